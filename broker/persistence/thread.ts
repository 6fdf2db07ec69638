/**
 * The broker persistence's database runs on a thread of its own: a libSQL commit with
 * `synchronous = FULL` waits for fsync, and the driver's calls block the thread they run on.
 * On a worker, the gateway's event loop keeps serving MQTT, episodes and HTTP while broker.db
 * syncs, and the writer gathers the next group commit meanwhile.
 */
import type { InStatement } from "@libsql/client";

/** A statement result as it crosses threads: rows keyed by column name. */
export interface PlainResult {
  readonly rows: Record<string, unknown>[];
  readonly rowsAffected: number;
}

/** Main thread -> worker. */
export type ThreadRequest =
  | { readonly id: number; readonly type: "open"; readonly path: string; readonly synchronous: "full" | "normal" }
  | { readonly id: number; readonly type: "batch"; readonly statements: InStatement[] }
  | { readonly id: number; readonly type: "close" };

/** Worker -> main thread. */
export type ThreadReply =
  | { readonly id: number; readonly ok: true; readonly results: PlainResult[] }
  | { readonly id: number; readonly ok: false; readonly error: string; readonly version?: number };

/** Thrown by `open` when the file was written by newer code (carries the file's version). */
export class TooNewOnThread extends Error {
  constructor(readonly version: number) {
    super(`broker schema version ${version} is newer than this code`);
  }
}

/** One database connection living on a worker thread; requests run in order. */
export class DbThread {
  private readonly worker: Worker;
  private next = 1;
  private readonly pending = new Map<number, { resolve: (r: PlainResult[]) => void; reject: (e: Error) => void }>();
  private closed = false;

  private constructor() {
    this.worker = new Worker(new URL("./db-worker.ts", import.meta.url));
    this.worker.onmessage = (e: MessageEvent<ThreadReply>) => {
      const reply = e.data;
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (reply.ok) p.resolve(reply.results);
      else p.reject(reply.version === undefined ? new Error(reply.error) : new TooNewOnThread(reply.version));
    };
    this.worker.onerror = (e: ErrorEvent) => {
      const err = new Error(`broker database thread failed: ${e.message}`);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
  }

  /** Start the thread and open (create, migrate) the file on it. */
  static async open(path: string, synchronous: "full" | "normal"): Promise<DbThread> {
    const t = new DbThread();
    try {
      await t.request({ type: "open", path, synchronous });
    } catch (err) {
      t.worker.terminate();
      throw err;
    }
    return t;
  }

  /** Run statements in one write transaction. */
  batch(statements: InStatement[]): Promise<PlainResult[]> {
    return this.request({ type: "batch", statements });
  }

  /** Close the file and end the thread. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.request({ type: "close" });
    } finally {
      this.worker.terminate();
    }
  }

  private request(
    r:
      | { type: "open"; path: string; synchronous: "full" | "normal" }
      | { type: "batch"; statements: InStatement[] }
      | { type: "close" },
  ): Promise<PlainResult[]> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...r, id } as ThreadRequest);
    });
  }
}
