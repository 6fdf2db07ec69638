/**
 * Opening the libSQL file and the group committer. The gateway is the only writer
 * (NOTES: a failed SQLITE_BUSY statement can keep holding the write lock); everything it
 * writes goes through `GroupCommitter`, which folds the jobs queued in one turn of the
 * event loop into a single transaction, so one fsync covers many stimuli.
 */
import { createClient, type Client, type InArgs, type ResultSet } from "@libsql/client";
import { drizzle, type LibSQLDatabase } from "drizzle-orm/libsql";
import type { BatchItem } from "drizzle-orm/batch";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import * as schema from "./schema.ts";
import { checkNotNewer, migrate, schemaVersion } from "./migrate.ts";

/** The drizzle handle over the fleet schema. */
export type Db = LibSQLDatabase<typeof schema>;

/** A statement already in SQL (the hot paths skip drizzle's query building). */
export interface RawStatement {
  readonly sql: string;
  readonly args: InArgs;
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
  busyTimeoutMs?: number;
}

/** Open (and migrate) the fleet database at `path`. */
export async function openDb(path: string, opts: OpenDbOptions): Promise<{ client: Client; db: Db }> {
  if (!opts.readonly) mkdirSync(dirname(path), { recursive: true });
  const client = createClient({ url: `file:${path}` });
  // NOTES: libSQL defaults to journal_mode=delete, synchronous=FULL, busy_timeout=0.
  await client.execute(`PRAGMA busy_timeout = ${opts.busyTimeoutMs ?? 5000}`);
  if (!opts.readonly) {
    await client.execute("PRAGMA journal_mode = WAL");
    await client.execute(`PRAGMA synchronous = ${opts.synchronous.toUpperCase()}`);
    await client.execute("PRAGMA foreign_keys = OFF");
    await migrate(client, path);
  } else {
    checkNotNewer(await schemaVersion(client), path);
  }
  const db = drizzle(client, { schema });
  return { client, db };
}

interface Job {
  items: RawStatement[];
  resolve: (results: ResultSet[]) => void;
  reject: (err: unknown) => void;
}

/** Commit statistics, read by /metrics. */
export interface CommitStats {
  commits: number;
  jobs: number;
  lastCommitMs: number;
  totalCommitMs: number;
}

/**
 * Folds concurrent write jobs into one transaction. A job is a list of statements that
 * must commit together; its promise resolves with their results after the commit.
 * If a combined batch fails, each job is retried alone so one bad job cannot sink others.
 */
export class GroupCommitter {
  private queue: Job[] = [];
  private scheduled = false;
  private flushing: Promise<void> | null = null;
  readonly stats: CommitStats = { commits: 0, jobs: 0, lastCommitMs: 0, totalCommitMs: 0 };
  /** Optional observer of each commit's duration (metrics histogram). */
  onCommit: ((ms: number, jobs: number) => void) | null = null;

  constructor(private readonly client: Client) {}

  /** Queue a job; resolves with one ResultSet per statement once durably committed. */
  write(items: WriteItem[]): Promise<ResultSet[]> {
    if (items.length === 0) return Promise.resolve([]);
    return new Promise((resolve, reject) => {
      this.queue.push({ items: items.map(toStatement), resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        // setImmediate lets every packet already read from sockets join this transaction.
        setImmediate(() => void this.flush());
      }
    });
  }

  /** Resolves when everything queued so far is committed. */
  async drain(): Promise<void> {
    while (this.queue.length > 0 || this.flushing) {
      if (this.flushing) await this.flushing;
      else await this.flush();
    }
  }

  private async flush(): Promise<void> {
    if (this.flushing) {
      await this.flushing;
      if (this.queue.length > 0) return this.flush();
      return;
    }
    this.scheduled = false;
    const jobs = this.queue;
    this.queue = [];
    if (jobs.length === 0) return;
    this.flushing = this.commit(jobs);
    try {
      await this.flushing;
    } finally {
      this.flushing = null;
    }
    if (this.queue.length > 0 && !this.scheduled) {
      this.scheduled = true;
      setImmediate(() => void this.flush());
    }
  }

  private async commit(jobs: Job[]): Promise<void> {
    const started = performance.now();
    const all = jobs.flatMap((j) => j.items);
    try {
      const results = await this.client.batch(all, "write");
      let i = 0;
      for (const job of jobs) {
        job.resolve(results.slice(i, i + job.items.length));
        i += job.items.length;
      }
    } catch (err) {
      if (jobs.length === 1) {
        jobs[0]!.reject(err);
      } else {
        for (const job of jobs) {
          try {
            job.resolve(await this.client.batch(job.items, "write"));
          } catch (e) {
            job.reject(e);
          }
        }
      }
    }
    const ms = performance.now() - started;
    this.stats.commits += 1;
    this.stats.jobs += jobs.length;
    this.stats.lastCommitMs = ms;
    this.stats.totalCommitMs += ms;
    this.onCommit?.(ms, jobs.length);
  }
}
