/**
 * Hashes stored as their 32 bytes (issue 13: store bytes per episode). A BLAKE3 hash is 64
 * lowercase hex characters in every API, CLI line and hash input; the per-episode columns that
 * only hold such hashes store the 32 bytes instead (migration 20 of ./migrate.ts) and read back
 * as hex through the drizzle column type below. A value that is not a lowercase 64-character hex
 * string (none is written by this code) is stored as the text it is, so every value reads back
 * exactly as written; SQL that needs the text form uses `hexOfSql`.
 */
import { customType } from "drizzle-orm/sqlite-core";

const HEX64 = /^[0-9a-f]{64}$/;

/** The stored form of a hash: its bytes when it is 64 lowercase hex characters, else the text. */
export function hashToDriver(hex: string): string | Buffer {
  return HEX64.test(hex) ? Buffer.from(hex, "hex") : hex;
}

/** The hex text of a stored hash (bytes or text). */
export function hashFromDriver(v: unknown): string {
  if (typeof v === "string") return v;
  if (v instanceof ArrayBuffer) return Buffer.from(v).toString("hex");
  if (ArrayBuffer.isView(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("hex");
  return String(v);
}

/** A hash column: hex text to the code, 32 bytes in the file. Declared TEXT (a BLOB keeps its bytes there). */
export const hashColumn = customType<{ data: string; driverData: string | Buffer }>({
  dataType: () => "text",
  toDriver: hashToDriver,
  fromDriver: hashFromDriver,
});

/** SQL for the hex text of a stored hash expression (replication sends text; joins with text columns). */
export const hexOfSql = (expr: string): string =>
  `(CASE WHEN typeof(${expr}) = 'blob' THEN lower(hex(${expr})) ELSE ${expr} END)`;

/** The columns stored this way, by table (migrations 20, 21 and 23). */
export const HASH_COLUMNS: Readonly<Record<string, readonly string[]>> = {
  episodes: ["checkpoint", "parent", "events_hash", "spec_version"],
  checkpoints: ["hash", "parent", "spec_version"],
  agents: ["anchor_hash", "head_hash"],
};

/** Whether `table.column` holds hashes as bytes. */
export const isHashColumn = (table: string, column: string): boolean => HASH_COLUMNS[table]?.includes(column) ?? false;
