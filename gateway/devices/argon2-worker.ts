/**
 * The worker side of argon2-thread.ts: computes argon2id hashes, one at a time in arrival order,
 * so a login's verification (tens to hundreds of ms of WASM) never runs on the gateway's thread.
 */
import { argon2id } from "hash-wasm";
import type { Argon2Reply, Argon2Request } from "./argon2-thread.ts";

declare const self: Worker;

let queue: Promise<void> = Promise.resolve();
self.onmessage = (e: MessageEvent<Argon2Request>) => {
  const { id, password, salt, memorySize, iterations, parallelism, hashLength } = e.data;
  queue = queue.then(async () => {
    let reply: Argon2Reply;
    try {
      const hash = await argon2id({
        password,
        salt,
        memorySize,
        iterations,
        parallelism,
        hashLength,
        outputType: "binary",
      });
      reply = { id, ok: true, hash };
    } catch (err) {
      reply = { id, ok: false, error: err instanceof Error ? err.message : String(err) };
    }
    self.postMessage(reply);
  });
};
