/**
 * A batch's local reads run on a thread of their own (issue 13): reading the rows a push sends
 * and having SQLite encode them is most of a push's CPU (~150 us per queue entry measured, two
 * thirds of it in `readEntries`), and on the gateway's thread it came out of the commits'
 * time: the commit path ran at 0.78x to 0.95x with replication on. The thread has its own
 * read-only connection; WAL lets it read beside the store's single writer, which still does
 * every write (the queue's confirming delete included).
 *
 * What it may read is bounded by the caller: `durableHead`, taken on the store's connection
 * the moment its WAL sync ends, so a commit the disk does not hold yet never reaches the center.
 */
import type { Batch } from "./batch.ts";

/** Main thread -> reader. */
export type ReaderRequest =
  | { readonly id: number; readonly type: "open"; readonly path: string }
  | { readonly id: number; readonly type: "read"; readonly limit: number; readonly upTo: number }
  | { readonly id: number; readonly type: "close" };

/** Reader -> main thread. */
export type ReaderReply =
  | { readonly id: number; readonly ok: true; readonly batch?: Batch }
  | { readonly id: number; readonly ok: false; readonly error: string };

/** A request before it is given its id (each member of the union on its own). */
type Request<R = ReaderRequest> = R extends unknown ? Omit<R, "id"> : never;

/** Bun's Worker, which can stop or start holding the process (its `ref` and `unref` are not in the DOM type). */
type BunWorker = Worker & { ref(): void; unref(): void };

export class BatchReader {
  private readonly worker: BunWorker;
  private next = 1;
  private readonly pending = new Map<number, { resolve: (b: Batch | undefined) => void; reject: (e: Error) => void }>();
  private closed = false;

  private constructor() {
    // An idle reader never keeps the process alive (`ref: false`); one with a request out does (`request`).
    this.worker = new Worker(new URL("./reader-worker.ts", import.meta.url), { ref: false }) as BunWorker;
    this.worker.onmessage = (e: MessageEvent<ReaderReply>) => {
      const reply = e.data;
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) this.worker.unref();
      if (reply.ok) p.resolve(reply.batch);
      else p.reject(new Error(reply.error));
    };
    this.worker.onerror = (e: ErrorEvent) => {
      const err = new Error(`replication reader thread failed: ${e.message}`);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
      this.worker.unref();
    };
  }

  /** Start the thread and open `path` (the store's database file) read-only on it. */
  static async open(path: string): Promise<BatchReader> {
    const r = new BatchReader();
    try {
      await r.request({ type: "open", path });
    } catch (err) {
      r.worker.terminate();
      throw err;
    }
    return r;
  }

  /** The oldest `limit` queue entries up to `upTo`, and their rows (batch.ts `readEntries`). */
  async read(limit: number, upTo: number): Promise<Batch> {
    const batch = await this.request({ type: "read", limit, upTo });
    if (!batch) throw new Error("replication reader thread answered a read without a batch");
    return batch;
  }

  /** Close the connection and end the thread. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.request({ type: "close" });
    } catch {
      // the thread is ended below all the same
    } finally {
      this.worker.terminate();
    }
  }

  private request(r: Request): Promise<Batch | undefined> {
    if (this.closed && r.type !== "close") return Promise.reject(new Error("replication reader is closed"));
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      // A promise alone does not keep the process alive: without this, a process whose last work is
      // waiting for the thread's answer (a failed start's clean-up closing the reader) exits 0 midway.
      this.worker.ref();
      this.worker.postMessage({ ...r, id } as ReaderRequest);
    });
  }
}
