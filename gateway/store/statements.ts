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
import { ConnectionPool } from "@libsql/client/sqlite3";

/** Statements kept per connection (multi-row inserts of different sizes are different SQL). */
const MAX_STATEMENTS = 256;

type Connection = { prepare(sql: string): unknown };

const cachedConnections = new WeakSet<object>();

function withStatementCache(db: Connection): Connection {
  if (cachedConnections.has(db)) return db;
  cachedConnections.add(db);
  const prepare = db.prepare.bind(db);
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

const pool = ConnectionPool.prototype as unknown as { acquireSync(forTransaction?: boolean): Connection };
const acquireSync = pool.acquireSync;
pool.acquireSync = function (this: unknown, forTransaction?: boolean): Connection {
  return withStatementCache(acquireSync.call(this, forTransaction));
};
