/**
 * The JSON the dashboard reads, as the gateway's API writes it (gateway/store/views.ts,
 * the `/api/fleet` health summary, the `/api/events` facts). Only the fields it shows.
 */

/** `GET /api/session`: the signed-in token's name and scope. */
export interface Session {
  readonly name: string;
  readonly scope: "read" | "operate" | "admin";
}

/** One record of `GET /api/audit`. */
export interface AuditRecord {
  readonly seq: number;
  readonly at: number;
  readonly actor: string;
  readonly action: string;
  readonly target: string | null;
  readonly status: number;
  readonly result: "ok" | "refused";
  readonly detail: string | null;
}

/** Stimulus kinds an episode list filters by (the API's `?kind=`). */
export const EPISODE_KINDS = ["mqtt", "timer", "webhook", "inbox", "manual", "wake"] as const;

/** Agent statuses as operators see them. */
export const STATUSES = ["idle", "paused", "draining", "failed", "retired"] as const;
export type ShownStatus = (typeof STATUSES)[number];

/** One agent type's row of the health summary. */
export interface TypeHealth {
  readonly agents?: Partial<Record<ShownStatus, number>>;
  readonly queued?: number;
  readonly lag_ms?: number | null;
  readonly budget_burn?: number;
  readonly episodes_hour?: number;
}

/** `replication` of the health summary (docs/replication.md); null when `[replication]` is off. */
export interface Replication {
  readonly url: string;
  readonly state: string;
  readonly backlog: { readonly rows: number; readonly bytes: number; readonly lag_s: number };
  readonly cursor?: { readonly confirmed_seq: number; readonly queued_seq: number };
  readonly over_backlog: boolean;
  readonly pushed_rows: number;
  readonly last_push_at: number | null;
  readonly lost_rows: number;
  readonly consecutive_failures: number;
  readonly last_error: { readonly kind: string; readonly message: string; readonly at: number } | null;
}

/** A type's newest canary rollout (docs/upgrading.md), as `GET /api/fleet` lists it. */
export interface RolloutSummary {
  readonly type: string;
  readonly state: "canary" | "promoted" | "rolled_back" | "aborted" | "superseded";
  readonly from_bundle: string | null;
  readonly to_bundle: string;
  readonly canary_agents: readonly string[];
  readonly episodes: number;
  readonly failures: number;
  readonly min_episodes: number;
  readonly reason: string | null;
}

/** `GET /api/fleet` and the `health` event. */
export interface Health {
  /** Each type's newest canary rollout. */
  readonly rollouts?: readonly RolloutSummary[];
  readonly fleet?: string;
  readonly state: string;
  readonly spec_version?: string;
  readonly spec_error?: string | null;
  /** Same as /readyz: not ready while commits fail, with the reason. */
  readonly readiness?: { readonly ready: boolean; readonly reason?: string };
  readonly uptime_s?: number;
  readonly agents?: Partial<Record<ShownStatus | "active" | "total", number>>;
  readonly running_episodes?: number;
  readonly queued_stimuli?: number;
  readonly subprocesses?: number;
  readonly lag_ms?: number;
  readonly budget_burn?: number;
  readonly broker?: { readonly clients?: number; readonly messagesIn?: number; readonly messagesOut?: number };
  readonly rates?: {
    readonly episodes_per_min: number;
    readonly failures_per_min: number;
    readonly failure_ratio: number;
    readonly window_s?: number;
  };
  readonly types?: Readonly<Record<string, TypeHealth>>;
  readonly replication?: Replication | null;
}

/** An agent in `/api/agents`. */
export interface Agent {
  readonly id: string;
  readonly type: string;
  readonly key: string;
  readonly status: string;
  readonly reason: string | null;
  readonly checkpoint: string | null;
  readonly seq: number | null;
  readonly episodes: number;
  readonly failures: number;
  readonly queued: number;
  readonly last_episode_at: number | null;
}

/** A page of `/api/agents`. */
export interface AgentPage {
  readonly agents: readonly Agent[];
  readonly total: number;
  readonly page: number;
  readonly limit: number;
  readonly pages?: number;
}

/** One link of `/api/agents/<t>/<k>`'s checkpoint chain. */
export interface Checkpoint {
  readonly hash: string;
  readonly seq: number;
  readonly parent: string | null;
  readonly episode: string;
  readonly collected: boolean;
  readonly created_at: number;
}

/** `GET /api/agents/<type>/<key>`. */
export interface AgentDetail extends Agent {
  readonly checkpoints: readonly Checkpoint[];
}

/** An episode in `/api/agents/<t>/<k>/episodes`. */
export interface Episode {
  readonly id: string;
  readonly agent: string;
  readonly stimulus: string;
  /** The stimulus kind (mqtt, timer, webhook, inbox, manual, wake); null for a few pre-upgrade episodes. */
  readonly kind: string | null;
  readonly status: string;
  readonly error_kind: string | null;
  readonly error: string | null;
  readonly attempt: number;
  readonly spec_version: string;
  readonly checkpoint: string | null;
  readonly parent: string | null;
  readonly started_at: number;
  readonly ms: number;
  readonly event_count: number;
}

/** One entry of an episode's event log; `data` depends on `kind`. */
export interface EpisodeEvent {
  readonly seq: number;
  readonly kind: string;
  // biome-ignore lint/suspicious/noExplicitAny: each kind has its own shape; eventText reads it per kind
  readonly data: any;
}

/** `GET /api/episodes/<id>`. */
export interface EpisodeDetail extends Episode {
  readonly events: readonly EpisodeEvent[];
  readonly decisions: readonly { readonly seq: number; readonly name: string; readonly data: unknown }[];
}

/** A fact from `/api/events` (`episode` or `status`). */
export interface Fact {
  readonly agent: string;
  /** The episode's outcome (`committed`, `failed`) or the agent's new status. */
  readonly status?: string;
  /** An episode fact: its failure put the stimulus in quarantine. */
  readonly quarantined?: boolean;
  readonly episode?: string;
  readonly reason?: string | null;
}

/** `GET /api/agents/<t>/<k>/state`. */
export interface StateAt {
  readonly agent: string;
  readonly seq: number;
  readonly hash: string;
  readonly episode: string;
  readonly created_at: number;
  readonly state: unknown;
  readonly collected: boolean;
}

/** One RFC 6902 operation of a state diff. */
export interface PatchOp {
  readonly op: "add" | "remove" | "replace";
  readonly path: string;
  readonly value?: unknown;
  readonly from_value?: unknown;
}

/** What an episode caused, in a trace (a failed episode's: no `seq`, not `sent`; nothing took effect). */
export type TraceEffect =
  | { readonly kind: "decide"; readonly name: string; readonly data: unknown }
  | { readonly kind: "emit"; readonly topic: string; readonly seq: number | null; readonly data: unknown }
  | { readonly kind: "publish"; readonly topic: string; readonly seq: number | null; readonly ok: boolean }
  | {
      readonly kind: "send";
      readonly to: string;
      readonly ok: boolean;
      readonly sent: boolean;
      readonly episodes: readonly TraceNode[];
    }
  | { readonly kind: "tool"; readonly tool: string; readonly ok: boolean }
  | {
      readonly kind: "wake";
      readonly id: string;
      readonly due_at: number;
      readonly state: string;
      readonly episodes: readonly TraceNode[];
    }
  | { readonly kind: "cancel_wake"; readonly id: string };

/** One episode of a trace. */
export interface TraceNode {
  readonly episode: string;
  readonly agent: string;
  readonly status: string;
  readonly started_at: number;
  readonly ms: number;
  readonly stimulus: {
    readonly kind: string;
    readonly topic: string | null;
    readonly payload_hash: string;
    readonly sent_by: string | null;
    readonly set_by: string | null;
  } | null;
  readonly effects: readonly TraceEffect[];
}

/** `GET /api/episodes/<id>/trace`. */
export interface Trace {
  readonly upstream: readonly TraceNode[];
  readonly episode: TraceNode;
}

/** One output of `GET /api/outputs`: an emit on the agent's out topic or a publish-tool message. */
export interface OutputItem {
  readonly episode: string;
  readonly agent: string;
  readonly kind: "emit" | "publish";
  readonly topic: string;
  readonly data: unknown;
  readonly started_at: number;
  readonly at: number;
}

/** One minute of `GET /api/activity`. */
export interface MinuteBucket {
  readonly t: number;
  readonly episodes: number;
  readonly failures: number;
  readonly lag_ms_max: number | null;
  readonly lag_ms_avg: number | null;
}

/** `GET /api/activity`. */
export interface Activity {
  readonly now: number;
  readonly bucket_ms: number;
  readonly buckets: readonly MinuteBucket[];
}

/** One stimulus of `GET /api/quarantine`. */
export interface Quarantined {
  readonly seq: number;
  readonly agent: string;
  readonly sid: string;
  readonly kind: string;
  readonly topic: string | null;
  readonly attempts: number;
  readonly last_error: string | null;
  readonly received_at: number;
  readonly quarantined_at: number | null;
  readonly episodes: readonly string[];
}

/** `POST /api/episodes/<id>/replay`. */
export type ReplayResult =
  | { readonly episode: string; readonly agent: string; readonly verdict: "MATCH" }
  | {
      readonly episode: string;
      readonly agent: string;
      readonly verdict: "DIVERGED";
      readonly divergence: { readonly at: string; readonly expected: unknown; readonly actual: unknown };
    }
  | { readonly episode: string; readonly agent: string; readonly verdict: "UNREPLAYABLE"; readonly reason: string };

/** A durable wake-up (`GET /api/agents/<type>/<key>/wakeups`). */
export interface Wakeup {
  readonly id: string;
  readonly due_at: number;
  readonly state: "pending" | "fired" | "cancelled" | "dropped";
  readonly set_by: string;
  readonly created_at: number;
  readonly done_at: number | null;
  readonly done_by: string | null;
  readonly payload: unknown;
}
