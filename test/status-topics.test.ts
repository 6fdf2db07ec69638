/**
 * The retained fleet summary on `fleet/health`: published each tick, and skipped without a
 * warning while the gateway's connection to an external broker is down (at start it is not up
 * yet; the next tick publishes). Failed episodes on `fleet/episodes`.
 */
import { describe, expect, test } from "bun:test";
import pino from "pino";
import type { Broker, BrokerStats } from "../broker/index.ts";
import { FleetEvents } from "../gateway/events.ts";
import { publishFacts, publishHealth } from "../gateway/observe/index.ts";

function fakeBroker(external: BrokerStats["external"] | undefined) {
  const published: string[] = [];
  const broker = {
    stats: () => ({ external }),
    publish: async (topic: string) => {
      if (external && !external.connected) throw new Error("not connected");
      published.push(topic);
    },
  } as unknown as Broker;
  return { broker, published };
}

function logged() {
  const lines: { level: number; msg: string }[] = [];
  return { lines, log: pino({ level: "debug" }, { write: (l: string) => void lines.push(JSON.parse(l)) }) };
}

const external = (connected: boolean) => ({
  url: "mqtt://b",
  connected,
  reconnects: 0,
  withheld: 0,
  staleRetained: 0,
  disconnectedSince: connected ? null : 1,
  takenOver: false,
});

describe("fleet/health", () => {
  test("is published retained each tick by the embedded broker and a connected external one", async () => {
    for (const ext of [undefined, external(true)]) {
      const { broker, published } = fakeBroker(ext);
      const { lines, log } = logged();
      await publishHealth(broker, async () => ({ ok: true }), log);
      expect(published).toEqual(["fleet/health"]);
      expect(lines).toEqual([]);
    }
  });

  test("a shard publishes it on fleet/health and on its own fleet/health/<i>-of-<N>, no sibling's", async () => {
    const { broker, published } = fakeBroker(external(true));
    const { log } = logged();
    await publishHealth(broker, async () => ({ ok: true }), log, { index: 2, count: 3 });
    expect(published).toEqual(["fleet/health", "fleet/health/2-of-3"]);
  });

  test("is skipped, with no warning, while the external broker is not connected", async () => {
    const { broker, published } = fakeBroker(external(false));
    const { lines, log } = logged();
    await publishHealth(broker, async () => ({ ok: true }), log);
    expect(published).toEqual([]);
    expect(lines).toEqual([]);
  });
});

describe("fleet/episodes", () => {
  test("carries every failed attempt, the one that quarantined the stimulus too, marked quarantined", async () => {
    const events = new FleetEvents();
    const published: { topic: string; body: Record<string, unknown> }[] = [];
    const broker = {
      publish: async (topic: string, payload: string) => void published.push({ topic, body: JSON.parse(payload) }),
    } as unknown as Broker;
    publishFacts(events, () => broker);
    const episode = (n: number, status: "committed" | "failed", quarantined: boolean) =>
      events.emit("episode", {
        episode: `ep-${n}`,
        agent: "w/q",
        type: "w",
        stimulus: "s-1",
        status,
        ...(status === "failed" ? { kind: "threw" } : {}),
        checkpoint: null,
        ms: 12.4,
        waitMs: 0,
        quarantined,
      });
    episode(1, "failed", false);
    episode(2, "failed", true);
    // A committed episode's summary rides its outbox (episode/executor.ts), not this listener.
    episode(3, "committed", false);
    expect(published).toEqual([
      {
        topic: "fleet/episodes",
        body: {
          episode: "ep-1",
          agent: "w/q",
          stimulus: "s-1",
          status: "failed",
          kind: "threw",
          checkpoint: null,
          ms: 12,
          quarantined: false,
        },
      },
      { topic: "fleet/episodes", body: expect.objectContaining({ episode: "ep-2", quarantined: true }) },
    ]);
  });
});
