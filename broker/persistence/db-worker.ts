/**
 * The worker side of `DbThread` (thread.ts): owns the connection to broker.db and runs each
 * request to completion, in arrival order.
 *
 * It drives the `libsql` driver itself (the one under `@libsql/client`), with each statement
 * prepared once: the client prepares every statement of a batch again, reads its columns
 * twice and rebuilds every row, which cost this thread ~3x its SQLite time on the few small
 * writes a QoS 1 delivery makes (measured: 1.1-1.2 vs 0.4-0.5 ms of this thread's user CPU per
 * bench episode, whose output and two statuses go to one clean = false subscriber).
 */
import Database from "libsql";
import type { InArgs, InStatement, InValue } from "@libsql/client";
import { BROKER_ADDED_COLUMNS, BROKER_DDL, BROKER_SCHEMA_VERSION } from "./schema.ts";
import type { PlainResult, ThreadReply, ThreadRequest } from "./thread.ts";

declare const self: Worker;

type Statement = ReturnType<Database.Database["prepare"]>;

let db: Database.Database | null = null;
/** The connection's prepared statements, by SQL text (the persistence uses a fixed set). */
const prepared = new Map<string, Statement>();

function statement(sql: string): Statement {
  let s = prepared.get(sql);
  if (!s) {
    s = db!.prepare(sql);
    prepared.set(sql, s);
  }
  return s;
}

/**
 * One argument as the driver takes it, checked as `@libsql/client` checks it (the same rules as
 * gateway/store/native.ts `toValue`; the broker does not import the gateway). Not optional: the
 * driver binds undefined as NULL without a word, and a boolean aborts the whole process (libsql
 * 0.5.29 panics: "not yet implemented: bool").
 */
function value(v: InValue | undefined): unknown {
  if (v === undefined) throw new TypeError("undefined cannot be passed as argument to the database");
  if (typeof v === "boolean") return v ? 1 : 0;
  if (typeof v === "number" && !Number.isFinite(v))
    throw new RangeError("Only finite numbers (not Infinity or NaN) can be stored");
  return v;
}

/** Positional arguments as an array; named ones as an object without their `:`/`@`/`$` prefix. */
function bind(args: InArgs | undefined): unknown[] | Record<string, unknown> {
  if (args === undefined) return [];
  if (Array.isArray(args)) return args.map(value);
  const named: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(args)) named[/^[:@$]/.test(k) ? k.slice(1) : k] = value(v);
  return named;
}

function open(path: string, synchronous: "full" | "normal"): void {
  const d = new Database(path);
  try {
    d.exec("PRAGMA busy_timeout = 5000");
    // Checked before anything is written (journal mode included): a newer file stays as it was.
    const [row] = d.prepare("PRAGMA user_version").all([]) as { user_version?: unknown }[];
    const version = Number(row?.user_version ?? 0);
    if (version > BROKER_SCHEMA_VERSION) throw Object.assign(new Error("too new"), { version });
    d.exec("PRAGMA journal_mode = WAL");
    d.exec(`PRAGMA synchronous = ${synchronous.toUpperCase()}`);
    d.exec("BEGIN IMMEDIATE");
    try {
      for (const ddl of BROKER_DDL) d.exec(ddl);
      for (const { table, column, type } of BROKER_ADDED_COLUMNS) {
        const columns = d.prepare(`PRAGMA table_info(${table})`).all([]) as { name?: unknown }[];
        if (!columns.some((c) => c.name === column)) d.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${type}`);
      }
      d.exec(`PRAGMA user_version = ${BROKER_SCHEMA_VERSION}`);
      d.exec("COMMIT");
    } catch (err) {
      if (d.inTransaction) d.exec("ROLLBACK");
      throw err;
    }
  } catch (err) {
    d.close();
    throw err;
  }
  db = d;
}

/** `statements` as one write transaction, rolled back whole when any of them fails. */
function batch(statements: readonly InStatement[]): PlainResult[] {
  if (!db) throw new Error("broker database is not open");
  statement("BEGIN IMMEDIATE").run([]);
  try {
    const results = statements.map((item): PlainResult => {
      const { sql, args } = typeof item === "string" ? { sql: item, args: undefined } : item;
      const s = statement(sql);
      // Rows keyed by column name, as the persistence reads them.
      if (s.reader) return { rows: s.all(bind(args)) as Record<string, unknown>[], rowsAffected: 0 };
      return { rows: [], rowsAffected: Number(s.run(bind(args)).changes) };
    });
    statement("COMMIT").run([]);
    return results;
  } catch (err) {
    if (db.inTransaction) statement("ROLLBACK").run([]);
    throw err;
  }
}

function handle(req: ThreadRequest): PlainResult[] {
  switch (req.type) {
    case "open":
      open(req.path, req.synchronous);
      return [];
    case "batch":
      return batch(req.statements);
    case "close":
      prepared.clear();
      db?.close();
      db = null;
      return [];
    default: {
      const never: never = req;
      throw new Error(`unknown request ${JSON.stringify(never)}`);
    }
  }
}

// Requests run one at a time, in order (a batch is one transaction): each runs to completion
// synchronously before the next message is read.
self.onmessage = (e: MessageEvent<ThreadRequest>) => {
  const req = e.data;
  let reply: ThreadReply;
  try {
    reply = { id: req.id, ok: true, results: handle(req) };
  } catch (err) {
    const version = (err as { version?: number }).version;
    reply = {
      id: req.id,
      ok: false,
      error: err instanceof Error ? err.message : String(err),
      ...(typeof version === "number" ? { version } : {}),
    };
  }
  self.postMessage(reply);
};
