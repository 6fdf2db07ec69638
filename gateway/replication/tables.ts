/**
 * What replicates, and the central database's schema (docs/replication.md). The central tables mirror
 * the local ones column for column, each row prefixed with `fleet` (the `[fleet] name`) and
 * `gateway` (the site-unique gateway id, a UUIDv7 minted with the data dir), which is part
 * of every primary key: two gateways never collide, whatever their fleet names.
 *
 * Immutable records (spec versions, episodes, events, checkpoints) are `INSERT OR IGNORE`d:
 * re-sending a batch changes nothing. Mutable rows (agents, the budget ledger, quarantined
 * stimuli) are upserts of the whole current row, so the newest push wins.
 */
import type { Migration } from "../store/index.ts";

/** One replicated table: its local columns (in order), primary key and write rule. */
export interface ReplicatedTable {
  readonly name: string;
  /** Local columns copied as they are (the local `gateway` column is replaced by the pusher's id). */
  readonly columns: readonly string[];
  /** Primary key columns after `gateway`. */
  readonly key: readonly string[];
  readonly mutable: boolean;
  /** Blob columns: sent hex-encoded (batches travel as JSON), decoded at the center. */
  readonly blobs: readonly string[];
}

const table = (name: string, columns: string, key: string, mutable = false, blobs: string[] = []): ReplicatedTable => ({
  name,
  columns: columns.split(/,\s*/),
  key: key.split(/,\s*/),
  mutable,
  blobs,
});

/** Every replicated table, in the order a batch writes them. */
export const REPLICATED = {
  spec_versions: table("spec_versions", "hash, path, text, summary, created_at", "hash"),
  agents: table(
    "agents",
    "id, type, key, status, reason, paused_until, anchor_seq, anchor_hash, head_seq, head_hash, " +
      "episodes, failures, last_episode_at, created_at, updated_at",
    "id",
    true,
  ),
  episodes: table(
    "episodes",
    "id, agent, stimulus_seq, stimulus_id, spec_version, status, error_kind, error, attempt, " +
      "started_at, ended_at, checkpoint, parent, events_hash, event_count",
    "id",
  ),
  events: table("events", "episode, seq, kind, data", "episode, seq"),
  // state_version and migrated_from are sealed when set (docs/upgrading.md): verify --central needs them.
  checkpoints: table(
    "checkpoints",
    "hash, agent, seq, parent, episode, spec_version, state, created_at, state_version, migrated_from",
    "hash",
  ),
  budget_usage: table(
    "budget_usage",
    `agent, "window", episodes, tool_calls, tokens, cost, bytes`,
    `agent, "window"`,
    true,
  ),
  stimuli: table(
    "stimuli",
    "seq, agent, sid, kind, topic, payload, received_at, state, attempts, not_before, last_error, episode, done_at",
    "seq",
    true,
    ["payload"],
  ),
  // Operator actions (pause, resume, retire, replay, tokens, gc): append-only at both ends.
  audit: table("audit", "seq, at, actor, action, target, status, detail", "seq"),
} as const satisfies Record<string, ReplicatedTable>;

/** A replicated table's name. */
export type ReplicatedName = keyof typeof REPLICATED;

function createTable(t: ReplicatedTable): string {
  // Columns are left untyped (no affinity): a value arrives at the center exactly as it left.
  return `CREATE TABLE IF NOT EXISTS ${t.name} (fleet TEXT NOT NULL, gateway TEXT NOT NULL, ${t.columns.join(", ")},
    PRIMARY KEY (gateway, ${t.key.join(", ")}))`;
}

/** Central schema v1. */
const CENTRAL_V1: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
  // One row per gateway: who it is and how far behind it said it was at its last push.
  `CREATE TABLE IF NOT EXISTS gateways (
    gateway TEXT PRIMARY KEY, fleet TEXT NOT NULL, first_push_at INTEGER NOT NULL, last_push_at INTEGER NOT NULL,
    pushed_rows INTEGER NOT NULL DEFAULT 0, backlog_rows INTEGER NOT NULL DEFAULT 0,
    backlog_bytes INTEGER NOT NULL DEFAULT 0, lag_s REAL NOT NULL DEFAULT 0, lost_rows INTEGER NOT NULL DEFAULT 0,
    schema_version INTEGER NOT NULL)`,
  // The tables v1 shipped with, with the columns they had then; later ones come in their own migrations.
  ...(["spec_versions", "agents", "episodes", "events", "stimuli"] as const).map((n) => createTable(REPLICATED[n])),
  createTable({ ...REPLICATED.budget_usage, columns: REPLICATED.budget_usage.columns.slice(0, 6) }),
  createTable({ ...REPLICATED.checkpoints, columns: REPLICATED.checkpoints.columns.slice(0, 8) }),
  `CREATE INDEX IF NOT EXISTS agents_fleet ON agents (fleet, id)`,
  `CREATE INDEX IF NOT EXISTS episodes_agent ON episodes (gateway, agent, started_at)`,
  `CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_chain ON checkpoints (gateway, agent, seq)`,
];

/** Central schema v2: operator actions (the gateways' audit logs), newest first per fleet. */
const CENTRAL_V2: readonly string[] = [
  createTable(REPLICATED.audit),
  `CREATE INDEX IF NOT EXISTS audit_time ON audit (gateway, at)`,
];

/**
 * Central schema v3: indexes for the paged reads of a large center (`fleet episodes --central`
 * looks an agent up across fleets; `verify --central` walks one gateway's agent by episode id).
 */
const CENTRAL_V3: readonly string[] = [
  `CREATE INDEX IF NOT EXISTS episodes_by_agent ON episodes (agent, started_at, id)`,
  `CREATE INDEX IF NOT EXISTS episodes_chain ON episodes (gateway, agent, id)`,
];

/** Central schema v4: the state version a checkpoint seals (docs/upgrading.md). */
const CENTRAL_V4: readonly string[] = [
  `ALTER TABLE checkpoints ADD COLUMN state_version`,
  `ALTER TABLE checkpoints ADD COLUMN migrated_from`,
];

/** Central schema v5: the bytes each agent's episodes stored per window (`bytes_per_day`). */
const CENTRAL_V5: readonly string[] = [`ALTER TABLE budget_usage ADD COLUMN bytes`];

/** The central database's migrations, oldest first (applied by the first gateway that connects). */
export const CENTRAL_MIGRATIONS: readonly Migration[] = [
  { version: 1, name: "central schema", statements: CENTRAL_V1 },
  { version: 2, name: "operator actions", statements: CENTRAL_V2 },
  { version: 3, name: "indexes for paged reads", statements: CENTRAL_V3 },
  { version: 4, name: "checkpoint state versions", statements: CENTRAL_V4 },
  { version: 5, name: "bytes stored per budget window", statements: CENTRAL_V5 },
];

/** The central schema version this code writes and reads. */
export const CENTRAL_SCHEMA_VERSION: number = CENTRAL_MIGRATIONS.at(-1)?.version ?? 0;
