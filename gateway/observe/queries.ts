/**
 * Read-side queries for observing the fleet (metrics, health, dashboard, API paging).
 * Every query here is aggregated by agent *type* or bounded by a limit, so its cost does
 * not grow into one row per agent on the wire.
 */
import { and, desc, eq, gt, inArray, lt, sql, count, min } from "drizzle-orm";
import { tables as t, type Store } from "../store/index.ts";
import type { AgentId } from "../types.ts";

/**
 * Agents per type and stored status; `budget` counts the pauses that end by themselves (a
 * paused_until). Read from `agent_counts`, which triggers keep equal to the agents table
 * (store/migrate.ts, migration 15): a few rows per type, not one per agent.
 */
export function agentStatusByType(store: Store) {
  const c = t.agentCounts;
  return store.db
    .select({
      type: c.type,
      status: c.status,
      budget: sql<number>`coalesce(sum(CASE WHEN ${c.timed} THEN ${c.n} END), 0)`.mapWith(Number),
      n: sql<number>`sum(${c.n})`.mapWith(Number),
    })
    .from(c)
    .where(gt(c.n, 0))
    .groupBy(c.type, c.status)
    .all();
}

/**
 * Queued stimuli per type: how many, and the oldest receive time (lag). The type is the part of
 * the agent id before its `/`, so no row of `agents` is looked up per queued stimulus (100,000
 * queued: ~70 ms instead of ~200 ms).
 */
export function queueByType(store: Store) {
  const type = sql<string>`substr(${t.stimuli.agent}, 1, instr(${t.stimuli.agent}, '/') - 1)`;
  return store.db
    .select({ type, n: count(), oldest: min(t.stimuli.receivedAt) })
    .from(t.stimuli)
    .where(eq(t.stimuli.state, "queued"))
    .groupBy(type)
    .all();
}

/**
 * Budget ledger of the given windows per type: totals and the highest single agent. Read from
 * `usage_totals`, which triggers keep in step with `budget_usage` (store/migrate.ts, migrations 17, 35):
 * one row per window and type, not one per agent.
 */
export function usageByType(store: Store, windows: readonly string[]) {
  const u = t.usageTotals;
  return store.db
    .select({
      type: u.type,
      window: u.window,
      agents: u.agents,
      episodes: u.episodes,
      maxEpisodes: u.maxEpisodes,
      toolCalls: u.toolCalls,
      tokens: u.tokens,
      maxTokens: u.maxTokens,
      cost: u.cost,
      maxCost: u.maxCost,
      bytes: u.bytes,
      maxBytes: u.maxBytes,
    })
    .from(u)
    .where(inArray(u.window, [...windows]))
    .all();
}

/** An agent's checkpoint chain, newest first, without the (possibly large) state text. */
export function recentCheckpoints(store: Store, agent: AgentId, limit: number, beforeSeq?: number) {
  const c = t.checkpoints;
  const where = beforeSeq === undefined ? eq(c.agent, agent) : and(eq(c.agent, agent), lt(c.seq, beforeSeq));
  return store.db
    .select({
      hash: c.hash,
      seq: c.seq,
      parent: c.parent,
      episode: c.episode,
      specVersion: c.specVersion,
      collected: sql<number>`(${c.state} IS NULL)`.mapWith(Number),
      createdAt: c.createdAt,
    })
    .from(c)
    .where(where)
    .orderBy(desc(c.seq))
    .limit(limit)
    .all();
}

/**
 * An agent's episodes, newest first, optionally only one status and one stimulus kind, paged by
 * start time. A kind filter is checked on the `episodes_agent` index entry (agent, started_at, kind)
 * before the row is read, so a few device episodes among thousands of timer fires cost index entries.
 */
export function episodesPage(
  store: Store,
  agent: AgentId,
  f: { limit: number; before?: number; status?: "committed" | "failed"; kind?: string },
) {
  const e = t.episodes;
  const conds = [eq(e.agent, agent)];
  if (f.kind !== undefined) conds.push(eq(e.stimulusKind, f.kind));
  if (f.before !== undefined) conds.push(lt(e.startedAt, f.before));
  if (f.status) conds.push(eq(e.status, f.status));
  return store.db
    .select()
    .from(e)
    .where(and(...conds))
    .orderBy(desc(e.startedAt), desc(e.id))
    .limit(f.limit)
    .all();
}
