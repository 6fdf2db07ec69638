/**
 * Episode outcomes and stimulus kinds stored as small integers (issue 13: store bytes per episode,
 * migration 31). Every episode row held "committed" or "failed" and its stimulus kind as text, and
 * `episodes_agent` held the kind again: ~17 bytes of a temp-monitor episode. SQLite stores the
 * integers 0 and 1 in no bytes at all (the record header's type code is the value), so the common
 * values (committed; mqtt and timer) cost nothing. The code reads and writes the names through the
 * column types below, as hashes go through ./hashes.ts. A name without a code (none is written by
 * this code; no name is a number) is stored as the text it is, and reads back as written.
 */
import { customType } from "drizzle-orm/sqlite-core";

/** Names stored as their position in a fixed list. Append only: a stored code never changes meaning. */
export class Codes<N extends string> {
  private readonly byName: ReadonlyMap<string, number>;

  constructor(readonly names: readonly N[]) {
    this.byName = new Map(names.map((n, i) => [n, i]));
  }

  /** The stored form of a name: its code, else the text. */
  toDriver(name: string): number | string {
    return this.byName.get(name) ?? name;
  }

  /** The name of a stored value: a code's name, else the value as text. */
  fromDriver(v: unknown): string {
    return (typeof v === "number" || typeof v === "bigint" ? this.names[Number(v)] : undefined) ?? String(v);
  }

  /** The SQL literal a column holding `name` equals (`status = ${episodeStatus.sql("committed")}`). */
  sql(name: N): string {
    return String(this.byName.get(name));
  }

  /** SQL for the name of a stored expression (what replication sends). */
  ofSql(expr: string): string {
    return `(CASE ${expr} ${this.names.map((n, i) => `WHEN ${i} THEN '${n}'`).join(" ")} ELSE ${expr} END)`;
  }

  /** SQL for the stored form of a name given as text (`toDriver` in SQL: migration 31). */
  storedSql(expr: string): string {
    return `(CASE ${expr} ${this.names.map((n, i) => `WHEN '${n}' THEN ${i}`).join(" ")} ELSE ${expr} END)`;
  }

  /** A column of these names: names to the code, codes in the file. Declared INTEGER. */
  column<T extends string = N>(name: string) {
    return customType<{ data: T; driverData: number | string }>({
      dataType: () => "integer",
      toDriver: (v) => this.toDriver(v),
      fromDriver: (v) => this.fromDriver(v) as T,
    })(name);
  }
}

/** `episodes.status`: failed 0, committed 1. */
export const episodeStatus = new Codes(["failed", "committed"] as const);

/** The SQL literals of the two outcomes: `WHERE status = ${STATUS_COMMITTED}`. */
export const STATUS_COMMITTED = episodeStatus.sql("committed");
export const STATUS_FAILED = episodeStatus.sql("failed");

/** `episodes.stimulus_kind`: the two kinds that fire most often take the two codes that cost no bytes. */
export const stimulusKind = new Codes(["timer", "mqtt", "webhook", "inbox", "manual", "wake"] as const);

/** The columns stored this way, by table, with their codes (migration 31; `wireSql` reads them as names). */
export const CODE_COLUMNS: Readonly<Record<string, Readonly<Record<string, Codes<string>>>>> = {
  episodes: { status: episodeStatus, stimulus_kind: stimulusKind },
};
