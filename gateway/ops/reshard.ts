/**
 * `fleet reshard` (docs/shards.md#changing-the-number-of-shards): offline, with every gateway
 * of the fleet stopped, move each agent's whole chain from the data dirs it is in now into
 * the data dir of the shard that owns it under the new count, then verify every chain there.
 *
 * What moves with an agent: its row (status, chain head and anchor, counters), its stimuli
 * (queued work and the dedup memory), its episodes with their event logs, its checkpoints, its
 * unsent outputs, its wake-ups and its budget usage. Every new data dir gets all spec versions and
 * code bundles (episodes name them), each timer's last fire and every canary rollout (they decide
 * which bundle each agent of a type runs); audit records and rejected messages go to shard 1. The
 * source dirs are only read (after being migrated to this release's schema, as a start would); the
 * new dirs are fresh, with gateway ids of their own.
 */
import { existsSync, readdirSync, readFileSync, realpathSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Client, InStatement, InValue } from "@libsql/client";
import { parse as parseToml } from "smol-toml";
import { processRuns } from "../pids.ts";
import { ownerShard, MAX_SHARDS, parseShard, shardClientId, type ShardSpec, shardLabel } from "../shard.ts";
import { idOfSql, secureDataDir, Store } from "../store/index.ts";
import { hadSessions, layoutSessions, sessionsAdded } from "./shard-sessions.ts";
import { verifyStore, type VerifyProblem } from "./verify.ts";
import { OperatorError } from "../errors.ts";

/** The command cannot run (a gateway is running, an output exists, an agent is in two dirs, …). */
export class ReshardError extends OperatorError {
  override readonly name = "ReshardError";
}

/** One new shard's data dir after the move. */
export interface ReshardTarget {
  readonly shard: string;
  readonly dir: string;
  readonly gateway: string;
  readonly agents: number;
  readonly checkpoints: number;
  readonly episodes: number;
  readonly stimuli: number;
  readonly problems: readonly VerifyProblem[];
}

/** What `fleet reshard` did. */
export interface ReshardReport {
  readonly from: readonly string[];
  readonly to: number;
  readonly targets: readonly ReshardTarget[];
  /** Agents moved, fleet-wide (each is in exactly one target). */
  readonly agents: number;
  /** True when every chain verified in its new data dir. */
  readonly verified: boolean;
  /**
   * Shards (`"i/N"`) of a layout some source belongs to that were not among the sources (only with
   * `partial`): their agents are not in the new layout.
   */
  readonly left_out: readonly string[];
  /**
   * Broker sessions the old layout had and the new one does not use (shard indexes; 0: the unsharded
   * `<client_id>`): the first start of new shard 1 ends them.
   */
  readonly ended_sessions: readonly number[];
  /**
   * Sessions the new layout uses that the old one did not have (shard indexes; 0: the unsharded
   * `<client_id>`): none exists on the broker until that gateway first connects, so readings published
   * for its agents before then are queued for nobody (docs/shards.md). Empty when no source says its layout.
   */
  readonly new_sessions: readonly number[];
  /**
   * Agents that read another broker session under the new layout than under the old one, of types without
   * a `dedup` key in the spec their source last ran, counted by type: a reading their old shard recorded
   * that their new session queued too (it was not read then) runs again, under another redelivery id.
   */
  readonly moved_without_dedup: readonly { readonly type: string; readonly agents: number }[];
}

/** How `reshard` runs. */
export interface ReshardOptions {
  /** Go on when the sources hold only some shards of their layout (their siblings' agents stay out). */
  readonly partial?: boolean;
}

/** Meta key: the shard a data dir `fleet reshard` wrote is, until its gateway first starts on it. */
const RESHARD_SHARD = "reshard.shard";
/**
 * Meta key (new shard 1's data dir): the broker sessions of the old layout the new one does not use, as
 * a JSON list of shard indexes (0: the unsharded gateway's `<client_id>`). Its gateway ends them once.
 */
const DROP_SESSIONS = "reshard.drop_sessions";

/** The same data dir named twice (by its real path), or undefined: `--from s1,s1` is a typo, not one source. */
export function repeatedDir(dirs: readonly string[]): string | undefined {
  const seen = new Set<string>();
  for (const d of dirs) {
    const real = existsSync(d) ? realpathSync(d) : resolve(d);
    if (seen.has(real)) return d;
    seen.add(real);
  }
  return undefined;
}

/** The data dir of new shard `i`: the prefix with the index appended. */
export function reshardDir(prefix: string, i: number): string {
  return resolve(`${prefix}${i}`);
}

/** Tables whose rows belong to one agent, with the column naming it. */
const AGENT_TABLES = [
  ["agents", "id"],
  ["stimuli", "agent"],
  ["episodes", "agent"],
  ["checkpoints", "agent"],
  ["wakeups", "agent"],
  ["budget_usage", "agent"],
] as const;

/** Refuse a data dir a live gateway runs on (its gateway.json names a live pid, started when it says). */
function assertStopped(dir: string): void {
  const file = join(dir, "gateway.json");
  if (!existsSync(file)) return;
  let g: { pid?: unknown; pid_start?: unknown; boot_id?: unknown };
  try {
    g = JSON.parse(readFileSync(file, "utf8")) as typeof g;
  } catch {
    return; // unreadable: not a running gateway's
  }
  const pid = Number(g.pid);
  // Gone, a zombie, or a reused pid: a kill -9 (or a power cut) left the file behind.
  const text = (v: unknown) => (typeof v === "string" ? v : null);
  if (!processRuns(pid, text(g.pid_start), text(g.boot_id))) return;
  throw new ReshardError(`a gateway (pid ${pid}) is running on ${dir}: stop every gateway of the fleet first`);
}

async function columns(client: Client, table: string): Promise<string[]> {
  return (await client.execute(`PRAGMA main.table_info(${table})`)).rows.map((r) => String(r.name));
}

/** Every agent a data dir holds anything of. */
async function agentsOf(client: Client): Promise<string[]> {
  const union = AGENT_TABLES.map(([t, c]) => `SELECT ${c} AS a FROM src.${t}`).join(" UNION ");
  return (await client.execute(`SELECT a FROM (${union}) ORDER BY a`)).rows.map((r) => String(r.a));
}

/**
 * Move the fleet's agents from `from` (data dirs, gateways stopped) into `count` new data dirs
 * `<outPrefix>1` … `<outPrefix><count>`, then verify every chain. Throws ReshardError before
 * writing anything when it cannot run; a verification failure is reported, not thrown.
 */
export async function reshard(
  from: readonly string[],
  count: number,
  outPrefix: string,
  opts: ReshardOptions = {},
): Promise<ReshardReport> {
  if (!Number.isInteger(count) || count < 1 || count > MAX_SHARDS)
    throw new ReshardError(`--to must be a shard count from 1 to ${MAX_SHARDS}`);
  const twice = repeatedDir(from);
  if (twice !== undefined) throw new ReshardError(`${twice} is named twice in --from: each data dir once`);
  const sources = from.map((d) => resolve(d));
  if (sources.length === 0) throw new ReshardError("--from needs at least one data dir");
  const outs = Array.from({ length: count }, (_, i) => reshardDir(outPrefix, i + 1));
  for (const dir of sources) {
    if (!existsSync(join(dir, "fleet.db"))) throw new ReshardError(`no fleet data in ${dir} (no fleet.db)`);
    assertStopped(dir);
    if (outs.includes(dir)) throw new ReshardError(`${dir} is both a source and an output: pick another --out`);
  }
  for (const dir of outs)
    if (existsSync(dir) && readdirSync(dir).length > 0)
      throw new ReshardError(`${dir} exists and is not empty: --out must name new data dirs`);

  // Each source must be at this release's schema (a start upgrades an older one; this refuses it), read through ATTACH.
  const layouts = new Map<string, ShardSpec>();
  let unsharded = false;
  // Each source's broker session (0: unsharded) and the types its spec gives a `dedup` key, where it knows them.
  const reads = new Map<string, { session: number; dedup: ReadonlySet<string> }>();
  for (const dir of sources) {
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "full" });
    try {
      const stored = await storedShard(store);
      if (stored.known && stored.shard) layouts.set(dir, stored.shard);
      else if (stored.known) unsharded = true;
      if (stored.known) reads.set(dir, { session: stored.shard?.index ?? 0, dedup: await dedupTypes(store) });
    } finally {
      await store.close();
    }
  }
  const leftOut = missingShards([...layouts.values()]);
  if (leftOut.length > 0 && !opts.partial)
    throw new ReshardError(
      `--from holds only part of a sharded layout: ${leftOut.join(", ")} ${leftOut.length === 1 ? "is" : "are"} ` +
        `not among the sources (${[...layouts].map(([d, s]) => `${d} is shard ${shardLabel(s)}`).join(", ")}), ` +
        "so those agents would be missing from the new layout. Add the missing shards' data dirs to --from, " +
        "or pass --partial to reshard only these",
    );
  const targets: Store[] = [];
  try {
    for (const dir of outs) {
      secureDataDir(dir);
      targets.push(await Store.open(join(dir, "fleet.db"), { synchronous: "full" }));
    }
    const { owners, sourceOf } = await planOwners(targets[0]!.client, sources, count);
    // Stimulus seqs of different sources must not collide in a target: each source's are shifted past the last's.
    let shift = 0;
    for (const [k, src] of sources.entries()) {
      const max = await copySource(targets, src, k, owners, shift);
      shift += max;
    }
    await copyRollouts(targets, sources);
    const report: ReshardTarget[] = [];
    const had = hadSessions([...layouts.values()], unsharded);
    const drop = [...had].filter((i) => !layoutSessions(count).includes(i)).sort((x, y) => x - y);
    const fresh = had.size === 0 ? [] : sessionsAdded(had, count);
    for (const [i, store] of targets.entries()) {
      // Until its gateway first starts on it, the new dir says which shard it is (a later reshard reads it).
      await store.setMeta(RESHARD_SHARD, `${i + 1}/${count}`);
      if (i === 0 && drop.length > 0) await store.setMeta(DROP_SESSIONS, JSON.stringify(drop));
      report.push(await check(store, outs[i]!, i + 1, count));
    }
    const moved = report.reduce((n, t) => n + t.agents, 0);
    return {
      from: sources,
      to: count,
      targets: report,
      agents: moved,
      verified: report.every((t) => t.problems.length === 0),
      left_out: leftOut,
      ended_sessions: drop,
      new_sessions: fresh,
      moved_without_dedup: movedWithoutDedup(owners, sourceOf, reads, count),
    };
  } catch (err) {
    for (const t of targets) await t.close().catch(() => undefined);
    targets.length = 0;
    for (const dir of outs) rmSync(dir, { recursive: true, force: true });
    throw err;
  } finally {
    for (const t of targets) await t.close().catch(() => undefined);
  }
}

/** What a data dir says about its shard; `known: false`: no gateway ran on it and `fleet reshard` did not write it. */
export type StoredShard = { readonly known: false } | { readonly known: true; readonly shard: ShardSpec | null };

/**
 * The shard a data dir is, as far as it knows: the `[fleet] shard` of the spec its gateway last ran
 * (the version whose instances it deployed at start; null when unsharded), else the one `fleet reshard`
 * wrote into it. A start on another shard is refused (gateway.ts), as it would strand or fork agents.
 */
export async function storedShard(store: Store): Promise<StoredShard> {
  const ran = await store.getMeta("instances_deployed");
  if (ran) {
    const rs = await store.client.execute({ sql: "SELECT text FROM spec_versions WHERE hash = ?", args: [ran] });
    const text = rs.rows[0]?.text;
    if (typeof text === "string") {
      try {
        const fleet = (parseToml(text) as { fleet?: { shard?: unknown } }).fleet;
        const s = typeof fleet?.shard === "string" ? parseShard(fleet.shard) : null;
        return { known: true, shard: typeof s === "string" ? null : s };
      } catch {
        // A stored spec always parsed once; if it does not now, the dir cannot tell.
      }
    }
  }
  const written = await store.getMeta(RESHARD_SHARD);
  const s = written ? parseShard(written) : null;
  return s === null || typeof s === "string" ? { known: false } : { known: true, shard: s };
}

/**
 * The client ids whose sessions this data dir's gateway is to end (`reshard.drop_sessions`): the shards
 * a reshard left out of the layout, named from the configured `client_id`.
 */
export async function sessionsToDrop(store: Store, clientId: string): Promise<string[]> {
  const raw = await store.getMeta(DROP_SESSIONS);
  let list: unknown;
  try {
    list = raw ? JSON.parse(raw) : [];
  } catch {
    list = [];
  }
  if (!Array.isArray(list)) return [];
  // A shard's session is named by its index alone (shardClientId).
  const ids = list.filter((i): i is number => Number.isInteger(i) && i >= 0);
  return ids.map((i) => shardClientId(clientId, i === 0 ? null : { index: i, count: i }));
}

/** Every session `sessionsToDrop` named has been ended. */
export async function sessionsDropped(store: Store): Promise<void> {
  await store.setMeta(DROP_SESSIONS, "[]");
}

/**
 * Why a gateway configured as `configured` must not start on a data dir that is `stored`, or null
 * when it may: the shard decides which agents the dir holds and which broker session it reads.
 */
export function shardChangeRefusal(dir: string, stored: StoredShard, configured: ShardSpec | null): string | null {
  if (!stored.known) return null;
  // One shard of one owns every agent, as an unsharded gateway does (`reshard --to 1` advises running it so).
  const label = (s: ShardSpec | null) => (s === null || s.count === 1 ? "unsharded" : shardLabel(s));
  const was = label(stored.shard);
  const now = configured === null ? "unsharded (no shard)" : `shard = "${shardLabel(configured)}"`;
  if (was === label(configured)) return null;
  const sameCount = stored.shard !== null && configured !== null && stored.shard.count === configured.count;
  return (
    `the data dir ${dir} is ${was === "unsharded" ? was : `shard ${was}`}; fleet.toml says ${now}. ` +
    (sameCount
      ? `Each shard keeps its own data dir: point data_dir at shard ${shardLabel(configured)}'s.`
      : "A new shard count needs `fleet reshard` with every gateway of the fleet stopped (docs/shards.md).") +
    " Nothing was changed"
  );
}

/** The shards (`"i/N"`) of each layout among `shards` that are not there themselves. */
function missingShards(shards: readonly ShardSpec[]): string[] {
  const out: string[] = [];
  for (const n of [...new Set(shards.map((s) => s.count))].sort((x, y) => x - y)) {
    const have = new Set(shards.filter((s) => s.count === n).map((s) => s.index));
    for (let i = 1; i <= n; i++) if (!have.has(i)) out.push(`${i}/${n}`);
  }
  return out;
}

/**
 * The agents whose broker session changes (their source's, known, against their new shard's; 0: unsharded)
 * and whose type has no `dedup` key in that source's spec, counted by type.
 */
function movedWithoutDedup(
  owners: ReadonlyMap<string, number>,
  sourceOf: ReadonlyMap<string, string>,
  reads: ReadonlyMap<string, { session: number; dedup: ReadonlySet<string> }>,
  count: number,
): { type: string; agents: number }[] {
  const byType = new Map<string, number>();
  for (const [agent, owner] of owners) {
    const was = reads.get(sourceOf.get(agent) ?? "");
    const type = agent.slice(0, agent.indexOf("/"));
    if (!was || was.session === (count === 1 ? 0 : owner) || was.dedup.has(type)) continue;
    byType.set(type, (byType.get(type) ?? 0) + 1);
  }
  return [...byType].sort(([x], [y]) => x.localeCompare(y)).map(([type, agents]) => ({ type, agents }));
}

/**
 * The agent types with a `dedup` key in the spec a data dir's gateway last ran, or, in a dir `fleet reshard`
 * wrote that no gateway ran on, its newest spec version (none known: empty).
 */
async function dedupTypes(store: Store): Promise<Set<string>> {
  const ran = await store.getMeta("instances_deployed");
  const rs = await store.client.execute(
    ran
      ? { sql: "SELECT text FROM spec_versions WHERE hash = ?", args: [ran] }
      : "SELECT text FROM spec_versions ORDER BY created_at DESC LIMIT 1",
  );
  const text = rs.rows[0]?.text;
  if (typeof text !== "string") return new Set();
  try {
    const agents = (parseToml(text) as { agents?: Record<string, { dedup?: unknown }> }).agents ?? {};
    return new Set(Object.entries(agents).flatMap(([t, a]) => (typeof a?.dedup === "string" ? [t] : [])));
  } catch {
    return new Set();
  }
}

/** Each agent's new shard and its source dir; an agent found in two source dirs is refused (which copy is right?). */
async function planOwners(
  client: Client,
  sources: readonly string[],
  count: number,
): Promise<{ owners: Map<string, number>; sourceOf: Map<string, string> }> {
  const seenIn = new Map<string, string>();
  const owners = new Map<string, number>();
  for (const src of sources) {
    await attach(client, src);
    try {
      for (const a of await agentsOf(client)) {
        const other = seenIn.get(a);
        if (other !== undefined)
          throw new ReshardError(`agent ${a} is in both ${other} and ${src}: each agent must be in one data dir`);
        seenIn.set(a, src);
        owners.set(a, ownerShard(a, count));
      }
    } finally {
      await client.execute("DETACH DATABASE src");
    }
  }
  return { owners, sourceOf: seenIn };
}

function attach(client: Client, dir: string): Promise<unknown> {
  return client.execute({ sql: "ATTACH DATABASE ? AS src", args: [join(dir, "fleet.db")] });
}

/**
 * Copy one source's rows into the targets; returns the highest stimulus seq it used (its
 * stimuli and the episodes naming them are shifted by `shift`).
 */
async function copySource(
  targets: readonly Store[],
  src: string,
  k: number,
  owners: ReadonlyMap<string, number>,
  shift: number,
): Promise<number> {
  let max = 0;
  for (const [i, store] of targets.entries()) {
    const client = store.client;
    await attach(client, src);
    try {
      const [{ maxSeq }] = (
        await client.execute(
          `SELECT max(coalesce((SELECT max(seq) FROM src.stimuli), 0),
            coalesce((SELECT max(stimulus_seq) FROM src.episodes), 0)) AS maxSeq`,
        )
      ).rows as unknown as [{ maxSeq: number }];
      max = Number(maxSeq);
      const mine = JSON.stringify([...owners].filter(([, o]) => o === i + 1).map(([a]) => a));
      const ids = "(SELECT value FROM json_each(?))";
      const stmts: { sql: string; args: (string | number)[] }[] = [];
      for (const [table, col] of AGENT_TABLES) {
        const cols = await columns(client, table);
        const select = cols.map((c) =>
          (table === "stimuli" && c === "seq") || (table === "episodes" && c === "stimulus_seq") ? `${c} + ?` : c,
        );
        const shifts = table === "stimuli" || table === "episodes" ? [shift] : [];
        stmts.push({
          sql: `INSERT INTO main.${table} (${cols.join(", ")}) SELECT ${select.join(", ")} FROM src.${table}
            WHERE ${col} IN ${ids} ${table === "stimuli" ? "ORDER BY seq" : ""}`,
          args: [...shifts, mine],
        });
      }
      // The outbox names an episode by its id's text; the episode row stores its bytes (store/hashes.ts).
      const episodes = `(SELECT ${idOfSql("id")} FROM src.episodes WHERE agent IN ${ids})`;
      // An episode's event log is its row's `log` column: it moved with the row above.
      // Unsent outputs of the moved episodes (ids are renumbered: nothing else names them).
      const out = (await columns(client, "outbox")).filter((c) => c !== "id");
      stmts.push({
        sql: `INSERT INTO main.outbox (${out.join(", ")}) SELECT ${out.join(", ")} FROM src.outbox
          WHERE episode IN ${episodes} ORDER BY id`,
        args: [mine],
      });
      // Every new dir can replay any episode: all spec versions and bundles, by content hash.
      for (const table of ["spec_versions", "bundles"]) {
        const cols = await columns(client, table);
        stmts.push({
          sql: `INSERT OR IGNORE INTO main.${table} (${cols.join(", ")}) SELECT ${cols.join(", ")} FROM src.${table}`,
          args: [],
        });
      }
      // A timer's last fire: the newest any source handled, so no shard fires it again.
      stmts.push({
        sql: `INSERT INTO main.meta (key, value) SELECT key, value FROM src.meta WHERE key LIKE 'timer:%' AND true
          ON CONFLICT (key) DO UPDATE SET value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
          AS TEXT)`,
        args: [],
      });
      if (i === 0) {
        // Fleet-wide records: the operator actions and the rejected messages, renumbered, on shard 1.
        for (const table of ["audit", "rejected_messages"]) {
          const cols = (await columns(client, table)).filter((c) => c !== "seq");
          stmts.push({
            sql: `INSERT INTO main.${table} (${cols.join(", ")}) SELECT ${cols.join(", ")} FROM src.${table}
              ORDER BY seq`,
            args: [],
          });
        }
      }
      await client.batch(stmts, "write");
    } catch (err) {
      throw new ReshardError(`copying from ${src} (source ${k + 1}) into ${store.path} failed: ${String(err)}`);
    } finally {
      await client.execute("DETACH DATABASE src");
    }
  }
  return max;
}

/** How far a rollout's state keeps its type's agents off the new code: the lower, the further. */
const CAUTION: Readonly<Record<string, number>> = { rolled_back: 0, aborted: 0, canary: 1 };

/** One source's rollout: its row as stored, and its steps. */
interface SourceRollout {
  readonly k: number;
  readonly row: Readonly<Record<string, unknown>>;
  readonly steps: readonly Readonly<Record<string, unknown>>[];
}

/**
 * Every source's rollouts and their steps into every target, renumbered alike from 1: the targets are
 * fresh, but the sources' ids collide. A gateway runs what each type's newest (highest id) rollout says
 * (fleet/rollouts.ts `start`), so the one that rules a type is numbered last: of the sources' newest,
 * those of the newest code, the most cautious. Shards judge their canaries apart: code one shard rolled
 * back and another promoted stays off every agent, whatever the order of `--from`.
 */
async function copyRollouts(targets: readonly Store[], sources: readonly string[]): Promise<void> {
  const client = targets[0]!.client;
  const read: SourceRollout[] = [];
  for (const [k, src] of sources.entries()) {
    await attach(client, src);
    try {
      const steps = (await client.execute("SELECT * FROM src.rollout_steps ORDER BY seq")).rows;
      for (const row of (await client.execute("SELECT * FROM src.rollouts ORDER BY id")).rows)
        read.push({ k, row, steps: steps.filter((s) => s.rollout === row.id) });
    } finally {
      await client.execute("DETACH DATABASE src");
    }
  }
  const type = (r: SourceRollout) => String(r.row.type);
  const byTime = (x: SourceRollout, y: SourceRollout) =>
    Number(x.row.started_at) - Number(y.row.started_at) || x.k - y.k || Number(x.row.id) - Number(y.row.id);
  const caution = (r: SourceRollout) => CAUTION[String(r.row.state)] ?? 2;
  // Each source's newest of each type (read in id order: the last one stays), oldest first.
  const newest = [...new Map(read.map((r) => [`${type(r)}\n${r.k}`, r])).values()].sort(byTime);
  const code = new Map(newest.map((r) => [type(r), r.row.to_bundle]));
  const ruling = new Map<string, SourceRollout>();
  for (const r of newest) {
    const now = ruling.get(type(r));
    if (r.row.to_bundle === code.get(type(r)) && (!now || caution(r) < caution(now))) ruling.set(type(r), r);
  }
  const last = new Set(ruling.values());
  const order = [...read.filter((r) => !last.has(r)).sort(byTime), ...[...last].sort(byTime)];
  const cols = (await columns(client, "rollouts")).filter((c) => c !== "id");
  const stmts: InStatement[] = order.flatMap((r, i) => [
    {
      sql: `INSERT INTO rollouts (id, ${cols.join(", ")}) VALUES (?${", ?".repeat(cols.length)})`,
      args: [i + 1, ...cols.map((c) => r.row[c] as InValue)],
    },
    ...r.steps.map((s) => ({
      sql: "INSERT INTO rollout_steps (rollout, at, step, detail) VALUES (?, ?, ?, ?)",
      args: [i + 1, s.at, s.step, s.detail] as InValue[],
    })),
  ]);
  for (const store of targets)
    await store.client.batch(stmts, "write").catch((err: unknown) => {
      throw new ReshardError(`copying the rollouts into ${store.path} failed: ${String(err)}`);
    });
}

/** Count what a new data dir holds and verify its chains (`fleet verify`). */
async function check(store: Store, dir: string, i: number, count: number): Promise<ReshardTarget> {
  const n = async (sql: string) => Number((await store.client.execute(sql)).rows[0]?.n ?? 0);
  const verify = await verifyStore(store);
  // Each agent is where its owner says (a second guard against a wrong plan).
  const wrong = (await store.client.execute("SELECT id FROM agents")).rows
    .map((r) => String(r.id))
    .filter((a) => ownerShard(a, count) !== i)
    .map((a) => ({ agent: a, record: `agent ${a}`, problem: `owned by shard ${ownerShard(a, count)}/${count}` }));
  return {
    shard: `${i}/${count}`,
    dir,
    gateway: store.gatewayId,
    agents: await n("SELECT count(*) AS n FROM agents"),
    checkpoints: verify.checkpoints,
    episodes: verify.episodes,
    stimuli: await n("SELECT count(*) AS n FROM stimuli"),
    problems: [...verify.problems, ...wrong],
  };
}
