/**
 * What the API, the dashboard and the CLI page through (an agent's episodes, its checkpoint chain), and the
 * JSON shapes they show stored rows in (snake_case, stable).
 */
import { and, desc, eq, lt, sql } from "drizzle-orm";
import * as t from "./schema.ts";
import type { AgentRow, EpisodeRow } from "./schema.ts";
import type { Store } from "./store.ts";
import { shownStatus, type AgentId } from "../types.ts";

/** An agent as `/api/agents` and `fleet agents --json` show it. */
export function agentView(a: AgentRow, queued: number) {
  return {
    id: a.id,
    type: a.type,
    key: a.key,
    status: shownStatus(a.status),
    reason: a.reason,
    paused_until: a.pausedUntil,
    checkpoint: a.headHash,
    seq: a.headSeq,
    episodes: a.episodes,
    failures: a.failures,
    queued,
    last_episode_at: a.lastEpisodeAt,
    created_at: a.createdAt,
  };
}

/** An episode as `/api/episodes/<id>` and `fleet episodes --json` show it. */
export function episodeView(
  e: Omit<EpisodeRow, "stimulusKind" | "bundle"> & {
    readonly stimulusKind?: string | null;
    readonly bundle?: string | null;
  },
) {
  return {
    id: e.id,
    agent: e.agent,
    stimulus: e.stimulusId,
    kind: e.stimulusKind ?? null,
    status: e.status,
    error_kind: e.errorKind,
    error: e.error,
    attempt: e.attempt,
    spec_version: e.specVersion,
    /** The code bundle it ran (docs/upgrading.md); null: its module file. */
    bundle: e.bundle ?? null,
    checkpoint: e.checkpoint,
    parent: e.parent,
    started_at: e.startedAt,
    ended_at: e.endedAt,
    ms: e.endedAt - e.startedAt,
    events_hash: e.eventsHash,
    event_count: e.eventCount,
  };
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
