/**
 * DDL for the schema in ./schema.ts. Kept by hand beside it (no drizzle-kit at run time);
 * test/store.test.ts round-trips every table through drizzle to prove they agree.
 */
export const SCHEMA_VERSION = 1;

export const DDL: readonly string[] = [
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
    payload TEXT NOT NULL, qos INTEGER NOT NULL DEFAULT 1, retain INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS budget_usage (
    agent TEXT NOT NULL, window TEXT NOT NULL, episodes INTEGER NOT NULL DEFAULT 0,
    tool_calls INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0, cost REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, window))`,
];
