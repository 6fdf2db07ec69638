/**
 * argon2id on a thread of its own. hash-wasm computes synchronously once started: on the
 * gateway's thread, every failed login (an unknown user pays a dummy hash) stalled every device's
 * PUBACKs for as long (explore-e.md section 4: four connections of bad CONNECTs pushed p90 to 1 s).
 * One thread for the process, started on first use, never keeping the process alive; its
 * hashes run one at a time, so bad logins also use at most one core.
 */

/** Main thread -> worker: one hash to compute. */
export interface Argon2Request {
  readonly id: number;
  readonly password: Uint8Array | string;
  readonly salt: Uint8Array;
  readonly memorySize: number;
  readonly iterations: number;
  readonly parallelism: number;
  readonly hashLength: number;
}

/** Worker -> main thread. */
export type Argon2Reply =
  | { readonly id: number; readonly ok: true; readonly hash: Uint8Array }
  | { readonly id: number; readonly ok: false; readonly error: string };

type Pending = { resolve: (h: Uint8Array) => void; reject: (e: Error) => void };

let worker: Worker | null = null;
let next = 1;
const pending = new Map<number, Pending>();

function thread(): Worker {
  if (worker) return worker;
  const w = new Worker(new URL("./argon2-worker.ts", import.meta.url), { ref: false });
  w.onmessage = (e: MessageEvent<Argon2Reply>) => {
    const reply = e.data;
    const p = pending.get(reply.id);
    if (!p) return;
    pending.delete(reply.id);
    if (reply.ok) p.resolve(reply.hash);
    else p.reject(new Error(reply.error));
  };
  w.onerror = (e: ErrorEvent) => {
    // Fail what was asked; the next hash starts a new thread.
    const err = new Error(`argon2 thread failed: ${e.message}`);
    for (const p of pending.values()) p.reject(err);
    pending.clear();
    w.terminate();
    if (worker === w) worker = null;
  };
  worker = w;
  return w;
}

/** argon2id of `password` with these parameters, computed off the calling thread. */
export function argon2idOffThread(args: Omit<Argon2Request, "id">): Promise<Uint8Array> {
  const id = next++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    thread().postMessage({ id, ...args } satisfies Argon2Request);
  });
}
