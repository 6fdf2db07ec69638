/**
 * Config schemas: an agent module may declare `defineAgent({ config: z.object(...) })`. Its
 * type's `config` table is checked against that schema before a spec version is deployed
 * (`fleet validate`, gateway start, hot redeploy), in the same sandboxed subprocess an
 * episode runs in: the schema is the agent's code, and agent code is not run in the gateway.
 */
import { type ConfigCheck, parseConfigCheck } from "../../agents/protocol.ts";
import {
  type AgentTypeSpec,
  type FleetSpec,
  formatKeyPath,
  reportProblems,
  SpecError,
  type SpecVersion,
} from "../spec/index.ts";
import { CHILD_LIMITS } from "./records.ts";
import { runEpisode, type RunLimits } from "./runner.ts";
import type { SparePool } from "./host-process.ts";
import type { SpawnOptions } from "./sandbox.ts";
import { moduleStamp } from "./sandbox-view.ts";

/** One complaint about a type's config (or its module, when it cannot be checked at all). */
export interface ConfigProblem {
  readonly type: string;
  /** Key path in fleet.toml, e.g. `agents.door.config.open_after` (`path` written out). */
  readonly keyPath: string;
  readonly path: readonly PropertyKey[];
  readonly message: string;
}

/** Most checks run at once (each is one subprocess). */
const PARALLEL = 2;

/** Modules (by closure stamp) known to declare no config schema: nothing to check until their code changes. */
const noSchema = new Set<string>();

/**
 * Check each type's config against its module's schema; types without a schema pass. A
 * module seen without a schema is not loaded again until its files change, so a redeploy
 * of such types costs no subprocess. `pool`: warm spares to run the checks in. A module that
 * can never run (no default export made by `defineAgent()`, it throws when loaded) is a problem
 * at `agents.<type>.module` too, unless `modules` is false (a start: a version that ran before
 * is checked against the module files as they are now, and a reload would have refused them).
 */
export async function checkConfigs(
  types: readonly AgentTypeSpec[],
  spawn: SpawnOptions,
  pool?: SparePool,
  opts: { readonly modules?: boolean } = {},
): Promise<ConfigProblem[]> {
  const problems: ConfigProblem[] = [];
  const queue = types.filter((t) => !noSchema.has(stampOrPath(t.module_path)));
  const modules = opts.modules ?? true;
  const worker = async () => {
    for (let type = queue.shift(); type; type = queue.shift())
      problems.push(...(await checkType(type, spawn, pool, modules)));
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
  return problems.sort((a, b) => a.keyPath.localeCompare(b.keyPath));
}

/** The types of `next` whose module or config differ from `current` (all of them when there is none). */
export function typesToCheck(next: FleetSpec, current: FleetSpec | null): AgentTypeSpec[] {
  return Object.values(next.agents).filter((t) => {
    const before = current?.agents[t.name];
    return (
      !before || before.module_path !== t.module_path || JSON.stringify(before.config) !== JSON.stringify(t.config)
    );
  });
}

/** The error for `problems` of `sv`'s agent configs, each placed at its line and column in the file. */
export function configProblemsError(sv: SpecVersion, problems: readonly ConfigProblem[]): SpecError {
  const r = reportProblems(sv.path, sv.text, problems);
  return new SpecError(sv.path, r.detail, r.line, r.column, r.keyPath);
}

function stampOrPath(module: string): string {
  try {
    return moduleStamp(module);
  } catch {
    return module;
  }
}

async function checkType(
  type: AgentTypeSpec,
  spawn: SpawnOptions,
  pool: SparePool | undefined,
  modules: boolean,
): Promise<ConfigProblem[]> {
  const stamp = stampOrPath(type.module_path);
  const check = await checkModule(type, type.module_path, spawn, pool);
  if (check !== null && "invalid" in check) {
    if (!modules) return [];
    const path = ["agents", type.name, "module"];
    return [{ type: type.name, keyPath: formatKeyPath(path), path, message: check.invalid }];
  }
  if (!check) return [];
  if (check.schema === false) noSchema.add(stamp);
  return check.issues.map((i) => {
    const path = ["agents", type.name, "config", ...i.path];
    return { type: type.name, keyPath: formatKeyPath(path), path, message: `${i.message} (the agent's config schema)` };
  });
}

/**
 * The state version (`defineAgent({ version })`) of the code at `module` (a type's bundle, say),
 * read in the sandbox like a config check: `invalid` says why it can never run (no default export
 * made by `defineAgent()`, it throws when loaded); null when the check itself failed.
 */
export async function moduleVersion(
  type: AgentTypeSpec,
  module: string,
  spawn: SpawnOptions,
): Promise<{ version: number } | { invalid: string } | null> {
  const check = await checkModule(type, module, spawn);
  if (check === null || "invalid" in check) return check;
  return { version: check.version ?? 1 };
}

/**
 * Load `module` in a sandboxed subprocess in `check` mode: what it says; `invalid` (naming the type's
 * `module` as fleet.toml writes it) when it can never run; null when the check failed otherwise.
 */
async function checkModule(
  type: AgentTypeSpec,
  module: string,
  spawn: SpawnOptions,
  pool?: SparePool,
): Promise<ConfigCheck | { invalid: string } | null> {
  const limits: RunLimits = {
    timeoutMs: Math.max(type.budget.episode_timeout_ms, 10_000),
    memoryMb: type.budget.memory_mb,
    maxRecords: 100,
    maxRecordBytes: 256 * 1024,
    maxOpenFiles: 256,
    maxProcesses: 4096,
  };
  const r = await runEpisode(
    {
      t: "start",
      episode: "00000000-0000-7000-8000-000000000000",
      agent: { type: type.name, key: "config-check", id: `${type.name}/config-check` },
      module,
      config: type.config,
      state: null,
      fresh: true,
      stimulus: { id: "config-check", kind: "manual", payload: null, received_at: 0 },
      replay: null,
      limits: CHILD_LIMITS,
      wakes: { pending: [], max: type.max_wakeups },
      mode: "check",
    },
    limits,
    async () => ({ ok: false, result: { error: "denied", reason: "a config check calls no tools" } }),
    spawn,
    pool,
  );
  // A module that cannot run refuses a deploy. Any other failure (a package the sandbox cannot resolve
  // from the source, a crash) is reported by the episodes: only the module's own verdict refuses.
  if (!r.ok && r.kind === "invalid_module") {
    const why = r.message.startsWith(module) ? r.message.slice(module.length).trimStart() : r.message;
    return { invalid: `${type.module} cannot run: it ${why}` };
  }
  if (!r.ok) return null;
  // The module's top level ran in that process and can write to the channel before the host does:
  // its answer is taken only in the shape the host gives it (a forged version would be stamped on state).
  const check = parseConfigCheck(r.state);
  return check ?? { invalid: `${type.module} cannot run: its config check answered out of shape` };
}
