/** JSON shapes of stored rows as the API and CLI show them (snake_case, stable). */
import type { AgentRow, EpisodeRow } from "../store/index.ts";
import { shownStatus } from "../types.ts";

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
