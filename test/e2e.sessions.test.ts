/**
 * Durable broker sessions end to end (issue 12): the real gateway process, real
 * mosquitto_sub and mqtt.js clients with clean session = false. Outputs produced while a
 * device is away reach it after a `kill -9` of the gateway; its subscriptions survive a
 * graceful restart. With `[broker] persistence = "memory"` the session is gone after a restart.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { connect, type IClientOptions, type MqttClient } from "mqtt";
import { TestFleet, cleanupAll, fixture, publishQos1, spawnLines, waitFor, within } from "./helpers/gateway.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const E2E_TIMEOUT = 180_000;
const COUNTER = fixture("counter");
const OUT = "fleet/agents/counter/+/out";

afterAll(() => cleanupAll(), 60_000);

const toml = (name: string, persistence: "libsql" | "memory" = "libsql"): string =>
  fleetHeader(name, { broker: `persistence = "${persistence}"` }) +
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
});
