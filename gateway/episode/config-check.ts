/**
 * Config schemas: an agent module may declare `defineAgent({ config: z.object(...) })`. Its
 * type's `config` table is checked against that schema before a spec version is deployed
 * (`fleet validate`, gateway start, hot redeploy), in the same sandboxed subprocess an
 * episode runs in: the schema is the agent's code, and agent code is not run in the gateway.
 */
import type { ConfigCheck } from "../../agents/protocol.ts";
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
 * of such types costs no subprocess. `pool`: warm spares to run the checks in.
 */
export async function checkConfigs(
  types: readonly AgentTypeSpec[],
  spawn: SpawnOptions,
  pool?: SparePool,
): Promise<ConfigProblem[]> {
  const problems: ConfigProblem[] = [];
  const queue = types.filter((t) => !noSchema.has(stampOrPath(t.module_path)));
  const worker = async () => {
    for (let type = queue.shift(); type; type = queue.shift()) problems.push(...(await checkType(type, spawn, pool)));
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

async function checkType(type: AgentTypeSpec, spawn: SpawnOptions, pool?: SparePool): Promise<ConfigProblem[]> {
  const stamp = stampOrPath(type.module_path);
  const check = await checkModule(type, type.module_path, spawn, pool);
  if (!check || !Array.isArray(check.issues)) return [];
  if (check.schema === false) noSchema.add(stamp);
  return check.issues.map((i) => {
    const path = ["agents", type.name, "config", ...i.path];
    return { type: type.name, keyPath: formatKeyPath(path), path, message: `${i.message} (the agent's config schema)` };
  });
}

/**
 * The state version (`defineAgent({ version })`) of the code at `module` (a type's bundle, say),
 * read in the sandbox like a config check; null when the module cannot load.
 */
export async function moduleVersion(type: AgentTypeSpec, module: string, spawn: SpawnOptions): Promise<number | null> {
  const check = await checkModule(type, module, spawn);
  return check ? (check.version ?? 1) : null;
}

/** Load `module` in a sandboxed subprocess in `check` mode: what it says, or null when it cannot load. */
async function checkModule(
  type: AgentTypeSpec,
  module: string,
  spawn: SpawnOptions,
  pool?: SparePool,
): Promise<ConfigCheck | null> {
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
  // A module that cannot load is reported by its episodes as before; only the schema's verdict refuses a deploy.
  if (!r.ok) return null;
  return r.state as ConfigCheck | null;
}
