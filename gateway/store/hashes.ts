/**
 * Hashes stored as their 32 bytes (issue 13: store bytes per episode). A BLAKE3 hash is 64
 * lowercase hex characters in every API, CLI line and hash input; the per-episode columns that
 * only hold such hashes store the 32 bytes instead (migration 20 of ./migrate.ts) and read back
 * as hex through the drizzle column type below. A value that is not a lowercase 64-character hex
 * string (none is written by this code) is stored as the text it is, so every value reads back
 * exactly as written; SQL that needs the text form uses `hexOfSql`. Episode ids are kept the same
 * way, as 16 bytes (`idColumn` below).
 */
import { customType } from "drizzle-orm/sqlite-core";
import { CODE_COLUMNS } from "./codes.ts";

const HEX64 = /^[0-9a-f]{64}$/;
/** GLOB of the same. */
const HEX64_GLOB = "[0-9a-f]".repeat(64);

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

/**
 * Episode ids stored as their 16 bytes (migration 26), as hashes are above: an id is a UUIDv7 in
 * its 36-character text form in every API, CLI line, hash input and replicated row; `episodes.id`
 * and the columns naming an episode (`checkpoints.episode`, `stimuli.episode`, the `events` view's
 * `episode`) store the 16 bytes and read back as that text. Any other value (none is written by the
 * gateway; tests use short names) is stored as the text it is. Raw SQL compares stored forms with
 * stored forms; `idOfSql` and `idBytesSql` convert where SQL meets the text (the replication queue).
 */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** The stored form of an episode id: its 16 bytes when it is a lowercase UUID, else the text. */
export function idToDriver(id: string): string | Buffer {
  return UUID.test(id) ? Buffer.from(id.replaceAll("-", ""), "hex") : id;
}

/** The text of a stored episode id (bytes or text). */
export function idFromDriver(v: unknown): string {
  if (typeof v === "string") return v;
  const hex = hashFromDriver(v);
  if (hex.length !== 32) return hex;
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** An episode id column: UUID text to the code, 16 bytes in the file. Declared TEXT, as hash columns. */
export const idColumn = customType<{ data: string; driverData: string | Buffer }>({
  dataType: () => "text",
  toDriver: idToDriver,
  fromDriver: idFromDriver,
});

/** SQL for the text of a stored episode id expression (what replication sends and the queue keys hold). */
export const idOfSql = (expr: string): string =>
  `(CASE WHEN typeof(${expr}) = 'blob' AND length(${expr}) = 16 THEN lower(substr(hex(${expr}), 1, 8) || '-' ||
    substr(hex(${expr}), 9, 4) || '-' || substr(hex(${expr}), 13, 4) || '-' || substr(hex(${expr}), 17, 4) || '-' ||
    substr(hex(${expr}), 21)) ELSE ${expr} END)`;

const h = (n: number) => "[0-9a-f]".repeat(n);
/** GLOB of a lowercase UUID, as `UUID` above. */
const UUID_GLOB = `${h(8)}-${h(4)}-${h(4)}-${h(4)}-${h(12)}`;

/** SQL for the stored form of an episode id given as text (`idToDriver` in SQL). */
export const idBytesSql = (expr: string): string =>
  `(CASE WHEN typeof(${expr}) = 'text' AND ${expr} GLOB '${UUID_GLOB}' THEN unhex(replace(${expr}, '-', ''))
    ELSE ${expr} END)`;

/** The episode id columns stored this way, by table (migration 26). */
export const ID_COLUMNS: Readonly<Record<string, readonly string[]>> = {
  episodes: ["id"],
  checkpoints: ["episode"],
  stimuli: ["episode"],
  events: ["episode"],
};

/** SQL for the value of `table.column` as the API and the central server see it (hex hashes, UUID text, names). */
export function wireSql(table: string, column: string, expr = column): string {
  if (isHashColumn(table, column)) return hexOfSql(expr);
  if (SPEC_COLUMNS[table]?.includes(column)) return specOfSql(expr);
  if (ID_COLUMNS[table]?.includes(column)) return idOfSql(expr);
  const codes = CODE_COLUMNS[table]?.[column];
  if (codes) return codes.ofSql(expr);
  return expr;
}

/**
 * Checkpoints are found by hash through an index of the hash's first 8 bytes (migration 28): SQL that
 * looks one up names that prefix too, `checkpointHashIs("c.hash", "?")`, so the index is used.
 */
export const checkpointHashIs = (column: string, expr: string): string =>
  `substr(${column}, 1, 8) = substr(${expr}, 1, 8) AND ${column} = ${expr}`;

/** The columns stored this way, by table (migrations 20, 21 and 23; spec versions moved to `specColumn`, 27). */
export const HASH_COLUMNS: Readonly<Record<string, readonly string[]>> = {
  episodes: ["checkpoint", "parent", "events_hash"],
  checkpoints: ["hash", "parent"],
  agents: ["anchor_hash", "head_hash"],
};

/**
 * Hashes named by a prefix of their bytes (migrations 27 and 30). Every episode names the spec version
 * it ran on and the code bundle it ran, and every checkpoint its spec version: each one of the few
 * hashes a data dir has in `spec_versions` or `bundles`, 32 bytes each time. A column of this kind
 * stores the hash's first bytes when those name it (the hash is known to this process and no other
 * known hash of its table begins with them), else all 32 bytes, and reads back the whole hex hash. A
 * reference made of the hash itself, not a row number, reads the same in every copy of the data (a
 * backup's `VACUUM INTO` renumbers rowids; `fleet reshard` copies rows between files). The process
 * learns the hashes of each data dir it opens and of every one it records (`know`), before a row can
 * name one. SQL reads them with `ofSql`: a prefix names the oldest hash of the data dir's table with
 * it, as the first known does here.
 */
class HashRefs {
  private readonly byPrefix = new Map<string, string>();

  constructor(
    /** The table holding the hashes (column `hash`, hex text), oldest first by `created_at, rowid`. */
    readonly table: string,
    /** Bytes of a reference. */
    readonly bytes: number,
  ) {}

  /** Learn a hash (idempotent): rows can name it by its prefix from now on. */
  know(hash: string): void {
    if (!HEX64.test(hash)) return;
    const prefix = hash.slice(0, this.bytes * 2);
    if (!this.byPrefix.has(prefix)) this.byPrefix.set(prefix, hash);
  }

  /** The stored form of a hash: its prefix when that names it, else as `hashToDriver`. */
  toDriver(hex: string): string | Buffer {
    const prefix = hex.slice(0, this.bytes * 2);
    return this.byPrefix.get(prefix) === hex ? Buffer.from(prefix, "hex") : hashToDriver(hex);
  }

  /** The hex hash of a stored value (a prefix, 32 bytes or text); an unknown prefix reads as its hex. */
  fromDriver(v: unknown): string {
    const hex = hashFromDriver(v);
    return hex.length === this.bytes * 2 && typeof v !== "string" ? (this.byPrefix.get(hex) ?? hex) : hex;
  }

  /** SQL for the first stored hash (hex text) that begins with the hex `prefixExpr`. */
  private withPrefix(prefixExpr: string): string {
    return `(SELECT r.hash FROM ${this.table} AS r WHERE r.hash >= ${prefixExpr} AND r.hash < ${prefixExpr} || 'g'
    ORDER BY r.created_at, r.rowid LIMIT 1)`;
  }

  /** SQL for the hex hash of a stored expression (replication; tests reading raw rows). */
  ofSql(expr: string): string {
    return `(CASE WHEN typeof(${expr}) = 'blob' AND length(${expr}) = ${this.bytes}
    THEN ${this.withPrefix(`lower(hex(${expr}))`)} ELSE ${hexOfSql(expr)} END)`;
  }

  /** SQL for the stored form of a hex hash expression (`toDriver` in SQL): what a column holding it equals. */
  storedSql(hexExpr: string): string {
    const whole = `${hexExpr} GLOB '${HEX64_GLOB}'`;
    return `(CASE WHEN ${whole} AND ${this.withPrefix(`substr(${hexExpr}, 1, ${this.bytes * 2})`)} = ${hexExpr}
    THEN unhex(substr(${hexExpr}, 1, ${this.bytes * 2})) WHEN ${whole} THEN unhex(${hexExpr}) ELSE ${hexExpr} END)`;
  }

  /**
   * SQL that rewrites column `c` in its stored form where it holds a hash as 32 bytes (or, with
   * `fromText`, as 64 lowercase hex characters): its prefix where that names it, else its 32 bytes.
   */
  refSql(c: string, fromText = false): string {
    const hex = fromText ? c : `lower(hex(${c}))`;
    const full = fromText ? `unhex(${c})` : c;
    const whole = fromText
      ? `typeof(${c}) = 'text' AND ${c} GLOB '${HEX64_GLOB}'`
      : `typeof(${c}) = 'blob' AND length(${c}) = 32`;
    return `${c} = CASE WHEN ${whole} AND ${this.withPrefix(`substr(${hex}, 1, ${this.bytes * 2})`)} = ${hex}
      THEN substr(${full}, 1, ${this.bytes}) WHEN ${whole} THEN ${full} ELSE ${c} END`;
  }
}

/** Spec versions: 6 bytes (migration 27). */
const specRefs = new HashRefs("spec_versions", 6);
/**
 * Code bundles: 8 bytes (migration 30). Their hashes come from agent code, so a prefix another bundle
 * could be made to share costs 2^64 hashes to find, not 2^48.
 */
const bundleRefs = new HashRefs("bundles", 8);

/** Learn a spec version's hash (idempotent): rows can name it by its prefix from now on. */
export const knowSpecVersion = (hash: string): void => specRefs.know(hash);
/** Learn a code bundle's hash (idempotent): episodes can name it by its prefix from now on. */
export const knowBundle = (hash: string): void => bundleRefs.know(hash);

/** The stored form of a spec version hash: its prefix when that names it, else as `hashToDriver`. */
export const specToDriver = (hex: string): string | Buffer => specRefs.toDriver(hex);
/** The stored form of a bundle hash (`episodes.bundle`): its prefix when that names it, else its bytes. */
export const bundleToDriver = (hex: string): string | Buffer => bundleRefs.toDriver(hex);

/** The hex hash of a stored spec version (a prefix, 32 bytes or text); an unknown prefix reads as its hex. */
export const specFromDriver = (v: unknown): string => specRefs.fromDriver(v);

/** A spec version column: hex hash to the code, its 6-byte prefix (or 32 bytes) in the file. Declared TEXT. */
export const specColumn = customType<{ data: string; driverData: string | Buffer }>({
  dataType: () => "text",
  toDriver: specToDriver,
  fromDriver: specFromDriver,
});

/** A code bundle column: hex hash to the code, its 8-byte prefix (or 32 bytes) in the file. Declared TEXT. */
export const bundleColumn = customType<{ data: string; driverData: string | Buffer }>({
  dataType: () => "text",
  toDriver: bundleToDriver,
  fromDriver: (v) => bundleRefs.fromDriver(v),
});

/** SQL for the hex hash of a stored spec version expression (replication; tests reading raw rows). */
export const specOfSql = (expr: string): string => specRefs.ofSql(expr);
/** SQL for the hex hash of a stored bundle expression (tests reading raw rows). */
export const bundleOfSql = (expr: string): string => bundleRefs.ofSql(expr);
/** SQL for the stored form of a bundle hash given as hex text (`bundleToDriver` in SQL). */
export const bundleStoredSql = (hexExpr: string): string => bundleRefs.storedSql(hexExpr);

/** SQL of migration 27: a stored spec version hash (32 bytes) as its prefix, where that names it in this data dir. */
export const specRefSql = (c: string): string => specRefs.refSql(c);
/** SQL of migration 30: a bundle hash stored as hex text as its prefix where that names it, else its 32 bytes. */
export const bundleRefSql = (c: string): string => bundleRefs.refSql(c, true);

/** The spec version columns, by table (migration 27). */
export const SPEC_COLUMNS: Readonly<Record<string, readonly string[]>> = {
  episodes: ["spec_version"],
  checkpoints: ["spec_version"],
};

/** Whether `table.column` holds hashes as bytes. */
export const isHashColumn = (table: string, column: string): boolean => HASH_COLUMNS[table]?.includes(column) ?? false;
