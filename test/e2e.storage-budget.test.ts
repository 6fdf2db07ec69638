/**
 * `bytes_per_day` end to end (docs/fleet-toml.md `[agents.<type>.budget]`): what an agent's episodes
 * store in fleet.db (event log, checkpoint state, outputs) is booked in its day window with each
 * commit; past the budget the agent pauses like for tokens_per_day, the episode that crossed it
 * committed whole, and a reload that raises the budget releases it. Tester F filled a 120 MB disk
 * in a minute with three agents' ctx.log lines, which stopped the whole gateway.
 * Real gateway process, real MQTT clients, real episode subprocesses, real libSQL file.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import type { MqttClient } from "mqtt";
import { cleanupAll, publishQos1, subscribe, TestFleet, waitFor, type Subscription } from "./helpers/gateway.ts";
import { agentBlock, fleetHeader, policyAgent } from "./helpers/policy.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";

afterAll(() => cleanupAll(), 60_000);

/** Bytes of one episode's ctx.log lines alone: 60 lines of 1,000 characters. */
const LINES = 60;
const LEN = 1000;
const BUDGET = 100_000;

describe("bytes_per_day: an agent that stores too much pauses, the fleet keeps running", () => {
  let fleet: TestFleet;
  let client: MqttClient;
  let outs: Subscription;
  let summaries: Subscription;

  /** The agent as `fleet agents --json` shows it. */
  const agentRow = async (id: string) => {
    const a = await fleet.agent(id);
    if (!a) throw new Error(`no agent ${id}`);
    return a as unknown as { status: string; reason: string | null; paused_until: number | null };
  };
  const flood = (agent: string, id: string) => publishQos1(client, `${agent}/in`, { id, lines: LINES, len: LEN });
  const dayWindow = () => `d:${Math.floor(Date.now() / 86_400_000)}`;
  const ledgerBytes = async (agent: string) =>
    (
      await fleet.query<{ bytes: number }>(`SELECT bytes FROM budget_usage WHERE agent = ? AND "window" = ?`, [
        agent,
        dayWindow(),
      ])
    )[0]?.bytes ?? 0;

  beforeAll(async () => {
    fleet = new TestFleet(
      fleetHeader("e2e-storage-budget") +
        agentBlock("hog", policyAgent("logger"), { budget: { bytes_per_day: BUDGET } }) +
        agentBlock("calm", policyAgent("logger")),
    );
    await fleet.start();
    client = await fleet.mqtt();
    outs = await subscribe(client, "fleet/agents/+/+/out");
    summaries = await subscribe(client, "fleet/episodes");
  }, 120_000);

  afterAll(async () => {
    await fleet?.dispose();
  }, 60_000);

  test("the episode that crosses the budget commits whole; the next waits, paused with the reason", async () => {
    for (const id of ["b1", "b2", "b3"]) await flood("hog/a", id);
    const a = await waitFor(
      async () => {
        const r = await agentRow("hog/a");
        return r.status === "paused" ? r : undefined;
      },
      30_000,
      "hog/a paused",
    );
    expect(a.reason).toBe(`budget bytes_per_day (${BUDGET}) reached`);
    expect(a.paused_until).toBe((Math.floor(Date.now() / 86_400_000) + 1) * 86_400_000);
    // ~61 KB an episode: the first is under 100,000, the second crosses it and still commits with all its lines.
    const committed = await fleet.waitCommitted("hog/a", 2);
    expect(committed).toHaveLength(2);
    const logs = await fleet.query<{ lines: number }>(
      `SELECT (SELECT count(*) FROM json_each(json(log)) WHERE value ->> 'k' = 'log') AS lines FROM episodes
        WHERE agent = 'hog/a'`,
    );
    expect(logs.map((l) => l.lines)).toEqual([LINES, LINES]);
    expect(
      await fleet.query("SELECT sid FROM stimuli WHERE agent = 'hog/a' AND state = 'queued' ORDER BY seq"),
    ).toEqual([{ sid: "id:b3" }]);

    // Another agent of the fleet is untouched: it runs under the default budget.
    await flood("calm/a", "c1");
    await fleet.waitCommitted("calm/a", 1);
  }, 60_000);

  test("the bytes booked are what the commits stored: event logs, checkpoint states and outputs", async () => {
    const episodes = await fleet.query<{ id: string; log: number }>(
      `SELECT lower(hex(id)) AS id, length(CAST(json(log) AS BLOB)) AS log FROM episodes WHERE agent = 'hog/a'`,
    );
    const states = await fleet.query<{ n: number }>(
      "SELECT sum(length(CAST(state AS BLOB))) AS n FROM checkpoints WHERE agent = 'hog/a'",
    );
    const ids = (await fleet.waitCommitted("hog/a", 2)).map((e) => e.id);
    // The outbox rows are gone once delivered: their payloads are what subscribers got.
    const mine = (m: { json: any }) => ids.includes(m.json?.episode);
    await summaries.until((ms) => ms.filter(mine).length === 2, 10_000, "both episode summaries");
    await outs.until((ms) => ms.filter(mine).length === 2, 10_000, "both outputs");
    const payloads = [...summaries.messages, ...outs.messages].filter(mine).reduce((n, m) => n + m.payload.length, 0);
    const logs = episodes.reduce((n, e) => n + e.log, 0);
    expect(logs).toBeGreaterThan(2 * LINES * LEN);
    expect(await ledgerBytes("hog/a")).toBe(logs + Number(states[0]!.n) + payloads);

    // Reported as the other budgets are: fleet/health (and /api/fleet) per type, /metrics use, ratio and limit.
    const booked = (await ledgerBytes("hog/a")) + (await ledgerBytes("calm/a"));
    const hog = await waitFor(
      async () => {
        const r = await fleet.fetch("/api/fleet");
        const types = ((await r.json()) as { types: Record<string, { bytes_day: number; budget_burn: number }> }).types;
        return types.hog!.bytes_day + types.calm!.bytes_day === booked ? types.hog : undefined;
      },
      10_000,
      "/api/fleet bytes_day",
    );
    expect(hog.bytes_day).toBe(await ledgerBytes("hog/a"));
    expect(hog.budget_burn).toBeGreaterThanOrEqual(1);
    const x = await scrape(fleet.httpUrl);
    expect(sampleValue(x, "fleet_budget_bytes_day_used", { type: "hog" })).toBe(hog.bytes_day);
    expect(sampleValue(x, "fleet_budget_max_ratio", { type: "hog", budget: "bytes_per_day" })).toBeCloseTo(
      hog.bytes_day / BUDGET,
      5,
    );
    expect(sampleValue(x, "fleet_budget_limit", { type: "hog", budget: "bytes_per_day" })).toBe(BUDGET);
    // The type that sets none gets the default: 256 MiB a day.
    expect(sampleValue(x, "fleet_budget_limit", { type: "calm", budget: "bytes_per_day" })).toBe(268_435_456);
  }, 60_000);

  test("a reload that raises bytes_per_day releases the agent at once", async () => {
    const text = readFileSync(fleet.configPath, "utf8");
    expect(text).toContain(`bytes_per_day = ${BUDGET}`);
    writeFileSync(fleet.configPath, text.replace(`bytes_per_day = ${BUDGET}`, `bytes_per_day = ${BUDGET * 10}`));
    await fleet.waitCommitted("hog/a", 3, 20_000);
    const a = await agentRow("hog/a");
    expect(a.status).toBe("idle");
    expect(a.reason).toBeNull();
    expect(fleet.logTail(400)).toContain("budget raised");
  }, 60_000);
});
