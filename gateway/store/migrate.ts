/**
 * Versioned schema migrations, kept by hand beside ./schema.ts (no drizzle-kit at run
 * time; test/store.test.ts round-trips every table through drizzle to prove they agree).
 *
 * The database records its version in `meta.schema_version`. At start the gateway applies
 * every migration newer than that, all in ONE transaction with the version bump, so a
 * crash mid-upgrade leaves the old schema whole. A data dir written by newer code is
 * refused (`SchemaVersionError`): old code must not guess at columns it does not know.
 * Migrations are append-only: never edit one that has shipped, add the next.
 */
import type { Client } from "@libsql/client";
import { dirname } from "node:path";
import { episodeStatus, stimulusKind } from "./codes.ts";
import { bundleRefSql, idBytesSql, idOfSql, specRefSql } from "./hashes.ts";
import { OperatorError } from "../errors.ts";

/**
 * The event log as rows (migration 18): each episode's `log` (JSONB `[[kind, data], ...]`) read out
 * as (episode, seq, kind, data), seq being the event's position. Read-only. Replaced by migration 22.
 */
const EVENTS_VIEW_18 = `CREATE VIEW events AS SELECT ep.id AS episode, j.key AS seq, j.value ->> 0 AS kind,
    j.value -> 1 AS data FROM episodes AS ep, json_each(ep.log) AS j`;

/** One step of the schema's history. */
export interface Migration {
  /** 1, 2, 3, ... in order, without gaps. */
  readonly version: number;
  /** What it changes, for the log. */
  readonly name: string;
  readonly statements: readonly string[];
}

/** Release 0.1: the schema as it first shipped. */
const INITIAL: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS spec_versions (
    hash TEXT PRIMARY KEY, gateway TEXT NOT NULL, path TEXT NOT NULL, text TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL, gateway TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', reason TEXT, paused_until INTEGER,
    anchor_seq INTEGER NOT NULL DEFAULT 0, anchor_hash TEXT,
    head_seq INTEGER NOT NULL DEFAULT 0, head_hash TEXT,
    episodes INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, last_episode_at INTEGER,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)`,
  `CREATE INDEX IF NOT EXISTS agents_type ON agents (type, key)`,
  `CREATE INDEX IF NOT EXISTS agents_status ON agents (status)`,
  `CREATE TABLE IF NOT EXISTS stimuli (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, gateway TEXT NOT NULL, agent TEXT NOT NULL, sid TEXT NOT NULL,
    kind TEXT NOT NULL, topic TEXT, payload BLOB, received_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0,
    not_before INTEGER NOT NULL DEFAULT 0, last_error TEXT, episode TEXT, done_at INTEGER)`,
  `CREATE UNIQUE INDEX IF NOT EXISTS stimuli_dedup ON stimuli (agent, sid)`,
  `CREATE INDEX IF NOT EXISTS stimuli_queue ON stimuli (agent, state, seq)`,
  `CREATE INDEX IF NOT EXISTS stimuli_state ON stimuli (state, done_at)`,
  `CREATE TABLE IF NOT EXISTS episodes (
    id TEXT PRIMARY KEY, gateway TEXT NOT NULL, agent TEXT NOT NULL, stimulus_seq INTEGER NOT NULL,
    stimulus_id TEXT NOT NULL, spec_version TEXT NOT NULL, status TEXT NOT NULL, error_kind TEXT, error TEXT,
    attempt INTEGER NOT NULL, started_at INTEGER NOT NULL, ended_at INTEGER NOT NULL,
    checkpoint TEXT, parent TEXT, events_hash TEXT NOT NULL, event_count INTEGER NOT NULL)`,
  `CREATE INDEX IF NOT EXISTS episodes_agent ON episodes (agent, started_at)`,
  `CREATE INDEX IF NOT EXISTS episodes_time ON episodes (started_at)`,
  `CREATE UNIQUE INDEX IF NOT EXISTS episodes_once ON episodes (stimulus_seq) WHERE status = 'committed'`,
  `CREATE TABLE IF NOT EXISTS events (
    episode TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (episode, seq))`,
  `CREATE TABLE IF NOT EXISTS checkpoints (
    hash TEXT PRIMARY KEY, gateway TEXT NOT NULL, agent TEXT NOT NULL, seq INTEGER NOT NULL, parent TEXT,
    episode TEXT NOT NULL, spec_version TEXT NOT NULL, state TEXT, created_at INTEGER NOT NULL)`,
  `CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_chain ON checkpoints (agent, seq)`,
  `CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, episode TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
    payload TEXT NOT NULL, qos INTEGER NOT NULL DEFAULT 1, retain INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS budget_usage (
    agent TEXT NOT NULL, window TEXT NOT NULL, episodes INTEGER NOT NULL DEFAULT 0,
    tool_calls INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0, cost REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, window))`,
];

/** Messages that matched a subscription but named no valid agent, recorded instead of acked and dropped. */
const REJECTED_MESSAGES: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS rejected_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, gateway TEXT NOT NULL, kind TEXT NOT NULL, topic TEXT, payload BLOB,
    client TEXT, reason TEXT NOT NULL, received_at INTEGER NOT NULL)`,
  `CREATE INDEX IF NOT EXISTS rejected_messages_time ON rejected_messages (received_at)`,
];

/** The audit log of operator actions (append-only; docs/access.md). */
const AUDIT: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, gateway TEXT NOT NULL, at INTEGER NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT, status INTEGER NOT NULL, detail TEXT)`,
];

/** `WHEN` of the replication triggers: they record nothing unless replication is on. */
const REPL_ON = "(SELECT value FROM meta WHERE key = 'replication') = 'on'";

/** Upsert a pending row; a row changed again while pending bumps `ver` and keeps its place. */
const pend = (tbl: string, key: string, at: string) =>
  `INSERT INTO repl_pending (tbl, key, at) VALUES ('${tbl}', ${key}, ${at})
    ON CONFLICT (tbl, key) DO UPDATE SET ver = ver + 1;`;

/**
 * Release 0.2: the replication queue (gateway/replication/). Triggers record each row
 * written to a replicated table in `repl_pending`, in the same transaction as the write,
 * so nothing committed can be missed; a row leaves the queue only once the central server
 * confirmed it. An episode's entry carries its events and checkpoint along.
 */
const REPLICATION_QUEUE: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS repl_pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, key TEXT NOT NULL,
    ver INTEGER NOT NULL DEFAULT 1, at INTEGER)`,
  `CREATE UNIQUE INDEX IF NOT EXISTS repl_pending_row ON repl_pending (tbl, key)`,
  `CREATE TRIGGER IF NOT EXISTS repl_spec AFTER INSERT ON spec_versions WHEN ${REPL_ON} BEGIN
    ${pend("spec", "NEW.hash", "NEW.created_at")} END`,
  `CREATE TRIGGER IF NOT EXISTS repl_agent_new AFTER INSERT ON agents WHEN ${REPL_ON} BEGIN
    ${pend("agent", "NEW.id", "NEW.updated_at")} END`,
  `CREATE TRIGGER IF NOT EXISTS repl_agent_set AFTER UPDATE ON agents WHEN ${REPL_ON} BEGIN
    ${pend("agent", "NEW.id", "NEW.updated_at")} END`,
  `CREATE TRIGGER IF NOT EXISTS repl_episode AFTER INSERT ON episodes WHEN ${REPL_ON} BEGIN
    ${pend("episode", "NEW.id", "NEW.ended_at")} END`,
  `CREATE TRIGGER IF NOT EXISTS repl_usage_new AFTER INSERT ON budget_usage WHEN ${REPL_ON} BEGIN
    ${pend("usage", `NEW.agent || char(10) || NEW."window"`, "NULL")} END`,
  `CREATE TRIGGER IF NOT EXISTS repl_usage_set AFTER UPDATE ON budget_usage WHEN ${REPL_ON} BEGIN
    ${pend("usage", `NEW.agent || char(10) || NEW."window"`, "NULL")} END`,
  // Stimuli that had trouble: quarantined, dropped, put back, or done after a failed attempt.
  `CREATE TRIGGER IF NOT EXISTS repl_quarantine AFTER UPDATE OF state ON stimuli
    WHEN NEW.state != OLD.state AND (NEW.state IN ('quarantined', 'dropped') OR OLD.state = 'quarantined'
      OR NEW.last_error IS NOT NULL) AND ${REPL_ON} BEGIN
    ${pend("stimulus", "CAST(NEW.seq AS TEXT)", "NEW.done_at")} END`,
];

/**
 * Release 0.3: operator actions replicate too (docs/replication.md). The audit log is
 * append-only, so one insert trigger is enough; rows already there when replication turns on
 * are queued by `enableReplication`.
 */
const REPLICATE_AUDIT: readonly string[] = [
  `CREATE TRIGGER IF NOT EXISTS repl_audit AFTER INSERT ON audit WHEN ${REPL_ON} BEGIN
    ${pend("audit", "CAST(NEW.seq AS TEXT)", "NEW.at")} END`,
];

/**
 * Episodes remember their stimulus kind, so an agent's episodes filter by it (`?kind=`) through an
 * index instead of a scan. Older episodes take it from their stimulus, else from the stimulus
 * event their sealed log begins with (the stimulus row may be collected already).
 */
const EPISODE_KIND = [
  `ALTER TABLE episodes ADD COLUMN stimulus_kind TEXT`,
  `UPDATE episodes SET stimulus_kind = COALESCE(
    (SELECT kind FROM stimuli WHERE stimuli.seq = episodes.stimulus_seq),
    (SELECT json_extract(data, '$.kind') FROM events WHERE events.episode = episodes.id AND events.seq = 0
      AND events.kind = 'stimulus'))`,
  `CREATE INDEX IF NOT EXISTS episodes_agent_kind ON episodes (agent, stimulus_kind, started_at)`,
];

/** Release 0.3: durable wake-ups (`ctx.wakeIn` / `ctx.wakeAt`). */
const WAKEUPS: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS wakeups (
    id TEXT PRIMARY KEY, gateway TEXT NOT NULL, agent TEXT NOT NULL, due_at INTEGER NOT NULL,
    payload TEXT NOT NULL, set_by TEXT NOT NULL, created_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', done_at INTEGER, done_by TEXT)`,
  `CREATE INDEX IF NOT EXISTS wakeups_due ON wakeups (state, due_at)`,
  `CREATE INDEX IF NOT EXISTS wakeups_agent ON wakeups (agent, state, due_at)`,
];

/** MQTT 5 message expiry: a stimulus past it is skipped (state 'expired'), not run. */
const STIMULUS_EXPIRY: readonly string[] = [`ALTER TABLE stimuli ADD COLUMN expires_at INTEGER`];

/** The W3C trace context a stimulus came in with (a webhook's `traceparent`), so its episode joins that trace. */
const STIMULUS_TRACE: readonly string[] = [`ALTER TABLE stimuli ADD COLUMN traceparent TEXT`];
/**
 * One queue entry per episode commit (issue 13): a commit used to queue four entries (the
 * episode, its agent's head update, both budget windows), each an insert or upsert into
 * `repl_pending` and its index inside the commit. Now the episode's entry stands for all of
 * them: the pusher sends the agent's current row and its usage rows of the episode's windows
 * along with it (gateway/replication/batch.ts). The agent trigger fires only for changes an
 * episode does not make (created, status, pause, retire, retention's anchor); budget usage is
 * only ever written by an episode's commit or failure, which both insert an episode row.
 */
const ONE_ENTRY_PER_EPISODE: readonly string[] = [
  `DROP TRIGGER IF EXISTS repl_agent_set`,
  `DROP TRIGGER IF EXISTS repl_usage_new`,
  `DROP TRIGGER IF EXISTS repl_usage_set`,
  `CREATE TRIGGER IF NOT EXISTS repl_agent_status
    AFTER UPDATE OF type, key, gateway, status, reason, paused_until, anchor_seq, anchor_hash ON agents
    WHEN ${REPL_ON} BEGIN
    ${pend("agent", "NEW.id", "NEW.updated_at")} END`,
];

/**
 * Release 0.4: upgrades (docs/upgrading.md). Agent code is stored content-addressed and each
 * episode names the bundle it ran; spec versions name their bundles; checkpoints record the
 * state version of the code that wrote them.
 */
const BUNDLES: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS bundles (
    hash TEXT PRIMARY KEY, gateway TEXT NOT NULL, module TEXT NOT NULL, code TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL)`,
  `ALTER TABLE episodes ADD COLUMN bundle TEXT`,
  `CREATE INDEX IF NOT EXISTS episodes_bundle ON episodes (bundle)`,
  `ALTER TABLE spec_versions ADD COLUMN bundles TEXT`,
  `ALTER TABLE checkpoints ADD COLUMN state_version INTEGER`,
  `ALTER TABLE checkpoints ADD COLUMN migrated_from INTEGER`,
];

/**
 * Release 0.4: canary rollouts (docs/upgrading.md). One row per rollout of new code to a type
 * (its state survives restarts and kill -9); every step it takes is a row of `rollout_steps`.
 */
const ROLLOUTS: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, gateway TEXT NOT NULL, type TEXT NOT NULL, from_bundle TEXT,
    to_bundle TEXT NOT NULL, canary REAL NOT NULL, min_episodes INTEGER NOT NULL, max_failure_rate REAL NOT NULL,
    bake_ms INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'canary', reason TEXT, started_at INTEGER NOT NULL,
    decided_at INTEGER)`,
  `CREATE INDEX IF NOT EXISTS rollouts_type ON rollouts (type, id)`,
  `CREATE TABLE IF NOT EXISTS rollout_steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, rollout INTEGER NOT NULL, at INTEGER NOT NULL, step TEXT NOT NULL,
    detail TEXT)`,
];

/**
 * Agents counted by type and status (`/metrics`, `fleet/health`, `/api/fleet`) from an index
 * alone: with 100,000 agents the GROUP BY walked agents_type and read every row (~150 ms a
 * count on a loaded 2-core box), now it reads this index in order.
 */
const AGENT_COUNTS: readonly string[] = [
  `CREATE INDEX IF NOT EXISTS agents_counts ON agents (type, status, paused_until)`,
];

/**
 * The event log keyed by (episode, seq) alone (issue 13: store bytes per episode): a rowid table
 * with a PRIMARY KEY stored every event twice, once in the table and once in its key's index
 * (~260 of ~2,260 bytes of a temp-monitor episode). WITHOUT ROWID keeps the rows in the key's
 * b-tree itself; every read is by episode (and seq), and nothing names an event's rowid.
 * Existing rows are copied over in key order within the migration's transaction.
 */
const EVENTS_BY_KEY: readonly string[] = [
  `CREATE TABLE events_by_key (
    episode TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (episode, seq)) WITHOUT ROWID`,
  `INSERT INTO events_by_key (episode, seq, kind, data) SELECT episode, seq, kind, data FROM events
    ORDER BY episode, seq`,
  `DROP TABLE events`,
  `ALTER TABLE events_by_key RENAME TO events`,
];

/** The key of an agent's `agent_counts` row: its type, status and whether its pause ends by itself. */
const countKey = (row: "NEW" | "OLD") => `${row}.type, ${row}.status, ${row}.paused_until IS NOT NULL`;

/**
 * Fleet counts kept by the database itself (issue 13: `/metrics`, `fleet/health`, `/api/fleet` and
 * `/api/agents` totals with 100,000 agents). Triggers move each agent's row in and out of
 * `agent_counts` in the same transaction as the change to `agents`, so the counts equal a
 * `GROUP BY` over `agents` after any write, restart, crash or reshard, and read in O(types)
 * instead of walking 100,000 index entries (~15 ms idle, 50-100 ms on a loaded 2-core box) on
 * every scrape and health tick. Rows that fall to 0 stay (at most types x statuses x 2).
 * `budget_usage_window` lets the per-type budget totals read the current windows' rows only,
 * not every window retention still keeps.
 */
const FLEET_COUNTS: readonly string[] = [
  `CREATE TABLE agent_counts (
    type TEXT NOT NULL, status TEXT NOT NULL, timed INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (type, status, timed)) WITHOUT ROWID`,
  `INSERT INTO agent_counts (type, status, timed, n)
    SELECT type, status, paused_until IS NOT NULL, count(*) FROM agents GROUP BY 1, 2, 3`,
  `CREATE TRIGGER agent_counts_new AFTER INSERT ON agents BEGIN
    INSERT INTO agent_counts (type, status, timed, n) VALUES (${countKey("NEW")}, 1)
      ON CONFLICT (type, status, timed) DO UPDATE SET n = n + 1; END`,
  `CREATE TRIGGER agent_counts_gone AFTER DELETE ON agents BEGIN
    UPDATE agent_counts SET n = n - 1 WHERE (type, status, timed) = (${countKey("OLD")}); END`,
  `CREATE TRIGGER agent_counts_set AFTER UPDATE OF type, status, paused_until ON agents
    WHEN (${countKey("OLD")}) IS NOT (${countKey("NEW")}) BEGIN
    UPDATE agent_counts SET n = n - 1 WHERE (type, status, timed) = (${countKey("OLD")});
    INSERT INTO agent_counts (type, status, timed, n) VALUES (${countKey("NEW")}, 1)
      ON CONFLICT (type, status, timed) DO UPDATE SET n = n + 1; END`,
  `CREATE INDEX budget_usage_window ON budget_usage ("window", agent)`,
];

/**
 * The per-episode tables stop repeating the gateway id (issue 13: ~140 of ~2,050 bytes of a
 * temp-monitor episode, 37 bytes on each stimulus, episode and checkpoint row). Every row of a
 * data dir is its gateway's: `meta.gateway_id` says which, replication already sends that id
 * instead of the column (gateway/replication/tables.ts), and no hash seals it.
 */
const IMPLIED_GATEWAY: readonly string[] = [
  `ALTER TABLE stimuli DROP COLUMN gateway`,
  `ALTER TABLE episodes DROP COLUMN gateway`,
  `ALTER TABLE checkpoints DROP COLUMN gateway`,
];

/** The agent type of a `budget_usage` row: the part of its agent id before the first `/` (types have none). */
const usageType = (row: "NEW" | "OLD") => `substr(${row}.agent, 1, instr(${row}.agent, '/') - 1)`;

/**
 * Budget use per window and agent type kept by the database (issue 13: `/metrics` and
 * `fleet/health` with 100,000 agents). The per-type totals and per-type highest single agent
 * were a join of every `budget_usage` row of the current hour and day windows with `agents`:
 * with 100,000 agents active, 400-800 ms for each snapshot (once a second while scraped, and on
 * every health tick). Triggers keep `usage_totals` in the same transaction as each booking.
 * A `budget_usage` row is only ever inserted, incremented in place (its key never changes) or
 * deleted by retention, so sums follow exactly and `max_*` (a row's use only grows within its
 * window) is exact until retention deletes rows of the window, which no budget reads any more;
 * a window's totals row goes with its last usage row. `budget_usage_window` (migration 15) served
 * the join and is dropped.
 */
const USAGE_TOTALS: readonly string[] = [
  `CREATE TABLE usage_totals (
    "window" TEXT NOT NULL, type TEXT NOT NULL, agents INTEGER NOT NULL, episodes INTEGER NOT NULL,
    tool_calls INTEGER NOT NULL, tokens INTEGER NOT NULL, cost REAL NOT NULL, max_episodes INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL, max_cost REAL NOT NULL, PRIMARY KEY ("window", type)) WITHOUT ROWID`,
  `INSERT INTO usage_totals
    SELECT "window", substr(agent, 1, instr(agent, '/') - 1), count(*), sum(episodes), sum(tool_calls), sum(tokens),
      sum(cost), max(episodes), max(tokens), max(cost) FROM budget_usage GROUP BY 1, 2`,
  `CREATE TRIGGER usage_totals_new AFTER INSERT ON budget_usage BEGIN
    INSERT INTO usage_totals VALUES (NEW."window", ${usageType("NEW")}, 1, NEW.episodes, NEW.tool_calls, NEW.tokens,
      NEW.cost, NEW.episodes, NEW.tokens, NEW.cost)
    ON CONFLICT ("window", type) DO UPDATE SET agents = agents + 1, episodes = episodes + excluded.episodes,
      tool_calls = tool_calls + excluded.tool_calls, tokens = tokens + excluded.tokens, cost = cost + excluded.cost,
      max_episodes = max(max_episodes, excluded.max_episodes), max_tokens = max(max_tokens, excluded.max_tokens),
      max_cost = max(max_cost, excluded.max_cost); END`,
  `CREATE TRIGGER usage_totals_set AFTER UPDATE ON budget_usage BEGIN
    UPDATE usage_totals SET episodes = episodes + NEW.episodes - OLD.episodes,
      tool_calls = tool_calls + NEW.tool_calls - OLD.tool_calls, tokens = tokens + NEW.tokens - OLD.tokens,
      cost = cost + NEW.cost - OLD.cost, max_episodes = max(max_episodes, NEW.episodes),
      max_tokens = max(max_tokens, NEW.tokens), max_cost = max(max_cost, NEW.cost)
    WHERE "window" = NEW."window" AND type = ${usageType("NEW")}; END`,
  `CREATE TRIGGER usage_totals_gone AFTER DELETE ON budget_usage BEGIN
    UPDATE usage_totals SET agents = agents - 1, episodes = episodes - OLD.episodes,
      tool_calls = tool_calls - OLD.tool_calls, tokens = tokens - OLD.tokens, cost = cost - OLD.cost
    WHERE "window" = OLD."window" AND type = ${usageType("OLD")};
    DELETE FROM usage_totals WHERE "window" = OLD."window" AND type = ${usageType("OLD")} AND agents <= 0; END`,
  `DROP INDEX budget_usage_window`,
];

/**
 * One row per episode for its event log (issue 13: store bytes per episode). The log was a row per
 * event keyed (episode, seq): a temp-monitor episode's five events repeated its 36-byte id five
 * times and cost ~600 of ~1,900 bytes. It is now the `log` column of the episode's own row, JSONB
 * of `[[kind, data], ...]` with each event's data embedded as JSON and its seq its position (every
 * log was written numbered 0, 1, 2, ...). The view `events` gives the same (episode, seq, kind,
 * data) rows as before: `data` comes back as the exact text that was stored (SQLite keeps a JSON
 * value's number and string text as written), so `events_hash` verifies as it did. Deleting an
 * episode deletes its log. Existing logs move over in seq order within the migration's transaction.
 */
const EVENT_LOG_IN_EPISODE: readonly string[] = [
  `ALTER TABLE episodes ADD COLUMN log BLOB`,
  // Data that is not JSON (never written by this code) is kept as a JSON string: its episode then
  // fails `fleet verify` instead of the upgrade failing.
  `UPDATE episodes SET log = (SELECT jsonb_group_array(jsonb_array(kind,
      CASE WHEN json_valid(data) THEN jsonb(data) ELSE data END) ORDER BY seq)
    FROM events WHERE events.episode = episodes.id)`,
  `DROP TABLE events`,
  EVENTS_VIEW_18,
];

/**
 * Indexes that only cover the rows their queries look for (issue 13: store bytes per episode). A
 * finished stimulus stays as dedup memory for `dedup_days`, yet every one kept an entry in the
 * queue index (agent, state, seq) that only queued ones are looked up by (~39 bytes an episode);
 * the queue index now holds queued stimuli only, keyed (agent, seq). Most episodes run no pinned
 * bundle, so `episodes_bundle` keeps the rows that name one (every query on it asks `bundle = ?`).
 */
const PARTIAL_INDEXES: readonly string[] = [
  `DROP INDEX stimuli_queue`,
  `CREATE INDEX stimuli_queue ON stimuli (agent, seq) WHERE state = 'queued'`,
  `DROP INDEX episodes_bundle`,
  `CREATE INDEX episodes_bundle ON episodes (bundle) WHERE bundle IS NOT NULL`,
];

/** SQL of migration 20: the stored form of a text hash column (gateway/store/hashes.ts `hashToDriver`). */
const hashBytes = (c: string) =>
  `${c} = CASE WHEN typeof(${c}) = 'text' AND length(${c}) = 64 AND ${c} NOT GLOB '*[^0-9a-f]*' THEN unhex(${c})
    ELSE ${c} END`;

/**
 * An episode's three hashes as their 32 bytes (issue 13: store bytes per episode): the checkpoint
 * it sealed, the one it started from and its event log's hash were 64 hex characters each, ~100 of
 * a temp-monitor episode's ~1,550 bytes (and its row then fits 7 to a page instead of 6). The code
 * reads and writes them as hex through their column type (./hashes.ts); a value that is not 64
 * lowercase hex characters stays text, so every value reads back as it was.
 */
const EPISODE_HASH_BYTES: readonly string[] = [
  `UPDATE episodes SET ${hashBytes("checkpoint")}, ${hashBytes("parent")}, ${hashBytes("events_hash")}`,
];

/**
 * The spec version of every episode and checkpoint, and each checkpoint's parent, as their 32 bytes
 * (issue 13: store bytes per episode; as migration 20 did for the episode's own hashes): two
 * 64-character copies of the same few spec hashes and one of the previous checkpoint's hash, ~100
 * bytes of a temp-monitor episode.
 */
const SPEC_AND_PARENT_BYTES: readonly string[] = [
  `UPDATE episodes SET ${hashBytes("spec_version")}`,
  `UPDATE checkpoints SET ${hashBytes("parent")}, ${hashBytes("spec_version")}`,
];

/**
 * A record's kind is not written twice (issue 13: store bytes per episode). Every record event's
 * data is the record itself, which begins `{"k":"<kind>"`, and its log element repeated the kind
 * before it: such an event is now stored as its data alone, and the view takes its kind from `k`.
 * Other events (the stimulus, the end or failure) stay `[kind, data]`; logs written before stay as
 * they are and read the same. Only the writer (store/episodes.ts `logText`) decides, by the exact
 * text prefix, so `data` still reads back byte for byte.
 */
/**
 * An event of an episode's log, as the `events` view shows it: `j` names a `json_each` row of the
 * log. The central server expands the logs a gateway pushes with the same expressions
 * (gateway/replication/batch.ts), so both sides show an event alike.
 */
export const logEventSql = (j: string) => ({
  kind: `CASE ${j}.type WHEN 'object' THEN ${j}.value ->> 'k' ELSE ${j}.value ->> 0 END`,
  data: `CASE ${j}.type WHEN 'object' THEN ${j}.value ELSE ${j}.value -> 1 END`,
});

const EVENTS_VIEW_22 = `CREATE VIEW events AS SELECT ep.id AS episode, j.key AS seq,
    ${logEventSql("j").kind} AS kind,
    ${logEventSql("j").data} AS data
    FROM episodes AS ep, json_each(ep.log) AS j`;
const RECORD_KIND_IMPLIED: readonly string[] = [`DROP VIEW events`, EVENTS_VIEW_22];

/**
 * Checkpoint hashes as their 32 bytes (issue 13: store bytes per episode, as migrations 20 and 21):
 * the key of every checkpoint and its index entry, ~70 bytes a temp-monitor episode. The agents'
 * head and anchor name a checkpoint by that hash and are compared with it in SQL, so they are stored
 * the same way. (Changing `anchor_hash` queues each agent for replication once, when it is on.)
 */
const CHECKPOINT_HASH_BYTES: readonly string[] = [
  `UPDATE checkpoints SET ${hashBytes("hash")}`,
  `UPDATE agents SET ${hashBytes("head_hash")}, ${hashBytes("anchor_hash")}`,
];

/**
 * One index for an agent's history instead of two (issue 13: store bytes per episode). Every episode
 * had an entry in (agent, started_at) and in (agent, stimulus_kind, started_at), ~80 bytes of a
 * temp-monitor episode. One index (agent, started_at, stimulus_kind) serves both: history pages walk
 * it by time as before, and a kind filter is checked on the index entry before its row is read, so a
 * few device episodes among thousands of timer fires cost index entries, not rows (~40 bytes saved).
 */
const ONE_AGENT_INDEX: readonly string[] = [
  `DROP INDEX episodes_agent_kind`,
  `DROP INDEX episodes_agent`,
  `CREATE INDEX episodes_agent ON episodes (agent, started_at, stimulus_kind)`,
];

/**
 * Stimulus dedup keyed (sid, agent) rather than (agent, sid). Keyed agent-first, every commit of
 * intake touched one leaf of this index per agent in the batch: with stimuli for 200 agents, 100
 * rows wrote ~80 pages to the WAL (a page is 4 KB; ~160 pwrite calls). Ids that grow with time
 * (counters, UUIDv7, timestamps: what devices send) now land next to each other whatever the
 * agent, and 100 rows write ~45 pages; random ids cost what they did. Lookups name both columns.
 */
const DEDUP_SID_FIRST: readonly string[] = [
  `DROP INDEX stimuli_dedup`,
  `CREATE UNIQUE INDEX stimuli_dedup ON stimuli (sid, agent)`,
];

/**
 * Episode ids as their 16 bytes (issue 13: store bytes per episode). A UUIDv7 was 36 characters in
 * the episode row, its primary-key index, its checkpoint and its stimulus, ~80 bytes of a
 * temp-monitor episode. The code reads and writes them as text through their column type
 * (./hashes.ts `idColumn`); anything that is not a lowercase UUID stays text. The replication queue
 * keeps the text (its key is sent and compared as such), so its episode trigger converts.
 */
const REPL_EPISODE_26 = `CREATE TRIGGER repl_episode AFTER INSERT ON episodes WHEN ${REPL_ON} BEGIN
    ${pend("episode", idOfSql("NEW.id"), "NEW.ended_at")} END`;
const EPISODE_ID_BYTES: readonly string[] = [
  `UPDATE episodes SET id = ${idBytesSql("id")}`,
  `UPDATE checkpoints SET episode = ${idBytesSql("episode")}`,
  `UPDATE stimuli SET episode = ${idBytesSql("episode")} WHERE episode IS NOT NULL`,
  `DROP TRIGGER IF EXISTS repl_episode`,
  REPL_EPISODE_26,
];

/**
 * Spec versions named by the first 6 bytes of their hash (issue 13: store bytes per episode). Every
 * episode and checkpoint repeated one of the data dir's few spec hashes, 32 bytes each; they keep the
 * prefix when it names the hash (./hashes.ts `specColumn`: the oldest spec version with that prefix),
 * else all 32 bytes. The code reads the whole hash back, so verify, replay and the API are unchanged.
 */
const SPEC_REFS: readonly string[] = [
  `UPDATE episodes SET ${specRefSql("spec_version")} WHERE typeof(spec_version) = 'blob'`,
  `UPDATE checkpoints SET ${specRefSql("spec_version")} WHERE typeof(spec_version) = 'blob'`,
];

/**
 * Checkpoints found by hash through an index of its first 8 bytes (issue 13: store bytes per
 * episode). The hash was the primary key, so every checkpoint had an index entry of all 32 bytes
 * (~45 bytes an episode); its first 8 bytes find it as well (a hash is compared whole after), and a
 * chain position stays unique by (agent, seq). The table is rebuilt without the key, rows in order.
 */
const CHECKPOINT_HASH_PREFIX: readonly string[] = [
  `CREATE TABLE checkpoints_new (
    hash TEXT NOT NULL, agent TEXT NOT NULL, seq INTEGER NOT NULL, parent TEXT, episode TEXT NOT NULL,
    spec_version TEXT NOT NULL, state TEXT, created_at INTEGER NOT NULL, state_version INTEGER, migrated_from INTEGER)`,
  `INSERT INTO checkpoints_new (hash, agent, seq, parent, episode, spec_version, state, created_at, state_version,
    migrated_from) SELECT hash, agent, seq, parent, episode, spec_version, state, created_at, state_version,
    migrated_from FROM checkpoints ORDER BY rowid`,
  `DROP TABLE checkpoints`,
  `ALTER TABLE checkpoints_new RENAME TO checkpoints`,
  `CREATE UNIQUE INDEX checkpoints_chain ON checkpoints (agent, seq)`,
  `CREATE INDEX checkpoints_hash ON checkpoints (substr(hash, 1, 8))`,
];

/**
 * Retention tombstones the checkpoints beyond `keep` (gateway/ops/gc.ts): each agent remembers how
 * far its chain is tombstoned, so a pass reads only the checkpoints it tombstones, not every
 * tombstone of every chain (nor keeps an index entry per live checkpoint).
 */
const TOMBSTONE_FRONTIER: readonly string[] = [
  `ALTER TABLE agents ADD COLUMN tombstoned_seq INTEGER NOT NULL DEFAULT 0`,
];

/**
 * Bundles named by the first 8 bytes of their hash (issue 13: store bytes per episode). With code pinned
 * by content, every episode named its bundle as 64 hex characters, in its row and in `episodes_bundle`
 * (~140 bytes an episode). They keep the prefix when it names the hash (./hashes.ts `bundleColumn`: the
 * oldest bundle with that prefix), else its 32 bytes; `episodes_bundle` follows the rows.
 */
const BUNDLE_REFS: readonly string[] = [`UPDATE episodes SET ${bundleRefSql("bundle")} WHERE typeof(bundle) = 'text'`];

/**
 * Episode outcomes and stimulus kinds as small integers (issue 13: store bytes per episode; ./codes.ts):
 * ~17 bytes of a temp-monitor episode, in its row and in `episodes_agent`. A column's declared type
 * cannot change in place (an integer into a TEXT column is stored as text), so the table is rebuilt,
 * rows and rowids in order, with its indexes, its replication trigger and the `events` view over it.
 */
const EPISODE_CODES: readonly string[] = [
  `DROP VIEW events`,
  `CREATE TABLE episodes_new (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, stimulus_seq INTEGER NOT NULL,
    stimulus_id TEXT NOT NULL, spec_version TEXT NOT NULL, status INTEGER NOT NULL, error_kind TEXT, error TEXT,
    attempt INTEGER NOT NULL, started_at INTEGER NOT NULL, ended_at INTEGER NOT NULL,
    checkpoint TEXT, parent TEXT, events_hash TEXT NOT NULL, event_count INTEGER NOT NULL, stimulus_kind INTEGER,
    bundle TEXT, log BLOB)`,
  `INSERT INTO episodes_new (rowid, id, agent, stimulus_seq, stimulus_id, spec_version, status, error_kind, error,
    attempt, started_at, ended_at, checkpoint, parent, events_hash, event_count, stimulus_kind, bundle, log)
    SELECT rowid, id, agent, stimulus_seq, stimulus_id, spec_version, ${episodeStatus.storedSql("status")}, error_kind,
    error, attempt, started_at, ended_at, checkpoint, parent, events_hash, event_count,
    ${stimulusKind.storedSql("stimulus_kind")}, bundle, log FROM episodes ORDER BY rowid`,
  `DROP TABLE episodes`,
  `ALTER TABLE episodes_new RENAME TO episodes`,
  `CREATE INDEX episodes_time ON episodes (started_at)`,
  `CREATE UNIQUE INDEX episodes_once ON episodes (stimulus_seq) WHERE status = ${episodeStatus.sql("committed")}`,
  `CREATE INDEX episodes_bundle ON episodes (bundle) WHERE bundle IS NOT NULL`,
  `CREATE INDEX episodes_agent ON episodes (agent, started_at, stimulus_kind)`,
  REPL_EPISODE_26,
  EVENTS_VIEW_22,
];

/** Trigger statements counting one more episode naming the stored bundle `expr` (null: none). */
function useBundle(expr: string): string {
  return `INSERT INTO bundle_uses (bundle, episodes) SELECT ${expr}, 1 WHERE ${expr} IS NOT NULL
    ON CONFLICT (bundle) DO UPDATE SET episodes = episodes + 1;`;
}

/** Trigger statements counting one fewer episode naming the stored bundle `expr`; its row goes at none. */
function unuseBundle(expr: string): string {
  return `UPDATE bundle_uses SET episodes = episodes - 1 WHERE bundle = ${expr};
    DELETE FROM bundle_uses WHERE bundle = ${expr} AND episodes <= 0;`;
}

/**
 * Bundles kept by a count of the episodes naming each, not by an index of them (issue 13: store bytes
 * per episode). With code pinned, every episode had an entry in `episodes_bundle` (~19 bytes) that only
 * code retention read, asking whether any episode still names a bundle. Triggers on `episodes` now keep
 * `bundle_uses` (stored bundle form -> episodes naming it; no row at 0), so that question is one lookup
 * and an episode costs a counter bump. The triggers see every insert, delete and change of `bundle`; a
 * later migration that rebuilds `episodes` (as 31 did) must create them again and count afresh.
 */
const BUNDLE_USES: readonly string[] = [
  `CREATE TABLE bundle_uses (bundle TEXT PRIMARY KEY, episodes INTEGER NOT NULL) WITHOUT ROWID`,
  `INSERT INTO bundle_uses (bundle, episodes) SELECT bundle, count(*) FROM episodes WHERE bundle IS NOT NULL
    GROUP BY bundle`,
  `DROP INDEX episodes_bundle`,
  `CREATE TRIGGER bundle_used AFTER INSERT ON episodes WHEN NEW.bundle IS NOT NULL BEGIN
    ${useBundle("NEW.bundle")} END`,
  `CREATE TRIGGER bundle_unused AFTER DELETE ON episodes WHEN OLD.bundle IS NOT NULL BEGIN
    ${unuseBundle("OLD.bundle")} END`,
  `CREATE TRIGGER bundle_changed AFTER UPDATE OF bundle ON episodes WHEN OLD.bundle IS NOT NEW.bundle BEGIN
    ${unuseBundle("OLD.bundle")} ${useBundle("NEW.bundle")} END`,
];

/**
 * The tombstone frontier of chains collected before migration 29 recorded it: it stayed 0, and
 * `fleet verify` (which allows collected states only at or below the frontier) would name every
 * tombstone retention made before then. Set once from the states collected below each head.
 */
const TOMBSTONE_FRONTIER_BACKFILL: readonly string[] = [
  `UPDATE agents SET tombstoned_seq = coalesce((SELECT max(c.seq) FROM checkpoints c
    WHERE c.agent = agents.id AND c.seq < agents.head_seq AND c.state IS NULL), 0) WHERE tombstoned_seq = 0`,
];

/** Every migration, oldest first. */
/**
 * No index of queued stimuli by agent (issue 13: intake throughput). `stimuli_queue` (agent, seq)
 * put each stimulus in its agent's part of the index: a commit of intake for 200 agents wrote
 * ~200 scattered leaves to the WAL, ~4 KB per stimulus, and was the largest part of intake's
 * SQLite time. The running gateway's queue book holds each agent's queued seqs (loaded at start
 * through `stimuli_state`), so a turn reads its head by rowid; the few reads by agent that are
 * left (retire, the CLI's drain check) walk the queued stimuli through `stimuli_state`.
 */
const NO_QUEUE_INDEX: readonly string[] = [`DROP INDEX stimuli_queue`];

/**
 * Bytes each agent's episodes store, per window (`bytes_per_day`, tester F: one agent's event log
 * filled the disk and stopped the fleet): a `bytes` column in the ledger, and its sum and highest
 * single agent in `usage_totals`, whose triggers (migration 17) are made again to keep them.
 * Windows booked before it count 0 bytes.
 */
const STORED_BYTES: readonly string[] = [
  `ALTER TABLE budget_usage ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0`,
  `ALTER TABLE usage_totals ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0`,
  `ALTER TABLE usage_totals ADD COLUMN max_bytes INTEGER NOT NULL DEFAULT 0`,
  `DROP TRIGGER usage_totals_new`,
  `DROP TRIGGER usage_totals_set`,
  `DROP TRIGGER usage_totals_gone`,
  `CREATE TRIGGER usage_totals_new AFTER INSERT ON budget_usage BEGIN
    INSERT INTO usage_totals VALUES (NEW."window", ${usageType("NEW")}, 1, NEW.episodes, NEW.tool_calls, NEW.tokens,
      NEW.cost, NEW.episodes, NEW.tokens, NEW.cost, NEW.bytes, NEW.bytes)
    ON CONFLICT ("window", type) DO UPDATE SET agents = agents + 1, episodes = episodes + excluded.episodes,
      tool_calls = tool_calls + excluded.tool_calls, tokens = tokens + excluded.tokens, cost = cost + excluded.cost,
      bytes = bytes + excluded.bytes, max_episodes = max(max_episodes, excluded.max_episodes),
      max_tokens = max(max_tokens, excluded.max_tokens), max_cost = max(max_cost, excluded.max_cost),
      max_bytes = max(max_bytes, excluded.max_bytes); END`,
  `CREATE TRIGGER usage_totals_set AFTER UPDATE ON budget_usage BEGIN
    UPDATE usage_totals SET episodes = episodes + NEW.episodes - OLD.episodes,
      tool_calls = tool_calls + NEW.tool_calls - OLD.tool_calls, tokens = tokens + NEW.tokens - OLD.tokens,
      cost = cost + NEW.cost - OLD.cost, bytes = bytes + NEW.bytes - OLD.bytes,
      max_episodes = max(max_episodes, NEW.episodes), max_tokens = max(max_tokens, NEW.tokens),
      max_cost = max(max_cost, NEW.cost), max_bytes = max(max_bytes, NEW.bytes)
    WHERE "window" = NEW."window" AND type = ${usageType("NEW")}; END`,
  `CREATE TRIGGER usage_totals_gone AFTER DELETE ON budget_usage BEGIN
    UPDATE usage_totals SET agents = agents - 1, episodes = episodes - OLD.episodes,
      tool_calls = tool_calls - OLD.tool_calls, tokens = tokens - OLD.tokens, cost = cost - OLD.cost,
      bytes = bytes - OLD.bytes
    WHERE "window" = OLD."window" AND type = ${usageType("OLD")};
    DELETE FROM usage_totals WHERE "window" = OLD."window" AND type = ${usageType("OLD")} AND agents <= 0; END`,
];

/**
 * Each bundle keeps the source map it was built with (docs/upgrading.md), so a failure in code
 * this process did not build (a rollout's old bundle after a restart, an episode pinned to code
 * edited since) still names the author's files and lines. Bundles stored before have none.
 */
const BUNDLE_MAPS: readonly string[] = [`ALTER TABLE bundles ADD COLUMN map TEXT`];

/**
 * A send another shard forwarded carries its count of the sends that led to it (docs/shards.md), so
 * `[fleet] max_send_hops` bounds a loop between agents of different shards too. Null for every other
 * stimulus (the count is then read from the local history).
 */
const FORWARDED_HOPS: readonly string[] = [`ALTER TABLE stimuli ADD COLUMN hops INTEGER`];

export const MIGRATIONS: readonly Migration[] = [
  { version: 1, name: "initial schema", statements: INITIAL },
  { version: 2, name: "rejected messages", statements: REJECTED_MESSAGES },
  { version: 3, name: "audit log", statements: AUDIT },
  { version: 4, name: "replication queue", statements: REPLICATION_QUEUE },
  { version: 5, name: "replicate operator actions", statements: REPLICATE_AUDIT },
  { version: 6, name: "episode stimulus kind", statements: EPISODE_KIND },
  { version: 7, name: "wake-ups", statements: WAKEUPS },
  { version: 8, name: "stimulus expiry", statements: STIMULUS_EXPIRY },
  { version: 9, name: "stimulus trace context", statements: STIMULUS_TRACE },
  { version: 10, name: "code bundles and state versions", statements: BUNDLES },
  { version: 11, name: "one replication entry per episode", statements: ONE_ENTRY_PER_EPISODE },
  { version: 12, name: "canary rollouts", statements: ROLLOUTS },
  { version: 13, name: "agent counts index", statements: AGENT_COUNTS },
  { version: 14, name: "event log without rowid", statements: EVENTS_BY_KEY },
  { version: 15, name: "fleet counts", statements: FLEET_COUNTS },
  { version: 16, name: "gateway id implied on per-episode rows", statements: IMPLIED_GATEWAY },
  { version: 17, name: "budget use per type", statements: USAGE_TOTALS },
  { version: 18, name: "event log in the episode row", statements: EVENT_LOG_IN_EPISODE },
  { version: 19, name: "partial queue and bundle indexes", statements: PARTIAL_INDEXES },
  { version: 20, name: "episode hashes as bytes", statements: EPISODE_HASH_BYTES },
  { version: 21, name: "spec versions and checkpoint parents as bytes", statements: SPEC_AND_PARENT_BYTES },
  { version: 22, name: "record kinds implied in the event log", statements: RECORD_KIND_IMPLIED },
  { version: 23, name: "checkpoint hashes as bytes", statements: CHECKPOINT_HASH_BYTES },
  { version: 24, name: "one agent history index", statements: ONE_AGENT_INDEX },
  { version: 25, name: "stimulus dedup keyed by id first", statements: DEDUP_SID_FIRST },
  { version: 26, name: "episode ids as bytes", statements: EPISODE_ID_BYTES },
  { version: 27, name: "spec versions by hash prefix", statements: SPEC_REFS },
  { version: 28, name: "checkpoints found by hash prefix", statements: CHECKPOINT_HASH_PREFIX },
  { version: 29, name: "tombstone frontier", statements: TOMBSTONE_FRONTIER },
  { version: 30, name: "bundles by hash prefix", statements: BUNDLE_REFS },
  { version: 31, name: "episode outcomes and stimulus kinds as codes", statements: EPISODE_CODES },
  { version: 32, name: "bundles kept by a count of their episodes", statements: BUNDLE_USES },
  { version: 33, name: "queued stimuli found through the queue book", statements: NO_QUEUE_INDEX },
  { version: 34, name: "tombstone frontier of chains collected before 29", statements: TOMBSTONE_FRONTIER_BACKFILL },
  { version: 35, name: "bytes stored per budget window", statements: STORED_BYTES },
  { version: 36, name: "bundles keep their source maps", statements: BUNDLE_MAPS },
  { version: 37, name: "send hops carried across shards", statements: FORWARDED_HOPS },
];

/** The schema version this code writes. */
export const SCHEMA_VERSION: number = MIGRATIONS.at(-1)?.version ?? 0;

/**
 * The newest migration that changed the form of values already stored (episode ids, hashes and spec
 * references as bytes; outcomes and stimulus kinds as codes). In a database older than this, a lookup
 * by one of those values finds nothing instead of failing, so a read command that looks them up
 * refuses the database rather than answer "none".
 */
export const STORED_FORMS_VERSION = 31;

/** The database's schema does not match what this code can use. */
export class SchemaVersionError extends OperatorError {
  override readonly name = "SchemaVersionError";
  constructor(
    readonly found: number,
    readonly supported: number,
    message: string,
  ) {
    super(message);
  }
}

/** The version recorded in the database (0 for an empty one). */
export async function schemaVersion(client: Pick<Client, "execute">): Promise<number> {
  const meta = await client.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'");
  if (meta.rows.length === 0) return 0;
  const row = await client.execute("SELECT value FROM meta WHERE key = 'schema_version'");
  const v = Number(row.rows[0]?.value ?? 0);
  if (!Number.isSafeInteger(v) || v < 0) throw new SchemaVersionError(-1, SCHEMA_VERSION, `bad schema_version "${v}"`);
  return v;
}

/** Refuse a database written by newer code. */
export function checkNotNewer(found: number, path: string, supported = SCHEMA_VERSION): void {
  if (found > supported) {
    throw new SchemaVersionError(
      found,
      supported,
      `${path} has schema version ${found}, newer than this code's ${supported}: ` +
        "run the release that wrote it (or newer); nothing was changed",
    );
  }
}

/**
 * Refuse to upgrade a database an older release wrote outside a gateway's start: the upgrade is
 * irreversible (that release refuses the data dir after it), so an offline command must not do it.
 */
export function checkNotOlder(found: number, path: string, supported = SCHEMA_VERSION): void {
  if (found > 0 && found < supported) {
    throw new SchemaVersionError(
      found,
      supported,
      `${dirname(path)} was written by an older release (schema ${found}; this one is ${supported}): ` +
        `${UPGRADE_HINT}; nothing was changed`,
    );
  }
}

/** How a data dir an older release wrote is upgraded, for messages that refuse to read or write it. */
export const UPGRADE_HINT = "`fleet start` upgrades it (irreversible; `fleet backup` first)";

/**
 * Bring the database up to the newest migration, in one transaction. Returns the versions
 * before and after (equal when there was nothing to do). The version is read again once the
 * write lock is held: another process migrating the same file meanwhile (two offline commands,
 * say) has applied some or all of the steps, and only the rest are applied here.
 */
export async function migrate(
  client: Client,
  path: string,
  migrations: readonly Migration[] = MIGRATIONS,
): Promise<{ from: number; to: number }> {
  const target = migrations.at(-1)?.version ?? 0;
  const seen = await schemaVersion(client);
  checkNotNewer(seen, path, target);
  if (seen === target) return { from: seen, to: seen };
  const tx = await client.transaction("write");
  try {
    const from = await schemaVersion(tx);
    checkNotNewer(from, path, target);
    const pending = migrations.filter((m) => m.version > from);
    if (pending.length === 0) return { from, to: from };
    for (const m of pending) for (const sql of m.statements) await tx.execute(sql);
    await tx.execute({
      sql:
        "INSERT INTO meta(key, value) VALUES ('schema_version', " +
        "?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
      args: [String(target)],
    });
    await tx.commit();
    return { from, to: target };
  } finally {
    tx.close();
  }
}
