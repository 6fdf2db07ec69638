/** Tables of the broker's own libSQL file (`<data-dir>/broker.db`). */

/**
 * Bumped when the tables change in a way older code would misread; a file from newer code is refused. A
 * table or a nullable column older code does not know (`sessions`, `meta`, `sessions.seen_at`,
 * `outgoing.bytes`) is not such a change:
 * it leaves them alone.
 */
export const BROKER_SCHEMA_VERSION = 1;

/** DDL, idempotent. */
export const BROKER_DDL: readonly string[] = [
  // One row per (client, filter) of a clean = false session; qos 0 ones are restored, not matched.
  `CREATE TABLE IF NOT EXISTS subscriptions (
     client_id TEXT NOT NULL,
     topic TEXT NOT NULL,
     qos INTEGER NOT NULL,
     options TEXT NOT NULL,
     PRIMARY KEY (client_id, topic)
   ) WITHOUT ROWID`,
  // Offline queues and in-flight QoS > 0 deliveries, per client in enqueue order.
  `CREATE TABLE IF NOT EXISTS outgoing (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     client_id TEXT NOT NULL,
     broker_id TEXT,
     broker_counter INTEGER,
     message_id INTEGER,
     packet TEXT NOT NULL
   )`,
  "CREATE INDEX IF NOT EXISTS outgoing_client ON outgoing (client_id, seq)",
  "CREATE INDEX IF NOT EXISTS outgoing_message ON outgoing (client_id, message_id)",
  `CREATE TABLE IF NOT EXISTS retained (
     topic TEXT PRIMARY KEY,
     packet TEXT NOT NULL
   ) WITHOUT ROWID`,
  // QoS 2 packets received and not yet released (PUBREL), per client and message id.
  `CREATE TABLE IF NOT EXISTS incoming (
     client_id TEXT NOT NULL,
     message_id INTEGER NOT NULL,
     packet TEXT NOT NULL,
     PRIMARY KEY (client_id, message_id)
   ) WITHOUT ROWID`,
  // One row per clean = false session, subscriptions or not (./sessions.ts: CONNACK's session present).
  `CREATE TABLE IF NOT EXISTS sessions (
     client_id TEXT PRIMARY KEY
   ) WITHOUT ROWID`,
  // The broker's own marks: `alive_at`, when it last knew itself running (./sessions.ts: downtime is not absence).
  `CREATE TABLE IF NOT EXISTS meta (
     key TEXT PRIMARY KEY,
     value
   ) WITHOUT ROWID`,
  `CREATE TABLE IF NOT EXISTS wills (
     client_id TEXT PRIMARY KEY,
     broker_id TEXT,
     packet TEXT NOT NULL
   ) WITHOUT ROWID`,
];

/** Columns added to a table after it first shipped, to a file that lacks them (older code ignores them). */
export const BROKER_ADDED_COLUMNS: readonly {
  readonly table: string;
  readonly column: string;
  readonly type: string;
}[] = [
  // When the session was last in use (ms since the epoch): `[broker] session_expiry_days` (./sessions.ts).
  { table: "sessions", column: "seen_at", type: "INTEGER" },
  // A queued message's payload bytes: `[broker] max_offline_bytes` (./outgoing.ts).
  { table: "outgoing", column: "bytes", type: "INTEGER" },
];
