/**
 * `fleet verify`: recompute every checkpoint hash, every chain link and every episode's
 * event-log hash. Collected checkpoints (tombstones) keep their hash and links, so the
 * chain still verifies after GC.
 */
import { bundleOfSql, hashEvents, verifyCheckpointRow, IntegrityError } from "../store/index.ts";
import type { AgentRow, CheckpointRow, EpisodeRow, EventRow, Store } from "../store/index.ts";
import type { AgentId } from "../types.ts";
import { errorReason, readEvents } from "./events.ts";

/** One broken record. */
export interface VerifyProblem {
  readonly agent: string;
  readonly record: string;
  readonly problem: string;
}

/** What verify looked at and what it found. */
export interface VerifyReport {
  readonly agents: number;
  readonly checkpoints: number;
  readonly episodes: number;
  readonly problems: VerifyProblem[];
}

/** A hash as problems quote it: its first 16 characters. */
const short = (hash: unknown): string => String(hash).slice(0, 16);

/**
 * Where verify reads chains from: the local store, or one gateway's rows in the central
 * database (gateway/replication/). Rows come in the local row shapes.
 */
export interface ChainSource {
  /** Every agent that has at least one checkpoint. */
  agents(): Promise<string[]>;
  /** An agent's checkpoints, oldest first (a source may stream them: verify holds one at a time). */
  checkpoints(agent: string): AsyncIterable<CheckpointRow> | Promise<Iterable<CheckpointRow>>;
  /** The agent row's chain anchor and head. */
  agent(agent: string): Promise<Pick<AgentRow, "anchorSeq" | "anchorHash" | "headHash"> | undefined>;
  /** An agent's episodes in id order after `afterId`. */
  episodes(agent: string, afterId: string, limit: number): Promise<EpisodeRow[]>;
  /** The events of these episodes, ordered by episode and seq; throws when a log cannot be read. */
  events(episodes: readonly string[]): Promise<EventRow[]>;
}

/** The local store as a chain source. */
export function storeChains(store: Store): ChainSource {
  return {
    agents: () => store.agentsWithCheckpoints(),
    checkpoints: (agent) => store.listCheckpoints(agent as AgentId),
    agent: (agent) => store.getAgent(agent as AgentId),
    episodes: (agent, after, limit) => store.scanEpisodes(agent as AgentId, after, limit),
    events: (ids) => readEvents(store, ids),
  };
}

/** Verify every agent (or those listed); with every agent, also the count of episodes naming each bundle. */
export async function verifyStore(store: Store, only?: readonly AgentId[]): Promise<VerifyReport> {
  const report = await verifyChains(storeChains(store), only);
  if (!only?.length) report.problems.push(...(await bundleUseProblems(store)));
  return report;
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

/** Verify every chain of a source (or the agents listed). */
export async function verifyChains(src: ChainSource, only?: readonly string[]): Promise<VerifyReport> {
  const agents = only?.length ? [...only] : await src.agents();
  const problems: VerifyProblem[] = [];
  let checkpoints = 0;
  let episodes = 0;
  for (const agent of agents) {
    const a = await src.agent(agent);
    const chain = src.checkpoints(agent);
    let prev: string | null = null;
    let prevSeq = 0;
    let seen = 0;
    for await (const row of Symbol.asyncIterator in chain ? chain : await chain) {
      if (seen++ === 0 && row.seq !== 1) {
        // Retention deletes a prefix of the chain and keeps its newest hash as the anchor. A copy
        // that still has the whole chain (the central database) verifies it from the start.
        prev = a?.anchorHash ?? null;
        prevSeq = a?.anchorSeq ?? 0;
      }
      checkpoints++;
      const rec = `checkpoint ${agent}#${row.seq} ${row.hash.slice(0, 16)}`;
      if (row.seq !== prevSeq + 1) problems.push({ agent, record: rec, problem: `sequence gap after #${prevSeq}` });
      if (row.parent !== prev)
        problems.push({
          agent,
          record: rec,
          problem: `parent ${short(row.parent)} does not link to #${prevSeq} ${short(prev)}`,
        });
      if (row.state !== null) {
        try {
          await verifyCheckpointRow(row);
        } catch (err) {
          problems.push({ agent, record: rec, problem: err instanceof IntegrityError ? err.message : String(err) });
        }
      }
      prev = row.hash;
      prevSeq = row.seq;
    }
    if (a && seen > 0 && a.headHash !== prev)
      problems.push({
        agent,
        record: `agent ${agent}`,
        problem: `head ${short(a.headHash)} is not the newest checkpoint ${short(prev)}`,
      });
    for (let after = ""; ; ) {
      const page = await src.episodes(agent, after, 500);
      // One query per page, not per episode: `fleet verify` reads 100,000s of episodes.
      const { logs, unreadable } = await eventLogs(src, page);
      for (const ep of page) {
        episodes++;
        const cause = unreadable.get(ep.id);
        if (cause !== undefined) {
          problems.push({ agent, record: `episode ${ep.id}`, problem: `event log unreadable: ${cause}` });
          continue;
        }
        const events = logs.get(ep.id) ?? [];
        // Retention deletes an episode together with its log, so a log cannot vanish alone.
        if (events.length === 0) {
          if (ep.eventCount > 0)
            problems.push({
              agent,
              record: `episode ${ep.id}`,
              problem: `event log missing (${ep.eventCount} event(s) recorded)`,
            });
          continue;
        }
        const h = await hashEvents(events);
        if (h !== ep.eventsHash)
          problems.push({
            agent,
            record: `episode ${ep.id}`,
            problem: `event log hash mismatch (stored ${ep.eventsHash.slice(0, 16)}, recomputed ${h.slice(0, 16)})`,
          });
      }
      if (page.length < 500) break;
      after = page[page.length - 1]!.id;
    }
  }
  return { agents: agents.length, checkpoints, episodes, problems };
}
