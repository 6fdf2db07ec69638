/**
 * Raw SQL for the hot paths, derived from the drizzle schema. Drizzle builds every query
 * from a tree of SQL chunks and params on each call, which cost the gateway several ms of
 * CPU per episode; a codec computes a table's column list and encoders once, so a hot
 * statement is a string join and an argument array. Column names and defaults still come
 * from ./schema.ts, so the raw statements cannot drift from the DDL.
 */
import { getTableColumns, getTableName, is, SQL, type Column } from "drizzle-orm";
import type { Client, InArgs, Row } from "@libsql/client";
import type { SQLiteTable } from "drizzle-orm/sqlite-core";
import type { RawStatement } from "./db.ts";
import * as t from "./schema.ts";

/** A table's column list and per-column encoders, in schema order. */
export interface TableCodec<Select, Insert> {
  readonly table: string;
  /** `"col_a", "col_b", …` in schema order: the select list and the insert column list. */
  readonly columns: string;
  readonly keys: readonly string[];
  readonly cols: readonly Column[];
  /** `(?,?,…)`: one row of an INSERT. */
  readonly tuple: string;
  /** Phantom types of a selected and an inserted row. */
  readonly _types?: { select: Select; insert: Insert };
}

/** The codec of a drizzle table. Throws for generated columns and SQL defaults, which raw inserts cannot fill. */
export function codecOf<T extends SQLiteTable>(table: T): TableCodec<T["$inferSelect"], T["$inferInsert"]> {
  const entries = Object.entries(getTableColumns(table) as Record<string, Column>);
  for (const [key, c] of entries) {
    if (c.generated !== undefined || is(c.default, SQL))
      throw new Error(
        `${getTableName(table)}.${key}: generated columns and SQL defaults are not supported by raw SQL codecs`,
      );
  }
  return {
    table: getTableName(table),
    // Quoted: `window` (budget_usage) is an SQL keyword.
    columns: entries.map(([, c]) => `"${c.name}"`).join(", "),
    keys: entries.map(([k]) => k),
    cols: entries.map(([, c]) => c),
    tuple: `(${entries.map(() => "?").join(",")})`,
  };
}

/** Codecs of the tables the hot paths write or read. */
export const codecs = {
  agents: codecOf(t.agents),
  stimuli: codecOf(t.stimuli),
  episodes: codecOf(t.episodes),
  checkpoints: codecOf(t.checkpoints),
  outbox: codecOf(t.outbox),
  budgetUsage: codecOf(t.budgetUsage),
  wakeups: codecOf(t.wakeups),
};

/** A selected row as drizzle returns it: camelCase keys, decoded values (e.g. Buffer, boolean). */
export function decodeRow<S, I>(codec: TableCodec<S, I>, row: Row): S {
  const out: Record<string, unknown> = {};
  for (let i = 0; i < codec.cols.length; i++) {
    const v = row[i];
    out[codec.keys[i]!] = v === null || v === undefined ? null : codec.cols[i]!.mapFromDriverValue(v);
  }
  return out as S;
}

/** Rows of `SELECT <codec columns> <rest>` (rest: `FROM … WHERE …`), decoded. */
export async function selectAll<S, I>(
  client: Client,
  codec: TableCodec<S, I>,
  rest: string,
  args: InArgs,
): Promise<S[]> {
  const rs = await client.execute({ sql: `SELECT ${codec.columns} ${rest}`, args });
  return rs.rows.map((r) => decodeRow(codec, r));
}

/** The first row of `SELECT <codec columns> <rest>`, decoded, or undefined (as drizzle's `.get()`). */
export async function selectOne<S, I>(
  client: Client,
  codec: TableCodec<S, I>,
  rest: string,
  args: InArgs,
): Promise<S | undefined> {
  const rs = await client.execute({ sql: `SELECT ${codec.columns} ${rest}`, args });
  const row = rs.rows[0];
  return row ? decodeRow(codec, row) : undefined;
}

/**
 * One multi-row `INSERT INTO t (…) VALUES (…),(…)` plus `tail` (e.g. `ON CONFLICT DO
 * NOTHING`). A missing value gets the column's schema default or NULL, as drizzle does.
 */
export function insertRows<S, I>(codec: TableCodec<S, I>, rows: readonly I[], tail = ""): RawStatement {
  const args: unknown[] = [];
  for (const row of rows) {
    const r = row as Record<string, unknown>;
    for (let i = 0; i < codec.cols.length; i++) {
      const col = codec.cols[i]!;
      let v = r[codec.keys[i]!];
      if (v === undefined) v = col.default ?? col.defaultFn?.() ?? null;
      args.push(v === null ? null : col.mapToDriverValue(v));
    }
  }
  const values = rows.length === 1 ? codec.tuple : Array(rows.length).fill(codec.tuple).join(",");
  return {
    sql: `INSERT INTO ${codec.table} (${codec.columns}) VALUES ${values}${tail ? ` ${tail}` : ""}`,
    args: args as RawStatement["args"],
  };
}

/** Rows per multi-row statement: well under SQLite's bound-parameter limit for every table. */
export const CHUNK = 400;

/** `rows` in slices of at most CHUNK. */
export function chunks<T>(rows: readonly T[]): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < rows.length; i += CHUNK) out.push(rows.slice(i, i + CHUNK));
  return out;
}
