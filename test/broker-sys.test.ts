/**
 * The embedded broker's `$SYS/broker/` tree (`[broker] sys_interval`, Mosquitto's names): retained counts a
 * client may read with `$SYS/...` filters, refreshed every interval, only what changed. No client id is in it:
 * aedes' own `$SYS/<broker id>/...` events, which name clients, reach no one. Devices still cannot publish there.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import { type EmbeddedBroker, LoadAverages, SysTree, sysMessages, type SysSnapshot } from "../broker/index.ts";
import { BrokerKit } from "./helpers/broker.ts";

const dir = mkdtempSync(join(tmpdir(), "broker-sys-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const kit = new BrokerKit();
const INTERVAL_MS = 50;

/** Every `$SYS` message a client gets, newest value per topic, and all of them in order. */
async function watch(broker: EmbeddedBroker, filter: string, clientId = "watcher") {
  const c = await kit.client(broker, { clientId });
  const latest = new Map<string, string>();
  const all: { topic: string; payload: string }[] = [];
  c.on("message", (topic, payload) => {
    latest.set(topic, payload.toString());
    all.push({ topic, payload: payload.toString() });
  });
  // mqtt.js rejects a SUBACK that refuses (128), carrying the packet.
  const granted = await c.subscribeAsync(filter, { qos: 0 }).then(
    (grants) => grants[0]?.qos,
    (err: { packet?: { granted?: number[] } }) => {
      if (!err.packet?.granted) throw err;
      return err.packet.granted[0];
    },
  );
  return { c, latest, all, granted };
}

/** Wait until `ok` holds (a few refreshes at most), or fail naming `what`. */
async function until(ok: () => boolean, what: string, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !ok(); await Bun.sleep(10))
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
}

describe("the $SYS/broker/ tree", () => {
  test("a client subscribed to $SYS/broker/# gets version, uptime and the client and publish counts", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS, version: "agent-fleets 9.9.9" });
    const w = await watch(broker, "$SYS/broker/#");
    expect(w.granted).toBe(0);
    const pub = await kit.client(broker, { clientId: "device-1" });
    for (let i = 0; i < 3; i++) await pub.publishAsync("sensors/a/t", `${i}`, { qos: 1 });
    const sys = (k: string) => w.latest.get(`$SYS/broker/${k}`);
    await until(() => sys("publish/messages/received") === "3" && sys("clients/connected") === "2", "the counts");
    expect(sys("version")).toBe("agent-fleets 9.9.9");
    expect(sys("uptime")).toMatch(/^\d+ seconds$/);
    expect(sys("clients/maximum")).toBe("2");
    expect(sys("clients/total")).toBe("2");
    expect(sys("clients/disconnected")).toBe("0");
    expect(sys("publish/messages/dropped")).toBe("0");
    // The watcher's own $SYS deliveries count as sent.
    expect(Number(sys("publish/messages/sent"))).toBeGreaterThan(0);
    // Every byte on the wire, both ways: at least the three publishes' and the watcher's deliveries'.
    await until(() => Number(sys("bytes/received")) === broker.stats().bytesIn, "the bytes received to settle");
    expect(Number(sys("bytes/received"))).toBeGreaterThan(3 * "sensors/a/t0".length);
    expect(Number(sys("bytes/sent"))).toBeGreaterThan(Number(sys("publish/messages/sent")) * "$SYS/broker/".length);
  });

  test("a subscriber never sees a count go back: the retained copy cannot land after a newer refresh", async () => {
    const broker = await kit.start({ sysIntervalMs: 5 });
    const pub = await kit.client(broker, { clientId: "device-1" });
    let publishing = true;
    const publishes = (async () => {
      for (let i = 0; publishing; i++) {
        await pub.publishAsync("sensors/a/t", `${i}`, { qos: 1 });
        await Bun.sleep(1);
      }
    })();
    // Each new subscription's retained copies stream out over several loop turns while refreshes go on.
    const watchers: Awaited<ReturnType<typeof watch>>[] = [];
    for (let i = 0; i < 12; i++) {
      watchers.push(await watch(broker, "$SYS/broker/#", `watcher-${i}`));
      await Bun.sleep(7);
    }
    publishing = false;
    await publishes;
    const final = String(broker.stats().messagesIn);
    const counts = (w: (typeof watchers)[number]) =>
      w.all.filter((m) => m.topic === "$SYS/broker/publish/messages/received").map((m) => Number(m.payload));
    await until(() => watchers.every((w) => String(counts(w).at(-1)) === final), "every watcher to see the last count");
    for (const w of watchers) {
      const seen = counts(w);
      expect(seen).toEqual(seen.toSorted((a, b) => a - b));
    }
  });

  test("a persistent session whose client is away counts as disconnected, and in the total", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS });
    const w = await watch(broker, "$SYS/broker/clients/+");
    const away = await kit.client(broker, { clientId: "away", clean: false });
    await away.subscribeAsync("out/#", { qos: 1 });
    await away.endAsync();
    const sys = (k: string) => w.latest.get(`$SYS/broker/clients/${k}`);
    await until(() => sys("disconnected") === "1" && sys("connected") === "1", "the away session to count");
    expect(sys("total")).toBe("2");
    expect(sys("maximum")).toBe("2");
  });

  for (const kind of ["memory", "libsql"] as const) {
    test(`subscriptions/count: connected clients' and away sessions' (${kind})`, async () => {
      const persistence =
        kind === "memory"
          ? ({ kind, maxOfflineMessages: 100 } as const)
          : ({ kind, path: join(dir, `subs-${kind}.db`), synchronous: "full", maxOfflineMessages: 100 } as const);
      const broker = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
      const w = await watch(broker, "$SYS/broker/subscriptions/count");
      const count = () => w.latest.get("$SYS/broker/subscriptions/count");
      const away = await kit.client(broker, { clientId: "away", clean: false });
      await away.subscribeAsync(["a/#", "b/#"], { qos: 1 });
      await away.subscribeAsync("a/#", { qos: 0 }); // the same filter again: still one
      await away.endAsync();
      const here = await kit.client(broker, { clientId: "here" });
      await here.subscribeAsync("x/#", { qos: 0 });
      // The watcher's own, the away session's two, and one of a connected clean session.
      await until(() => count() === "4", "4 subscriptions");
      expect(broker.subscriptionCount?.()).toBe(4); // fleet_broker_subscriptions
      await here.unsubscribeAsync("x/#");
      await until(() => count() === "3", "3 once x/# is gone");
      await here.endAsync();
      const back = await kit.client(broker, { clientId: "away", clean: false });
      await back.unsubscribeAsync("b/#");
      await until(() => count() === "2", "2 once b/# is gone");
      // A clean session 1 CONNECT ends the session and its subscriptions.
      await back.endAsync();
      await kit.client(broker, { clientId: "away", clean: true });
      await until(() => count() === "1", "the watcher's alone");
    });
  }

  test("subscriptions/count after a restart counts the sessions broker.db kept", async () => {
    const path = join(dir, "subs-restart.db");
    const persistence = { kind: "libsql", path, synchronous: "full", maxOfflineMessages: 100 } as const;
    const first = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
    const away = await kit.client(first, { clientId: "away", clean: false });
    await away.subscribeAsync(["a/#", "b/#"], { qos: 1 });
    await away.endAsync();
    await first.close();
    const second = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
    const w = await watch(second, "$SYS/broker/subscriptions/count");
    await until(() => w.latest.get("$SYS/broker/subscriptions/count") === "3", "the two kept and the watcher's");
  });

  for (const kind of ["memory", "libsql"] as const) {
    test(`retained messages/count: devices' and the tree's own, an empty payload clears one (${kind})`, async () => {
      const persistence =
        kind === "memory"
          ? ({ kind, maxOfflineMessages: 100 } as const)
          : ({ kind, path: join(dir, `retained-${kind}.db`), synchronous: "full", maxOfflineMessages: 100 } as const);
      const broker = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
      const w = await watch(broker, "$SYS/broker/#");
      const count = () => w.latest.get("$SYS/broker/retained messages/count");
      // Every topic of the tree is retained; the watcher got each one.
      const tree = () => new Set(w.all.map((m) => m.topic)).size;
      await until(() => count() === String(tree()) && tree() === 35, "the tree's own");
      const pub = await kit.client(broker, { clientId: "device-1" });
      await pub.publishAsync("status/a", "on", { qos: 1, retain: true });
      await pub.publishAsync("status/b", "on", { qos: 0, retain: true });
      await pub.publishAsync("status/a", "off", { qos: 1, retain: true }); // replaced: still one
      await pub.publishAsync("events/x", "not kept", { qos: 1 });
      await until(() => count() === "37", "two more");
      expect(broker.stats().retainedMessages).toBe(37);
      // The replaced topic holds its newest payload.
      const reader = await kit.client(broker, { clientId: "reader" });
      const got = new Promise<string>((resolve) => reader.on("message", (_t, p) => resolve(p.toString())));
      await reader.subscribeAsync("status/a", { qos: 1 });
      expect(await got).toBe("off");
      await pub.publishAsync("status/b", "", { qos: 1, retain: true });
      await pub.publishAsync("status/never", "", { qos: 0, retain: true }); // nothing to clear
      await until(() => count() === "36", "one cleared");
      expect(broker.stats().retainedMessages).toBe(36);
    });
  }

  test("retained messages/count after a restart counts what broker.db kept", async () => {
    const path = join(dir, "retained-restart.db");
    const persistence = { kind: "libsql", path, synchronous: "full", maxOfflineMessages: 100 } as const;
    const first = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
    const pub = await kit.client(first, { clientId: "device-1" });
    for (const t of ["a", "b", "c"]) await pub.publishAsync(`status/${t}`, "on", { qos: 1, retain: true });
    await first.close();
    const second = await kit.start({ sysIntervalMs: INTERVAL_MS, persistence });
    const w = await watch(second, "$SYS/broker/retained messages/count");
    await until(() => w.latest.get("$SYS/broker/retained messages/count") === String(35 + 3), "the tree's and 3");
  });

  test("load/*: per-minute rates of publishes, bytes, connections and sockets, with two decimals", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS });
    const w = await watch(broker, "$SYS/broker/load/#");
    const load = (k: string) => w.latest.get(`$SYS/broker/load/${k}`);
    await until(() => w.latest.size === 21, "the 21 loads");
    const pub = await kit.client(broker, { clientId: "device-1" });
    for (let i = 0; i < 20; i++) await pub.publishAsync("sensors/a/t", `${i}`, { qos: 1 });
    await until(() => Number(load("publish/received/1min")) > 0, "a publish load");
    for (const k of ["publish/received", "bytes/received", "connections", "sockets"])
      for (const window of ["1min", "5min", "15min"]) expect(load(`${k}/${window}`)).toMatch(/^\d+\.\d\d$/);
    expect(Number(load("connections/1min"))).toBeGreaterThan(0);
    expect(Number(load("sockets/1min"))).toBeGreaterThan(0);
    // The shorter the window, the faster it rises.
    expect(Number(load("publish/received/1min"))).toBeGreaterThan(Number(load("publish/received/15min")));
    expect(load("publish/dropped/1min")).toBe("0.00");
  });

  test("$SYS/# shows the counts only: aedes' own events, which name clients, reach no one", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS });
    const w = await watch(broker, "$SYS/#");
    expect(w.granted).toBe(0);
    const other = await kit.client(broker, { clientId: "secret-device-id" });
    await other.subscribeAsync("a/b", { qos: 0 });
    await other.endAsync();
    await until(() => w.latest.get("$SYS/broker/clients/connected") === "1" && w.all.length > 35, "refreshes");
    await Bun.sleep(4 * INTERVAL_MS);
    expect(w.all.every((m) => m.topic.startsWith("$SYS/broker/"))).toBe(true);
    expect(w.all.some((m) => m.payload.includes("secret-device-id"))).toBe(false);
  });

  test("each refresh publishes only what changed", async () => {
    const broker = await kit.start({ sysIntervalMs: 1000 });
    const w = await watch(broker, "$SYS/broker/#");
    const times = (k: string) => w.all.filter((m) => m.topic === `$SYS/broker/${k}`).length;
    // Uptime is new at every refresh (a second apart): three refreshes after the retained copy.
    await until(
      () => new Set(w.all.filter((m) => m.topic.endsWith("/uptime")).map((m) => m.payload)).size >= 4,
      "3 refreshes",
      10_000,
    );
    // What does not change came once: retained, and at most once more live when the subscription beat the first
    // refresh's delivery.
    expect(times("version")).toBeLessThanOrEqual(2);
    expect(times("publish/messages/received")).toBeLessThanOrEqual(2);
    expect(times("uptime")).toBeGreaterThanOrEqual(4);
  });

  test("a client cannot publish into the tree: the next reader still sees the broker's values", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS, version: "agent-fleets 1" });
    const forger = await kit.client(broker, { clientId: "forger" });
    await forger.publishAsync("$SYS/broker/version", "forged", { qos: 1, retain: true });
    expect(broker.stats().dropped).toBe(1);
    const w = await watch(broker, "$SYS/broker/version");
    await until(() => w.latest.has("$SYS/broker/version"), "the retained version");
    expect(w.all.map((m) => m.payload)).toEqual(["agent-fleets 1"]);
  });

  test("other $ filters stay refused (0x80) while the tree is on", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS });
    expect((await watch(broker, "$fleet/#")).granted).toBe(128);
  });

  test("the ACL decides $SYS filters as any other: a device it does not grant gets 0x80", async () => {
    const broker = await kit.start({
      sysIntervalMs: INTERVAL_MS,
      authorizeSubscribeTopic: (_client, filter) => !filter.startsWith("$SYS/"),
    });
    const w = await watch(broker, "$SYS/broker/#");
    expect(w.granted).toBe(128);
    expect(w.c.connected).toBe(true);
  });

  test("with the tree off, a $SYS filter is refused (0x80) and the connection stays", async () => {
    const broker = await kit.start({ sysIntervalMs: 0 });
    const w = await watch(broker, "$SYS/#");
    expect(w.granted).toBe(128);
    await Bun.sleep(100);
    expect(w.all).toEqual([]);
    expect(w.c.connected).toBe(true);
  });

  test("libsql persistence: the tree stays out of broker.db, and a restart shows only this run's", async () => {
    const path = join(dir, "restart.db");
    const persistence = { kind: "libsql", path, synchronous: "full", maxOfflineMessages: 1000 } as const;
    const first = await kit.start({ persistence, sysIntervalMs: INTERVAL_MS, version: "release 1" });
    await Bun.sleep(2 * INTERVAL_MS);
    await first.close();
    // Retained in memory, as Mosquitto keeps $SYS: a refresh is no write to the box's flash.
    const db = createClient({ url: `file:${path}` });
    const rows = await db.execute("SELECT count(*) AS n FROM retained WHERE topic LIKE '$SYS/%'");
    db.close();
    expect(Number(rows.rows[0]?.n)).toBe(0);
    const second = await kit.start({ persistence, sysIntervalMs: 60_000, version: "release 2" });
    const w: { c: MqttClient; all: { payload: string }[] } = await watch(second, "$SYS/broker/version");
    await until(() => w.all.length > 0, "the retained version");
    await Bun.sleep(100);
    // The retained copy, and the live one too when the subscription came before it was delivered: never release 1.
    expect(new Set(w.all.map((m) => m.payload))).toEqual(new Set(["release 2"]));
  });

  test("mosquitto_sub reads it as it reads Mosquitto's", async () => {
    const broker = await kit.start({ sysIntervalMs: INTERVAL_MS, version: "agent-fleets 9.9.9" });
    const sub = Bun.spawn(
      ["mosquitto_sub", "-h", "127.0.0.1", "-p", String(broker.port), "-v", "-C", "1", "-W", "10"].concat([
        "-t",
        "$SYS/broker/version",
      ]),
      { env: {}, stdout: "pipe", stderr: "pipe" },
    );
    kit.defer(() => sub.kill());
    expect(await sub.exited).toBe(0);
    expect((await new Response(sub.stdout).text()).trim()).toBe("$SYS/broker/version agent-fleets 9.9.9");
  });
});

describe("LoadAverages", () => {
  const zero: SysSnapshot = {
    version: "v",
    uptimeSeconds: 0,
    connected: 0,
    maximum: 0,
    disconnected: 0,
    received: 0,
    sent: 0,
    dropped: 0,
    sessionsExpired: 0,
    bytesReceived: 0,
    bytesSent: 0,
    subscriptions: 0,
    retained: 0,
    connects: 0,
    sockets: 0,
  };
  const load = (m: Map<string, string>, name: string) =>
    ["1min", "5min", "15min"].map((w) => m.get(`$SYS/broker/load/${name}/${w}`));

  test("every load starts at 0.00, under Mosquitto's names", () => {
    const m = new LoadAverages().update(0, zero);
    expect([...m.keys()].toSorted()).toEqual(
      ["bytes/received", "bytes/sent", "connections", "publish/dropped", "publish/received", "publish/sent", "sockets"]
        .flatMap((n) => ["1min", "5min", "15min"].map((w) => `$SYS/broker/load/${n}/${w}`))
        .toSorted(),
    );
    expect(new Set(m.values())).toEqual(new Set(["0.00"]));
  });

  test("a minute at 600 per minute moves each window by its time constant (1 - e^(-1), -1/5, -1/15)", () => {
    const loads = new LoadAverages();
    loads.update(0, zero);
    const m = loads.update(60_000, { ...zero, received: 600 });
    expect(load(m, "publish/received")).toEqual(["379.27", "108.76", "38.70"]);
    expect(load(m, "publish/sent")).toEqual(["0.00", "0.00", "0.00"]);
  });

  test("a steady rate is what every window settles on; a clock that goes back adds nothing", () => {
    const loads = new LoadAverages();
    let m = loads.update(0, zero);
    for (let s = 10; s <= 3 * 3600; s += 10) m = loads.update(s * 1000, { ...zero, sockets: s * 2 });
    expect(load(m, "sockets")).toEqual(["120.00", "120.00", "120.00"]);
    const back = loads.update(1000, { ...zero, sockets: 3 * 3600 * 2 + 500 });
    expect(load(back, "sockets")).toEqual(["120.00", "120.00", "120.00"]);
  });
});

describe("SysTree", () => {
  const base: SysSnapshot = {
    version: "v",
    uptimeSeconds: 1.9,
    connected: 2,
    maximum: 1,
    disconnected: 3,
    received: 10,
    sent: 4,
    dropped: 0,
    sessionsExpired: 1,
    bytesReceived: 1234,
    bytesSent: 99.5,
    subscriptions: 7,
    retained: 5,
    connects: 3,
    sockets: 4,
  };

  test("the messages use Mosquitto's names; whole numbers, the maximum never below the connected", () => {
    expect(Object.fromEntries(sysMessages(base))).toEqual({
      "$SYS/broker/version": "v",
      "$SYS/broker/uptime": "1 seconds",
      "$SYS/broker/clients/connected": "2",
      "$SYS/broker/clients/disconnected": "3",
      "$SYS/broker/clients/total": "5",
      "$SYS/broker/clients/expired": "1",
      "$SYS/broker/clients/maximum": "2",
      "$SYS/broker/subscriptions/count": "7",
      "$SYS/broker/retained messages/count": "5",
      "$SYS/broker/publish/messages/received": "10",
      "$SYS/broker/publish/messages/sent": "4",
      "$SYS/broker/publish/messages/dropped": "0",
      "$SYS/broker/bytes/received": "1234",
      "$SYS/broker/bytes/sent": "99",
    });
  });

  test("refresh publishes the whole tree first, then what changed", () => {
    let now = base;
    let clock = 0;
    const sent: string[] = [];
    const tree = new SysTree(
      1000,
      () => now,
      (topic) => sent.push(topic),
      () => clock,
    );
    // 14 counts and 7 loads over 3 windows.
    expect(tree.refresh()).toBe(14 + 21);
    clock = 1000;
    expect(tree.refresh()).toBe(0);
    now = { ...base, uptimeSeconds: 5, received: 11 };
    clock = 2000;
    sent.length = 0;
    expect(tree.refresh()).toBe(5);
    expect(sent).toEqual([
      "$SYS/broker/uptime",
      "$SYS/broker/publish/messages/received",
      "$SYS/broker/load/publish/received/1min",
      "$SYS/broker/load/publish/received/5min",
      "$SYS/broker/load/publish/received/15min",
    ]);
  });

  test("an interval that is not positive is refused", () => {
    expect(
      () =>
        new SysTree(
          0,
          () => base,
          () => undefined,
        ),
    ).toThrow(/must be > 0/);
  });
});
