/**
 * Prepared statements kept per connection. `@libsql/client` prepares every statement it runs
 * anew (`db.prepare(sql)` on each execute and on each statement of a batch): with the same few
 * dozen statements per episode and per stimulus, compiling them was 7–9% of the gateway's JS
 * thread in the intake and episodes benches, and each budget booking recompiled the triggers
 * on `budget_usage`. Every connection the client's pool hands out gets a small LRU of its
 * statements by SQL text.
 *
 * Safe to reuse because the client runs each statement to completion synchronously (`run`, or
 * `all` over `iterate`), sets `raw`/`safeIntegers` before every use, and SQLite re-prepares a
 * statement itself after a schema change. Installed once, on import.
 */
import type { Client } from "@libsql/client";
import { ConnectionPool } from "@libsql/client/sqlite3";

/** Statements kept per connection (multi-row inserts of different sizes are different SQL). */
const MAX_STATEMENTS = 256;

type Connection = { prepare(sql: string): unknown };

const cachedConnections = new WeakSet<object>();

/** Each cached connection's own, uncached `prepare`. */
const uncached = new WeakMap<object, (sql: string) => unknown>();

function withStatementCache(db: Connection): Connection {
  if (cachedConnections.has(db)) return db;
  cachedConnections.add(db);
  const prepare = db.prepare.bind(db);
  uncached.set(db, prepare);
  const statements = new Map<string, unknown>();
  db.prepare = (sql: string) => {
    let stmt = statements.get(sql);
    if (stmt !== undefined) {
      // Most recently used last: the first key is the one to drop.
      statements.delete(sql);
    } else {
      stmt = prepare(sql);
      if (statements.size >= MAX_STATEMENTS) statements.delete(statements.keys().next().value!);
    }
    statements.set(sql, stmt);
    return stmt;
  };
  return db;
}

/** Connections handed out while `nativeConnection` watches, in order. */
let watching: Connection[] | null = null;

const pool = ConnectionPool.prototype as unknown as { acquireSync(forTransaction?: boolean): Connection };
const acquireSync = pool.acquireSync;
pool.acquireSync = function (this: unknown, forTransaction?: boolean): Connection {
  const db = withStatementCache(acquireSync.call(this, forTransaction));
  watching?.push(db);
  return db;
};

/** A prepared statement of the `libsql` package (the driver under `@libsql/client`). */
export interface NativeStatement {
  readonly reader: boolean;
  raw(on?: boolean): NativeStatement;
  safeIntegers(on?: boolean): NativeStatement;
  columns(): { name: string }[];
  run(args: readonly unknown[]): { changes: number; lastInsertRowid: number | bigint };
  all(args: readonly unknown[]): unknown[][];
}

/** A connection of the `libsql` package, with this module's statement cache. */
export interface NativeConnection {
  readonly inTransaction: boolean;
  prepare(sql: string): NativeStatement;
}

/**
 * The connection `client` runs its statements on. The client borrows from its pool
 * synchronously and, with no transaction held open across an await, always gets the same
 * idle connection back, so statements run here see and are seen by the client's own.
 * The committer runs its batches on it directly: `@libsql/client` spends more of the
 * gateway's thread per statement (columns read twice, every row rebuilt property by
 * property, arguments copied) than SQLite does on a small insert.
 */
export async function nativeConnection(client: Client): Promise<NativeConnection> {
  const seen: Connection[] = [];
  watching = seen;
  let probe: Promise<unknown>;
  try {
    probe = client.execute("SELECT 1");
  } finally {
    watching = null;
  }
  await probe;
  if (seen.length !== 1) throw new Error(`store: expected the client to borrow one connection, saw ${seen.length}`);
  return seen[0] as unknown as NativeConnection;
}

/**
 * A statement of the store's own path (./native.ts), prepared apart from the client's: the client
 * sets `safeIntegers(true)` on the statements it runs, so a statement shared with it would need
 * both settings made again before every use, each a call into the driver. These are set once.
 */
export interface OwnStatement {
  readonly stmt: NativeStatement;
  /** It returns rows (a SELECT, or a write with RETURNING); set to `raw` mode, rows as arrays. */
  readonly reader: boolean;
  /** Its column names, when it returns rows. */
  readonly columns: readonly string[];
}

const ownStatements = new WeakMap<object, Map<string, OwnStatement>>();

/** `sql` prepared on `conn` for the store's own path, kept per connection by SQL text. */
export function ownStatement(conn: NativeConnection, sql: string): OwnStatement {
  let cache = ownStatements.get(conn);
  if (!cache) {
    cache = new Map();
    ownStatements.set(conn, cache);
  }
  let own = cache.get(sql);
  if (own) return own;
  const stmt = (uncached.get(conn) ?? conn.prepare.bind(conn))(sql) as NativeStatement;
  stmt.safeIntegers(false);
  const reader = stmt.reader;
  if (reader) stmt.raw(true);
  own = { stmt, reader, columns: reader ? stmt.columns().map((c) => c.name) : [] };
  // Oldest first out: the hot statements are few and come back at once.
  if (cache.size >= MAX_STATEMENTS) cache.delete(cache.keys().next().value!);
  cache.set(sql, own);
  return own;
}
