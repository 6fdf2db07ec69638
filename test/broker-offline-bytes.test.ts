/**
 * `[broker] max_offline_bytes` (Mosquitto's max_queued_bytes): a clean = false session's queue holds at most
 * that many payload bytes, with either persistence, beside `max_offline_messages`. Past it a message is not
 * queued for that client, counted as dropped; a connected client still gets it live, once, and stays connected.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { IClientOptions } from "mqtt";
import type { EmbeddedBroker } from "../broker/index.ts";
import { BrokerKit } from "./helpers/broker.ts";

const dir = mkdtempSync(join(tmpdir(), "offline-bytes-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const kit = new BrokerKit();
let n = 0;

type Kind = "libsql" | "memory";

/** A broker whose sessions keep at most 10 payload bytes (and 100 messages) each, or these bounds. */
function startBroker(
  kind: Kind,
  path = join(dir, `b${n++}.db`),
  bounds: { maxOfflineMessages: number; maxOfflineBytes?: number; maxOfflineBytesTotal?: number } = {
    maxOfflineMessages: 100,
    maxOfflineBytes: 10,
  },
): Promise<EmbeddedBroker> {
  return kit.start({
    persistence: kind === "libsql" ? { kind, path, synchronous: "full", ...bounds } : { kind, ...bounds },
  });
}

const client = (broker: EmbeddedBroker, opts: IClientOptions) => kit.client(broker, opts);

/** The messages a client taking up its session again gets within half a second. */
const comeBack = async (broker: EmbeddedBroker, clientId: string) => (await kit.comeBack(broker, clientId, 500)).got;

/** A persistent subscriber to `out/#` that went away (the broker saw it go). */
async function away(broker: EmbeddedBroker, clientId: string): Promise<void> {
  const c = await client(broker, { clientId, clean: false });
  await c.subscribeAsync("out/#", { qos: 1 });
  await c.endAsync();
  for (let i = 0; broker.stats().clients > 0; i++) {
    if (i > 500) throw new Error("the broker did not see the client go");
    await Bun.sleep(10);
  }
}

for (const kind of ["libsql", "memory"] as const) {
  describe(`max_offline_bytes, persistence = "${kind}"`, () => {
    test("an away client's queue holds at most that many payload bytes; the oldest are kept", async () => {
      const broker = await startBroker(kind);
      await away(broker, "dev");
      for (const payload of ["aaaa", "bbbb", "cccc", "dd"]) await broker.publish("out/x", payload, { qos: 1 });
      // 4 + 4 fit in 10; "cccc" would make 12: dropped; "dd" makes 10: kept.
      expect(broker.stats().offlineDropped).toBe(1);
      expect(await comeBack(broker, "dev")).toEqual(["aaaa", "bbbb", "dd"]);
    });

    test("a message past the bound is not queued; a connected client gets it live, once, and stays", async () => {
      const broker = await startBroker(kind);
      const c = await client(broker, { clientId: "live", clean: false });
      const got: string[] = [];
      c.on("message", (_t, payload) => got.push(payload.toString()));
      await c.subscribeAsync("out/#", { qos: 1 });
      await broker.publish("out/x", "a payload of 24 bytes..", { qos: 1 });
      await broker.publish("out/x", "small", { qos: 1 });
      const deadline = Date.now() + 10_000;
      while (got.length < 2 && Date.now() < deadline) await Bun.sleep(10);
      await Bun.sleep(200); // a second copy would come within this
      expect(got).toEqual(["a payload of 24 bytes..", "small"]);
      expect(c.connected).toBe(true);
      expect(broker.stats().offlineDropped).toBe(1);
    });
  });
}

for (const kind of ["libsql", "memory"] as const) {
  describe(`max_offline_bytes_total, persistence = "${kind}"`, () => {
    const total = { maxOfflineMessages: 100, maxOfflineBytesTotal: 12 };

    test("all sessions' queues together hold at most that many payload bytes; each keeps what it holds", async () => {
      const broker = await startBroker(kind, undefined, total);
      await away(broker, "dev-a");
      await away(broker, "dev-b");
      // "aaaa" twice makes 8, "bb" twice 12; "c" would make 13 for either: dropped for both.
      for (const payload of ["aaaa", "bb", "c"]) await broker.publish("out/x", payload, { qos: 1 });
      expect(broker.stats()).toMatchObject({ offlineDropped: 2, offlineQueued: 4, offlineQueuedBytes: 12 });
      expect(await comeBack(broker, "dev-a")).toEqual(["aaaa", "bb"]);
      expect(await comeBack(broker, "dev-b")).toEqual(["aaaa", "bb"]);
      // Acknowledged, they leave the bound's count: room for new ones again.
      expect(broker.stats()).toMatchObject({ offlineQueued: 0, offlineQueuedBytes: 0 });
    });

    test("room one session's queue gives back is room for another's", async () => {
      const broker = await startBroker(kind, undefined, total);
      await away(broker, "dev-a");
      await broker.publish("out/a", "aaaaaaaaaaaa", { qos: 1 });
      await away(broker, "dev-b");
      await broker.publish("out/b", "bbbb", { qos: 1 });
      expect(broker.stats().offlineDropped).toBe(2);
      expect(await comeBack(broker, "dev-a")).toEqual(["aaaaaaaaaaaa"]);
      await broker.publish("out/b", "cccc", { qos: 1 });
      expect(await comeBack(broker, "dev-b")).toEqual(["cccc"]);
    });
  });
}

describe("max_offline_bytes on broker.db", () => {
  test("a queue read back at start counts its bytes: the bound holds across a restart", async () => {
    const path = join(dir, `b${n++}.db`);
    const first = await startBroker("libsql", path);
    await away(first, "dev");
    for (const payload of ["aaaa", "bbbb"]) await first.publish("out/x", payload, { qos: 1 });
    await first.close();
    const second = await startBroker("libsql", path);
    await second.publish("out/x", "cccc", { qos: 1 });
    expect(second.stats().offlineDropped).toBe(1);
    expect(await comeBack(second, "dev")).toEqual(["aaaa", "bbbb"]);
  });

  test("queues read back at start count toward max_offline_bytes_total", async () => {
    const path = join(dir, `b${n++}.db`);
    const total = { maxOfflineMessages: 100, maxOfflineBytesTotal: 8 };
    const first = await startBroker("libsql", path, total);
    await away(first, "dev-a");
    await away(first, "dev-b");
    await first.publish("out/x", "aaaa", { qos: 1 });
    await first.close();
    const second = await startBroker("libsql", path, total);
    expect(second.stats()).toMatchObject({ offlineQueued: 2, offlineQueuedBytes: 8 });
    await second.publish("out/x", "b", { qos: 1 });
    expect(second.stats().offlineDropped).toBe(2);
    expect(await comeBack(second, "dev-a")).toEqual(["aaaa"]);
  });

  test("rows older code wrote, without a size, count at about their stored size", async () => {
    const path = join(dir, `b${n++}.db`);
    const first = await startBroker("libsql", path);
    await away(first, "dev");
    await first.publish("out/x", "a", { qos: 1 });
    await first.close();
    const db = createClient({ url: `file:${path}` });
    await db.execute("UPDATE outgoing SET bytes = NULL");
    db.close();
    // The row's JSON text is far longer than 10 bytes: the queue counts as full.
    const second = await startBroker("libsql", path);
    await second.publish("out/x", "b", { qos: 1 });
    expect(second.stats().offlineDropped).toBe(1);
  });
});
