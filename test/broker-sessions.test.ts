/**
 * Durable broker sessions in process (issue 12): the embedded broker on its libSQL
 * persistence keeps clean = false sessions, offline queues and retained messages on disk,
 * resolves a gateway publish only once its queue rows are committed, and bounds each
 * client's queue with `max_offline_messages` (as the in-memory persistence does).
 */
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import pino from "pino";
import { BrokerStoreTooNew, createEmbeddedBroker, LibsqlPersistence, memoryPersistence } from "../broker/index.ts";
import type { Broker } from "../broker/index.ts";
import { readInAnotherProcess } from "./helpers/gateway.ts";

const dir = mkdtempSync(join(tmpdir(), "broker-sessions-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn();
});

let n = 0;
const logger = pino({ level: "silent" });

async function startBroker(path: string, maxOfflineMessages = 1000): Promise<Broker> {
  return startWith({ kind: "libsql", path, synchronous: "full", maxOfflineMessages });
}

/** An embedded broker on a free port with this persistence, closed after the test. */
async function startWith(persistence: Parameters<typeof createEmbeddedBroker>[0]["persistence"]): Promise<Broker> {
  const broker = createEmbeddedBroker({
    host: "127.0.0.1",
    port: 0,
    maxPacketBytes: 65536,
    allowAnonymous: true,
    logger,
    intake: async () => ({ ok: true }),
    persistence,
  });
  cleanups.push(() => broker.close());
  await broker.start();
  return broker;
}

async function client(broker: Broker, opts: IClientOptions): Promise<MqttClient> {
  const c = await connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, ...opts });
  cleanups.push(() => c.endAsync(true));
  return c;
}

/** A client that connects only on `.connect()`, so listeners can be attached first. */
function later(broker: Broker, opts: IClientOptions): MqttClient {
  const c = connect(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, manualConnect: true, ...opts });
  cleanups.push(() => c.endAsync(true));
  return c;
}

/** Rows of a table as another process would see them: a fresh connection to the file. */
async function rowsOnDisk(path: string, table: string): Promise<number> {
  const db = createClient({ url: `file:${path}` });
  try {
    return Number((await db.execute(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
  } finally {
    db.close();
  }
}

/** Collect `count` messages (or fail after `ms`). */
function collect(c: MqttClient, count: number, ms = 10_000): Promise<string[]> {
  const got: string[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`got ${got.length} of ${count} messages: ${got}`)), ms);
    c.on("message", (_t, payload) => {
      got.push(payload.toString());
      if (got.length === count) {
        clearTimeout(timer);
        resolve(got);
      }
    });
  });
}

describe("the libSQL broker persistence", () => {
  test("a gateway publish resolves only once the offline queue row is committed to broker.db", async () => {
    const path = join(dir, `b${n++}.db`);
    const broker = await startBroker(path);
    const sub = await client(broker, { clientId: "dev-1", clean: false });
    await sub.subscribeAsync("out/#", { qos: 1 });
    await sub.endAsync();
    for (let i = 0; i < 3; i++) {
      await broker.publish("out/a", `m${i}`, { qos: 1 });
      // The promise the outbox waits on has resolved: the row is already in the file.
      expect(await rowsOnDisk(path, "outgoing")).toBe(i + 1);
    }
    await broker.publish("status/a", "idle", { qos: 1, retain: true });
    expect(await rowsOnDisk(path, "retained")).toBe(1);
    expect(statSync(path).mode & 0o777).toBe(0o600);
  });

  test("a clean = false session keeps its subscriptions and queued messages across a broker restart", async () => {
    const path = join(dir, `b${n++}.db`);
    let broker = await startBroker(path);
    const sub = await client(broker, { clientId: "dev-2", clean: false });
    await sub.subscribeAsync("out/#", { qos: 1 });
    await sub.endAsync();
    for (let i = 0; i < 20; i++) await broker.publish("out/a", `m${i}`, { qos: 1 });
    await broker.publish("status/a", "idle", { qos: 0, retain: true });
    await broker.close();

    broker = await startBroker(path);
    const back = later(broker, { clientId: "dev-2", clean: false });
    const got = collect(back, 21);
    const connack = new Promise<boolean>((resolve) => back.once("connect", (p) => resolve(p.sessionPresent)));
    back.connect();
    expect(await connack).toBe(true); // MQTT-3.2.2-2: the session was found
    // The subscription came back with the session: a new publish reaches it too.
    await broker.publish("out/b", "after", { qos: 1 });
    expect((await got).sort()).toEqual([...Array.from({ length: 20 }, (_, i) => `m${i}`), "after"].sort());
    const watcher = await client(broker, { clientId: "watcher", clean: true });
    const retained = collect(watcher, 1);
    await watcher.subscribeAsync("status/#", { qos: 0 });
    expect(await retained).toEqual(["idle"]);
  });

  test("an offline client's queue holds at most max_offline_messages; later ones are dropped and counted", async () => {
    const path = join(dir, `b${n++}.db`);
    const broker = await startBroker(path, 5);
    const sub = await client(broker, { clientId: "dev-3", clean: false });
    await sub.subscribeAsync("out/#", { qos: 1 });
    await sub.endAsync();
    for (let i = 0; i < 8; i++) await broker.publish("out/a", `m${i}`, { qos: 1 });
    expect(await rowsOnDisk(path, "outgoing")).toBe(5);
    expect(broker.stats().offlineDropped).toBe(3);
    const back = later(broker, { clientId: "dev-3", clean: false });
    const got = collect(back, 5);
    back.connect();
    // The oldest are kept (Mosquitto's max_queued_messages drops the newest the same way).
    expect(await got).toEqual(["m0", "m1", "m2", "m3", "m4"]);
    await waitForRows(path, 0);
  });
});

describe('in-memory sessions (persistence = "memory")', () => {
  test("an offline client's queue holds at most max_offline_messages too; the oldest are kept", async () => {
    const broker = await startWith({ kind: "memory", maxOfflineMessages: 5 });
    const sub = await client(broker, { clientId: "mem-1", clean: false });
    await sub.subscribeAsync("out/#", { qos: 1 });
    await sub.endAsync();
    for (let i = 0; i < 8; i++) await broker.publish("out/a", `m${i}`, { qos: 1 });
    expect(broker.stats().offlineDropped).toBe(3);
    const back = later(broker, { clientId: "mem-1", clean: false });
    const got = collect(back, 5);
    back.connect();
    expect(await got).toEqual(["m0", "m1", "m2", "m3", "m4"]);
  });

  // Two messages' room either way: by count, or by payload bytes (2 each).
  const ROOM_FOR_TWO = [
    ["max_offline_messages", { maxOfflineMessages: 2 }],
    ["max_offline_bytes", { maxOfflineMessages: 100, maxOfflineBytes: 4 }],
    ["max_offline_bytes_total", { maxOfflineMessages: 100, maxOfflineBytesTotal: 4 }],
  ] as const;
  test.each(ROOM_FOR_TWO)("a message leaves %s's count when it leaves the queue (its PUBACK)", async (_, bounds) => {
    const memory = memoryPersistence({ ...bounds, logger });
    // aedes' calls, as it makes them: queue for the session, number it when sent, clear it at its PUBACK.
    const aedes = memory.aedes as unknown as {
      outgoingEnqueueCombi(subs: object[], packet: object): Promise<void>;
      outgoingUpdate(client: object, packet: object): Promise<void>;
      outgoingClearMessageId(client: object, packet: object): Promise<unknown>;
    };
    const client = { id: "mem-2" };
    const packet = (i: number) => ({ cmd: "publish", topic: "out/a", payload: Buffer.from(`m${i}`), qos: 1 });
    const queue = (i: number) =>
      aedes.outgoingEnqueueCombi([{ clientId: client.id, topic: "out/#", qos: 1 }], {
        ...packet(i),
        brokerId: "b",
        brokerCounter: i,
      });
    for (let i = 0; i < 3; i++) await queue(i);
    expect(memory.stats()).toEqual({ offlineDropped: 1, queued: 2, queuedBytes: 4 });
    for (const i of [0, 1]) {
      await aedes.outgoingUpdate(client, { ...packet(i), brokerId: "b", brokerCounter: i, messageId: i + 1 });
      expect(await aedes.outgoingClearMessageId(client, { messageId: i + 1 })).toBeTruthy();
    }
    expect(memory.stats()).toEqual({ offlineDropped: 1, queued: 0, queuedBytes: 0 });
    // An unknown packet id clears nothing and counts nothing.
    expect(await aedes.outgoingClearMessageId(client, { messageId: 9 })).toBeFalsy();
    for (let i = 3; i < 5; i++) await queue(i);
    expect(memory.stats()).toEqual({ offlineDropped: 1, queued: 2, queuedBytes: 4 });
  });
});

describe("a session that comes back while messages keep coming", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a queue longer than a page and live messages meanwhile all arrive, never dropped`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 5000 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 5000 },
      );
      const sub = await client(broker, { clientId: `back-${kind}`, clean: false });
      await sub.subscribeAsync("out/#", { qos: 1 });
      await sub.endAsync();
      // More than one page of the queue's read-back (500 rows), so the stream reads again after the
      // client has acknowledged live messages queued behind the ones it was away for.
      const queued = Array.from({ length: 1200 }, (_, i) => `q${i}`);
      for (const m of queued) await broker.publish("out/a", m, { qos: 1 });
      const back = later(broker, { clientId: `back-${kind}`, clean: false });
      let closed = 0;
      back.on("close", () => closed++);
      const live = Array.from({ length: 300 }, (_, i) => `l${i}`);
      const got = collect(back, queued.length + live.length, 20_000);
      back.connect();
      await new Promise<void>((resolve) => back.once("connect", () => resolve()));
      for (const m of live) await broker.publish("out/a", m, { qos: 1 });
      expect(new Set(await got)).toEqual(new Set([...queued, ...live]));
      expect(closed).toBe(0);
    }, 30_000);
  }
});

describe("the RETAIN flag of queued messages", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a retained message queued for an away session comes back with RETAIN 0 (MQTT-3.3.1-9)`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 100 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      const sub = await client(broker, { clientId: `ret-${kind}`, clean: false });
      await sub.subscribeAsync("state/#", { qos: 1 });
      await sub.endAsync();
      await broker.publish("state/a", "on", { qos: 1, retain: true });
      // Queued because it matched the session's subscription: a consumer must not take it for a stored copy.
      const back = later(broker, { clientId: `ret-${kind}`, clean: false });
      const flags = new Promise<boolean>((resolve) => back.once("message", (_t, _p, packet) => resolve(packet.retain)));
      back.connect();
      expect(await flags).toBe(false);
      // A new subscription still gets the stored copy with RETAIN 1.
      const fresh = await client(broker, { clientId: `ret-new-${kind}`, clean: true });
      const stored = new Promise<boolean>((resolve) =>
        fresh.once("message", (_t, _p, packet) => resolve(packet.retain)),
      );
      await fresh.subscribeAsync("state/#", { qos: 1 });
      expect(await stored).toBe(true);
    });
  }
});

describe("the DUP flag of redelivered messages (MQTT-3.3.1-1)", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a QoS 1 message sent before comes again with DUP 1; one never sent comes with DUP 0`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 100 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      // This connection takes the message and never acknowledges it (mqtt.js sends the PUBACK once its
      // handleMessage calls back).
      const first: { payload: string; dup: boolean }[] = [];
      const away = await client(broker, { clientId: `dup-${kind}`, clean: false });
      away.handleMessage = () => {};
      away.on("message", (_t, p, packet) => first.push({ payload: p.toString(), dup: packet.dup }));
      await away.subscribeAsync("redo/#", { qos: 1 });
      await broker.publish("redo/a", "sent", { qos: 1 });
      await until(() => first.length > 0);
      expect(first).toEqual([{ payload: "sent", dup: false }]);
      await away.endAsync(true);
      // A publisher's DUP is not passed on (MQTT-3.3.1-3), to a live subscriber or to the queue of an away one.
      const watcher = await client(broker, { clientId: `dup-watch-${kind}` });
      await watcher.subscribeAsync("redo/#", { qos: 1 });
      const watched = new Promise<boolean>((resolve) =>
        watcher.once("message", (_t, _p, packet) => resolve(packet.dup)),
      );
      const publisher = await client(broker, { clientId: `dup-pub-${kind}` });
      await publisher.publishAsync("redo/b", "queued", { qos: 1, dup: true });
      // Live clients get a message once it is in the queues of the away sessions.
      expect(await watched).toBe(false);
      const back = later(broker, { clientId: `dup-${kind}`, clean: false });
      const got: { payload: string; dup: boolean }[] = [];
      back.on("message", (_t, p, packet) => got.push({ payload: p.toString(), dup: packet.dup }));
      back.connect();
      await until(() => got.length === 2);
      expect(got).toEqual([
        { payload: "sent", dup: true },
        { payload: "queued", dup: false },
      ]);
    });
  }
});

/** CONNACK's session present for a clean = false CONNECT of `clientId`; the client then disconnects. */
async function present(broker: Broker, clientId: string): Promise<boolean> {
  const c = later(broker, { clientId, clean: false });
  const connack = new Promise<boolean>((resolve) => c.once("connect", (p) => resolve(p.sessionPresent)));
  c.connect();
  const flag = await connack;
  await c.endAsync();
  return flag;
}

for (const kind of ["libsql", "memory"] as const) {
  const start = () =>
    kind === "libsql" ? startBroker(join(dir, `b${n++}.db`)) : startWith({ kind, maxOfflineMessages: 1000 });

  describe(`CONNACK's session present, persistence = "${kind}" (MQTT-3.2.2-1, MQTT-3.2.2-2)`, () => {
    test("a clean = false session with no subscription is present when its client comes back", async () => {
      const broker = await start();
      expect(await present(broker, "sp-none")).toBe(false);
      expect(await present(broker, "sp-none")).toBe(true);
      // Taken over while connected: the session is there all the same (Mosquitto says 1 too).
      const first = await client(broker, { clientId: "sp-live", clean: false });
      const closed = new Promise<void>((resolve) => first.once("close", () => resolve()));
      expect(await present(broker, "sp-live")).toBe(true);
      await closed;
    });

    test("a session with subscriptions is present, and stays so once it unsubscribed from all", async () => {
      const broker = await start();
      const sub = await client(broker, { clientId: "sp-sub", clean: false });
      await sub.subscribeAsync("sp/#", { qos: 1 });
      await sub.endAsync();
      expect(await present(broker, "sp-sub")).toBe(true);
      const again = await client(broker, { clientId: "sp-sub", clean: false });
      await again.unsubscribeAsync("sp/#");
      await again.endAsync();
      expect(await present(broker, "sp-sub")).toBe(true);
    });

    test("a clean = true CONNECT ends the session: it is not present, nor at the next clean = false one", async () => {
      const broker = await start();
      expect(await present(broker, "sp-ended")).toBe(false);
      const clean = later(broker, { clientId: "sp-ended", clean: true });
      const connack = new Promise<boolean>((resolve) => clean.once("connect", (p) => resolve(p.sessionPresent)));
      clean.connect();
      expect(await connack).toBe(false);
      await clean.endAsync();
      expect(await present(broker, "sp-ended")).toBe(false);
    });

    test("a session without subscriptions comes back subscribed to nothing (no filter is its mark)", async () => {
      const broker = await start();
      expect(await present(broker, "sp-empty")).toBe(false);
      const back = await client(broker, { clientId: "sp-empty", clean: false });
      expect(back.connected).toBe(true);
      await back.subscribeAsync("sp/seen", { qos: 1 });
      const got = collect(back, 1);
      // `$fleet/session` is the placeholder's filter (broker/persistence/sessions.ts).
      await broker.publish("$fleet/session", "not for anyone", { qos: 1 });
      await broker.publish("sp/seen", "seen", { qos: 1 });
      expect(await got).toEqual(["seen"]);
      await back.endAsync();
      // And it is not stored: the session comes back with the one subscription it made.
      const again = await client(broker, { clientId: "sp-empty", clean: false });
      const next = collect(again, 1);
      await broker.publish("$fleet/session", "not for anyone", { qos: 1 });
      await broker.publish("sp/seen", "seen again", { qos: 1 });
      expect(await next).toEqual(["seen again"]);
    });
  });
}

for (const kind of ["libsql", "memory"] as const) {
  test(`QoS 2 messages published while a persistent subscriber comes back reach it once each (${kind})`, async () => {
    const broker = await (kind === "libsql"
      ? startBroker(join(dir, `b${n++}.db`))
      : startWith({ kind, maxOfflineMessages: 1000 }));
    const publisher = await client(broker, { clientId: "burst-pub" });
    const first = await client(broker, { clientId: "burst-sub", clean: false });
    await first.subscribeAsync("burst/#", { qos: 2 });
    await first.endAsync();
    const got: string[] = [];
    const sent: string[] = [];
    // aedes restores the subscriptions before it reads the queue back: messages published in between are
    // queued and live at once. Before, some came both ways: 1 to 8 of these 140 with broker.db, in every run
    // (in memory the window is narrower; test/broker-persistence.test.ts drives it step by step).
    for (let round = 0; round < 20; round++) {
      // One queued while it is away, so its queue has something to read back.
      sent.push(`away${round}`);
      await publisher.publishAsync("burst/a", `away${round}`, { qos: 2 });
      const back = later(broker, { clientId: "burst-sub", clean: false });
      back.on("message", (_t, payload) => got.push(payload.toString()));
      const connected = new Promise((resolve) => back.once("connect", resolve));
      back.connect();
      const publishes: Promise<unknown>[] = [];
      for (let i = 0; i < 6; i++) {
        sent.push(`r${round}.${i}`);
        publishes.push(publisher.publishAsync("burst/a", `r${round}.${i}`, { qos: 2 }));
        await Bun.sleep(1);
      }
      await Promise.all([connected, ...publishes]);
      await until(() => got.length >= sent.length);
      await back.endAsync();
    }
    expect(got.sort()).toEqual(sent.sort());
  });
}

describe("a connection taken over by a new one of its client (MQTT-3.1.4-2)", () => {
  /** What a watcher of dev/avail sees while `dev` (will: "offline", retained) reconnects over its open connection. */
  async function takeover(broker: Broker, cleanAfter: boolean): Promise<string[]> {
    const will = { topic: "dev/avail", payload: Buffer.from("offline"), qos: 1 as const, retain: true };
    const watcher = await client(broker, { clientId: "avail-watch", clean: true });
    const seen: string[] = [];
    watcher.on("message", (_t, payload) => seen.push(payload.toString()));
    await watcher.subscribeAsync("dev/avail", { qos: 1 });
    const old = await client(broker, { clientId: "dev", clean: false, will });
    await old.publishAsync("dev/avail", "online", { qos: 1, retain: true });
    const fresh = await client(broker, { clientId: "dev", clean: cleanAfter, will });
    await fresh.publishAsync("dev/avail", "online", { qos: 1, retain: true });
    await until(() => seen.length >= 2);
    await Bun.sleep(200); // an "offline" would come within this
    return seen;
  }

  for (const kind of ["libsql", "memory"] as const) {
    const start = () =>
      kind === "libsql" ? startBroker(join(dir, `b${n++}.db`)) : startWith({ kind, maxOfflineMessages: 1000 });

    test(`the session going on, its will is not published: the client is back (${kind})`, async () => {
      // Before, every such reconnection told the watchers "offline" between two "online"s.
      expect(await takeover(await start(), false)).toEqual(["online", "online"]);
    });

    test(`a takeover that ends the session (clean = true) publishes the old will, as Mosquitto (${kind})`, async () => {
      // (The old will and the new "online" go through intake side by side: either may come first.)
      expect((await takeover(await start(), true)).sort()).toEqual(["offline", "online", "online"]);
    });
  }

  for (const [oldClean, newClean] of [
    [false, false],
    [false, true],
    [true, false],
    [true, true],
  ] as const) {
    const name = `clean = ${oldClean} taken over by clean = ${newClean}`;
    test(`${name}: the new connection's will stays stored in broker.db, for the next start after a crash`, async () => {
      const path = join(dir, `b${n++}.db`);
      const broker = await startBroker(path);
      const will = (payload: string) => ({ topic: "dev/avail", payload: Buffer.from(payload), qos: 1 as const });
      await client(broker, { clientId: "dev-w", clean: oldClean, will: will("first") });
      await client(broker, { clientId: "dev-w", clean: newClean, will: will("second") });
      await Bun.sleep(200); // before, the old connection's close deleted the row the new one had just stored
      const db = createClient({ url: `file:${path}` });
      try {
        const rows = (await db.execute("SELECT packet FROM wills WHERE client_id = 'dev-w'")).rows;
        expect(rows.map((r) => String(r.packet).includes(Buffer.from("second").toString("base64")))).toEqual([true]);
      } finally {
        db.close();
      }
    });
  }
});

test("a session with no subscription is still present after the broker restarts on its broker.db", async () => {
  const path = join(dir, `b${n++}.db`);
  const first = await startBroker(path);
  expect(await present(first, "sp-restart")).toBe(false);
  await first.close();
  expect(await rowsOnDisk(path, "sessions")).toBe(1);
  const second = await startBroker(path);
  expect(await present(second, "sp-restart")).toBe(true);
});

describe("delivery to live clients beside durable sessions", () => {
  test("a publish held by its offline queue write still reaches a client a later publish reached first", async () => {
    const path = join(dir, `b${n++}.db`);
    const broker = await startBroker(path);
    // An offline session on out/#: a QoS 1 publish there waits for its queue row's commit
    // before it reaches live clients; a publish on status/# has no such write and passes it.
    const offline = await client(broker, { clientId: "dev-4", clean: false });
    await offline.subscribeAsync("out/#", { qos: 1 });
    await offline.endAsync();
    const watcher = await client(broker, { clientId: "watch-all", clean: true });
    await watcher.subscribeAsync("#", { qos: 1 });
    const got = collect(watcher, 6);
    const sent: Promise<void>[] = [];
    for (let i = 0; i < 3; i++) {
      sent.push(broker.publish("out/a", `out${i}`, { qos: 1 }));
      sent.push(broker.publish("status/a", `status${i}`, { qos: 1, retain: true }));
    }
    await Promise.all(sent);
    expect((await got).sort()).toEqual(["out0", "out1", "out2", "status0", "status1", "status2"]);
  });

  test("a client whose subscriptions overlap gets each message once", async () => {
    const path = join(dir, `b${n++}.db`);
    const broker = await startBroker(path);
    const watcher = await client(broker, { clientId: "overlap", clean: true });
    await watcher.subscribeAsync(["out/#", "out/a", "+/a"], { qos: 1 });
    const got: string[] = [];
    watcher.on("message", (_t, p) => got.push(p.toString()));
    for (let i = 0; i < 3; i++) await broker.publish("out/a", `m${i}`, { qos: i === 1 ? 0 : 1 });
    await broker.publish("out/b", "last", { qos: 1 });
    await until(() => got.includes("last"));
    await Bun.sleep(100);
    expect(got).toEqual(["m0", "m1", "m2", "last"]);
  });
});

/** Each message `c` receives: its payload and the QoS it came with. */
function received(c: MqttClient): { payload: string; qos: number }[] {
  const got: { payload: string; qos: number }[] = [];
  c.on("message", (_t, p, packet) => got.push({ payload: p.toString(), qos: packet.qos }));
  return got;
}

describe("the QoS a subscriber gets (MQTT-3.8.4-6: the lower of published and granted)", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a retained QoS 1 message replayed to a QoS 0 wildcard subscription comes at QoS 0`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 100 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      // (Resolves once the message went its way: a device's PUBACK comes before that, and a subscriber quick
      // enough would get it live too.)
      await broker.publish("rq/a", "keep", { qos: 1, retain: true });
      for (const filter of ["rq/#", "rq/+", "rq/a"]) {
        const sub = await client(broker, { clientId: `rq-${kind}-${filter}`, clean: filter !== "rq/+" });
        const got = received(sub);
        await sub.subscribeAsync(filter, { qos: 0 });
        await until(() => got.length > 0);
        expect({ filter, got }).toEqual({ filter, got: [{ payload: "keep", qos: 0 }] });
      }
    });
  }

  test("a live QoS 1 message to a QoS 0 wildcard subscription comes at QoS 0, clean session or not", async () => {
    const broker = await startBroker(join(dir, `b${n++}.db`));
    for (const clean of [true, false]) {
      const sub = await client(broker, { clientId: `live-q0-${clean}`, clean });
      const got = received(sub);
      await sub.subscribeAsync("live/#", { qos: 0 });
      await broker.publish("live/a", "m", { qos: 1 });
      await until(() => got.length > 0);
      expect({ clean, got }).toEqual({ clean, got: [{ payload: "m", qos: 0 }] });
    }
  });

  test("overlapping subscriptions deliver once, at the highest QoS granted by any of them", async () => {
    const broker = await startBroker(join(dir, `b${n++}.db`));
    const sub = await client(broker, { clientId: "overlap-qos", clean: true });
    const got = received(sub);
    await sub.subscribeAsync({ "ov/#": { qos: 0 }, "ov/+": { qos: 1 }, "+/+": { qos: 0 } });
    await broker.publish("ov/a", "one", { qos: 1 });
    await broker.publish("ov/a", "zero", { qos: 0 });
    await broker.publish("ov/b", "last", { qos: 1 });
    await until(() => got.some((m) => m.payload === "last"));
    await Bun.sleep(100);
    expect(got).toEqual([
      { payload: "one", qos: 1 },
      { payload: "zero", qos: 0 },
      { payload: "last", qos: 1 },
    ]);
  });
});

describe("an away session's queue (MQTT-3.8.4-6, and one copy for overlapping filters)", () => {
  // "none": a broker built without a persistence option gets the memory one too, not aedes' own.
  for (const kind of ["libsql", "memory", "none"] as const) {
    test(`${kind}: a message overlapping filters matched comes back once, at the QoS granted`, async () => {
      const broker = await startWith(
        kind === "none"
          ? undefined
          : kind === "memory"
            ? { kind, maxOfflineMessages: 100 }
            : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      const id = `away-${kind}`;
      const sub = await client(broker, { clientId: id, clean: false });
      await sub.subscribeAsync({
        "aw/#": { qos: 1 },
        "aw/a": { qos: 1 },
        "aw/two/#": { qos: 2 },
        "aw/zero": { qos: 0 },
      });
      await sub.endAsync();
      // A QoS 2 publish two QoS 1 filters match: queued once, at QoS 1. (Queued per filter, at QoS 2, the
      // second copy's PUBREL found no packet on the memory persistence and the connection was dropped at
      // every reconnect.) One a QoS 2 filter matches stays QoS 2; a QoS 0 filter beside a QoS 1 one: QoS 1.
      const device = await client(broker, { clientId: `${id}-device` });
      await device.publishAsync("aw/a", "downgraded", { qos: 2 });
      await device.publishAsync("aw/two/x", "kept", { qos: 2 });
      await device.publishAsync("aw/zero", "via aw/#", { qos: 1 });
      await device.publishAsync("aw/b", "last", { qos: 1 });
      for (const round of [1, 2]) {
        const back = later(broker, { clientId: id, clean: false });
        const got = received(back);
        let closed = false;
        back.on("close", () => {
          closed = true;
        });
        back.connect();
        if (round === 1) {
          await until(() => got.some((m) => m.payload === "last"));
          await Bun.sleep(200);
          // (mqtt.js hands a QoS 2 message over at its PUBREL, so it may come after a later QoS 1 one.)
          expect(got.sort((a, b) => a.payload.localeCompare(b.payload))).toEqual([
            { payload: "downgraded", qos: 1 },
            { payload: "kept", qos: 2 },
            { payload: "last", qos: 1 },
            { payload: "via aw/#", qos: 1 },
          ]);
        } else {
          // Everything was acknowledged: nothing comes back a second time.
          await until(() => back.connected);
          await Bun.sleep(300);
          expect(got).toEqual([]);
        }
        expect(closed).toBe(false);
        await back.endAsync();
      }
    });
  }
});

describe("a connected session's queue", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a message sent at QoS 0 (an exact filter's) leaves it: not resent, not filling it`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 3 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 3 },
      );
      const id = `exact-q0-${kind}`;
      const sub = await client(broker, { clientId: id, clean: false });
      const got = received(sub);
      // aedes 1.2.0 sends a live message at the QoS of a filter that is exactly its topic (docs/broker.md),
      // after it joined the session's queue at the QoS 1 `ex/#` owes it.
      await sub.subscribeAsync({ "ex/a": { qos: 0 }, "ex/#": { qos: 1 } });
      const device = await client(broker, { clientId: `${id}-device` });
      for (let i = 0; i < 5; i++) await device.publishAsync("ex/a", `m${i}`, { qos: 1 });
      await until(() => got.length === 5);
      expect(got.map((m) => m.qos)).toEqual([0, 0, 0, 0, 0]);
      // No QoS 0 message is acknowledged: kept, they filled the queue (max 3) and later ones were dropped.
      expect(broker.stats().offlineDropped).toBe(0);
      await sub.endAsync();
      const back = later(broker, { clientId: id, clean: false });
      const again = received(back);
      back.connect();
      await until(() => back.connected);
      await Bun.sleep(300);
      expect(again).toEqual([]);
    });
  }
});

describe("a new subscription and a retained message published right after its SUBACK", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: the subscriber gets it once, live (RETAIN 0), not again as a stored copy`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 100 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      const device = await client(broker, { clientId: `after-suback-pub-${kind}` });
      const sub = await client(broker, { clientId: `after-suback-${kind}` });
      const got: { payload: string; retain: boolean }[] = [];
      sub.on("message", (_t, p, packet) => got.push({ payload: p.toString(), retain: packet.retain }));
      // aedes reads the retained messages a subscription matches after its SUBACK; broker.db answered after
      // these were stored, and the read brought them a second time.
      await sub.subscribeAsync("state/#", { qos: 2 });
      await device.publishAsync("state/a", "v1", { qos: 1, retain: true });
      await device.publishAsync("state/a", "v2", { qos: 2, retain: true });
      await until(() => got.length >= 2);
      await Bun.sleep(300);
      expect(got).toEqual([
        { payload: "v1", retain: false },
        { payload: "v2", retain: false },
      ]);
    });
  }
});

describe("retained copies streaming to a new subscription while their topic is published again", () => {
  const cases = [
    ["libsql", "clean", 0],
    ["memory", "clean", 0],
    ["libsql", "kept", 1],
    ["memory", "kept", 1],
  ] as const;
  for (const [kind, session, qos] of cases) {
    test(`${kind}, ${session} session, QoS ${qos}: the subscriber never sees the value go back`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 1000 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 1000 },
      );
      const device = await client(broker, { clientId: `streaming-pub-${kind}` });
      // aedes streams a subscription's retained copies about one per loop turn: the last topic's copy goes
      // out several turns after the read, while the device publishes that topic again and again.
      for (let t = 0; t < 10; t++) await device.publishAsync(`level/t${t}`, "0", { qos: 1, retain: true });
      let last = 0;
      let publishing = true;
      const publishes = (async () => {
        while (publishing) await device.publishAsync("level/t9", String(++last), { qos: 1, retain: true });
      })();
      const seen: number[][] = [];
      for (let i = 0; i < 12; i++) {
        const id = `streaming-${kind}-${session}-${i}`;
        const sub = await client(broker, { clientId: id, clean: session === "clean" });
        const values: number[] = [];
        sub.on("message", (topic, p) => topic === "level/t9" && values.push(Number(p.toString())));
        await sub.subscribeAsync("level/#", { qos });
        seen.push(values);
        await Bun.sleep(3);
      }
      publishing = false;
      await publishes;
      await until(() => seen.every((values) => values.at(-1) === last)).catch((e) => {
        console.log(
          last,
          broker.stats().offlineQueued,
          seen.map((v) => `${v.length}:${v.slice(-4)}`),
        );
        throw e;
      });
      for (const values of seen) expect(values).toEqual(values.toSorted((a, b) => a - b));
      // A kept session's queue held no dropped copy: every message in it was sent and acknowledged.
      await until(() => broker.stats().offlineQueued === 0);
    });
  }
});

describe("a clean = false subscription made while its topic is busy", () => {
  const cases = [
    ["libsql", 1],
    ["libsql", 2],
    ["memory", 1],
    ["memory", 2],
  ] as const;
  for (const [kind, qos] of cases) {
    test(`${kind}, QoS ${qos}: the connection stays; every message after its SUBACK comes, once`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 1000 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 1000 },
      );
      const device = await client(broker, { clientId: `busy-pub-${kind}` });
      let last = 0;
      let publishing = true;
      // Retained: with broker.db a publish then waits on a commit between its queuing and its live routing.
      const publishes = (async () => {
        while (publishing) await device.publishAsync("busy/a", String(++last), { qos, retain: true });
      })();
      await Bun.sleep(20);
      const sub = await client(broker, { clientId: `busy-sub-${kind}`, clean: false });
      let closed = false;
      sub.on("close", () => {
        closed = true;
      });
      const got: number[] = [];
      sub.on("message", (_t, p, packet) => !packet.retain && got.push(Number(p.toString())));
      await sub.subscribeAsync("busy/#", { qos });
      const subscribedAt = last;
      await Bun.sleep(100);
      publishing = false;
      await publishes;
      await until(() => got.at(-1) === last || closed);
      expect(closed).toBe(false);
      const after = got.filter((v) => v > subscribedAt);
      expect(after).toEqual(Array.from({ length: last - subscribedAt }, (_, i) => subscribedAt + 1 + i));
      await until(() => broker.stats().offlineQueued === 0);
    });
  }
});

describe("retained messages a clean = false session's new subscription gets", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: a retained QoS 2 message completes its flow; a lost PUBREL comes again`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 100 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 },
      );
      await broker.publish("rq2/a", "kept", { qos: 1, retain: true });
      const device = await client(broker, { clientId: `rq2-pub-${kind}` });
      await device.publishAsync("rq2/b", "exactly once", { qos: 2, retain: true });
      const id = `rq2-${kind}`;
      // This connection answers the QoS 2 PUBLISH with PUBREC and never sends PUBCOMP (mqtt.js sends it
      // once its handleMessage calls back). (Its PUBREC closed the connection: "no such packet".)
      const first = await client(broker, { clientId: id, clean: false });
      const got = received(first);
      first.handleMessage = (packet, done) => (packet.qos === 2 ? undefined : done());
      let closed = false;
      first.on("close", () => {
        closed = true;
      });
      const pubrels = (c: MqttClient): number[] => {
        const ids: number[] = [];
        c.on("packetreceive", (p) => (p.cmd === "pubrel" ? ids.push(p.messageId!) : undefined));
        return ids;
      };
      const firstPubrels = pubrels(first);
      await first.subscribeAsync("rq2/#", { qos: 2 });
      await until(() => firstPubrels.length === 1 && got.length === 2);
      expect(got.sort((a, b) => a.payload.localeCompare(b.payload))).toEqual([
        { payload: "exactly once", qos: 2 },
        { payload: "kept", qos: 1 },
      ]);
      await Bun.sleep(200);
      expect(closed).toBe(false);
      await first.endAsync(true);
      // MQTT-4.4.0-1: the session sends the unacknowledged PUBREL again; this connection completes it.
      const back = later(broker, { clientId: id, clean: false });
      const backPubrels = pubrels(back);
      back.connect();
      await until(() => backPubrels.length === 1);
      expect(backPubrels).toEqual(firstPubrels);
      await Bun.sleep(200);
      await back.endAsync();
      // Completed: nothing comes a third time.
      const again = later(broker, { clientId: id, clean: false });
      const againPubrels = pubrels(again);
      const againGot = received(again);
      again.connect();
      await until(() => again.connected);
      await Bun.sleep(300);
      expect({ pubrels: againPubrels, got: againGot }).toEqual({ pubrels: [], got: [] });
    });
  }
});

describe("a retained message sent to a clean = false session's new subscription is kept in its queue", () => {
  for (const kind of ["libsql", "memory"] as const) {
    test(`${kind}: not acknowledged, it comes again with RETAIN 1 and DUP 1 when the session comes back`, async () => {
      const opts =
        kind === "memory"
          ? ({ kind, maxOfflineMessages: 100 } as const)
          : ({ kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 100 } as const);
      let broker = await startWith(opts);
      await broker.publish("rq1/a", "state", { qos: 1, retain: true });
      const id = `rq1-${kind}`;
      type Seen = { payload: string; qos: number; retain: boolean; dup: boolean };
      const publishes = (c: MqttClient): Seen[] => {
        const seen: Seen[] = [];
        c.on("packetreceive", (p) => {
          if (p.cmd === "publish") seen.push({ payload: String(p.payload), qos: p.qos, retain: p.retain, dup: p.dup });
        });
        return seen;
      };
      // This connection never acknowledges: mqtt.js sends PUBACK once its handleMessage calls back.
      const first = await client(broker, { clientId: id, clean: false });
      first.handleMessage = () => undefined;
      const firstSeen = publishes(first);
      await first.subscribeAsync("rq1/#", { qos: 1 });
      await until(() => firstSeen.length === 1);
      expect(firstSeen).toEqual([{ payload: "state", qos: 1, retain: true, dup: false }]);
      await first.endAsync(true);
      if (kind === "libsql") {
        // Its queue row is on the disk: a broker restart keeps it too.
        await broker.close();
        broker = await startWith(opts);
      }
      // MQTT-4.4.0-1: the unacknowledged PUBLISH goes out again, still as a retained message (MQTT-3.3.1-8).
      const back = later(broker, { clientId: id, clean: false });
      const backSeen = publishes(back);
      back.connect();
      await until(() => backSeen.length === 1);
      expect(backSeen).toEqual([{ payload: "state", qos: 1, retain: true, dup: true }]);
      await Bun.sleep(200); // its PUBACK
      await back.endAsync();
      // Acknowledged: nothing comes a third time.
      const again = later(broker, { clientId: id, clean: false });
      const againSeen = publishes(again);
      again.connect();
      await until(() => again.connected);
      await Bun.sleep(300);
      expect(againSeen).toEqual([]);
    });

    test(`${kind}: past max_offline_messages it is not kept, and counted as dropped`, async () => {
      const broker = await startWith(
        kind === "memory"
          ? { kind, maxOfflineMessages: 1 }
          : { kind, path: join(dir, `b${n++}.db`), synchronous: "full", maxOfflineMessages: 1 },
      );
      await broker.publish("rqf/a", "a", { qos: 1, retain: true });
      await broker.publish("rqf/b", "b", { qos: 1, retain: true });
      const id = `rqf-${kind}`;
      const seen = (c: MqttClient): string[] => {
        const got: string[] = [];
        c.on("packetreceive", (p) => (p.cmd === "publish" ? got.push(String(p.payload)) : undefined));
        return got;
      };
      // Never acknowledging (mqtt.js then reads no further packet): the first one holds the queue's one place.
      const first = await client(broker, { clientId: id, clean: false });
      first.handleMessage = () => undefined;
      const firstSeen = seen(first);
      await first.subscribeAsync("rqf/#", { qos: 1 });
      await until(() => firstSeen.length === 1 && broker.stats().offlineDropped === 1);
      await first.endAsync(true);
      const back = later(broker, { clientId: id, clean: false });
      const backSeen = seen(back);
      back.connect();
      await until(() => backSeen.length === 1);
      await Bun.sleep(300);
      expect(backSeen).toEqual(firstSeen);
    });
  }
});

describe("broker.db beside other connections", () => {
  test("keeps its WAL when another process's last connection closes, with another of this process open", async () => {
    // A broker restarted in one process (a reload, a test) may open broker.db while a connection of the
    // last one is still open until collected: opening it must not drop the process's locks on the file.
    const path = join(dir, `b${n++}.db`);
    await (await startBroker(path)).close();
    const other = createClient({ url: `file:${path}` });
    try {
      await other.execute("SELECT count(*) FROM retained");
      const broker = await startBroker(path);
      await broker.publish("wal/a", "1", { qos: 1, retain: true });
      await readInAnotherProcess(path, "retained");
      expect(existsSync(`${path}-wal`)).toBe(true);
      await broker.publish("wal/b", "2", { qos: 1, retain: true });
      await broker.close();
      expect(await rowsOnDisk(path, "retained")).toBe(2);
    } finally {
      other.close();
    }
  });
});

describe("broker.db from other code", () => {
  test("a broker.db written by newer code is refused with its version, and left untouched", async () => {
    const path = join(dir, `b${n++}.db`);
    const db = createClient({ url: `file:${path}` });
    await db.execute("CREATE TABLE future (x)");
    await db.execute("PRAGMA user_version = 99");
    db.close();
    const p = new LibsqlPersistence({ path });
    const err = await p.setup({ id: "b" }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(BrokerStoreTooNew);
    expect((err as BrokerStoreTooNew).version).toBe(99);
    const after = createClient({ url: `file:${path}` });
    try {
      expect((await after.execute("PRAGMA user_version")).rows[0]![0]).toBe(99);
      expect((await after.execute("PRAGMA journal_mode")).rows[0]![0]).toBe("delete");
      const tables = (await after.execute("SELECT name FROM sqlite_master WHERE type = 'table'")).rows.map(
        (r) => r.name,
      );
      expect(tables).toEqual(["future"]);
    } finally {
      after.close();
    }
  });
});

async function until(done: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!done()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await Bun.sleep(20);
  }
}

async function waitForRows(path: string, want: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const got = await rowsOnDisk(path, "outgoing");
    if (got === want) return;
    if (Date.now() > deadline) throw new Error(`outgoing has ${got} rows, want ${want}`);
    await Bun.sleep(50);
  }
}
