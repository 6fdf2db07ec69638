/**
 * The data dir is private to the gateway's user: the directory is 0700 and every file in it
 * (fleet.db and its -wal/-shm, gateway.json, device and token files) 0600, so neither an
 * episode running as another uid nor another local user reads agent state, payloads or ports.
 * SQLite creates -wal and -shm with the mode of the database file, so a 0600 fleet.db keeps them private.
 */
import { chmodSync, closeSync, mkdirSync, openSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** Mode of the data dir and of every folder inside it. */
export const PRIVATE_DIR_MODE = 0o700;
/** Mode of every file in the data dir. */
export const PRIVATE_FILE_MODE = 0o600;

/**
 * Create `dir` if missing and make it private: the directory 0700 and the files directly in it
 * 0600 (a data dir made by an older version with 0755/0644 is fixed at start). Not recursive:
 * what lies below a 0700 directory is out of other users' reach already, and a data dir set to
 * a folder with other content must not have that content's modes rewritten. Symlinks are left alone.
 */
export function secureDataDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  chmodSync(dir, PRIVATE_DIR_MODE);
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name);
    if (entry.isFile() && (statSync(p).mode & 0o777) !== PRIVATE_FILE_MODE) chmodSync(p, PRIVATE_FILE_MODE);
  }
}

/**
 * Create `file` empty and 0600 unless it exists; an existing one is made 0600 without being opened.
 * Closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's too:
 * with another connection to fleet.db open in this process (the CLI's schema check, whose connection
 * lives until collected), another process's last connection to close then took the lock, checkpointed
 * and deleted the WAL the store went on writing.
 */
export function ensurePrivateFile(file: string): void {
  try {
    closeSync(openSync(file, "wx", PRIVATE_FILE_MODE));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
  }
  chmodSync(file, PRIVATE_FILE_MODE);
}

/** Write `file` as 0600 (also when it already existed with a wider mode). */
export function writePrivateFile(file: string, text: string): void {
  writeFileSync(file, text, { mode: PRIVATE_FILE_MODE });
  chmodSync(file, PRIVATE_FILE_MODE);
}
