/**
 * The worker side of `BatchReader` (reader.ts): a read-only connection to the store's file, on
 * which each read runs batch.ts `readEntries`, the same code the gateway's thread runs without it.
 */
import type { Client } from "@libsql/client";
import { openDb } from "../store/index.ts";
import { readEntries } from "./batch.ts";
import type { ReaderReply, ReaderRequest } from "./reader.ts";

declare const self: Worker;

let db: Client | null = null;

async function handle(r: ReaderRequest): Promise<ReaderReply> {
  switch (r.type) {
    case "open":
      db = (await openDb(r.path, { readonly: true, synchronous: "normal" })).client;
      return { id: r.id, ok: true };
    case "read":
      if (!db) throw new Error("the replication reader has no database open");
      return { id: r.id, ok: true, batch: await readEntries(db, r.limit, r.upTo) };
    case "close":
      db?.close();
      db = null;
      return { id: r.id, ok: true };
  }
}

// One request at a time, in arrival order (a push never has two reads in flight).
let queue: Promise<void> = Promise.resolve();
self.onmessage = (e: MessageEvent<ReaderRequest>) => {
  const r = e.data;
  queue = queue.then(async () => {
    let reply: ReaderReply;
    try {
      reply = await handle(r);
    } catch (err) {
      reply = { id: r.id, ok: false, error: err instanceof Error ? err.message : String(err) };
    }
    self.postMessage(reply);
  });
};
