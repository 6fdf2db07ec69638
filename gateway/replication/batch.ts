/**
 * One batch: the oldest pending entries of the local replication queue, the rows they name
 * read from the local database, and the central statements that write them idempotently.
 * An `episode` entry carries the episode, its event log and the checkpoint it sealed.
 */
import type { Client, InArgs, InStatement, InValue } from "@libsql/client";
import { checkpointHashIs, idBytesSql, idOfSql, logEventSql, type Store, wireSql } from "../store/index.ts";
import { REPLICATED, type ReplicatedName, type ReplicatedTable } from "./tables.ts";

/** One row of `repl_pending`. */
export interface PendingEntry {
  readonly seq: number;
  readonly tbl: string;
  readonly key: string;
  readonly ver: number;
  /** When it became pending (`repl_pending.at`; null for budget windows queued on their own). */
  readonly at: number | null;
}

/**
 * Rows already encoded by SQLite as the JSON arrays the central statements take (one text per
 * statement), so the bulk of a batch (episodes, events, checkpoints) never becomes JS objects.
 */
export interface EncodedRows {
  readonly count: number;
  /**
   * JSON arrays of rows (each row an array in the table's column order), at most ROWS_PER_STATEMENT
   * each; for `events`, of `[episode, log]` pairs instead (`selectLogs`), `count` still in events.
   */
  readonly chunks: readonly string[];
}

/** Rows read for a batch, by central table, each row in its table's column order. */
export type BatchRows = Partial<Record<ReplicatedName, InValue[][] | EncodedRows>>;

/** A batch ready to push. */
export interface Batch {
  readonly entries: readonly PendingEntry[];
  readonly rows: BatchRows;
  /** Rows across tables (an episode with 5 events and a checkpoint counts 7, more with its agent and usage). */
  readonly rowCount: number;
  /** Entries whose local row is gone (collected before it was pushed): counted as lost. */
  readonly lost: readonly PendingEntry[];
  /** Approximate payload size: string and blob lengths, 8 per number. */
  readonly bytes: number;
  /**
   * The first queue entry after the batch (the oldest left once it is confirmed, in queue order), or
   * null when the batch takes every entry there is: what the center's `gateways.lag_s` is told.
   */
  readonly rest: { readonly at: number | null } | null;
}

/** The queue's entry kinds (`repl_pending.tbl`, written by the triggers in store/migrate.ts). */
const KINDS: readonly string[] = ["spec", "agent", "episode", "usage", "stimulus", "audit"];

const IN_JSON = "IN (SELECT value FROM json_each(?))";

/** What a batch is read through: a connection to the local database (the store's, or a reader thread's own). */
export type BatchSource = Pick<Client, "execute">;

async function select(db: BatchSource, t: ReplicatedTable, where: string, args: InArgs): Promise<InValue[][]> {
  // Hashes and episode ids stored as bytes go out as the text they are everywhere else (store/hashes.ts).
  const cols = t.columns.map((c) => wireSql(t.name, c)).join(", ");
  const rs = await db.execute({ sql: `SELECT ${cols} FROM ${t.name} WHERE ${where}`, args });
  return rs.rows.map((r) => t.columns.map((_, i) => r[i] as InValue));
}

/**
 * Rows as JSON built by SQLite: `SELECT ${columns} FROM ${from}`, each row encoded by `row` (a
 * json_array over those columns), `per` rows to a chunk, and `n` (an aggregate) of each chunk.
 * With at most `most` rows known to come, and `most <= per`, one chunk: numbering the rows for
 * chunks (a window function, then a sort to group them) cost ~2 us a row (this box).
 */
async function encoded(
  db: BatchSource,
  q: { columns: string; from: string; row: string; n: string; per: number; most: number },
  args: InArgs,
): Promise<EncodedRows> {
  const sql =
    q.most <= q.per
      ? `SELECT json_group_array(${q.row}), ${q.n}, count(*) FROM (SELECT ${q.columns} FROM ${q.from})`
      : `SELECT json_group_array(${q.row}), ${q.n}, count(*) FROM (SELECT ${q.columns},
        (row_number() OVER () - 1) / ${q.per} AS chunk FROM ${q.from}) GROUP BY chunk ORDER BY chunk`;
  const rs = await db.execute({ sql, args });
  let count = 0;
  const chunks: string[] = [];
  for (const r of rs.rows) {
    if (Number(r[2]) === 0) continue; // one chunk, and no rows in it
    count += Number(r[1]);
    chunks.push(String(r[0]));
  }
  return { count, chunks };
}

/**
 * Rows of `t` as JSON built by SQLite (json_group_array of json_array), ROWS_PER_STATEMENT to a
 * chunk: a third of the push's CPU went into turning rows into JS objects and back into JSON.
 * Only for tables without REAL columns (SQLite prints a REAL in JSON with 15 digits, which would
 * not round-trip) and without blobs (JSON cannot hold them). `most`: how many rows can come at most.
 */
function selectEncoded(
  db: BatchSource,
  t: ReplicatedTable,
  where: string,
  args: InArgs,
  most: number,
  qualify?: (column: string) => string,
): Promise<EncodedRows> {
  // With `qualify`, `where` is a whole join ("a JOIN b ... WHERE ...") and the columns are named through it.
  const from = qualify ? where : `${t.name} WHERE ${where}`;
  const q = qualify ?? ((c: string) => c);
  // Hashes and episode ids stored as bytes go out as the text they are everywhere else (store/hashes.ts).
  const columns = t.columns.map((c) => `${wireSql(t.name, c, q(c))} AS ${c}`).join(", ");
  const row = `json_array(${t.columns.join(", ")})`;
  return encoded(db, { columns, from, row, n: "count(*)", per: ROWS_PER_STATEMENT, most }, args);
}

/** Most episode logs per statement (a temp-monitor episode's log holds 5 events). */
const LOGS_PER_STATEMENT = 500;

/**
 * The event logs of the batch's `most` episode entries (binds ?1, ?2), one `[episode, log]` pair
 * each, counted in events; the center expands each log into its events (`eventsInsertSql`).
 * Reading the `events` view here instead (every event taken out of its log and put back into JSON
 * one by one) was the costliest read of a push: ~21 us an episode entry of ~47 us of SQLite,
 * against ~9 us for the logs (`readEntries` of 500-entry batches, this box).
 */
function selectLogs(db: BatchSource, range: InArgs, most: number): Promise<EncodedRows> {
  const columns = `${idOfSql("e.id")} AS id, e.log AS log, e.event_count AS events`;
  const row = "json_array(id, json(log))";
  const q = { columns, from: EPISODE_ENTRIES, row, n: "coalesce(sum(events), 0)", per: LOGS_PER_STATEMENT, most };
  return encoded(db, q, range);
}

function isEncoded(rows: readonly InValue[][] | EncodedRows): rows is EncodedRows {
  return !Array.isArray(rows);
}

function sizeOf(rows: readonly InValue[][] | EncodedRows): number {
  if (isEncoded(rows)) return rows.chunks.reduce((n, c) => n + c.length, 0);
  let n = 0;
  for (const row of rows)
    for (const v of row) {
      if (typeof v === "string") n += v.length;
      else if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) n += v.byteLength;
      else n += 8;
    }
  return n;
}

/**
 * The budget windows an episode that started at `startedAt` booked (`h:<hour>`, `d:<day>`, as
 * gateway/episode budgetWindows does at the turn that started it); those of its end too, in
 * case a window closed while it ran.
 */
export function usageWindows(startedAt: number, endedAt: number): string[] {
  const out = new Set<string>();
  for (const at of [startedAt, endedAt]) {
    out.add(`h:${Math.floor(at / 3_600_000)}`);
    out.add(`d:${Math.floor(at / 86_400_000)}`);
  }
  return [...out];
}

/**
 * The batch's episode entries as a join source: a range of the queue by its rowid (`NOT INDEXED`:
 * by `tbl`'s index SQLite would walk every pending episode, the whole backlog). Binds ?1, ?2.
 */
const EPISODE_ENTRIES = `repl_pending AS p NOT INDEXED JOIN episodes AS e ON e.id = ${idBytesSql("p.key")}
  WHERE p.seq BETWEEN ?1 AND ?2 AND p.tbl = 'episode'`;

/**
 * The highest queue entry on the disk now: only rows already there go to the center (a commit is
 * visible before its WAL sync ends, and a crash before the sync ends loses it). Read on the store's
 * own connection the moment its sync is done, before another commit can run.
 */
export async function durableHead(store: Store): Promise<number> {
  await store.writer.durable();
  const rs = await store.client.execute("SELECT coalesce(max(seq), 0) FROM repl_pending");
  return Number(rs.rows[0]?.[0] ?? 0);
}

/** The oldest `limit` pending entries on the disk, and the rows they name, read on the store's connection. */
export async function readBatch(store: Store, limit: number): Promise<Batch> {
  return readEntries(store.client, limit, await durableHead(store));
}

/**
 * Read the oldest `limit` pending entries up to `upTo` (`durableHead`) and the rows they name.
 * The entries are one range of the queue (`seq` is its rowid; new entries always get a higher
 * one), so the rows an episode entry stands for are read by joining that range, not by sending
 * its keys back as a list.
 */
export async function readEntries(db: BatchSource, limit: number, upTo: number): Promise<Batch> {
  const rs = await db.execute({
    sql: "SELECT seq, tbl, key, ver, at FROM repl_pending WHERE seq <= ? ORDER BY seq LIMIT ?",
    args: [upTo, limit],
  });
  const entries: PendingEntry[] = rs.rows.map((r) => ({
    seq: Number(r[0]),
    tbl: String(r[1]),
    key: String(r[2]),
    ver: Number(r[3]),
    at: r[4] === null || r[4] === undefined ? null : Number(r[4]),
  }));
  if (entries.length === 0) return { entries, rows: {}, rowCount: 0, lost: [], bytes: 0, rest: null };
  const byKind = new Map<string, PendingEntry[]>();
  for (const e of entries) {
    const list = byKind.get(e.tbl);
    if (list) list.push(e);
    else byKind.set(e.tbl, [e]);
  }
  const range = [entries[0]?.seq ?? 0, entries.at(-1)?.seq ?? -1];
  const keys = (kind: string) => JSON.stringify((byKind.get(kind) ?? []).map((e) => e.key));
  const got: BatchRows = {};
  const lost: PendingEntry[] = [];
  /** Entries of `kind` whose key is not among `found` are lost. */
  const missing = (kind: string, found: Set<string>) => {
    for (const e of byKind.get(kind) ?? []) if (!found.has(e.key)) lost.push(e);
  };
  const { spec_versions, agents, episodes, checkpoints, budget_usage, stimuli, audit } = REPLICATED;

  if (byKind.has("spec")) {
    got.spec_versions = await select(db, spec_versions, `hash ${IN_JSON}`, [keys("spec")]);
    missing("spec", new Set(got.spec_versions.map((r) => String(r[0]))));
  }
  // An episode entry stands for its agent's row and the budget windows it booked (store/migrate.ts,
  // migration 11): those are sent with it, as they are now.
  const usage: InValue[][] = [];
  let agentsOfEpisodes = "";
  if (byKind.has("episode")) {
    const wanted = byKind.get("episode")!;
    const col = (c: string) => `e.${c}`;
    // At most one row each (an episode, its log, the checkpoint it sealed) per episode entry.
    const most = wanted.length;
    got.episodes = await selectEncoded(db, episodes, EPISODE_ENTRIES, range, most, col);
    got.events = await selectLogs(db, range, most);
    got.checkpoints = await selectEncoded(
      db,
      checkpoints,
      EPISODE_ENTRIES.replace("WHERE", `JOIN checkpoints AS c ON ${checkpointHashIs("c.hash", "e.checkpoint")} WHERE`),
      range,
      most,
      (c) => `c.${c}`,
    );
    if (got.episodes.count < wanted.length) {
      // Some were collected before their push (retention stopped waiting): the rare path.
      const found = await db.execute({
        sql: `SELECT ${idOfSql("e.id")} FROM ${EPISODE_ENTRIES}`,
        args: range,
      });
      const have = new Set(found.rows.map((r) => String(r[0])));
      missing("episode", have);
      // An episode collected before its push may leave its checkpoint behind (checkpoint.keep):
      // the chain still goes. A scan, but only on this rare path.
      const gone = wanted.filter((e) => !have.has(e.key)).map((e) => e.key);
      const orphans = await selectEncoded(
        db,
        checkpoints,
        `episode IN (SELECT ${idBytesSql("value")} FROM json_each(?))`,
        [JSON.stringify(gone)],
        Number.POSITIVE_INFINITY,
      );
      const kept = got.checkpoints;
      got.checkpoints = { count: kept.count + orphans.count, chunks: [...kept.chunks, ...orphans.chunks] };
    }
    // The budget windows each episode booked (usageWindows, in SQL).
    const at = (t: string) => `CAST(e.${t} AS INTEGER)`;
    const windows = [
      `'h:' || (${at("started_at")} / 3600000)`,
      `'d:' || (${at("started_at")} / 86400000)`,
      `'h:' || (${at("ended_at")} / 3600000)`,
      `'d:' || (${at("ended_at")} / 86400000)`,
    ];
    // Windows first, then each one's row by the primary key (an IN over them would scan budget_usage).
    const perWindow = EPISODE_ENTRIES.replace("WHERE", `JOIN json_each(json_array(${windows.join(", ")})) AS w WHERE`);
    const ur = await db.execute({
      sql: `SELECT ${budget_usage.columns.map((c) => `u.${c}`).join(", ")} FROM (SELECT DISTINCT e.agent AS a,
        w.value AS win FROM ${perWindow}) AS x CROSS JOIN budget_usage AS u ON u.agent = x.a AND u."window" = x.win`,
      args: range,
    });
    for (const r of ur.rows) usage.push(budget_usage.columns.map((_, i) => r[i] as InValue));
    agentsOfEpisodes = `SELECT e.agent FROM ${EPISODE_ENTRIES}`;
  }
  const agentEntries = `SELECT p.key FROM repl_pending AS p NOT INDEXED
    WHERE p.seq BETWEEN ?1 AND ?2 AND p.tbl = 'agent'`;
  if (byKind.has("episode") || byKind.has("agent")) {
    const from = [agentsOfEpisodes, byKind.has("agent") ? agentEntries : ""].filter(Boolean).join(" UNION ");
    got.agents = await selectEncoded(db, agents, `id IN (${from})`, range, entries.length);
    if (byKind.has("agent")) {
      const ids = await db.execute({
        sql: `SELECT id FROM agents WHERE id IN (${agentEntries})`,
        args: range,
      });
      missing("agent", new Set(ids.rows.map((r) => String(r[0]))));
    }
  }
  // Usage entries of their own (queued when replication was turned on, or by older code).
  if (byKind.has("usage")) {
    const pairs = (byKind.get("usage") ?? []).map((e) => e.key.split("\n"));
    const own = await select(
      db,
      budget_usage,
      `(agent, "window") IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))`,
      [JSON.stringify(pairs)],
    );
    missing("usage", new Set(own.map((r) => `${r[0]}\n${r[1]}`)));
    const seen = new Set(usage.map((r) => `${r[0]}\n${r[1]}`));
    for (const r of own) if (!seen.has(`${r[0]}\n${r[1]}`)) usage.push(r);
  }
  if (usage.length > 0) got.budget_usage = usage;
  if (byKind.has("stimulus")) {
    got.stimuli = await select(db, stimuli, `seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))`, [
      keys("stimulus"),
    ]);
    missing("stimulus", new Set(got.stimuli.map((r) => String(r[0]))));
  }
  if (byKind.has("audit")) {
    got.audit = await select(db, audit, `seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))`, [keys("audit")]);
    missing("audit", new Set(got.audit.map((r) => String(r[0]))));
  }
  // The center writes them in REPLICATED's order (agents before their episodes).
  const rows: BatchRows = {};
  for (const name of Object.keys(REPLICATED) as ReplicatedName[]) if (got[name]) rows[name] = got[name];
  // An entry kind this code does not know was written by newer code: it cannot be sent.
  for (const e of entries) if (!KINDS.includes(e.tbl)) lost.push(e);
  let rowCount = 0;
  let bytes = 0;
  for (const list of Object.values(rows)) {
    rowCount += isEncoded(list) ? list.count : list.length;
    bytes += sizeOf(list);
  }
  // One seek by rowid past the batch (past `upTo` too: entries not yet on the disk are left as well).
  const next = await db.execute({
    sql: "SELECT at FROM repl_pending WHERE seq > ? ORDER BY seq LIMIT 1",
    args: [entries.at(-1)!.seq],
  });
  const restAt = next.rows[0]?.[0];
  const rest = next.rows.length === 0 ? null : { at: restAt === null || restAt === undefined ? null : Number(restAt) };
  return { entries, rows, rowCount, lost, bytes, rest };
}

/** Most rows per statement: each statement carries its rows as one JSON text. */
const ROWS_PER_STATEMENT = 2000;

const hex = (v: InValue): InValue =>
  v instanceof ArrayBuffer
    ? Buffer.from(v).toString("hex")
    : ArrayBuffer.isView(v)
      ? Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("hex")
      : v;

/** The central INSERT of `t` that takes its rows (fleet, gateway, then one JSON text of rows). */
function insertSql(t: ReplicatedTable): string {
  const select = t.columns.map((c, i) => (t.blobs.includes(c) ? `unhex(value ->> ${i})` : `value ->> ${i}`)).join(", ");
  const conflict = t.mutable
    ? `ON CONFLICT (gateway, ${t.key.join(", ")}) DO UPDATE SET fleet = excluded.fleet, ${t.columns
        .filter((c) => !t.key.includes(c))
        .map((c) => `${c} = excluded.${c}`)
        .join(", ")}`
    : "ON CONFLICT DO NOTHING";
  return `INSERT INTO ${t.name} (fleet, gateway, ${t.columns.join(", ")})
      SELECT ?, ?, ${select} FROM json_each(?) WHERE true ${conflict}`;
}

/**
 * The central INSERT of events from `[episode, log]` pairs (`selectLogs`): each log expanded as the
 * gateway's own `events` view expands it (`logEventSql`), so an event reads the same on both sides.
 */
function eventsInsertSql(): string {
  const { kind, data } = logEventSql("j");
  const t = REPLICATED.events;
  const values: Record<string, string> = { episode: "r.value ->> 0", seq: "j.key", kind, data };
  return `INSERT INTO ${t.name} (fleet, gateway, ${t.columns.join(", ")})
      SELECT ?, ?, ${t.columns.map((c) => values[c]).join(", ")}
      FROM json_each(?) AS r, json_each(r.value, '$[1]') AS j
      WHERE json_type(r.value, '$[1]') = 'array' ON CONFLICT DO NOTHING`;
}

/**
 * The central statements that write a batch's rows for gateway `gateway` of fleet `fleet`.
 * Each statement takes its rows as ONE JSON array bound as text and unpacks it with
 * `json_each` at the center: about 4x faster over HTTP than one bound value per column
 * (measured: 20,000 event rows in 2.7 s vs 11.1 s on the same sqld), because the client
 * and server no longer encode and decode every value separately.
 */
export function centralStatements(fleet: string, gateway: string, rows: BatchRows): InStatement[] {
  const out: InStatement[] = [];
  for (const [name, list] of Object.entries(rows) as [ReplicatedName, InValue[][] | EncodedRows][]) {
    const t: ReplicatedTable = REPLICATED[name];
    if (isEncoded(list)) {
      // Events come as their episodes' logs (`selectLogs`); every other table as its rows.
      const sql = name === "events" ? eventsInsertSql() : insertSql(t);
      for (const chunk of list.chunks) out.push({ sql, args: [fleet, gateway, chunk] });
      continue;
    }
    if (list.length === 0) continue;
    const blobAt = t.blobs.map((b) => t.columns.indexOf(b));
    const sql = insertSql(t);
    for (let i = 0; i < list.length; i += ROWS_PER_STATEMENT) {
      let part = list.slice(i, i + ROWS_PER_STATEMENT);
      if (blobAt.length > 0) part = part.map((r) => r.map((v, k) => (blobAt.includes(k) ? hex(v) : v)));
      out.push({ sql, args: [fleet, gateway, JSON.stringify(part)] });
    }
  }
  return out;
}
