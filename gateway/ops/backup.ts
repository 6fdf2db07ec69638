/**
 * `fleet backup FILE` and `fleet restore FILE`. A backup is one self-contained SQLite file
 * made with `VACUUM INTO`: it reads a single consistent snapshot, so it is safe while the
 * gateway writes (WAL readers never block the writer, and the writer never blocks them).
 * Both sides check the copy before calling it good: `PRAGMA integrity_check`, the schema
 * version, and every hash chain (`fleet verify`). A backup of an older release's data dir keeps
 * its schema; `restore` upgrades its copy to this release's before checking it.
 */
import { createClient } from "@libsql/client/sqlite3";
import {
  chmodSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
} from "node:fs";
import { dirname, join, resolve } from "node:path";
import { syncDir, syncFile } from "../durable.ts";
import { forkGatewayIdentity, migrate, SCHEMA_VERSION, schemaVersion, Store } from "../store/index.ts";
import { type VerifyReport, verifyStore } from "./verify.ts";
import { errorReason, OperatorError } from "../errors.ts";

/** Why a backup or restore was refused (the CLI prints the message, exit 1). */
export class BackupError extends OperatorError {
  override readonly name = "BackupError";
  /** When a copy failed its check: what is wrong with it (the message without the file's name). */
  readonly check?: string;
  constructor(message: string, check?: string) {
    super(message);
    this.check = check;
  }
}

const checkFailed = (file: string, why: string) => new BackupError(`${file} ${why}`, why);

/** What a backup or restore produced, after checking it. */
export interface BackupReport {
  readonly file: string;
  readonly bytes: number;
  /** The schema of `file`: a backup keeps the one it was taken at, a restored fleet.db has this release's. */
  readonly schema_version: number;
  /**
   * An older release's schema the database had, else null: `restore` upgraded its copy from it; `backup`
   * verified an upgraded scratch copy (deleted after), the backup itself keeps it.
   */
  readonly upgraded_from: number | null;
  readonly verify: VerifyReport;
}

/** Integrity and schema version of a database file (`name` in messages); throws BackupError when unusable. */
async function checkFile(file: string, name = file): Promise<number> {
  const client = createClient({ url: `file:${file}` });
  try {
    const rows = (await client.execute("PRAGMA integrity_check")).rows;
    const verdict = rows.map((r) => String(r[0])).join("; ");
    if (verdict !== "ok") throw checkFailed(name, `is damaged: ${verdict}`);
    const version = await schemaVersion(client);
    if (version === 0) throw checkFailed(name, "is not a fleet database or not a complete backup (no schema version)");
    if (version > SCHEMA_VERSION)
      throw checkFailed(
        name,
        `was written by a newer release (schema ${version}; this one is ${SCHEMA_VERSION}): ` +
          "use that release (or a newer one); nothing was changed",
      );
    return version;
  } catch (err) {
    if (err instanceof BackupError) throw err;
    throw checkFailed(name, `cannot be read as a fleet database: ${errorReason(err)}`);
  } finally {
    client.close();
  }
}

/**
 * Bring `file` (a copy nothing else uses) to this release's schema and check every hash chain
 * in it, reporting problems as `name`'s. Verification reads today's tables, so an older schema
 * is verified only once upgraded.
 */
async function upgradeAndVerify(file: string, name: string): Promise<VerifyReport> {
  const client = createClient({ url: `file:${file}` });
  try {
    await migrate(client, file);
  } catch (err) {
    throw checkFailed(name, `cannot be upgraded to this release's schema: ${errorReason(err)}`);
  } finally {
    client.close();
  }
  const store = await Store.open(file, { synchronous: "normal", readonly: true });
  let verify: VerifyReport;
  try {
    verify = await verifyStore(store);
  } catch (err) {
    throw checkFailed(name, `cannot be verified: ${errorReason(err)}`);
  } finally {
    await store.close();
  }
  if (verify.problems.length > 0) {
    const first = verify.problems[0]!;
    throw checkFailed(
      name,
      `fails verification (${verify.problems.length} problem(s)); first: ${first.record}: ${first.problem}`,
    );
  }
  return verify;
}

/** A database file and what SQLite may have left beside it. */
function removeDatabase(file: string): void {
  for (const side of ["", "-wal", "-shm", "-journal"]) rmSync(file + side, { force: true });
}

/**
 * Check a finished backup: integrity and schema version, then every hash chain. A backup of an
 * older release's data dir keeps that schema (it restores with either release); its chains are
 * verified in an upgraded scratch copy in `scratchDir`.
 */
async function checkBackup(file: string, scratchDir: string): Promise<Omit<BackupReport, "file" | "bytes">> {
  const version = await checkFile(file);
  if (version === SCHEMA_VERSION) {
    return { schema_version: version, upgraded_from: null, verify: await upgradeAndVerify(file, file) };
  }
  const scratch = join(scratchDir, "upgraded.db");
  try {
    await copyDatabase(file, scratch, file);
    return { schema_version: version, upgraded_from: version, verify: await upgradeAndVerify(scratch, file) };
  } finally {
    removeDatabase(scratch);
  }
}

/** `VACUUM INTO`: a clean, consistent copy of `from` (no WAL) at `to`. */
async function copyDatabase(from: string, to: string, name: string): Promise<void> {
  const client = createClient({ url: `file:${from}` });
  try {
    await client.execute("PRAGMA busy_timeout = 5000");
    await client.execute({ sql: "VACUUM INTO ?", args: [to] });
  } catch (err) {
    throw checkFailed(name, `cannot be copied: ${errorReason(err)}`);
  } finally {
    client.close();
  }
}

/** Write a consistent, verified copy of `dbPath` to `target` (which must not exist). */
export async function backupDatabase(dbPath: string, target: string): Promise<BackupReport> {
  const file = resolve(target);
  if (!existsSync(dbPath)) throw new BackupError(`no fleet database at ${dbPath}`);
  // lstat, not exists: a dangling symlink at FILE is something there too, not a path to follow.
  if (lstatSync(file, { throwIfNoEntry: false })) {
    throw new BackupError(`${file} already exists; choose a new file name`);
  }
  mkdirSync(dirname(file), { recursive: true });
  // The copy holds every agent's state and every device payload. VACUUM INTO creates its file with
  // the umask, so it writes into a private (0700) directory beside FILE, and the finished copy is
  // linked in under FILE: a backup killed midway leaves no readable, partial file under the final name.
  let scratch: string | undefined;
  try {
    scratch = mkdtempSync(join(dirname(file), ".fleet-backup-"));
    const partial = join(scratch, "copy.db");
    const client = createClient({ url: `file:${dbPath}` });
    try {
      await client.execute("PRAGMA busy_timeout = 5000");
      await client.execute({ sql: "VACUUM INTO ?", args: [partial] });
    } catch (err) {
      throw new BackupError(`cannot write a backup to ${file}: ${errorReason(err)}`);
    } finally {
      client.close();
    }
    chmodSync(partial, 0o600);
    // VACUUM INTO does not sync its file: a backup taken just before a power cut would come back short.
    syncFile(partial);
    publish(partial, file);
    syncDir(dirname(file));
    try {
      return { file, bytes: statSync(file).size, ...(await checkBackup(file, scratch)) };
    } catch (err) {
      // The copy is the database as it is, damage included (VACUUM INTO copies rows, it does not check
      // them): it is kept, since the damaged live file may be all there is otherwise, and `restore`
      // refuses it for the same reason this fails. The command still fails, so a timer's unit fails.
      const why = err instanceof BackupError ? (err.check ?? err.message) : errorReason(err);
      throw new BackupError(`copy written to ${file}, but it does not verify: it ${why}`);
    }
  } catch (err) {
    if (err instanceof BackupError) throw err;
    throw new BackupError(`cannot write a backup to ${file}: ${errorReason(err)}`);
  } finally {
    if (scratch) rmSync(scratch, { recursive: true, force: true }); // whatever a failed VACUUM INTO left is no copy
  }
}

/** Give the finished copy its final name without replacing anything that appeared there meanwhile. */
function publish(partial: string, file: string): void {
  try {
    linkSync(partial, file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "EEXIST") throw new BackupError(`${file} already exists; choose a new file name`);
    if (code !== "EPERM" && code !== "ENOTSUP" && code !== "EXDEV") throw err;
    renameSync(partial, file); // a file system without hard links
  }
}

/**
 * Put a backup in place as `<dataDir>/fleet.db`. Refused while a gateway runs on the data
 * dir or when it already holds a database: restore never overwrites history.
 */
export async function restoreDatabase(source: string, dataDir: string, gatewayRunning: boolean): Promise<BackupReport> {
  const from = resolve(source);
  if (!existsSync(from)) throw new BackupError(`no backup file at ${from}`);
  if (gatewayRunning) throw new BackupError(`a gateway is running on ${dataDir}; stop it first`);
  const made = mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  // Hold the data dir as a gateway does (its sandbox ledger names this process) until the copy is in
  // place: a gateway started meanwhile refuses it instead of making a fleet.db the rename then replaces.
  const ledgerFile = join(dataDir, "sandboxes");
  const hadLedger = existsSync(ledgerFile);
  const { SandboxLedger } = await import("../episode/index.ts");
  const ledger = new SandboxLedger(ledgerFile);
  try {
    if (ledger.sweep().ownerAlive) throw new BackupError(`a gateway is running on ${dataDir}; stop it first`);
    try {
      return await restoreInto(from, dataDir);
    } finally {
      ledger.release();
    }
  } catch (err) {
    // A refused restore changes nothing: the ledger it started and the directories it made go again.
    if (!hadLedger) rmSync(ledgerFile, { force: true });
    if (made !== undefined) removeEmptyDirs(dataDir, made);
    throw err;
  }
}

/** Remove `dir` and its parents up to `top`, each only while it is empty (what a refused restore made). */
function removeEmptyDirs(dir: string, top: string): void {
  for (let d = resolve(dir); ; d = dirname(d)) {
    try {
      rmdirSync(d);
    } catch {
      return; // not empty: something else is there now, and stays
    }
    if (d === resolve(top) || dirname(d) === d) return;
  }
}

/** `restoreDatabase` once it holds the data dir. */
async function restoreInto(from: string, dataDir: string): Promise<BackupReport> {
  const target = join(dataDir, "fleet.db");
  // Only fleet.db is a database: a WAL without it is stale (nothing can replay it) and is removed below.
  if (existsSync(target))
    throw new BackupError(`${dataDir} already holds a fleet database (fleet.db); restore into a data dir without one`);
  const version = await checkFile(from);
  // Copy through VACUUM INTO (a clean file, no WAL) under a temporary name, upgrade the copy to this
  // release's schema (a backup of an older release restores as its data dir would start) and verify
  // it, then rename, so a crash or a refusal never leaves a half-written fleet.db behind.
  const partial = `${target}.restoring`;
  removeDatabase(partial);
  try {
    await copyDatabase(from, partial, from);
    const verify = await upgradeAndVerify(partial, from);
    // The copy is a gateway of its own at the central server (docs/replication.md, "Restoring a backup").
    const copy = createClient({ url: `file:${partial}` });
    try {
      await forkGatewayIdentity(copy);
    } finally {
      copy.close();
    }
    chmodSync(partial, 0o600);
    // On the disk before it is fleet.db (VACUUM INTO does not sync): a power cut must not leave a short one.
    syncFile(partial);
    // A stale WAL, shm or journal would be applied to the new file, so they go before it is there;
    // other files (a backup named fleet.db-<date>, the very one restored from) are the operator's and stay.
    for (const leftover of ["fleet.db-wal", "fleet.db-shm", "fleet.db-journal"])
      rmSync(join(dataDir, leftover), { force: true });
    renameSync(partial, target);
    syncDir(dataDir);
    const upgradedFrom = version < SCHEMA_VERSION ? version : null;
    return {
      file: target,
      bytes: statSync(target).size,
      schema_version: SCHEMA_VERSION,
      upgraded_from: upgradedFrom,
      verify,
    };
  } finally {
    removeDatabase(partial); // after the rename, only what SQLite left beside the copy
  }
}
