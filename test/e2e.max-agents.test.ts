/**
 * `agents.<type>.max_agents` against a real gateway process: agents created on demand (a device
 * topic or inbox with a new key, a send to a new key, an HTTP stimulus) stop at the cap, and the
 * stimulus that would create one more is refused the way a full queue's is. Instances count; the
 * count survives a restart; retiring an agent frees a place; a reload raising the cap lets new
 * ones in, and one lowering it retires none.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  ROOT,
  RawMqtt,
  TestFleet,
  cleanupAll,
  connectMqtt,
  publishPacket,
  publishQos1,
  waitFor,
} from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, counterType, fleetHeader, q } from "./helpers/toml.ts";

/** The fleet with `meter` capped at `max` (one instance, i1) and `relay/<key>` sending to `meter/s1`. */
const toml = (max: number) =>
  fleetHeader("e2e-max-agents") +
  counterType("meter", "m/+/in", { instances: ["i1"], extra: `max_agents = ${max}\n` }) +
  agentType("relay", join(ROOT, "test/fixtures/sources/relay.ts"), ["r/+/go"], {
    extra: `tools = ["send"]\nconfig = { to = ${q("meter/s1")} }\n`,
  });

let fleet: TestFleet;

beforeAll(async () => {
  fleet = new TestFleet(toml(3));
  await fleet.start();
}, 60_000);

afterAll(async () => {
  await fleet?.dispose();
  await cleanupAll();
}, 60_000);

/** Agent rows of `meter`, retired ones too. */
async function meters(): Promise<string[]> {
  const rows = await fleet.query<{ id: string }>("SELECT id FROM agents WHERE type = 'meter' ORDER BY id");
  return rows.map((r) => r.id);
}

/** A QoS 1 publish on a connection of its own: whether the broker acknowledged it (else it closed the connection). */
async function acked(topic: string, id: string): Promise<boolean> {
  const raw = await RawMqtt.connect(fleet.mqttPort, `max-agents-${id}`);
  try {
    raw.write(publishPacket(topic, JSON.stringify({ id }), 1));
    await raw.until(() => raw.pubacked || raw.closed, 10_000, "a PUBACK or the connection closed");
    return raw.pubacked;
  } finally {
    raw.destroy();
  }
}

/** Edit fleet.toml and wait until the running gateway applied it. */
async function reload(text: string): Promise<void> {
  const version = async () =>
    ((await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string }).spec_version;
  const before = await version();
  writeFileSync(fleet.configPath, text);
  process.kill(fleet.pid, "SIGHUP");
  await waitFor(async () => (await version()) !== before, 15_000, "the reload");
}

describe("max_agents", () => {
  test("new keys create agents up to the cap, instances counted; the next device publish gets no PUBACK", async () => {
    const client = await connectMqtt(fleet.mqttPort);
    try {
      await publishQos1(client, "m/d1/in", { id: "d1-1" });
      await publishQos1(client, "m/d2/in", { id: "d2-1" });
    } finally {
      client.end(true);
    }
    expect(await meters()).toEqual(["meter/d1", "meter/d2", "meter/i1"]);
    expect(await acked("m/d3/in", "d3-1")).toBe(false);
    expect(await meters()).toEqual(["meter/d1", "meter/d2", "meter/i1"]);
    // Agents that exist still take stimuli.
    expect(await acked("m/d1/in", "d1-2")).toBe(true);
    await fleet.waitCommitted("meter/d1", 2);
  }, 60_000);

  test("a new agent's HTTP stimulus is 429 max_agents; a send to one is denied in the sender's episode", async () => {
    const res = await fleet.fetch("/api/agents/meter/h1/stimuli", { method: "POST", body: '{"id":"h1"}' });
    expect(res.status).toBe(429);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("max_agents");

    const client = await connectMqtt(fleet.mqttPort);
    try {
      await publishQos1(client, "r/x/go", { id: "go-1" });
    } finally {
      client.end(true);
    }
    const [episode] = await fleet.waitCommitted("relay/x", 1);
    expect(await fleet.decisions(episode!.id)).toEqual([
      expect.objectContaining({
        name: "send_denied",
        data: { to: "meter/s1", reason: expect.stringContaining("max_agents (3)") },
      }),
    ]);
    expect(await meters()).toEqual(["meter/d1", "meter/d2", "meter/i1"]);

    const x = await scrape(fleet.httpUrl);
    expect(sampleValue(x, "fleet_agents_refused_total", { type: "meter" })).toBe(3);
    expect(sampleValue(x, "fleet_agents_refused_total", { type: "relay" })).toBe(0);
    // Three refusals within a minute: one log line.
    const lines = readFileSync(fleet.logPath, "utf8").split("\n");
    expect(lines.filter((l) => l.includes("more agents of type meter than max_agents (3)"))).toHaveLength(1);
  }, 60_000);

  test("the count survives a restart; retiring an agent frees a place", async () => {
    expect(await fleet.stop()).toBe(0);
    await fleet.start();
    expect(await acked("m/d3/in", "d3-2")).toBe(false);
    expect((await fleet.cli("retire", "meter/d2")).code).toBe(0);
    expect(await acked("m/d3/in", "d3-3")).toBe(true);
    expect(await acked("m/d4/in", "d4-1")).toBe(false);
    expect(await meters()).toEqual(["meter/d1", "meter/d2", "meter/d3", "meter/i1"]);
  }, 90_000);

  test("a reload raising the cap lets new agents in; lowering it retires none and admits no new one", async () => {
    await reload(toml(4));
    expect(await acked("m/d4/in", "d4-2")).toBe(true);
    expect(await acked("m/d5/in", "d5-1")).toBe(false);

    await reload(toml(1));
    const rows = await fleet.query<{ id: string; status: string }>(
      "SELECT id, status FROM agents WHERE type = 'meter' AND status != 'retired' ORDER BY id",
    );
    expect(rows.map((r) => r.id)).toEqual(["meter/d1", "meter/d3", "meter/d4", "meter/i1"]);
    expect(await acked("m/d4/in", "d4-3")).toBe(true);
    expect(await acked("m/d5/in", "d5-2")).toBe(false);
  }, 60_000);
});
