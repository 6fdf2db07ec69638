/**
 * Which gateway on this machine hands out which sandbox uids. Two root gateways whose
 * `[fleet] sandbox_uids` overlap (two fleets, or shards, left at the default) would run
 * episodes of both as one uid: they could signal each other's processes and would share one
 * process limit. Each gateway claims its range at start, as a row in a small SQLite file in a
 * folder of root's on /run (a tmpfs: claims last one boot). A claim is made in one write
 * transaction (BEGIN IMMEDIATE): it reads the claims there, drops those whose gateway is gone
 * (its pid no longer alive with the start time the claim names), picks the range and writes its
 * row, so two gateways starting at the same moment take turns and never pick the same block.
 * The lock is SQLite's, a POSIX lock the kernel lets go of when its process dies: a gateway
 * killed mid-claim (kill -9) leaves nothing to break. The default range moves up to the first
 * block of 65,536 no live claim overlaps; a range set in fleet.toml that overlaps one is refused.
 */
import Database from "libsql";
import { chmodSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { DEFAULT_SANDBOX_UIDS, type UidRange } from "../spec/index.ts";
import { startTicks } from "./leftovers.ts";
import { defaultSpawnOptions, runsAsUids, type SandboxMode, type SpawnOptions } from "./sandbox.ts";

/** Where claims are kept: root's, and cleared at boot. */
export const UID_CLAIMS_DIR = "/run/fleet/uid-claims";

/** The claims file in that folder. */
export const UID_CLAIMS_FILE = "claims.db";

/** How many blocks of the default's size the default range may move up (0x70000000 to 0x70ffffff). */
export const DEFAULT_UID_BLOCKS = 256;

/** How long a gateway waits for another's claim to finish, ms (a claim holds the lock for well under one). */
const LOCK_WAIT_MS = 10_000;

/** One gateway's claim, as its row holds it. */
export interface UidClaim {
  readonly pid: number;
  /** Its start time in clock ticks since boot (a pid reused by another process does not hold the claim). */
  readonly start: string;
  readonly first: number;
  readonly count: number;
  /** Who holds it, for messages: "the gateway of <data dir>", or a command. */
  readonly owner: string;
}

/** A range set in fleet.toml that a running gateway holds already. */
export class UidRangeTaken extends Error {
  override readonly name = "UidRangeTaken";
}

/** The range this gateway holds, and how to let it go. */
export interface HeldUids {
  readonly range: UidRange;
  /** The gateway holding the range asked for, when the default moved past it. */
  readonly movedPast: UidClaim | null;
  release(): void;
}

const overlaps = (a: UidRange, b: UidRange) => a.first < b.first + b.count && b.first < a.first + a.count;

/** `first-last`. */
export const uidSpan = (r: UidRange) => `${r.first}-${r.first + r.count - 1}`;

const CLAIMS_DDL =
  "CREATE TABLE IF NOT EXISTS claims (pid INTEGER NOT NULL, start TEXT NOT NULL, first INTEGER NOT NULL, " +
  "count INTEGER NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (pid, first))";

/**
 * Claim `wanted` for this process (`owner`: who it is, for others' messages). The default range
 * moves to the first block no live claim overlaps; any other range that overlaps a live claim
 * throws UidRangeTaken. Throws what the file system or SQLite throws when the folder or its
 * file cannot be used.
 */
export function claimUids(wanted: UidRange, owner: string, dir = UID_CLAIMS_DIR): HeldUids {
  const movable = wanted.first === DEFAULT_SANDBOX_UIDS.first && wanted.count === DEFAULT_SANDBOX_UIDS.count;
  const claim = withClaims(dir, (db) => {
    const live = liveClaims(db);
    const before = live.find((c) => overlaps(c, wanted)) ?? null;
    let range = wanted;
    if (before !== null) {
      if (!movable)
        throw new UidRangeTaken(
          `[fleet] sandbox_uids ${uidSpan(wanted)} overlaps the uids ${uidSpan(before)} that pid ${before.pid} ` +
            `(${before.owner}) hands to its episodes: give each gateway on this machine a range of its own`,
        );
      let block = 1;
      while (block < DEFAULT_UID_BLOCKS && live.some((c) => overlaps(c, blockAt(block)))) block++;
      if (block >= DEFAULT_UID_BLOCKS)
        throw new UidRangeTaken(
          `all ${DEFAULT_UID_BLOCKS} blocks of the default sandbox_uids are held by running gateways: ` +
            "set [fleet] sandbox_uids to a range of its own",
        );
      range = blockAt(block);
    }
    db.prepare("INSERT INTO claims (pid, start, first, count, owner) VALUES (?, ?, ?, ?, ?)").run(
      process.pid,
      startTicks(process.pid) ?? "",
      range.first,
      range.count,
      owner,
    );
    return { range, movedPast: before };
  });
  let released = false;
  return {
    ...claim,
    release: () => {
      if (released) return;
      released = true;
      try {
        withClaims(dir, (db) => forget(db, process.pid, claim.range.first));
      } catch {
        // The folder went away (a reboot's tmpfs, a test's temp dir): nothing left to let go.
      }
    },
  };
}

/** The claims of gateways running now (for tests and operators' tools); those of gateways gone are dropped. */
export function uidClaims(dir = UID_CLAIMS_DIR): UidClaim[] {
  return withClaims(dir, liveClaims);
}

const blockAt = (block: number): UidRange => ({
  first: DEFAULT_SANDBOX_UIDS.first + block * DEFAULT_SANDBOX_UIDS.count,
  count: DEFAULT_SANDBOX_UIDS.count,
});

/** `fn` on the claims file, in one write transaction: other claimers wait for it to commit. */
function withClaims<T>(dir: string, fn: (db: Database.Database) => T): T {
  ensureRootFolder(dir);
  const path = join(dir, UID_CLAIMS_FILE);
  let db: Database.Database;
  try {
    db = new Database(path);
  } catch (err) {
    throw new Error(`${path}: ${(err as Error).message}`);
  }
  try {
    db.exec(`PRAGMA busy_timeout = ${LOCK_WAIT_MS}`);
    db.exec("BEGIN IMMEDIATE");
    try {
      db.exec(CLAIMS_DDL);
      const out = fn(db);
      db.exec("COMMIT");
      return out;
    } catch (err) {
      if (db.inTransaction) db.exec("ROLLBACK");
      throw err;
    }
  } catch (err) {
    if (err instanceof UidRangeTaken) throw err;
    throw new Error(`${path}: ${(err as Error).message}`);
  } finally {
    db.close();
  }
}

/**
 * A folder only root can write (a claim anyone could plant would stop a gateway from starting) and
 * read (the claims name data dirs and pids). One an older version made readable to all is closed.
 */
function ensureRootFolder(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = statSync(dir);
  if (st.uid !== 0 || (st.mode & 0o022) !== 0)
    throw new Error(
      `${dir} is not a folder only root can write (uid ${st.uid}, mode ${(st.mode & 0o777).toString(8)})`,
    );
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
}

/** The claims of gateways alive now, in the order they were made; the rows of gateways gone are deleted. */
function liveClaims(db: Database.Database): UidClaim[] {
  const rows = db.prepare("SELECT pid, start, first, count, owner FROM claims ORDER BY rowid").all() as UidClaim[];
  const live: UidClaim[] = [];
  for (const c of rows) {
    // This process's own pid is checked like any other: a command killed before it let go may have
    // had it (its claim would otherwise hold a block for as long as this process runs).
    // (Without /proc a claim names no start time; then only this process's own is known to be alive.)
    const ticks = startTicks(c.pid);
    if (ticks !== null ? ticks === c.start : c.pid === process.pid && c.start === "") live.push(c);
    else forget(db, c.pid, c.first);
  }
  return live;
}

/** Delete one claim: a gateway's that let go, or one whose gateway is gone. */
function forget(db: Database.Database, pid: number, first: number): void {
  db.prepare("DELETE FROM claims WHERE pid = ? AND first = ?").run(pid, first);
}

/**
 * Spawn options for a command that runs agent code outside a gateway (`fleet replay`, `deploy
 * --check`, `validate`): as root its episodes run as a block of the default range that no running
 * gateway holds, claimed until this process exits (a range set in fleet.toml is the gateway's).
 */
export function commandSpawnOptions(
  mode: SandboxMode,
  opts: { allowWeak?: boolean },
  command: string,
  dir = UID_CLAIMS_DIR,
): SpawnOptions {
  let uids = DEFAULT_SANDBOX_UIDS;
  if (runsAsUids(mode))
    try {
      const held = claimUids(DEFAULT_SANDBOX_UIDS, command, dir);
      uids = held.range;
      process.once("exit", () => held.release());
    } catch {
      // No claims folder here (or every block held): the default range, as before claims.
    }
  return defaultSpawnOptions(mode, { ...opts, uids });
}
