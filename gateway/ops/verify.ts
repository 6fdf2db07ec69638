/**
 * `fleet verify`: recompute every checkpoint hash, every chain link and every episode's
 * event-log hash. Collected checkpoints (tombstones) keep their hash and links, so the
 * chain still verifies after GC.
 */
import { bundleOfSql, hashEvents, verifyCheckpointRow, IntegrityError } from "../store/index.ts";
import type { AgentRow, CheckpointRow, EpisodeRow, EventRow, Store } from "../store/index.ts";
import { blake3Hex, hashValue } from "../hash.ts";
import type { AgentId } from "../types.ts";
import { readEvents } from "./events.ts";
import { errorReason } from "../errors.ts";

/** One broken record. */
export interface VerifyProblem {
  readonly agent: string;
  readonly record: string;
  readonly problem: string;
}

/** What verify looked at and what it found. */
export interface VerifyReport {
  /** Agents the source has (an agent listed in `only` that it has no row, checkpoint or episode of is not one). */
  readonly agents: number;
  readonly checkpoints: number;
  readonly episodes: number;
  readonly problems: VerifyProblem[];
}

/** A hash as problems quote it: its first 16 characters. */
const short = (hash: unknown): string => String(hash).slice(0, 16);

/**
 * What verify reads of an agent row. `tombstonedSeq` (retention's frontier, migration 29) only where the
 * source keeps it: states are collected at or below it, never above.
 */
export type ChainAgent = Pick<AgentRow, "anchorSeq" | "anchorHash" | "headSeq" | "headHash" | "episodes"> & {
  readonly tombstonedSeq?: number;
};

/**
 * Where verify reads chains from: the local store, or one gateway's rows in the central
 * database (gateway/replication/). Rows come in the local row shapes.
 */
export interface ChainSource {
  /** Every agent that has at least one checkpoint or episode, and (the local store) each whose row has a head. */
  agents(): Promise<string[]>;
  /** An agent's checkpoints, oldest first (a source may stream them: verify holds one at a time). */
  checkpoints(agent: string): AsyncIterable<CheckpointRow> | Promise<Iterable<CheckpointRow>>;
  /** The agent row's chain anchor, head and counts. */
  agent(agent: string): Promise<ChainAgent | undefined>;
  /** An agent's episodes in id order after `afterId`. */
  episodes(agent: string, afterId: string, limit: number): Promise<EpisodeRow[]>;
  /** The events of these episodes, ordered by episode and seq; throws when a log cannot be read. */
  events(episodes: readonly string[]): Promise<EventRow[]>;
  /**
   * Run `read` with every read of this source seeing one state of the data, so that the rows one commit
   * writes together (an agent's head, its newest checkpoint, the episode that sealed it) are seen all or
   * none: verify reads an agent's row, chain and episodes in separate statements while a running gateway
   * commits. Absent: reads are not isolated from one another.
   */
  consistent?<T>(read: () => Promise<T>): Promise<T>;
}

/** The local store as a chain source. */
export function storeChains(store: Store): ChainSource {
  return {
    // Agents with a chain, those with episodes but none (every stimulus so far failed), and those whose
    // row has a head: a chain lost whole (checkpoints and episodes) is named, not skipped.
    agents: async () =>
      (
        await store.client.execute(`SELECT agent FROM checkpoints UNION SELECT id FROM agents a
          WHERE a.head_seq > 0 OR EXISTS (SELECT 1 FROM episodes e WHERE e.agent = a.id)`)
      ).rows.map((r) => String(r[0])),
    checkpoints: (agent) => store.listCheckpoints(agent as AgentId),
    agent: async (agent) => {
      const row = await store.getAgent(agent as AgentId);
      return row && { ...row, tombstonedSeq: await tombstonedSeq(store, agent) };
    },
    episodes: (agent, after, limit) => store.scanEpisodes(agent as AgentId, after, limit),
    events: (ids) => readEvents(store, ids),
    // `fleet verify` on the data dir of a running gateway: without a snapshot, an episode committed
    // between two reads showed as a broken chain (a head behind its newest checkpoint, a count short).
    consistent: (read) => store.readSnapshot(read),
  };
}

/** Retention's frontier of an agent; undefined in a data dir from before it (opened read-only, not upgraded). */
async function tombstonedSeq(store: Store, agent: string): Promise<number | undefined> {
  try {
    const rs = await store.client.execute({ sql: "SELECT tombstoned_seq FROM agents WHERE id = ?", args: [agent] });
    return rs.rows.length > 0 ? Number(rs.rows[0]![0]) : undefined;
  } catch {
    return undefined;
  }
}

/** Verify every agent (or those listed); with every agent, also the count of episodes naming each bundle. */
export async function verifyStore(store: Store, only?: readonly AgentId[]): Promise<VerifyReport> {
  const report = await verifyChains(storeChains(store), only);
  if (!only?.length)
    // One snapshot: code retention may delete a bundle between the listing and the read of its code.
    report.problems.push(
      ...(await store.readSnapshot(async () => [
        ...(await bundleUseProblems(store)),
        ...(await contentProblems(store)),
      ])),
    );
  return report;
}

/**
 * Stored code bundles and spec versions against the hashes that name them: a bundle is the BLAKE3 of
 * its code; a spec version the BLAKE3 of its text, or with code pinned, of that hash and its bundles
 * (gateway/code `withBundles`). Replay runs the stored code, so damage there is damage to history.
 */
async function contentProblems(store: Store): Promise<VerifyProblem[]> {
  const problems: VerifyProblem[] = [];
  // One row at a time: bundles are up to megabytes each.
  const bundleHashes = (await store.client.execute("SELECT hash FROM bundles ORDER BY hash")).rows;
  for (const { hash } of bundleHashes) {
    const rs = await store.client.execute({ sql: "SELECT code FROM bundles WHERE hash = ?", args: [String(hash)] });
    const code = String(rs.rows[0]?.[0] ?? "");
    if ((await blake3Hex(code)) !== hash)
      problems.push({ agent: "", record: `bundle ${short(hash)}`, problem: "stored code does not match its hash" });
  }
  const specs = await store.client.execute("SELECT hash, text, bundles FROM spec_versions ORDER BY created_at");
  for (const { hash, text, bundles } of specs.rows) {
    const ok = await specHash(String(text), bundles === null ? null : String(bundles)).then(
      (h) => h === hash,
      () => false, // bundles that are not JSON
    );
    if (!ok)
      problems.push({
        agent: "",
        record: `spec version ${short(hash)}`,
        problem: "stored fleet.toml text (or its code) does not match its hash",
      });
  }
  return problems;
}

/** A spec version's hash from its stored text and bundles (JSON), as gateway/code `withBundles` makes it. */
async function specHash(text: string, bundles: string | null): Promise<string> {
  const textHash = await blake3Hex(text);
  return bundles === null ? textHash : hashValue({ spec: textHash, bundles: JSON.parse(bundles) });
}

/**
 * Whether `bundle_uses` (kept by triggers, read by code retention) counts the episodes that name each
 * bundle: a count too low would let retention delete code an episode still names.
 */
async function bundleUseProblems(store: Store): Promise<VerifyProblem[]> {
  const rs = await store.client.execute(
    `SELECT ${bundleOfSql("bundle")} AS bundle, sum(n) AS named, sum(c) AS counted FROM (
      SELECT bundle, count(*) AS n, 0 AS c FROM episodes WHERE bundle IS NOT NULL GROUP BY bundle
      UNION ALL SELECT bundle, 0, episodes FROM bundle_uses) GROUP BY bundle HAVING sum(n) != sum(c)`,
  );
  return rs.rows.map((r) => ({
    agent: "",
    record: `bundle ${short(r.bundle)}`,
    problem: `named by ${Number(r.named)} episode(s), counted ${Number(r.counted)} in bundle_uses`,
  }));
}

/**
 * The event logs of a page of episodes, in one query; when that fails (a damaged log makes SQLite refuse
 * the whole query), one query per episode, so each unreadable log is named with its cause and the others
 * are still checked.
 */
async function eventLogs(
  src: ChainSource,
  page: readonly EpisodeRow[],
): Promise<{ logs: Map<string, EventRow[]>; unreadable: Map<string, string> }> {
  const logs = new Map<string, EventRow[]>();
  const unreadable = new Map<string, string>();
  const add = (rows: readonly EventRow[]) => {
    for (const r of rows) {
      const log = logs.get(r.episode);
      if (log) log.push(r);
      else logs.set(r.episode, [r]);
    }
  };
  if (page.length === 0) return { logs, unreadable };
  try {
    add(await src.events(page.map((e) => e.id)));
  } catch {
    logs.clear();
    for (const ep of page) {
      try {
        add(await src.events([ep.id]));
      } catch (err) {
        unreadable.set(ep.id, errorReason(err));
      }
    }
  }
  return { logs, unreadable };
}

/** The chain verify has read for one agent, for matching its episodes against (hash -> link). */
interface Link {
  readonly seq: number;
  readonly episode: string;
  /** Its episode was seen: committed, this agent's, naming this checkpoint. */
  sealed: boolean;
}

/** How `verifyChains` treats a source that is still being written to. */
export interface VerifyChainsOptions {
  /**
   * Asked after a pass that found broken agents: resolves true once the source may have changed in a way
   * that completes them (they are verified again), false when it will not (what was found is reported).
   * For a source that cannot show one moment (`ChainSource.consistent`) while it is written to: a center a
   * gateway replicates to receives an episode's rows in batches cut by count, so an agent's newest commit
   * may be there in part until the next batch lands.
   */
  readonly settle?: () => Promise<boolean>;
}

/** Passes over the broken agents at most, after the first (a source that never settles ends here). */
const SETTLE_ROUNDS = 3;

/** Verify every chain of a source (or the agents listed). */
export async function verifyChains(
  src: ChainSource,
  only?: readonly string[],
  opts: VerifyChainsOptions = {},
): Promise<VerifyReport> {
  const agents = only?.length ? [...only] : await src.agents();
  const results = new Map<
    string,
    { checkpoints: number; episodes: number; present: boolean; problems: VerifyProblem[] }
  >();
  const verify = async (agent: string) => {
    const problems: VerifyProblem[] = [];
    const found = (record: string, problem: string) => problems.push({ agent, record, problem });
    const seen = src.consistent
      ? await src.consistent(() => verifyAgent(src, agent, found))
      : await verifyAgent(src, agent, found);
    results.set(agent, { ...seen, problems });
  };
  for (const agent of agents) await verify(agent);
  for (let round = 0; opts.settle && round < SETTLE_ROUNDS; round++) {
    const broken = agents.filter((a) => results.get(a)!.problems.length > 0);
    if (broken.length === 0 || !(await opts.settle())) break;
    for (const agent of broken) await verify(agent);
  }
  const all = [...results.values()];
  return {
    agents: all.filter((r) => r.present).length,
    checkpoints: all.reduce((n, r) => n + r.checkpoints, 0),
    episodes: all.reduce((n, r) => n + r.episodes, 0),
    problems: all.flatMap((r) => r.problems),
  };
}

/**
 * Verify one agent's chain and episodes, naming each broken record to `found`; what it read, and whether
 * the source has the agent at all (a row, a checkpoint or an episode of it).
 */
async function verifyAgent(
  src: ChainSource,
  agent: string,
  found: (record: string, problem: string) => void,
): Promise<{ checkpoints: number; episodes: number; present: boolean }> {
  let checkpoints = 0;
  let episodes = 0;
  const a = await src.agent(agent);
  const chain = src.checkpoints(agent);
  const links = new Map<string, Link>();
  let prev: string | null = null;
  let prevSeq = 0;
  let seen = 0;
  let first: CheckpointRow | undefined;
  let last: CheckpointRow | undefined;
  const aboveFrontier: string[] = [];
  for await (const row of Symbol.asyncIterator in chain ? chain : await chain) {
    if (seen++ === 0 && row.seq !== 1) {
      // Retention deletes a prefix of the chain and keeps its newest hash as the anchor. A copy
      // that still has the whole chain (the central database) verifies it from the start.
      prev = a?.anchorHash ?? null;
      prevSeq = a?.anchorSeq ?? 0;
    }
    for (const r of aboveFrontier.splice(0))
      found(r, `state collected above the retention frontier #${a?.tombstonedSeq}`);
    first ??= row;
    last = row;
    checkpoints++;
    links.set(row.hash, { seq: row.seq, episode: row.episode, sealed: false });
    const rec = `checkpoint ${agent}#${row.seq} ${row.hash.slice(0, 16)}`;
    if (row.seq !== prevSeq + 1) found(rec, `sequence gap after #${prevSeq}`);
    if (row.parent !== prev) found(rec, `parent ${short(row.parent)} does not link to #${prevSeq} ${short(prev)}`);
    if (row.state !== null) {
      try {
        await verifyCheckpointRow(row);
      } catch (err) {
        found(rec, err instanceof IntegrityError ? err.detail : String(err)); // rec names the checkpoint
      }
    } else if (a?.tombstonedSeq !== undefined && row.seq > a.tombstonedSeq) {
      // Retention collects states oldest first and records how far (agents.tombstoned_seq). Named once
      // the next checkpoint is read: at the head it is named as the head.
      aboveFrontier.push(rec);
    }
    prev = row.hash;
    prevSeq = row.seq;
  }
  if (last) {
    if (!a) found(`agent ${agent}`, `no agent row for a chain of ${seen} checkpoint(s)`);
    else if (a.headHash !== prev || a.headSeq !== prevSeq)
      found(
        `agent ${agent}`,
        `head #${a.headSeq} ${short(a.headHash)} is not the newest checkpoint #${prevSeq} ${short(prev)}`,
      );
    // The agent's next episode loads its head: retention never collects it.
    if (last.state === null) found(`checkpoint ${agent}#${last.seq} ${last.hash.slice(0, 16)}`, "head state collected");
  } else if (a && a.headSeq > 0) {
    // Retention keeps the head checkpoint, so a head with no chain at all is history lost.
    found(`agent ${agent}`, `head #${a.headSeq} ${short(a.headHash)} missing: no checkpoints`);
  }
  let committed = 0;
  for (let after = ""; ; ) {
    const page = await src.episodes(agent, after, 500);
    // One query per page, not per episode: `fleet verify` reads 100,000s of episodes.
    const { logs, unreadable } = await eventLogs(src, page);
    for (const ep of page) {
      episodes++;
      const rec = `episode ${ep.id}`;
      if (ep.status === "committed") {
        committed++;
        sealedBy(ep, links, first, a, (problem) => found(rec, problem));
      }
      const cause = unreadable.get(ep.id);
      if (cause !== undefined) {
        found(rec, `event log unreadable: ${cause}`);
        continue;
      }
      const events = logs.get(ep.id) ?? [];
      // Retention deletes an episode together with its log, so a log cannot vanish alone.
      if (events.length === 0) {
        if (ep.eventCount > 0) found(rec, `event log missing (${ep.eventCount} event(s) recorded)`);
        continue;
      }
      const h = await hashEvents(events);
      if (h !== ep.eventsHash)
        found(rec, `event log hash mismatch (stored ${ep.eventsHash.slice(0, 16)}, recomputed ${h.slice(0, 16)})`);
    }
    if (page.length < 500) break;
    after = page[page.length - 1]!.id;
  }
  // Retention deletes episodes oldest first: after the oldest checkpoint whose episode is here,
  // every later one's must be here too.
  let sealedFrom = Infinity;
  for (const l of links.values()) if (l.sealed) sealedFrom = Math.min(sealedFrom, l.seq);
  for (const [hash, l] of links) {
    if (!l.sealed && l.seq > sealedFrom)
      found(
        `checkpoint ${agent}#${l.seq} ${hash.slice(0, 16)}`,
        `its episode ${l.episode} is missing, not committed, or not this agent's`,
      );
  }
  if (a && committed > a.episodes) found(`agent ${agent}`, `counts ${a.episodes} episode(s), ${committed} committed`);
  return { checkpoints, episodes, present: a !== undefined || checkpoints > 0 || episodes > 0 };
}

/**
 * Check a committed episode against the chain: it names a checkpoint of its agent that names it back.
 * One older than the chain's first checkpoint may name one that retention deleted (below the anchor).
 */
function sealedBy(
  ep: EpisodeRow,
  links: ReadonlyMap<string, Link>,
  first: CheckpointRow | undefined,
  a: ChainAgent | undefined,
  problem: (p: string) => void,
): void {
  const link = ep.checkpoint === null ? undefined : links.get(ep.checkpoint);
  if (link) {
    if (link.episode === ep.id) link.sealed = true;
    else problem(`names checkpoint #${link.seq} ${short(ep.checkpoint)}, which was sealed by episode ${link.episode}`);
    return;
  }
  const collected = first !== undefined && first.seq > 1 && (a?.anchorSeq ?? 0) > 0 && ep.startedAt <= first.createdAt;
  if (!collected) problem(`committed, but its checkpoint ${short(ep.checkpoint)} is not in the agent's chain`);
}
