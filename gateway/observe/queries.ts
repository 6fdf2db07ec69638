/**
 * Read-side queries for observing the fleet (metrics, health, dashboard; the API's pages are store/views.ts).
 * Every query here is aggregated by agent *type* or bounded by a limit, so its cost does
 * not grow into one row per agent on the wire.
 */
import { eq, gt, inArray, sql, count, min } from "drizzle-orm";
import { tables as t, type Store } from "../store/index.ts";

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
