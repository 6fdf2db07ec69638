/**
 * Opening the libSQL file and the group committer. The gateway is the only writer
 * (a statement that failed with SQLITE_BUSY can keep holding the write lock,
 * libsql-client-ts#352); everything it
 * writes goes through `GroupCommitter`, which folds the jobs queued in one turn of the
 * event loop into a single transaction, so one fsync covers many stimuli.
 */
// The local-file client and its drizzle driver only: the packages' main entries load libSQL's remote
// protocols too (40-odd modules more for every CLI call).
import { createClient, type Client, type InArgs, type ResultSet } from "@libsql/client/sqlite3";
import { drizzle } from "drizzle-orm/libsql/sqlite3";
import type { LibSQLDatabase } from "drizzle-orm/libsql";
import type { BatchItem } from "drizzle-orm/batch";
import { existsSync, fstatSync, statSync } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import * as schema from "./schema.ts";
import { checkNotNewer, checkNotOlder, migrate, schemaVersion } from "./migrate.ts";
import { ensurePrivateFile, secureDataDir } from "./files.ts";
import { nativeClient, runBatch } from "./native.ts";
import { nativeConnection, ownStatement, type NativeConnection } from "./statements.ts";

/** The drizzle handle over the fleet schema. */
export type Db = LibSQLDatabase<typeof schema>;

/** A statement already in SQL (the hot paths skip drizzle's query building). */
export interface RawStatement {
  readonly sql: string;
  readonly args: InArgs;
  /**
   * Run only when this says so of the result of the statement before it in the transaction (a
   * first statement always runs); otherwise it is skipped and its result is empty (no rows, nothing
   * changed). Keep the two in one job: jobs that share a transaction run one after another.
   */
  readonly when?: (previous: ResultSet) => boolean;
}

/** One statement of a write job: a drizzle query or raw SQL. Results are libSQL ResultSets. */
export type WriteItem = BatchItem<"sqlite"> | RawStatement;

function toStatement(item: WriteItem): RawStatement {
  if ("args" in item && typeof (item as RawStatement).sql === "string") return item as RawStatement;
  const q = item as unknown as {
    toSQL?: () => { sql: string; params: unknown[] };
    getQuery?: () => { sql: string; params: unknown[] };
  };
  const built = q.toSQL ? q.toSQL() : q.getQuery!();
  return { sql: built.sql, args: built.params as InArgs };
}

/** Options for `openDb`. */
export interface OpenDbOptions {
  /** "full" survives power loss; "normal" survives process crashes (WAL). */
  synchronous: "full" | "normal";
  /** Read-only handles (CLI readers) skip migrations and never write. */
  readonly?: boolean;
  /**
   * Upgrade a database an older release wrote to this schema (a gateway's start: irreversible, that
   * release refuses it after). Without it a writable open refuses one (`SchemaVersionError`) before
   * changing anything; a new database is created either way.
   */
  upgrade?: boolean;
  busyTimeoutMs?: number;
  /**
   * Test hook: asked before every group commit; an error it returns fails that commit as if
   * libSQL had (e.g. a full disk), without touching the file. See `commitFaultFromEnv`.
   */
  commitFault?: () => Error | null;
  /** Test hook: how the WAL is synced after a commit at synchronous = "full" (default: an fdatasync). */
  walSync?: (path: string) => Promise<void>;
}

/** Why a commit failed, from libSQL's error code: a small fixed set (a metric label). */
export type CommitFailureKind = "disk_full" | "io" | "readonly" | "busy" | "constraint" | "other";

/** Classify a failed commit. `constraint` is one job's own conflict, not a storage problem. */
export function commitFailureKind(err: unknown): CommitFailureKind {
  const code = String((err as { code?: unknown } | null)?.code ?? "");
  const text = `${code} ${err instanceof Error ? err.message : String(err)}`;
  if (/SQLITE_FULL|disk is full/i.test(text)) return "disk_full";
  if (/SQLITE_IOERR|disk I\/O error/i.test(text)) return "io";
  if (/SQLITE_READONLY|readonly database/i.test(text)) return "readonly";
  if (/SQLITE_BUSY|SQLITE_LOCKED|database is locked/i.test(text)) return "busy";
  if (/SQLITE_CONSTRAINT|constraint failed/i.test(text)) return "constraint";
  return "other";
}

/**
 * The fault hook for end-to-end tests: with `FLEET_TEST_COMMIT_FAULT_FILE=<path>` set,
 * every commit fails like a full disk while that file exists. Null when the variable is unset.
 */
export function commitFaultFromEnv(env: Readonly<Record<string, string | undefined>>): (() => Error | null) | null {
  const file = env.FLEET_TEST_COMMIT_FAULT_FILE;
  if (!file) return null;
  return () =>
    existsSync(file)
      ? Object.assign(new Error(`SQLITE_FULL: database or disk is full (injected: ${file} exists)`), {
          code: "SQLITE_FULL",
        })
      : null;
}

/** The storage health the committer saw: failing from a storage-level commit failure until the next commit succeeds. */
export interface CommitHealth {
  readonly failing: boolean;
  /** Epoch ms of the first failure in the current failing run, or null. */
  readonly since: number | null;
  readonly kind: CommitFailureKind | null;
  readonly error: string | null;
}

/** The schema upgrade a writable open applied to a database an older release wrote. */
export interface SchemaUpgrade {
  readonly from: number;
  readonly to: number;
  readonly ms: number;
}

/**
 * Bytes the WAL file is cut back to when a checkpoint resets it (PRAGMA journal_size_limit): it holds
 * about 4 MB between checkpoints (wal_autocheckpoint's 1000 pages), so this cuts only a WAL that grew
 * while a reader held it back, and a data dir's size comes back down after a long backup.
 */
export const WAL_SIZE_LIMIT = 16 * 1024 * 1024;

/** Open (and migrate) the fleet database at `path`. */
export async function openDb(
  path: string,
  opts: OpenDbOptions,
): Promise<{ client: Client; db: Db; native: NativeConnection; upgraded: SchemaUpgrade | null }> {
  if (!opts.readonly && !opts.upgrade && existsSync(path)) {
    const found = createClient({ url: `file:${path}` });
    try {
      await found.execute(`PRAGMA busy_timeout = ${opts.busyTimeoutMs ?? 5000}`);
      checkNotOlder(await schemaVersion(found), path);
    } finally {
      found.close();
    }
  }
  if (!opts.readonly) {
    // A private dir, and a 0600 database file before SQLite creates it (its -wal and -shm copy its mode).
    if (!existsSync(dirname(path))) secureDataDir(dirname(path));
    ensurePrivateFile(path);
    for (const side of ["-wal", "-shm"]) if (existsSync(path + side)) ensurePrivateFile(path + side);
  }
  const client = createClient({ url: `file:${path}` });
  let upgraded: SchemaUpgrade | null = null;
  // libSQL's defaults are journal_mode=delete, synchronous=FULL, busy_timeout=0: set them all.
  await client.execute(`PRAGMA busy_timeout = ${opts.busyTimeoutMs ?? 5000}`);
  if (!opts.readonly) {
    await client.execute("PRAGMA journal_mode = WAL");
    // A WAL outgrows its usual ~4 MB while a reader holds an old snapshot (`fleet backup`, `verify`,
    // `deploy --check` on a busy gateway); SQLite never gives that space back unless told to.
    await client.execute(`PRAGMA journal_size_limit = ${WAL_SIZE_LIMIT}`);
    await client.execute(`PRAGMA synchronous = ${opts.synchronous.toUpperCase()}`);
    await client.execute("PRAGMA foreign_keys = OFF");
    const started = performance.now();
    const { from, to } = await migrate(client, path);
    if (from > 0 && to > from) upgraded = { from, to, ms: Math.round(performance.now() - started) };
  } else {
    checkNotNewer(await schemaVersion(client), path);
  }
  const native = await nativeConnection(client);
  const fast = nativeClient(client, native);
  return { client: fast, db: drizzle(fast, { schema }), native, upgraded };
}

interface Job {
  items: RawStatement[];
  resolve: (results: ResultSet[]) => void;
  reject: (err: unknown) => void;
  committed?: ((results: ResultSet[]) => void) | undefined;
}

/** Commit statistics, read by /metrics. */
export interface CommitStats {
  commits: number;
  jobs: number;
  lastCommitMs: number;
  totalCommitMs: number;
  /** Jobs whose commit failed, by kind. */
  failures: Partial<Record<CommitFailureKind, number>>;
}

/**
 * Folds concurrent write jobs into one transaction. A job is a list of statements that
 * must commit together; its promise resolves with their results after the commit is durable.
 * If a combined batch fails, each job is retried alone so one bad job cannot sink others.
 *
 * With `walSync` (synchronous = "full"), a commit runs at synchronous = NORMAL and its jobs
 * wait for an fdatasync of the WAL that started after it, on a thread of the pool: in WAL
 * mode that one sync is all FULL adds to NORMAL, and the gateway's thread keeps parsing
 * packets and running the next commit while the disk flushes. Syncs are grouped: commits
 * made while one runs share the next.
 *
 * A job may also ask to hear of its commit before that sync (`committed`): its rows are visible
 * to this connection from then on, so work that reads them can start while the disk flushes
 * (the intake wakes the scheduler there; the device is acknowledged on the promise). Whatever
 * that work writes commits later, in a later WAL frame, so no sync can cover it without also
 * covering these rows.
 *
 * A flush takes every job queued into one transaction, however many: while a device floods, that is
 * hundreds of rows and milliseconds of the thread. Cut at 128 jobs, the rest in the next turn of
 * the event loop, the quiet agent's p99 under a flood (`bun scripts/bench-policy.ts --flood`) was
 * worse, 4.15x, 3.93x, 2.91x against 2.70x, 2.85x, 1.34x uncut (alternating runs): a quiet device's
 * stimulus still queued behind the flood's, now behind more commits, and the slowest pings' episodes ran longer.
 *
 * The transactions run on the gateway's thread. On a connection of their own on a worker thread
 * (a prototype, one transaction in flight, results returned by structured clone; `bun
 * scripts/bench.ts intake busy`, two pairs on two cores) durable intake ran at 21,600 and 27,000
 * msg/s against 29,800 and 31,000 here: the thread saved little (29.1 and 22.2 us per message
 * against 26.1 and 24.5: arguments and rows cross threads by copy) and the process spent more
 * (53 and 41 us against 35 and 33).
 */
export class GroupCommitter {
  private queue: Job[] = [];
  private scheduled = false;
  /** Jobs queued may wait for others to share their transaction until this timer fires (`write`'s `gatherMs`). */
  private gathering: ReturnType<typeof setTimeout> | null = null;
  /** Commits run but not yet settled (waiting for their WAL sync). */
  private inFlight = new Set<Promise<void>>();
  /** Transactions committed, and how many of them a finished WAL sync covers. */
  private committed = 0;
  private syncedThrough = 0;
  private syncRunning: Promise<void> | null = null;
  /** The commits the running sync covers (those made before it started). */
  private runningCovers = 0;
  private syncNext: Promise<void> | null = null;
  /** The WAL, kept open for its syncs (unless the `walSync` hook syncs instead). */
  private readonly wal: WalFile | null;
  readonly stats: CommitStats = { commits: 0, jobs: 0, lastCommitMs: 0, totalCommitMs: 0, failures: {} };
  /** Optional observer of each commit's duration, until durable (metrics histogram). */
  onCommit: ((ms: number, jobs: number) => void) | null = null;
  /** Optional observer of each failed job (metrics, logs). */
  onFailure: ((kind: CommitFailureKind, err: unknown) => void) | null = null;
  private healthNow: CommitHealth = { failing: false, since: null, kind: null, error: null };
  /** When a commit last settled, or work arrived with none outstanding: what `stalledMs` counts from. */
  private progressAt = 0;

  constructor(
    private readonly conn: NativeConnection,
    private readonly fault: (() => Error | null) | null = null,
    private readonly now: () => number = Date.now,
    /**
     * The WAL file to sync after each commit (and how: tests observe it); null: the
     * connection's own synchronous level holds.
     */
    private readonly walSync: { readonly path: string; readonly sync?: (path: string) => Promise<void> } | null = null,
  ) {
    this.wal = walSync && !walSync.sync ? new WalFile(walSync.path) : null;
  }

  /** Whether commits are failing for a storage reason now (readiness, status). */
  get health(): CommitHealth {
    return this.healthNow;
  }

  /**
   * How long the queue has gone without a commit settling while it had work, in ms (0: no work
   * waits), on the monotonic clock: a step of the wall clock is no stall. A failing commit settles
   * too: only a store that neither commits nor fails stalls (a hung disk, a lost promise), which
   * systemd's watchdog restarts (gateway/systemd.ts).
   */
  stalledMs(): number {
    const outstanding = this.queue.length > 0 || this.inFlight.size > 0;
    return outstanding ? Math.max(0, performance.now() - this.progressAt) : 0;
  }

  /**
   * Queue a job; resolves with one ResultSet per statement once durably committed. `committed`
   * hears of the commit first, before the WAL sync (see the class comment); it must not throw.
   *
   * `gatherMs` > 0: the job may wait up to that long for other jobs to share its transaction (a
   * commit in a backlog, whose latency its wait in the queue dominates). Whichever comes first
   * ends the wait: the timer of the first such job queued, or a job that does not wait, which
   * takes every job queued into its transaction.
   */
  write(items: WriteItem[], committed?: (results: ResultSet[]) => void, gatherMs = 0): Promise<ResultSet[]> {
    if (items.length === 0) {
      committed?.([]);
      return Promise.resolve([]);
    }
    return new Promise((resolve, reject) => {
      if (this.queue.length === 0 && this.inFlight.size === 0) this.progressAt = performance.now();
      this.queue.push({ items: items.map(toStatement), resolve, reject, committed });
      if (gatherMs <= 0) this.schedule();
      else if (!this.scheduled && !this.gathering)
        this.gathering = setTimeout(() => {
          this.gathering = null;
          this.schedule();
        }, gatherMs);
    });
  }

  /** Flush the queue soon: at the next turn of the event loop, or once the running WAL sync ends. */
  private schedule(): void {
    this.stopGathering();
    if (this.scheduled) return;
    this.scheduled = true;
    // While the WAL syncs, jobs gather for the next transaction (its jobs could not be
    // acknowledged before that sync ends anyway, and one bigger commit writes fewer pages);
    // otherwise setImmediate lets every packet already read from sockets join this one.
    const flush = () => setImmediate(() => this.flush());
    if (this.syncRunning) this.syncRunning.then(flush, flush);
    else flush();
  }

  private stopGathering(): void {
    if (this.gathering === null) return;
    clearTimeout(this.gathering);
    this.gathering = null;
  }

  /**
   * Resolves once every transaction committed so far is on the disk. Readers whose rows
   * leave the process (outbox publishes, replication) wait for it: a committed row is
   * visible before its jobs are acknowledged.
   */
  durable(): Promise<void> {
    if (!this.walSync || this.syncedThrough >= this.committed) return Promise.resolve();
    // A sync that started after the last commit covers it.
    if (this.syncRunning && this.runningCovers >= this.committed) return this.syncRunning;
    return this.syncWal();
  }

  /** Resolves when everything queued so far is committed and durable. */
  async drain(): Promise<void> {
    while (this.queue.length > 0 || this.inFlight.size > 0) {
      if (this.queue.length > 0) this.flush();
      await Promise.all(this.inFlight);
    }
  }

  /** Drain, then let go of the WAL's descriptor (the store is closing). */
  async close(): Promise<void> {
    await this.drain();
    await this.syncRunning?.catch(() => undefined);
    await this.wal?.close();
  }

  private flush(): void {
    this.scheduled = false;
    this.stopGathering();
    const jobs = this.queue;
    this.queue = [];
    if (jobs.length === 0) return;
    const settled = this.commit(jobs).finally(() => {
      this.inFlight.delete(settled);
      this.progressAt = performance.now();
    });
    this.inFlight.add(settled);
  }

  /** Run `items` as one transaction now; throws what libSQL (or the fault hook) throws. */
  private run(items: RawStatement[]): ResultSet[] {
    const injected = this.fault?.();
    if (injected) throw injected;
    if (!this.walSync) return runBatch(this.conn, items, "write");
    ownStatement(this.conn, "PRAGMA synchronous = NORMAL").stmt.run([]);
    try {
      const results = runBatch(this.conn, items, "write");
      this.committed++;
      return results;
    } finally {
      ownStatement(this.conn, "PRAGMA synchronous = FULL").stmt.run([]);
    }
  }

  private succeeded(): void {
    if (this.healthNow.failing) this.healthNow = { failing: false, since: null, kind: null, error: null };
  }

  private failed(job: Job, err: unknown): void {
    const kind = commitFailureKind(err);
    this.stats.failures[kind] = (this.stats.failures[kind] ?? 0) + 1;
    // A job's own constraint conflict (e.g. a second commit of one stimulus) says nothing about the disk.
    if (kind !== "constraint") {
      this.healthNow = {
        failing: true,
        since: this.healthNow.since ?? this.now(),
        kind,
        error: err instanceof Error ? err.message : String(err),
      };
    }
    this.onFailure?.(kind, err);
    job.reject(err);
  }

  private async commit(jobs: Job[]): Promise<void> {
    const started = performance.now();
    // The transactions run synchronously, here; only the WAL sync is waited for.
    const done: { job: Job; results: ResultSet[] }[] = [];
    try {
      const results = this.run(jobs.flatMap((j) => j.items));
      let i = 0;
      for (const job of jobs) {
        done.push({ job, results: results.slice(i, i + job.items.length) });
        i += job.items.length;
      }
    } catch (err) {
      if (jobs.length === 1) this.failed(jobs[0]!, err);
      else
        for (const job of jobs) {
          try {
            done.push({ job, results: this.run(job.items) });
          } catch (e) {
            this.failed(job, e);
          }
        }
    }
    if (done.length > 0) {
      for (const d of done)
        try {
          d.job.committed?.(d.results);
        } catch (err) {
          // A bug in the listener: it must not leave jobs committed but never settled.
          queueMicrotask(() => {
            throw err;
          });
        }
      try {
        if (this.walSync) await this.syncWal();
        this.succeeded();
        for (const d of done) d.job.resolve(d.results);
      } catch (err) {
        // Committed but perhaps not on the disk: no job may report success on it.
        const io = Object.assign(new Error(`SQLITE_IOERR: syncing the WAL failed: ${String(err)}`), {
          code: "SQLITE_IOERR",
        });
        for (const d of done) this.failed(d.job, io);
      }
    }
    const ms = performance.now() - started;
    this.stats.commits += 1;
    this.stats.jobs += jobs.length;
    this.stats.lastCommitMs = ms;
    this.stats.totalCommitMs += ms;
    this.onCommit?.(ms, jobs.length);
  }

  /** Resolves after an fdatasync of the WAL that started after this call. */
  private syncWal(): Promise<void> {
    if (!this.syncRunning) {
      const covers = this.committed;
      this.runningCovers = covers;
      const run: Promise<void> = (this.wal ? this.wal.sync() : this.walSync!.sync!(this.walSync!.path))
        .then(() => {
          this.syncedThrough = Math.max(this.syncedThrough, covers);
        })
        .finally(() => {
          if (this.syncRunning === run) this.syncRunning = null;
        });
      this.syncRunning = run;
      return run;
    }
    if (!this.syncNext) {
      const again = () => {
        this.syncNext = null;
        return this.syncWal();
      };
      this.syncNext = this.syncRunning.then(again, again);
    }
    return this.syncNext;
  }
}

/**
 * The WAL file, kept open for fdatasync on the thread pool: one job on the pool per sync, not
 * three (open, sync, close), each of which also wakes the gateway's thread when it ends. The
 * path is checked before each sync and the file opened again if it names another file than the
 * one open: SQLite makes a new WAL only when its last connection closes, which cannot happen
 * under a running committer, and the check keeps even that case from syncing a file SQLite no
 * longer writes. A WAL gone from under the committer (ENOENT) fails its jobs: another process
 * deleted it, which it can only do once this one lost its locks on fleet.db (./files.ts
 * `ensurePrivateFile` says how that once happened), and rows written to it since are in no file.
 */
export class WalFile {
  private handle: FileHandle | null = null;
  /** Device and inode of the open file. */
  private id = "";
  /** How many times the file was opened (tests). */
  opens = 0;

  constructor(readonly path: string) {}

  /** fdatasync the file the path names now; throws as `open` would (e.g. ENOENT). */
  async sync(): Promise<void> {
    const st = statSync(this.path);
    if (this.handle === null || this.id !== `${st.dev}:${st.ino}`) {
      await this.close();
      const handle = await open(this.path, "r");
      const opened = fstatSync(handle.fd);
      this.handle = handle;
      this.id = `${opened.dev}:${opened.ino}`;
      this.opens++;
    }
    await this.handle.datasync();
  }

  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    await handle?.close().catch(() => undefined);
  }
}
