/**
 * The retained fleet summary on `fleet/health`: published each tick, and skipped without a
 * warning while the gateway's connection to an external broker is down (at start it is not up
 * yet; the next tick publishes).
 */
import { describe, expect, test } from "bun:test";
import pino from "pino";
import type { Broker, BrokerStats } from "../broker/index.ts";
import { publishHealth } from "../gateway/observe/index.ts";

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

  test("is skipped, with no warning, while the external broker is not connected", async () => {
    const { broker, published } = fakeBroker(external(false));
    const { lines, log } = logged();
    await publishHealth(broker, async () => ({ ok: true }), log);
    expect(published).toEqual([]);
    expect(lines).toEqual([]);
  });
});
