/**
 * Durable broker sessions end to end (issue 12): the real gateway process, real
 * mosquitto_sub and mqtt.js clients with clean session = false. Outputs produced while a
 * device is away reach it after a `kill -9` of the gateway; its subscriptions survive a
 * graceful restart. With `[broker] persistence = "memory"` the session is gone after a restart.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { join } from "node:path";
import { connect, type IClientOptions, type MqttClient } from "mqtt";
import { TestFleet, cleanupAll, fixture, publishQos1, spawnLines, waitFor, within } from "./helpers/gateway.ts";
import { parseExposition, sampleValue } from "./helpers/prom.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const E2E_TIMEOUT = 180_000;
const COUNTER = fixture("counter");
const OUT = "fleet/agents/counter/+/out";

afterAll(() => cleanupAll(), 60_000);

const toml = (name: string, persistence: "libsql" | "memory" = "libsql", broker = ""): string =>
  fleetHeader(name, { broker: `persistence = "${persistence}"\n${broker}` }) +
  agentType("counter", COUNTER, ["c/+/in"], { dedup: "id" });

/** An mqtt.js client that connects on `.connect()`; resolves `sessionPresent` from its CONNACK. */
function device(fleet: TestFleet, opts: IClientOptions): { client: MqttClient; sessionPresent: Promise<boolean> } {
  const client = connect(`mqtt://127.0.0.1:${fleet.mqttPort}`, { reconnectPeriod: 0, manualConnect: true, ...opts });
  const sessionPresent = within(
    new Promise<boolean>((resolve) => client.once("connect", (p) => resolve(p.sessionPresent))),
    15_000,
    "CONNACK",
  );
  client.connect();
  return { client, sessionPresent };
}

/** mosquitto_sub with a persistent session (`-c -i`), QoS 1, printing topic and payload. */
function mosquittoSub(fleet: TestFleet, id: string, extra: string[] = []) {
  return spawnLines([
    "stdbuf",
    "-oL",
    "mosquitto_sub",
    ...["-h", "127.0.0.1", "-p", String(fleet.mqttPort), "-q", "1", "-c", "-i", id, "-v", "-d", "-t", OUT],
    ...extra,
  ]);
}

async function outboxEmpty(fleet: TestFleet): Promise<void> {
  await waitFor(
    async () => Number((await fleet.query<{ n: number }>("SELECT count(*) AS n FROM outbox"))[0]?.n) === 0,
    30_000,
    "the outbox to drain into the broker",
  );
}

describe("durable broker sessions", () => {
  test(
    "a clean = false mosquitto_sub gets every QoS 1 output and fleet/episodes summary produced while it was " +
      "away, across kill -9 of the gateway",
    async () => {
      const fleet = new TestFleet(toml("sessions-kill"));
      await fleet.start();
      const first = mosquittoSub(fleet, "sess-sub", ["-t", "fleet/episodes"]);
      await first.until((lines) => lines.some((l) => l.includes("SUBACK")), 15_000, "mosquitto_sub SUBACK");
      await first.stop(); // DISCONNECT; the session (subscription + queue) stays with the broker

      const pub = await fleet.mqtt({ clientId: "sess-pub" });
      for (let i = 0; i < 20; i++) await publishQos1(pub, "c/one/in", { id: `s-${i}`, v: i });
      const episodes = await fleet.waitCommitted("counter/one", 20, 60_000);
      // An outbox row goes only once aedes' publish callback ran, i.e. once broker.db has the queued copy.
      await outboxEmpty(fleet);
      await fleet.kill();

      await fleet.start();
      const back = mosquittoSub(fleet, "sess-sub", ["-t", "fleet/episodes"]);
      try {
        const on = (topic: string) => (lines: readonly string[]) => lines.filter((l) => l.startsWith(`${topic} `));
        const ids = (lines: readonly string[]) =>
          new Set(lines.map((l) => JSON.parse(l.slice(l.indexOf(" ") + 1)).episode));
        const outs = on("fleet/agents/counter/one/out");
        const summaries = on("fleet/episodes");
        await back.until((lines) => ids(outs(lines)).size >= 20, 30_000, "20 queued outputs");
        expect(ids(outs(back.lines))).toEqual(new Set(episodes.map((e) => e.id)));
        // The summaries are outputs too (docs/mqtt.md: at least once): queued for the session like the rest.
        await back.until((lines) => ids(summaries(lines)).size >= 20, 30_000, "20 queued summaries");
        expect(ids(summaries(back.lines))).toEqual(new Set(episodes.map((e) => e.id)));
      } finally {
        await back.stop();
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );

  test(
    "a clean = false device's subscriptions survive a graceful restart: outputs arrive without subscribing again",
    async () => {
      const fleet = new TestFleet(toml("sessions-restart"));
      await fleet.start();
      const d1 = device(fleet, { clientId: "sess-keep", clean: false });
      expect(await d1.sessionPresent).toBe(false);
      await d1.client.subscribeAsync(OUT, { qos: 1 });
      await d1.client.endAsync();
      expect(await fleet.stop()).toBe(0);

      await fleet.start();
      const d2 = device(fleet, { clientId: "sess-keep", clean: false });
      try {
        const out = new Promise<{ topic: string; body: any }>((resolve) =>
          d2.client.on("message", (topic, payload) => resolve({ topic, body: JSON.parse(payload.toString()) })),
        );
        expect(await d2.sessionPresent).toBe(true); // MQTT-3.2.2-2
        const pub = await fleet.mqtt({ clientId: "sess-pub2" });
        await publishQos1(pub, "c/two/in", { id: "after-restart" });
        const m = await within(out, 30_000, "an output on the restored subscription");
        expect(m.topic).toBe("fleet/agents/counter/two/out");
        expect(m.body.data.payload).toEqual({ id: "after-restart" });
      } finally {
        await d2.client.endAsync(true);
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );

  test(
    "a device's QoS 1 retained message and what it queued for an offline session survive a kill -9 right " +
      "after its PUBACK",
    async () => {
      const fleet = new TestFleet(toml("sessions-ack"));
      await fleet.start();
      const away = device(fleet, { clientId: "sess-away", clean: false });
      await away.sessionPresent;
      await away.client.subscribeAsync("home/queued", { qos: 1 });
      await away.client.endAsync();
      const pub = await fleet.mqtt({ clientId: "sess-ack-pub" });
      await pub.publishAsync("home/kept", "V0", { qos: 1, retain: true });
      // SIGKILL the moment the second PUBACK arrives: what both promised must be on disk already.
      const pid = fleet.pid;
      const killed = new Promise<void>((resolve) => {
        let acks = 0;
        pub.on("packetreceive", (p) => {
          if (p.cmd !== "puback" || ++acks < 2) return;
          process.kill(pid, "SIGKILL");
          resolve();
        });
      });
      pub.publish("home/queued", "X1", { qos: 1 });
      pub.publish("home/kept", "V1", { qos: 1, retain: true });
      await within(killed, 15_000, "both PUBACKs");
      await fleet.kill();

      await fleet.start();
      const back = device(fleet, { clientId: "sess-away", clean: false });
      try {
        const queued = new Promise<string>((resolve) =>
          back.client.on("message", (topic, payload) => topic === "home/queued" && resolve(payload.toString())),
        );
        expect(await back.sessionPresent).toBe(true);
        expect(await within(queued, 15_000, "the queued message")).toBe("X1");
        const retained = new Promise<string>((resolve) =>
          back.client.on("message", (topic, payload) => topic === "home/kept" && resolve(payload.toString())),
        );
        await back.client.subscribeAsync("home/kept", { qos: 1 });
        expect(await within(retained, 15_000, "the retained message")).toBe("V1");
      } finally {
        await back.client.endAsync(true);
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );

  test(
    "a connected client's will outlives a graceful stop: kept in broker.db for the next start to publish",
    async () => {
      const fleet = new TestFleet(toml("sessions-will"));
      await fleet.start();
      const d = device(fleet, {
        clientId: "sess-will",
        keepalive: 600,
        will: { topic: "home/gone", payload: Buffer.from("dead"), qos: 1, retain: true },
      });
      await d.sessionPresent;
      expect(await fleet.stop()).toBe(0);
      d.client.end(true);
      const db = createClient({ url: `file:${join(fleet.dataDir, "broker.db")}` });
      try {
        const rows = (await db.execute("SELECT client_id FROM wills")).rows;
        expect(rows.map((r) => String(r.client_id))).toEqual(["sess-will"]);
      } finally {
        db.close();
      }
    },
    E2E_TIMEOUT,
  );

  test(
    "[broker] session_expiry_days ends the session of a device that stays away; a connected one keeps its own",
    async () => {
      // 0.00003 days: 2.6 s, swept every second (a quarter of it, at least a second).
      const fleet = new TestFleet(
        fleetHeader("sessions-expiry", { broker: 'persistence = "libsql"\nsession_expiry_days = 0.00003' }) +
          agentType("counter", COUNTER, ["c/+/in"], { dedup: "id" }),
      );
      await fleet.start();
      const metrics = async () => parseExposition(await (await fleet.fetch("/metrics")).text());
      const stays = device(fleet, { clientId: "sess-stays", clean: false, keepalive: 600 });
      const leaves = device(fleet, { clientId: "sess-leaves", clean: false });
      try {
        await Promise.all([stays.sessionPresent, leaves.sessionPresent]);
        await stays.client.subscribeAsync(OUT, { qos: 1 });
        await leaves.client.subscribeAsync(OUT, { qos: 1 });
        await leaves.client.endAsync();
        await waitFor(
          async () => sampleValue(await metrics(), "fleet_broker_sessions_expired_total") === 1 || undefined,
          30_000,
          "the away session to expire",
        );
        // The connected one outlived several expiry periods and sweeps.
        await Bun.sleep(3_000);
        const x = await metrics();
        expect([
          sampleValue(x, "fleet_broker_sessions_expired_total"),
          sampleValue(x, "fleet_broker_sessions"),
        ]).toEqual([1, 1]);
        const db = createClient({ url: `file:${join(fleet.dataDir, "broker.db")}` });
        try {
          const subs = (await db.execute("SELECT DISTINCT client_id FROM subscriptions")).rows;
          expect(subs.map((r) => String(r.client_id))).toEqual(["sess-stays"]);
        } finally {
          db.close();
        }
        expect(fleet.logTail(200)).toContain("sessions expired");
        const back = device(fleet, { clientId: "sess-leaves", clean: false });
        expect(await back.sessionPresent).toBe(false);
        await back.client.endAsync(true);
      } finally {
        await stays.client.endAsync(true);
        await leaves.client.endAsync(true);
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );

  test(
    'with persistence = "memory" a clean = false session does not survive kill -9 (the choice is real)',
    async () => {
      const fleet = new TestFleet(toml("sessions-memory", "memory"));
      await fleet.start();
      const d1 = device(fleet, { clientId: "sess-mem", clean: false });
      await d1.sessionPresent;
      await d1.client.subscribeAsync(OUT, { qos: 1 });
      await d1.client.endAsync();
      await fleet.kill();
      await fleet.start();
      const d2 = device(fleet, { clientId: "sess-mem", clean: false });
      try {
        expect(await d2.sessionPresent).toBe(false);
      } finally {
        await d2.client.endAsync(true);
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );

  test(
    "mosquitto_sub reads the gateway's $SYS/broker/ tree: its version, and an away session as disconnected",
    async () => {
      const fleet = new TestFleet(toml("sessions-sys", "libsql", "sys_interval = 1"));
      await fleet.start();
      const away = device(fleet, { clientId: "sess-away-device", clean: false });
      await away.sessionPresent;
      await away.client.subscribeAsync(OUT, { qos: 1 });
      await away.client.endAsync();
      const sys = spawnLines([
        ...["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", String(fleet.mqttPort)],
        ...["-i", "sys-reader", "-v", "-t", "$SYS/#"],
      ]);
      try {
        await sys.until(
          (lines) => lines.includes("$SYS/broker/clients/disconnected 1"),
          30_000,
          "the away session in $SYS/broker/clients/disconnected",
        );
        const { version } = (await Bun.file(join(import.meta.dir, "..", "package.json")).json()) as { version: string };
        expect(sys.lines.filter((l) => l.startsWith("$SYS/broker/version "))).toEqual([
          expect.stringMatching(new RegExp(`^\\$SYS/broker/version agent-fleets ${version} \\(schema \\d+\\)$`)),
        ]);
        expect(sys.lines.some((l) => /^\$SYS\/broker\/uptime \d+ seconds$/.test(l))).toBe(true);
        // Counts only: aedes' own $SYS events, which name clients, are not forwarded.
        expect(sys.lines.every((l) => l.startsWith("$SYS/broker/"))).toBe(true);
        expect(sys.lines.some((l) => l.includes("sess-away-device") || l.includes("sys-reader"))).toBe(false);
      } finally {
        await sys.stop();
      }
      expect(await fleet.stop()).toBe(0);
    },
    E2E_TIMEOUT,
  );
});
