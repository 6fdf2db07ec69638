/**
 * The replay gate (docs/upgrading.md, `fleet deploy --check`, `POST /api/deploy/check`): before a
 * fleet.toml is applied, replay recorded history against what it would change. For each agent
 * type whose module, code or config differs from the running spec, the last N committed episodes of a
 * stable sample of its agents are replayed (./replay.ts) on the candidate's code (its bundle) and
 * config, and counted MATCH / DIVERGED / FAILED / UNREPLAYABLE. Nothing is applied: the check reads
 * the store (the candidate's bundle files aside) and runs each episode in a fresh sandboxed
 * subprocess, like `fleet replay --module`.
 */
import { and, desc, eq } from "drizzle-orm";
import { blake3Hex, canonicalJson } from "../hash.ts";
import type { SpawnOptions } from "../episode/index.ts";
import type { AgentTypeSpec, FleetSpec, SpecVersion } from "../spec/index.ts";
import { tables as t, type Store } from "../store/index.ts";
import type { AgentId, Blake3Hex } from "../types.ts";
import { type Divergence, replayOrUnreplayable, type ReplayResult } from "./replay.ts";

/** The verdict of one replayed episode in a deploy check. */
export type CheckVerdict = "MATCH" | "DIVERGED" | "FAILED" | "UNREPLAYABLE";

/** The first episode of a type that the candidate changes (DIVERGED or FAILED). */
export interface CheckFinding {
  readonly episode: string;
  readonly agent: string;
  readonly verdict: "DIVERGED" | "FAILED";
  readonly divergence: Divergence;
}

/** What the check found for one changed type. */
export interface TypeCheck {
  readonly type: string;
  /** What changed: "module a.ts -> b.ts", "config", or "forced" (named with `--type`). */
  readonly changed: readonly string[];
  /** The sampled agents, in the stable order they were chosen. */
  readonly agents: readonly string[];
  readonly episodes: number;
  readonly counts: Readonly<Record<CheckVerdict, number>>;
  readonly first: CheckFinding | null;
}

/** The whole answer. `ok` is false when any episode DIVERGED or FAILED, or a reload would refuse the file. */
export interface DeployCheckReport {
  readonly ok: boolean;
  /**
   * The candidate file, and the spec version hash the gateway would give it if it applied it now (its
   * text with its bundles): the running spec's own hash when neither the file nor its code changed.
   */
  readonly candidate: { readonly path: string; readonly hash: string };
  /** The spec version the candidate is compared with (null: none stored yet). */
  readonly running: string | null;
  readonly types: readonly TypeCheck[];
  /** Types the candidate adds (no history to replay). */
  readonly added: readonly string[];
  /** Types present in both whose module and config are the same. */
  readonly unchanged: readonly string[];
  /**
   * Why the gateway would refuse the candidate whatever the replays say (a module that does not
   * bundle; code whose state version is lower than the one that wrote its agents' state).
   */
  readonly refusals: readonly string[];
}

/** A module bundled for a check: its hash and the file the sandbox runs. */
export interface Built {
  readonly hash: string;
  readonly file: () => Promise<string>;
}

/** How much history a check replays. */
export interface DeployCheckOptions {
  /** Committed episodes per sampled agent, newest first (default 20). */
  readonly episodes?: number;
  /** Agents sampled per type (default 5). */
  readonly agents?: number;
  /** Types to check even when unchanged (an edited module file the spec cannot see). */
  readonly force?: readonly string[];
  /** Only these types (the reload gate checks the types that require it). */
  readonly only?: readonly string[];
  /** Replays run at once (each is a subprocess; default 2). */
  readonly concurrency?: number;
  /**
   * For a candidate whose code is not pinned yet (a file, not a reload): bundle a type's module as
   * the gateway would pin it (gateway/code; nothing stored) and give its hash and the file the
   * sandbox runs, or why it does not bundle (the bundler's error). An edited module file is then a code
   * change even when fleet.toml names the same path, and the replay runs what the gateway would run.
   */
  readonly build?: (modulePath: string) => Promise<Built | { readonly error: string }>;
  /** The file of a stored bundle: a pinned candidate (a reload) is replayed on its own bundle. */
  readonly bundleFile?: (hash: string) => Promise<string>;
  /** The gateway runs `running`: the candidate would be a hot reload, which refuses keys read at start. */
  readonly live?: boolean;
}

/**
 * What changed in a type between the running spec and the candidate; empty when nothing replayable
 * did. `from` and `to` are the code bundles (gateway/code) when known: `to` undefined means unknown,
 * null that the candidate's module does not bundle.
 */
export function typeChanges(
  before: AgentTypeSpec,
  after: AgentTypeSpec,
  from?: string | null,
  to?: string | null,
): string[] {
  const out: string[] = [];
  if (before.module_path !== after.module_path) out.push(`module ${before.module} -> ${after.module}`);
  else if (from && to === null) out.push("code: the module does not bundle");
  else if (from && to && from !== to) out.push(`code ${from.slice(0, 12)} -> ${to.slice(0, 12)}`);
  if (canonicalJson(before.config) !== canonicalJson(after.config)) out.push("config");
  return out;
}

/**
 * Why `module` (new code for `type`) may not be deployed: it can never run (no default export made by
 * `defineAgent()`, it throws when loaded), or its state version (`defineAgent({ version })`) is lower
 * than the one that wrote its agents' state (docs/upgrading.md); null when it may.
 */
export async function loweredVersion(
  store: Store,
  type: AgentTypeSpec,
  module: string,
  spawn: SpawnOptions,
): Promise<string | null> {
  const { moduleVersion } = await import("../episode/index.ts");
  const loaded = await moduleVersion(type, module, spawn);
  if (loaded !== null && "invalid" in loaded) return `agents.${type.name}.module ${loaded.invalid}`;
  const stored = await store.maxStateVersion(type.name);
  const version = loaded?.version ?? null;
  if (version === null || version >= stored) return null;
  return (
    `agents.${type.name}.module is version ${version} (defineAgent({ version })), lower than version ${stored} ` +
    "that wrote its agents' state: a deploy may not lower version"
  );
}

/** A stored spec version as it ran: compiled from its text, with the hash and code bundles stored with it. */
export async function storedVersion(row: {
  readonly hash: string;
  readonly path: string;
  readonly text: string;
  readonly bundles: string | null;
}): Promise<SpecVersion> {
  const { compileSpec } = await import("../spec/index.ts");
  const sv = await compileSpec(row.text, row.path);
  const bundles = row.bundles ? (JSON.parse(row.bundles) as Record<string, Blake3Hex>) : {};
  return Object.freeze({ ...sv, hash: row.hash as Blake3Hex, bundles: Object.freeze(bundles) });
}

/** The spec version a check compares with: `hash` when given and stored, else the newest stored. */
export async function storedSpec(store: Store, hash?: string): Promise<SpecVersion | null> {
  const row = hash
    ? await store.db.query.specVersions.findFirst({ where: (v, { eq }) => eq(v.hash, hash) })
    : (await store.listSpecVersions(1))[0];
  return row ? storedVersion(row) : null;
}

/**
 * Up to `n` agents of a type that have committed episodes, in a stable order (by the BLAKE3 of
 * the agent id): the same fleet gives the same sample on every run.
 */
async function sampleAgents(store: Store, type: string, n: number): Promise<AgentId[]> {
  const { rows } = await store.listAgents({ type, limit: 1_000_000 });
  const ranked = await Promise.all(rows.map(async (a) => ({ id: a.id as AgentId, rank: await blake3Hex(a.id) })));
  ranked.sort((x, y) => (x.rank < y.rank ? -1 : x.rank > y.rank ? 1 : 0));
  const out: AgentId[] = [];
  for (const a of ranked) {
    if (out.length >= n) break;
    if ((await lastCommitted(store, a.id, 1)).length > 0) out.push(a.id);
  }
  return out;
}

/** An agent's newest `n` committed episode ids, replayed oldest first. */
async function lastCommitted(store: Store, agent: AgentId, n: number): Promise<string[]> {
  const e = t.episodes;
  const rows = await store.db
    .select({ id: e.id })
    .from(e)
    .where(and(eq(e.agent, agent), eq(e.status, "committed")))
    .orderBy(desc(e.startedAt), desc(e.id))
    .limit(n)
    .all();
  return rows.map((r) => r.id).reverse();
}

/** A replay's verdict as the gate counts it: a committed episode the candidate fails on is FAILED. */
function verdictOf(r: ReplayResult): CheckVerdict {
  if (r.verdict !== "DIVERGED") return r.verdict;
  return r.divergence.at === "outcome" && r.divergence.expected === "committed" ? "FAILED" : "DIVERGED";
}

/** Run `fn` over `items`, `limit` at a time, results in input order. */
async function pool<T, R>(items: readonly T[], limit: number, fn: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < items.length; i = next++) out[i] = await fn(items[i]!);
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  return out;
}

/** Replay one changed type's sampled history on the candidate. */
async function checkType(
  store: Store,
  type: AgentTypeSpec,
  changed: readonly string[],
  spawn: SpawnOptions,
  o: Required<Pick<DeployCheckOptions, "episodes" | "agents" | "concurrency">> & { module: () => Promise<string> },
): Promise<TypeCheck> {
  const agents = await sampleAgents(store, type.name, o.agents);
  const episodes = (await Promise.all(agents.map((a) => lastCommitted(store, a, o.episodes)))).flat();
  const results = await pool(episodes, o.concurrency, async (id): Promise<ReplayResult> => {
    try {
      // A stored log that cannot be read is damage to history, not the candidate's failure.
      return await replayOrUnreplayable(store, id, spawn, await o.module(), type);
    } catch (err) {
      // A replay that cannot even run the candidate is the candidate's failure.
      const message = err instanceof Error ? err.message : String(err);
      return {
        episode: id,
        agent: "?",
        verdict: "DIVERGED",
        divergence: { at: "outcome", expected: "committed", actual: message },
      };
    }
  });
  const counts: Record<CheckVerdict, number> = { MATCH: 0, DIVERGED: 0, FAILED: 0, UNREPLAYABLE: 0 };
  let first: CheckFinding | null = null;
  for (const r of results) {
    const v = verdictOf(r);
    counts[v]++;
    if (!first && r.verdict === "DIVERGED" && (v === "DIVERGED" || v === "FAILED"))
      first = { episode: r.episode, agent: r.agent, verdict: v, divergence: r.divergence };
  }
  return { type: type.name, changed, agents, episodes: episodes.length, counts, first };
}

/**
 * Check `candidate` against `running` (the spec version the fleet runs; null when none is stored):
 * replay the history of every type whose module, code or config the candidate changes.
 */
export async function deployCheck(
  store: Store,
  running: SpecVersion | null,
  candidate: SpecVersion,
  spawn: SpawnOptions,
  opts: DeployCheckOptions = {},
): Promise<DeployCheckReport> {
  const o = { episodes: opts.episodes ?? 20, agents: opts.agents ?? 5, concurrency: opts.concurrency ?? 2 };
  const before: FleetSpec["agents"] = running?.spec.agents ?? {};
  const added: string[] = [];
  const unchanged: string[] = [];
  const types: TypeCheck[] = [];
  const refusals: string[] = [];
  // Each module bundled once: for its type's check, and for the spec version the candidate would be.
  // undefined: not built here (pinned already, or no builder); null: it does not bundle (`unbundled` says why).
  const builds = new Map<string, Promise<Built | null | undefined>>();
  const unbundled = new Map<string, string>();
  const buildOf = (type: AgentTypeSpec) => {
    const build = opts.build;
    if (candidate.bundles[type.name] !== undefined || !build) return Promise.resolve(undefined);
    let b = builds.get(type.name);
    if (!b) {
      b = build(type.module_path).then((r) => {
        if ("hash" in r) return r;
        unbundled.set(type.name, r.error.split("\n")[0] ?? r.error);
        return null;
      });
      builds.set(type.name, b);
    }
    return b;
  };
  for (const [name, type] of Object.entries(candidate.spec.agents)) {
    if (opts.only && !opts.only.includes(name)) continue;
    const old = before[name];
    if (!old) {
      added.push(name);
      continue;
    }
    const from = running?.bundles[name] ?? null;
    const pinned = candidate.bundles[name];
    const built = await buildOf(type);
    const to = pinned ?? (built === undefined ? undefined : (built?.hash ?? null));
    const changed = typeChanges(old, type, from, to);
    if (changed.length === 0 && opts.force?.includes(name)) changed.push("forced");
    // The candidate's bundle (what the gateway would run), else its module file.
    const bundleFile = opts.bundleFile;
    const module = () =>
      pinned && bundleFile ? bundleFile(pinned) : built ? built.file() : Promise.resolve(type.module_path);
    if (changed.length === 0) unchanged.push(name);
    else types.push(await checkType(store, type, changed, spawn, { ...o, module }));
    // A candidate pinned already (a reload) had these checks when it was pinned.
    if (built && built.hash !== from) {
      const lowered = await loweredVersion(store, type, await module(), spawn);
      if (lowered !== null) refusals.push(lowered);
    }
  }
  const [{ restartNeeded }, { withBundles }] = await Promise.all([
    import("../spec/index.ts"),
    import("../code/index.ts"),
  ]);
  const restart = opts.live && running ? restartNeeded(running.spec, candidate.spec) : [];
  if (restart.length > 0) refusals.push(`needs restart: ${restart.join(", ")}`);
  for (const type of Object.values(candidate.spec.agents))
    if ((await buildOf(type)) === null)
      refusals.push(`agents.${type.name}.module ${type.module} does not bundle: ${unbundled.get(type.name)}`);
  // The candidate's hash as the gateway would store it if it applied the file now: its text's hash
  // with its bundles (a module that cannot be bundled runs from its file, as the gateway would run it).
  const bundles: Record<string, Blake3Hex> = { ...candidate.bundles };
  for (const type of Object.values(candidate.spec.agents)) {
    const built = await buildOf(type);
    if (built) bundles[type.name] = built.hash as Blake3Hex;
  }
  return {
    ok: refusals.length === 0 && types.every((c) => c.counts.DIVERGED + c.counts.FAILED === 0),
    candidate: { path: candidate.path, hash: (await withBundles(candidate, bundles)).hash },
    running: running?.hash ?? null,
    types,
    added,
    unchanged,
    refusals,
  };
}

/** The report as the CLI prints it. */
export function describeDeployCheck(r: DeployCheckReport): string {
  const lines = [
    `deploy check of ${r.candidate.path} (spec ${r.candidate.hash.slice(0, 12)}) against ` +
      (r.running === r.candidate.hash
        ? "the running spec, the same version"
        : r.running
          ? `the running spec ${r.running.slice(0, 12)}`
          : "no stored spec"),
  ];
  for (const c of r.types) {
    const n = c.counts;
    lines.push(
      `  ${c.type} (${c.changed.join(", ")}): ${c.agents.length} agent(s), ${c.episodes} episode(s): ` +
        `${n.MATCH} MATCH, ${n.DIVERGED} DIVERGED, ${n.FAILED} FAILED, ${n.UNREPLAYABLE} UNREPLAYABLE`,
    );
    if (c.first) {
      const d = c.first.divergence;
      lines.push(
        `    first ${c.first.verdict}: ${c.first.agent} episode ${c.first.episode} at ${d.at}`,
        `      expected ${JSON.stringify(d.expected)}`,
        `      actual   ${JSON.stringify(d.actual)}`,
      );
    }
  }
  if (r.types.length === 0) lines.push("  no type's module, code or config changed: nothing to replay");
  if (r.added.length > 0) lines.push(`  new (no history): ${r.added.join(", ")}`);
  if (r.unchanged.length > 0) lines.push(`  unchanged: ${r.unchanged.join(", ")}`);
  for (const why of r.refusals) lines.push(`  refused: ${why}`);
  const bad = r.types.reduce((s, c) => s + c.counts.DIVERGED + c.counts.FAILED, 0);
  const reasons = [
    ...(bad > 0 ? [`${bad} episode(s) DIVERGED or FAILED`] : []),
    ...(r.refusals.length > 0 ? ["a reload would refuse it"] : []),
  ];
  lines.push(r.ok ? "OK" : `NOT OK: ${reasons.join("; ")}`);
  return lines.join("\n");
}

/**
 * The hot-reload gate: the types whose module, code or config `next` changes and that require the check
 * (`[agents.<t>.rollout] require_check` in the running spec or in `next`, so one edit cannot both
 * turn the gate off and slip a change through). Why `next` must not be applied, or null.
 */
export async function reloadGate(
  store: Store,
  current: SpecVersion,
  next: SpecVersion,
  spawn: SpawnOptions,
  bundleFile?: (hash: string) => Promise<string>,
): Promise<string | null> {
  const gated = Object.entries(next.spec.agents).flatMap(([name, type]) => {
    const old = current.spec.agents[name];
    if (!old || !(old.rollout.require_check || type.rollout.require_check)) return [];
    return typeChanges(old, type, current.bundles[name] ?? null, next.bundles[name]).length > 0 ? [name] : [];
  });
  if (gated.length === 0) return null;
  const r = await deployCheck(store, current, next, spawn, { only: gated, bundleFile });
  if (r.ok) return null;
  const failed = r.types.filter((c) => c.counts.DIVERGED + c.counts.FAILED > 0);
  return failed
    .map((c) => {
      const f = c.first;
      const first = f ? ` (first ${f.verdict}: ${f.agent} episode ${f.episode} at ${f.divergence.at})` : "";
      return (
        `deploy check failed for ${c.type}: ${c.counts.DIVERGED} DIVERGED, ${c.counts.FAILED} FAILED ` +
        `of ${c.episodes} replayed episode(s)${first}`
      );
    })
    .join("; ");
}
