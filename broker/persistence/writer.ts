/**
 * The one writer of a broker persistence file: jobs queued in one turn of the event loop
 * run in a single transaction (one fsync), in the order they were queued, so a read queued
 * after a write sees it. A job's promise settles after its transaction commits.
 * A `lazy` job (one whose loss in a crash only means a redelivery) does not start a
 * transaction of its own at once: it rides along with the next one, or commits after
 * `lazyMs`, so a burst of PUBACKs costs one fsync instead of one per turn. A job no caller
 * waits for (`lazy: "background"`: a delivered message's id, a PUBACK's delete) waits up to
 * `backgroundMs`: it nearly always rides along with the next queued message's commit.
 */
import type { InStatement } from "@libsql/client";
import type { PlainResult } from "./thread.ts";

/** Where batches run: one write transaction each, in order (a `DbThread`). */
export interface BatchRunner {
  batch(statements: InStatement[]): Promise<PlainResult[]>;
}

interface Job {
  readonly statements: InStatement[];
  readonly resolve: (results: PlainResult[]) => void;
  readonly reject: (err: unknown) => void;
}

/** Commit counters, for metrics and tests. */
export interface WriterStats {
  commits: number;
  jobs: number;
}

/** Serial group committer over one libSQL connection. */
export class SerialWriter {
  private queue: Job[] = [];
  private scheduled = false;
  private lazyTimer: ReturnType<typeof setTimeout> | null = null;
  private flushing: Promise<void> | null = null;
  readonly stats: WriterStats = { commits: 0, jobs: 0 };

  /** When the lazy timer fires (performance.now() ms); Infinity when none is set. */
  private lazyDue = Number.POSITIVE_INFINITY;

  constructor(
    private readonly db: BatchRunner,
    private readonly lazyMs = 5,
    private readonly backgroundMs = 100,
  ) {}

  /** Run `statements` as one unit in the next group transaction; resolves with their results once committed. */
  run(statements: InStatement[], opts: { lazy?: boolean | "background" } = {}): Promise<PlainResult[]> {
    if (statements.length === 0) return Promise.resolve([]);
    return new Promise((resolve, reject) => {
      this.queue.push({ statements, resolve, reject });
      if (opts.lazy === "background") this.commitWithin(this.backgroundMs);
      else if (opts.lazy) this.commitWithin(this.lazyMs);
      else this.schedule();
    });
  }

  /** Commit what is queued within `ms` at the latest (sooner if another job starts a transaction). */
  private commitWithin(ms: number): void {
    const due = performance.now() + ms;
    if (due >= this.lazyDue) return;
    if (this.lazyTimer) clearTimeout(this.lazyTimer);
    this.lazyDue = due;
    this.lazyTimer = setTimeout(() => {
      this.lazyTimer = null;
      this.lazyDue = Number.POSITIVE_INFINITY;
      this.schedule();
    }, ms);
  }

  private schedule(): void {
    if (this.scheduled || this.flushing) return;
    this.scheduled = true;
    // setImmediate lets everything aedes does in this turn join the same transaction.
    setImmediate(() => void this.flush());
  }

  /** Resolves when every job queued so far has committed (or failed). */
  async drain(): Promise<void> {
    while (this.queue.length > 0 || this.flushing) {
      if (this.flushing) await this.flushing;
      else await this.flush();
    }
  }

  private async flush(): Promise<void> {
    this.scheduled = false;
    if (this.flushing) return;
    const jobs = this.queue;
    this.queue = [];
    if (jobs.length === 0) return;
    // Every lazy job queued so far is in this transaction: its deadline is met.
    if (this.lazyTimer) clearTimeout(this.lazyTimer);
    this.lazyTimer = null;
    this.lazyDue = Number.POSITIVE_INFINITY;
    this.flushing = this.commit(jobs);
    try {
      await this.flushing;
    } finally {
      this.flushing = null;
    }
    if (this.queue.length > 0) this.schedule();
  }

  private async commit(jobs: Job[]): Promise<void> {
    this.stats.commits++;
    this.stats.jobs += jobs.length;
    try {
      const results = await this.db.batch(jobs.flatMap((j) => j.statements));
      let i = 0;
      for (const job of jobs) {
        job.resolve(results.slice(i, i + job.statements.length));
        i += job.statements.length;
      }
    } catch (err) {
      if (jobs.length === 1) return jobs[0]!.reject(err);
      // One bad job must not sink the others: run each alone, in order.
      for (const job of jobs) {
        try {
          job.resolve(await this.db.batch(job.statements));
        } catch (e) {
          job.reject(e);
        }
      }
    }
  }
}
