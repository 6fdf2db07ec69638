/**
 * What a clean = false session's SUBSCRIBE leaves in the broker's persistence: every filter the subscribe
 * ACL granted, stored once, and none it refused, whatever else the packet asked for.
 */
import { afterAll, afterEach, describe, expect, spyOn, test } from "bun:test";
import { createClient } from "@libsql/client";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import aedesMemory from "aedes-persistence";
import { connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import pino from "pino";
import { type BrokerOptions, createEmbeddedBroker, type EmbeddedBroker, LibsqlPersistence } from "../broker/index.ts";
import { waitFor } from "./helpers/gateway.ts";

const dir = mkdtempSync(join(tmpdir(), "broker-subscriptions-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn();
});

let n = 0;
const logger = pino({ level: "silent" });
type Kind = "libsql" | "memory";

/** An embedded broker on a free port with this persistence (broker.db at `path` for libsql), closed after the test. */
async function startBroker(kind: Kind, path: string, overrides: Partial<BrokerOptions> = {}): Promise<EmbeddedBroker> {
  const broker = createEmbeddedBroker({
    host: "127.0.0.1",
    port: 0,
    maxPacketBytes: 65536,
    allowAnonymous: true,
    logger,
    intake: async () => ({ ok: true }),
    persistence:
      kind === "libsql"
        ? { kind, path, synchronous: "normal", maxOfflineMessages: 1000 }
        : { kind, maxOfflineMessages: 1000 },
    ...overrides,
  });
  cleanups.push(() => broker.close());
  await broker.start();
  return broker;
}

async function client(broker: EmbeddedBroker, opts: IClientOptions): Promise<MqttClient> {
  const c = await connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, ...opts });
  cleanups.push(() => c.endAsync(true));
  return c;
}

/**
 * Every filter the persistence is handed to store from now until the test ends, as often as it is handed:
 * libsql's own `addSubscriptions`, or aedes-persistence's under the memory persistence's counts.
 */
function filtersStored(kind: Kind): () => string[] {
  type Store = { addSubscriptions(client: unknown, subs: readonly { topic: string }[]): Promise<unknown> };
  const store: Store = kind === "libsql" ? LibsqlPersistence.prototype : Object.getPrototypeOf(aedesMemory());
  const spy = spyOn(store, "addSubscriptions");
  cleanups.push(() => spy.mockRestore());
  return () => spy.mock.calls.flatMap(([, subs]) => subs.map((s) => s.topic));
}

/** The QoS each filter of one SUBSCRIBE was granted, 128 for a refusal (mqtt.js rejects a SUBACK with one). */
function grantedQos(c: MqttClient, filters: string[]): Promise<number[]> {
  return c.subscribeAsync(filters, { qos: 1 }).then(
    (grants) => grants.map((g) => g.qos),
    (err: { packet?: { granted?: number[] } }) => {
      if (!err.packet?.granted) throw err;
      return err.packet.granted;
    },
  );
}

/** The filters broker.db holds for `clientId`, read as another process would. */
async function rowsOnDisk(path: string, clientId: string): Promise<string[]> {
  const db = createClient({ url: `file:${path}` });
  try {
    const rows = (await db.execute({ sql: "SELECT topic FROM subscriptions WHERE client_id = ?", args: [clientId] }))
      .rows;
    return rows.map((r) => String(r.topic)).sort();
  } finally {
    db.close();
  }
}

for (const kind of ["libsql", "memory"] as const) {
  describe(`a clean = false session's SUBSCRIBE, persistence = "${kind}"`, () => {
    test("one SUBSCRIBE with 2,000 granted filters stores each filter once and is acknowledged", async () => {
      const path = join(dir, `b${n++}.db`);
      const stored = filtersStored(kind);
      const broker = await startBroker(kind, path);
      const c = await client(broker, { clientId: "many", clean: false });
      const filters = Array.from({ length: 2000 }, (_, i) => `many/${i}/+`);
      // Before, aedes handed the persistence the whole packet once per filter: 4,000,000 stores.
      expect(await grantedQos(c, filters)).toEqual(filters.map(() => 1));
      expect(stored().length).toBe(2000);
      expect(new Set(stored())).toEqual(new Set(filters));
      expect(broker.subscriptionCount?.()).toBe(2000);
      if (kind === "libsql") expect(await rowsOnDisk(path, "many")).toEqual([...filters].sort());
      // Each of them is live, and kept for the session.
      const got = new Promise<string>((resolve) => c.once("message", (topic) => resolve(topic)));
      await broker.publish("many/1999/x", "hi", { qos: 1 });
      expect(await got).toBe("many/1999/x");
    });

    test("SUBSCRIBE [denied, allowed] keeps only the allowed filter; the denied one queues nothing", async () => {
      const path = join(dir, `b${n++}.db`);
      const stored = filtersStored(kind);
      const broker = await startBroker(kind, path, {
        authorizeSubscribeTopic: (_client, filter) => !filter.startsWith("denied/"),
      });
      const c = await client(broker, { clientId: "half", clean: false });
      expect(await grantedQos(c, ["denied/#", "ok/1"])).toEqual([128, 1]);
      await c.endAsync();
      // Before, the refusal's removal ran first, then the grant of ok/1 stored both: the session was
      // sent no denied/# message, yet queued every one of them while away.
      for (let i = 0; i < 5; i++) await broker.publish(`denied/${i}`, "not for half", { qos: 1 });
      expect(broker.stats().offlineQueued).toBe(0);
      await broker.publish("ok/1", "for half", { qos: 1 });
      expect(broker.stats().offlineQueued).toBe(1);
      expect(broker.subscriptionCount?.()).toBe(1);
      if (kind === "libsql") expect(await rowsOnDisk(path, "half")).toEqual(["ok/1"]);
      expect(stored()).toEqual(["ok/1"]);
    });

    test("restored subscriptions are re-checked, not stored again; a later SUBSCRIBE stores its own", async () => {
      const path = join(dir, `b${n++}.db`);
      const stored = filtersStored(kind);
      let revoked = false;
      const broker = await startBroker(kind, path, {
        authorizeSubscribeTopic: (_client, filter) => !(revoked && filter === "b/#"),
      });
      const first = await client(broker, { clientId: "back", clean: false });
      expect(await grantedQos(first, ["a/#", "b/#"])).toEqual([1, 1]);
      await first.endAsync();
      revoked = true;
      const back = await client(broker, { clientId: "back", clean: false });
      expect(back.connected).toBe(true);
      expect(await grantedQos(back, ["c/#"])).toEqual([1]);
      expect(stored()).toEqual(["a/#", "b/#", "c/#"]);
      // The restore dropped b/#, no longer granted, from the session.
      expect(broker.subscriptionCount?.()).toBe(2);
      if (kind === "libsql") expect(await rowsOnDisk(path, "back")).toEqual(["a/#", "c/#"]);
      const got: string[] = [];
      back.on("message", (topic) => got.push(topic));
      for (const topic of ["a/1", "b/1", "c/1"]) await broker.publish(topic, "x", { qos: 1 });
      await waitFor(() => got.length >= 2, 3000, "two messages");
      await Bun.sleep(100); // a b/1 would come within this
      expect(got.sort()).toEqual(["a/1", "c/1"]);
    });
  });
}
