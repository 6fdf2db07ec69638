/**
 * The drizzle schema: the one source of truth for tables (DDL in ./migrate.ts mirrors it,
 * and test/store.test.ts checks the two agree). Designed for replication (docs/replication.md):
 * the records of a data dir are its gateway's (`meta.gateway_id`; the pusher puts it on every
 * central row, and the per-episode tables `stimuli`, `episodes` and `checkpoints` do not repeat
 * it, migration 16); immutable records are keyed by content hash or by (gateway, seq)/UUIDv7;
 * the mutable rows are `agents`, `stimuli.state`, `outbox` and `budget_usage`.
 */
import { sql } from "drizzle-orm";
import {
  sqliteTable,
  sqliteView,
  text,
  integer,
  real,
  blob,
  primaryKey,
  uniqueIndex,
  index,
} from "drizzle-orm/sqlite-core";
import type { AgentId } from "../types.ts";
import { episodeStatus, stimulusKind } from "./codes.ts";
import { bundleColumn, hashColumn, idColumn, specColumn } from "./hashes.ts";

/** Key/value facts about this data dir (gateway id, schema version). */
export const meta = sqliteTable("meta", {
  key: text("key").primaryKey(),
  value: text("value").notNull(),
});

/** Every accepted fleet.toml, by content hash. Immutable. */
export const specVersions = sqliteTable("spec_versions", {
  hash: text("hash").primaryKey(),
  gateway: text("gateway").notNull(),
  path: text("path").notNull(),
  text: text("text").notNull(),
  summary: text("summary").notNull().default(""),
  createdAt: integer("created_at").notNull(),
  /** The code it deployed: agent type -> bundle hash (JSON object); null before code was pinned. */
  bundles: text("bundles"),
});

/** Agent code pinned by content (docs/upgrading.md): a type's module bundled with its imports. Immutable. */
export const bundles = sqliteTable("bundles", {
  /** BLAKE3 of `code`. */
  hash: text("hash").primaryKey(),
  gateway: text("gateway").notNull(),
  /** The module path it was built from, for people. */
  module: text("module").notNull(),
  code: text("code").notNull(),
  bytes: integer("bytes").notNull(),
  createdAt: integer("created_at").notNull(),
  /** The source map it was built with (JSON), for failures' stacks; null for bundles stored before 36. */
  map: text("map"),
});

/** Durable agent status. `running`/`idle` are live states and are not stored. */
/** `draining`: takes no new stimuli, runs those queued, then becomes `retired` (`fleet retire --drain`). */
export type StoredAgentStatus = "active" | "paused" | "draining" | "retired" | "failed";

/** One row per agent instance. Mutable. */
export const agents = sqliteTable(
  "agents",
  {
    id: text("id").$type<AgentId>().primaryKey(),
    type: text("type").notNull(),
    key: text("key").notNull(),
    gateway: text("gateway").notNull(),
    status: text("status").$type<StoredAgentStatus>().notNull().default("active"),
    reason: text("reason"),
    /** Epoch ms when a budget pause ends by itself; null for operator pauses. */
    pausedUntil: integer("paused_until"),
    /** Newest checkpoint deleted by retention: the chain verifies from here (a tombstone of a prefix). */
    anchorSeq: integer("anchor_seq").notNull().default(0),
    /** This and `head_hash` are stored as their 32 bytes (./hashes.ts), as `checkpoints.hash` they name. */
    anchorHash: hashColumn("anchor_hash"),
    headSeq: integer("head_seq").notNull().default(0),
    // tombstoned_seq (migration 29) is only retention's (ops/gc.ts, raw SQL): a read-only handle of an
    // older data dir selects agents through this table.
    headHash: hashColumn("head_hash"),
    episodes: integer("episodes").notNull().default(0),
    failures: integer("failures").notNull().default(0),
    lastEpisodeAt: integer("last_episode_at"),
    createdAt: integer("created_at").notNull(),
    updatedAt: integer("updated_at").notNull(),
  },
  (t) => [
    index("agents_type").on(t.type, t.key),
    index("agents_status").on(t.status),
    index("agents_counts").on(t.type, t.status, t.pausedUntil),
  ],
);

/**
 * Agents counted by type, stored status and `timed` (1: a pause that ends by itself, i.e.
 * `paused_until` set). Kept by triggers on `agents` (store/migrate.ts, migration 15); never
 * written by code. Rows whose `n` fell to 0 stay.
 */
export const agentCounts = sqliteTable(
  "agent_counts",
  {
    type: text("type").notNull(),
    status: text("status").$type<StoredAgentStatus>().notNull(),
    timed: integer("timed").notNull(),
    n: integer("n").notNull(),
  },
  (t) => [primaryKey({ columns: [t.type, t.status, t.timed] })],
);

/** Where a stimulus came from (agents/protocol.ts `Stimulus.kind`). */
export type StoredStimulusKind = "mqtt" | "timer" | "webhook" | "inbox" | "manual" | "wake";
// Every kind has a code (./codes.ts): this fails to compile until a new kind gets one.
const everyKindCoded: readonly (typeof stimulusKind.names)[number][] = [] as StoredStimulusKind[];
void everyKindCoded;

/** Lifecycle of a stimulus for one agent. */
export type StimulusState = "queued" | "done" | "quarantined" | "dropped" | "rejected" | "expired";

/**
 * Stimuli: the dedup memory and each agent's durable FIFO queue in one table.
 * `(agent, sid)` is unique, which is what makes intake idempotent.
 */
export const stimuli = sqliteTable(
  "stimuli",
  {
    seq: integer("seq").primaryKey({ autoIncrement: true }),
    agent: text("agent").$type<AgentId>().notNull(),
    sid: text("sid").notNull(),
    kind: text("kind").$type<StoredStimulusKind>().notNull(),
    topic: text("topic"),
    /** Raw payload bytes; null once collected (the dedup mark stays). */
    payload: blob("payload", { mode: "buffer" }),
    receivedAt: integer("received_at").notNull(),
    state: text("state").$type<StimulusState>().notNull().default("queued"),
    attempts: integer("attempts").notNull().default(0),
    /** Epoch ms before which a retry must not start. */
    notBefore: integer("not_before").notNull().default(0),
    lastError: text("last_error"),
    /** The episode that ran it: 16 bytes stored, UUID text read (./hashes.ts `idColumn`, migration 26). */
    episode: idColumn("episode"),
    doneAt: integer("done_at"),
    /** Epoch ms after which it is skipped (state `expired`) instead of run: MQTT 5 message expiry. */
    expiresAt: integer("expires_at"),
    /** W3C `traceparent` the stimulus arrived with (webhooks); its episode's span is that span's child. */
    traceparent: text("traceparent"),
    /** A forwarded send's count of the sends that led to it (migration 37); null otherwise. */
    hops: integer("hops"),
  },
  (t) => [
    uniqueIndex("stimuli_dedup").on(t.sid, t.agent),
    // No index by agent over queued stimuli: the queue book holds their seqs (migration 33).
    index("stimuli_state").on(t.state, t.doneAt),
  ],
);

/**
 * Messages that matched a subscription but could not become a stimulus (e.g. the topic
 * gives an invalid agent key). They were acknowledged, so they are recorded with the
 * reason instead of being dropped. Immutable; collected after `dedup_days`.
 */
export const rejectedMessages = sqliteTable(
  "rejected_messages",
  {
    seq: integer("seq").primaryKey({ autoIncrement: true }),
    gateway: text("gateway").notNull(),
    kind: text("kind").$type<StoredStimulusKind>().notNull(),
    topic: text("topic"),
    payload: blob("payload", { mode: "buffer" }),
    /** MQTT client id of the sender, when known. */
    client: text("client"),
    reason: text("reason").notNull(),
    receivedAt: integer("received_at").notNull(),
  },
  (t) => [index("rejected_messages_time").on(t.receivedAt)],
);

/**
 * One row per episode attempt (committed or failed). Immutable once written. The row also holds
 * the episode's event log, column `log`, which only raw SQL names (see `events` below).
 */
export const episodes = sqliteTable(
  "episodes",
  {
    /** A UUIDv7: its 16 bytes stored, its text read (./hashes.ts `idColumn`, migration 26). */
    id: idColumn("id").primaryKey(),
    agent: text("agent").$type<AgentId>().notNull(),
    stimulusSeq: integer("stimulus_seq").notNull(),
    stimulusId: text("stimulus_id").notNull(),
    /** Stored as the first 6 bytes of its hash when those name it (./hashes.ts `specColumn`, migration 27). */
    specVersion: specColumn("spec_version").notNull(),
    /** Stored as 1 or 0 (./codes.ts, migration 31). */
    status: episodeStatus.column("status").notNull(),
    errorKind: text("error_kind"),
    error: text("error"),
    attempt: integer("attempt").notNull(),
    startedAt: integer("started_at").notNull(),
    endedAt: integer("ended_at").notNull(),
    /** Hash of the checkpoint this episode sealed (committed only). This, `parent` and `events_hash`
     *  are stored as their 32 bytes (./hashes.ts) and read as hex. */
    checkpoint: hashColumn("checkpoint"),
    /** Hash of the checkpoint it started from. */
    parent: hashColumn("parent"),
    eventsHash: hashColumn("events_hash").notNull(),
    eventCount: integer("event_count").notNull(),
    /**
     * The kind of its stimulus (mqtt, timer, ...), for filters; null only where it could not be recovered.
     * Stored as a small integer (./codes.ts, migration 31).
     */
    stimulusKind: stimulusKind.column<string>("stimulus_kind"),
    /**
     * The code bundle it ran (`bundles.hash`); null when it ran from the module file. Stored as the
     * first 8 bytes of the hash when those name it (./hashes.ts `bundleColumn`, migration 30).
     */
    bundle: bundleColumn("bundle"),
  },
  (t) => [
    // History by time; a kind filter is checked on the entry, before the row is read (migration 24).
    index("episodes_agent").on(t.agent, t.startedAt, t.stimulusKind),
    index("episodes_time").on(t.startedAt),
    // Exactly-once commit: a second committed episode for the same stimulus aborts its whole batch.
    uniqueIndex("episodes_once")
      .on(t.stimulusSeq)
      .where(sql.raw(`status = ${episodeStatus.sql("committed")}`)),
  ],
);

/**
 * The event log of each episode as rows: a read-only view (./migrate.ts, migrations 18 and 22) of
 * the `log` column of `episodes`, JSONB with one element per event (`[kind, data]`, or a record's
 * data alone) written with the episode row (./episodes.ts `logText`) and kept out of the drizzle
 * table above so that episode rows do not carry it.
 * `seq` is an event's position in its log; `data` is the exact JSON text the event was written with.
 */
export const events = sqliteView("events", {
  /** The episode's id as stored (16 bytes; raw SQL joins it with `episodes.id`), read as text. */
  episode: idColumn("episode").notNull(),
  seq: integer("seq").notNull(),
  kind: text("kind").notNull(),
  data: text("data").notNull(),
}).existing();

/** Sealed checkpoints: a hash chain per agent. `state` is null once collected (tombstone). */
export const checkpoints = sqliteTable(
  "checkpoints",
  {
    /** This and `parent` are stored as their 32 bytes (./hashes.ts) and read as hex. */
    hash: hashColumn("hash").notNull(),
    agent: text("agent").$type<AgentId>().notNull(),
    seq: integer("seq").notNull(),
    parent: hashColumn("parent"),
    /** 16 bytes stored, UUID text read (./hashes.ts `idColumn`, migration 26). */
    episode: idColumn("episode").notNull(),
    /** Stored as the first 6 bytes of its hash when those name it (./hashes.ts `specColumn`, migration 27). */
    specVersion: specColumn("spec_version").notNull(),
    state: text("state"),
    createdAt: integer("created_at").notNull(),
    /** `defineAgent({ version })` of the code that wrote the state; null for code without a version (1). */
    stateVersion: integer("state_version"),
    /** The state version this checkpoint's episode migrated from (`migrate(state, from)`); null when none ran. */
    migratedFrom: integer("migrated_from"),
  },
  (t) => [
    uniqueIndex("checkpoints_chain").on(t.agent, t.seq),
    // Found by hash through its first 8 bytes (migration 28): queries name `substr(hash, 1, 8)` (hashes.ts).
    index("checkpoints_hash").on(sql`substr(${t.hash}, 1, 8)`),
  ],
);

/** Effects waiting to be published after commit (at least once). Rows are deleted once sent. */
export const outbox = sqliteTable("outbox", {
  id: integer("id").primaryKey({ autoIncrement: true }),
  episode: text("episode").notNull(),
  seq: integer("seq").notNull(),
  topic: text("topic").notNull(),
  payload: text("payload").notNull(),
  qos: integer("qos").notNull().default(1),
  retain: integer("retain", { mode: "boolean" }).notNull().default(false),
  createdAt: integer("created_at").notNull(),
});

/** Budget ledger: usage per agent per window (`h:<hour>` / `d:<day>`), committed with each episode. */
export const budgetUsage = sqliteTable(
  "budget_usage",
  {
    agent: text("agent").$type<AgentId>().notNull(),
    window: text("window").notNull(),
    episodes: integer("episodes").notNull().default(0),
    toolCalls: integer("tool_calls").notNull().default(0),
    tokens: integer("tokens").notNull().default(0),
    cost: real("cost").notNull().default(0),
    /** Bytes the agent's episodes stored (store/episodes.ts `storedBytes`), against `bytes_per_day`. */
    bytes: integer("bytes").notNull().default(0),
  },
  (t) => [primaryKey({ columns: [t.agent, t.window] })],
);

/**
 * How many episodes name each code bundle, by the bundle's stored form (`episodes.bundle`); no row at
 * none. Kept by triggers on `episodes` (store/migrate.ts, migration 32); never written by code. Code
 * retention keeps a bundle while it has a row.
 */
export const bundleUses = sqliteTable("bundle_uses", {
  bundle: bundleColumn("bundle").primaryKey(),
  episodes: integer("episodes").notNull(),
});

/**
 * Budget use per window and agent type: the sums over the type's `budget_usage` rows and the
 * highest single agent. Kept by triggers on `budget_usage` (store/migrate.ts, migrations 17 and 35);
 * never written by code.
 */
export const usageTotals = sqliteTable(
  "usage_totals",
  {
    window: text("window").notNull(),
    type: text("type").notNull(),
    /** Agents with a row in the window. */
    agents: integer("agents").notNull(),
    episodes: integer("episodes").notNull(),
    toolCalls: integer("tool_calls").notNull(),
    tokens: integer("tokens").notNull(),
    cost: real("cost").notNull(),
    maxEpisodes: integer("max_episodes").notNull(),
    maxTokens: integer("max_tokens").notNull(),
    maxCost: real("max_cost").notNull(),
    /** Since migration 35: windows booked before it count 0 bytes. */
    bytes: integer("bytes").notNull().default(0),
    maxBytes: integer("max_bytes").notNull().default(0),
  },
  (t) => [primaryKey({ columns: [t.window, t.type] })],
);

/**
 * Operator actions (who, what, target, when, result): append-only, never updated or collected
 * by retention. `actor` is the token's name; `status` the HTTP status the action got.
 */
export const audit = sqliteTable("audit", {
  seq: integer("seq").primaryKey({ autoIncrement: true }),
  gateway: text("gateway").notNull(),
  at: integer("at").notNull(),
  actor: text("actor").notNull(),
  action: text("action").notNull(),
  target: text("target"),
  status: integer("status").notNull(),
  detail: text("detail"),
});

/**
 * The replication queue (gateway/replication/): one row per local row the central server
 * has not confirmed yet, filled by triggers in the writing transaction (./migrate.ts).
 * `tbl` names what to send (`spec`, `agent`, `episode` with its events and checkpoint,
 * `usage`, `stimulus`, `audit`), `ver` counts changes while pending, `at` is when it became pending.
 */
export const replPending = sqliteTable(
  "repl_pending",
  {
    seq: integer("seq").primaryKey({ autoIncrement: true }),
    tbl: text("tbl").notNull(),
    key: text("key").notNull(),
    ver: integer("ver").notNull().default(1),
    at: integer("at"),
  },
  (t) => [uniqueIndex("repl_pending_row").on(t.tbl, t.key)],
);

/** Where a rollout is: new code on the canaries, or decided (docs/upgrading.md). */
export type RolloutState = "canary" | "promoted" | "rolled_back" | "aborted" | "superseded";

/** Canary rollouts of new code to an agent type. Mutable in `state`, `reason`, `decided_at`. */
export const rollouts = sqliteTable(
  "rollouts",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    gateway: text("gateway").notNull(),
    type: text("type").notNull(),
    /** The bundle the other agents keep running (null: their module file). */
    fromBundle: text("from_bundle"),
    toBundle: text("to_bundle").notNull(),
    canary: real("canary").notNull(),
    minEpisodes: integer("min_episodes").notNull(),
    maxFailureRate: real("max_failure_rate").notNull(),
    bakeMs: integer("bake_ms").notNull(),
    state: text("state").$type<RolloutState>().notNull().default("canary"),
    reason: text("reason"),
    startedAt: integer("started_at").notNull(),
    decidedAt: integer("decided_at"),
  },
  (t) => [index("rollouts_type").on(t.type, t.id)],
);

/** Every step a rollout took (started, promoted, rolled back, retried, ...). Append-only. */
export const rolloutSteps = sqliteTable("rollout_steps", {
  seq: integer("seq").primaryKey({ autoIncrement: true }),
  rollout: integer("rollout").notNull(),
  at: integer("at").notNull(),
  step: text("step").notNull(),
  detail: text("detail"),
});

export type RolloutRow = typeof rollouts.$inferSelect;
export type AgentRow = typeof agents.$inferSelect;
export type StimulusRow = typeof stimuli.$inferSelect;
export type EpisodeRow = typeof episodes.$inferSelect;
export type EventRow = typeof events.$inferSelect;
export type CheckpointRow = typeof checkpoints.$inferSelect;
export type OutboxRow = typeof outbox.$inferSelect;
export type SpecVersionRow = typeof specVersions.$inferSelect;
export type BundleRow = typeof bundles.$inferSelect;
export type RejectedMessageRow = typeof rejectedMessages.$inferSelect;
export type AuditRow = typeof audit.$inferSelect;

/** Lifecycle of a wake-up: pending until it fires (a `wake` stimulus), is cancelled, or is dropped. */
export type WakeState = "pending" | "fired" | "cancelled" | "dropped";

/**
 * Durable wake-ups (`ctx.wakeIn` / `ctx.wakeAt`), written with the commit of the episode that
 * set them. Mutable only in `state`, `done_at` and `done_by`; collected after `dedup_days`
 * once no longer pending.
 */
export const wakeups = sqliteTable(
  "wakeups",
  {
    /** `<episode>.w<n>`: unique, and the same when the episode is replayed. */
    id: text("id").primaryKey(),
    gateway: text("gateway").notNull(),
    agent: text("agent").$type<AgentId>().notNull(),
    dueAt: integer("due_at").notNull(),
    /** The payload as JSON. */
    payload: text("payload").notNull(),
    /** The episode that set it. */
    setBy: text("set_by").notNull(),
    createdAt: integer("created_at").notNull(),
    state: text("state").$type<WakeState>().notNull().default("pending"),
    doneAt: integer("done_at"),
    /**
     * The episode that cancelled it, or why it was dropped. Null for a fired one: `Store.listWakes`
     * names the episode that ran it, from its stimulus.
     */
    doneBy: text("done_by"),
  },
  (t) => [index("wakeups_due").on(t.state, t.dueAt), index("wakeups_agent").on(t.agent, t.state, t.dueAt)],
);
