/**
 * Statements run on the native connection under `@libsql/client`, synchronously, with the
 * client's result shapes. The client's own path costs more of the gateway's thread per
 * statement than SQLite does on a small insert or a point read: it reads a statement's
 * columns twice, rebuilds every row property by property with `defineProperty`, and copies
 * every argument. The store and drizzle get `nativeClient`, whose `execute` and `batch` run
 * here; everything else (migrations, interactive transactions, close) stays the client's.
 */
import type { Client, InArgs, InStatement, InValue, ResultSet, Row, TransactionMode } from "@libsql/client";
import { ownStatement, type NativeConnection, type OwnStatement } from "./statements.ts";

const BEGIN: Record<TransactionMode, string> = {
  write: "BEGIN IMMEDIATE",
  read: "BEGIN TRANSACTION READONLY",
  deferred: "BEGIN DEFERRED",
};

/**
 * A statement as the client takes it: SQL text, an object, or a `[sql, args]` pair; in `runBatch`,
 * an object may also say `when` it runs (store/db.ts `RawStatement`).
 */
type AnyStatement = InStatement | [string, InArgs?];

/** A statement of a batch run only if `when` holds of the result before it. */
interface Conditional {
  readonly sql: string;
  readonly args: InArgs;
  readonly when: (previous: ResultSet) => boolean;
}

const isConditional = (s: AnyStatement): s is Conditional =>
  typeof s === "object" && !Array.isArray(s) && typeof (s as Partial<Conditional>).when === "function";

function normalize(stmt: AnyStatement, args?: InArgs): { sql: string; args: InArgs } {
  if (typeof stmt === "string") return { sql: stmt, args: args ?? [] };
  if (Array.isArray(stmt)) return { sql: stmt[0], args: stmt[1] ?? [] };
  return { sql: stmt.sql, args: stmt.args ?? [] };
}

/**
 * Run `items` as one transaction on `conn`, synchronously (nothing else on the thread can
 * slip into it); rolled back whole when any statement fails.
 */
export function runBatch(
  conn: NativeConnection,
  items: readonly AnyStatement[],
  mode: TransactionMode = "deferred",
): ResultSet[] {
  const begin = BEGIN[mode];
  if (!begin) throw new RangeError(`unknown transaction mode: ${String(mode)}`);
  ownStatement(conn, begin).stmt.run([]);
  try {
    const results: ResultSet[] = [];
    for (const item of items) {
      if (isConditional(item) && results.length > 0 && !item.when(results.at(-1)!)) {
        results.push(resultSet([], [], 0, undefined));
        continue;
      }
      const { sql, args } = normalize(item);
      results.push(runStatement(ownStatement(conn, sql), args));
    }
    ownStatement(conn, "COMMIT").stmt.run([]);
    return results;
  } catch (err) {
    if (conn.inTransaction) ownStatement(conn, "ROLLBACK").stmt.run([]);
    throw err;
  }
}

/** `client` with `execute` and `batch` run on its native connection `conn`. */
export function nativeClient(client: Client, conn: NativeConnection): Client {
  const settle = <T>(run: () => T): Promise<T> => {
    try {
      return Promise.resolve(run());
    } catch (err) {
      return Promise.reject(err);
    }
  };
  return {
    execute: ((stmt: InStatement | string, args?: InArgs) =>
      settle(() => {
        const s = normalize(stmt, args);
        return runStatement(ownStatement(conn, s.sql), s.args);
      })) as Client["execute"],
    batch: (stmts, mode) => settle(() => runBatch(conn, stmts, mode ?? "deferred")),
    migrate: (stmts) => client.migrate(stmts),
    transaction: ((mode?: TransactionMode) => client.transaction(mode)) as Client["transaction"],
    executeMultiple: (sql) => client.executeMultiple(sql),
    sync: () => client.sync(),
    close: () => client.close(),
    reconnect: () => client.reconnect(),
    get closed() {
      return client.closed;
    },
    get protocol() {
      return client.protocol;
    },
  };
}

/** Run one statement; rows come back readable by column name and by index. */
export function runStatement(own: OwnStatement, args: InArgs): ResultSet {
  const bound = toArgs(args) as unknown[];
  if (!own.reader) {
    const info = own.stmt.run(bound);
    return resultSet([], [], info.changes, BigInt(info.lastInsertRowid));
  }
  return resultSet(own.columns, toRows(own.columns, own.stmt.all(bound)), 0, undefined);
}

function resultSet(
  columns: readonly string[],
  rows: Row[],
  rowsAffected: number,
  lastInsertRowid: bigint | undefined,
): ResultSet {
  return {
    columns: columns as string[],
    columnTypes: columns.map(() => ""),
    rows,
    rowsAffected,
    lastInsertRowid,
    toJSON: () => ({ columns, rows, rowsAffected, lastInsertRowid: lastInsertRowid?.toString() ?? null }),
  };
}

const VALUES = Symbol("values");
const rowPrototypes = new WeakMap<readonly string[], object>();

/**
 * What rows of one statement share: `length` and index getters, neither enumerable, so a
 * row's own keys are its column names (as the client's rows, which drizzle reads both ways).
 */
function rowPrototype(columns: readonly string[]): object {
  let proto = rowPrototypes.get(columns);
  if (proto) return proto;
  proto = {};
  Object.defineProperty(proto, "length", { value: columns.length });
  for (let i = 0; i < columns.length; i++)
    Object.defineProperty(proto, i, {
      get(this: { [VALUES]: unknown[] }) {
        return this[VALUES][i];
      },
    });
  rowPrototypes.set(columns, proto);
  return proto;
}

/** A reader's raw rows (arrays of values) as the client's rows, readable by column name and by index. */
function toRows(columns: readonly string[], raw: unknown[][]): Row[] {
  const proto = rowPrototype(columns);
  return raw.map((values) => toRow(values, columns, proto));
}

function toRow(values: unknown[], columns: readonly string[], proto: object): Row {
  const row = Object.create(proto) as Record<string | symbol, unknown>;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    // Blobs as ArrayBuffers, as the client gives them.
    if (v instanceof Uint8Array) values[i] = v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength);
    const name = columns[i]!;
    if (!Object.hasOwn(row, name)) row[name] = values[i];
  }
  Object.defineProperty(row, VALUES, { value: values });
  return row as unknown as Row;
}

/** One argument as the driver takes it, checked as `@libsql/client` checks it. */
function toValue(v: InValue | undefined): unknown {
  switch (typeof v) {
    case "number":
      if (!Number.isFinite(v)) throw new RangeError("Only finite numbers (not Infinity or NaN) can be stored");
      return v;
    case "boolean":
      return v ? 1 : 0;
    case "undefined":
      throw new TypeError("undefined cannot be passed as argument to the database");
    default:
      if (v instanceof ArrayBuffer) return Buffer.from(v);
      if (v instanceof Date) return v.valueOf();
      return v;
  }
}

/** Positional arguments as an array; named ones as an object without their `:`/`@`/`$` prefix. */
function toArgs(args: InArgs): unknown[] | Record<string, unknown> {
  if (Array.isArray(args)) return args.map(toValue);
  const named: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(args)) named[/^[:@$]/.test(k) ? k.slice(1) : k] = toValue(v);
  return named;
}
