/**
 * An agent's episodes filter by stimulus kind as well as status, in the API (`?kind=`) and the
 * CLI (`fleet episodes --kind --status`): a watcher whose timer fires every second still shows
 * its two device readings when asked for `mqtt`. Bad values are refused with the allowed list.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { cleanupAll, fixture, publishQos1, runCli, TestFleet } from "./helpers/gateway.ts";
import { agentType, fleetHeader, throwerType } from "./helpers/toml.ts";

const TOML =
  fleetHeader("filters") +
  agentType("watch", fixture("counter"), ["dev/+/in"], {
    dedup: "id",
    instances: ["d1"],
    extra: 'every = "1s"\n[agents.watch.budget]\nepisodes_per_hour = 1000000\n',
  }) +
  throwerType("bad/+/in");

let fleet: TestFleet;
const api = async (path: string) => {
  const res = await fleet.fetch(path);
  return { status: res.status, body: (await res.json()) as any };
};

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  await fleet.waitCommitted("watch/d1", 4); // timer fires first
  const client = await fleet.mqtt();
  await publishQos1(client, "dev/d1/in", { id: "m1", v: 1 });
  await publishQos1(client, "dev/d1/in", { id: "m2", v: 2 });
  await publishQos1(client, "bad/v1/in", { id: "b1" });
  const manual = await fleet.fetch("/api/agents/thrower/v1/stimuli", { method: "POST", body: '{"by":"hand"}' });
  expect(manual.status).toBe(202);
  await fleet.waitEpisodes(
    "watch/d1",
    (eps) => eps.filter((e) => e.stimulus.startsWith("id:m")).length === 2,
    30_000,
    "both device readings of watch/d1",
  );
  await fleet.waitEpisodes("thrower/v1", (eps) => eps.length === 2, 30_000, "both thrower failures");
}, 90_000);
afterAll(cleanupAll);

describe("GET /api/agents/<t>/<k>/episodes?kind=", () => {
  test("timer fires do not bury device readings: kind=mqtt lists only the two readings", async () => {
    const all = await api("/api/agents/watch/d1/episodes?limit=1000");
    expect(all.body.episodes.filter((e: any) => e.kind === "timer").length).toBeGreaterThanOrEqual(4);
    const r = await api("/api/agents/watch/d1/episodes?kind=mqtt");
    expect(r.status).toBe(200);
    expect(r.body.episodes.map((e: any) => [e.kind, e.stimulus])).toEqual([
      ["mqtt", "id:m2"],
      ["mqtt", "id:m1"],
    ]);
    const timers = await api("/api/agents/watch/d1/episodes?kind=timer&limit=2");
    expect(timers.body.episodes).toHaveLength(2);
    expect(timers.body.episodes.every((e: any) => e.kind === "timer" && e.stimulus.startsWith("timer:"))).toBe(true);
    expect(timers.body.next_before).toBe(timers.body.episodes[1].started_at);
  });

  test("kind and status combine", async () => {
    const failedManual = await api("/api/agents/thrower/v1/episodes?kind=manual&status=failed");
    expect(failedManual.body.episodes.map((e: any) => [e.kind, e.status])).toEqual([["manual", "failed"]]);
    const failedMqtt = await api("/api/agents/thrower/v1/episodes?kind=mqtt&status=failed");
    expect(failedMqtt.body.episodes.map((e: any) => e.stimulus)).toEqual(["id:b1"]);
    const none = await api("/api/agents/watch/d1/episodes?kind=timer&status=failed");
    expect(none.body.episodes).toEqual([]);
    const wake = await api("/api/agents/watch/d1/episodes?kind=wake");
    expect(wake.status).toBe(200);
    expect(wake.body.episodes).toEqual([]);
  });

  test("an unknown kind is a 400 that lists the kinds; cron and send say what they are filed under", async () => {
    const bad = await api("/api/agents/watch/d1/episodes?kind=device");
    expect(bad.status).toBe(400);
    expect(bad.body.error).toEqual({
      code: "bad_query",
      message: 'kind must be one of mqtt, timer, webhook, inbox, manual, wake; got "device"',
    });
    expect((await api("/api/agents/watch/d1/episodes?kind=cron")).body.error.message).toContain(
      "(cron fires are kind timer)",
    );
    expect((await api("/api/agents/watch/d1/episodes?kind=send")).body.error.message).toContain(
      "(ctx.send messages are inbox)",
    );
    const status = await api("/api/agents/watch/d1/episodes?status=running");
    expect(status.status).toBe(400);
    expect(status.body.error.message).toBe('status must be committed or failed, got "running"');
  });
});

describe("fleet episodes --kind --status", () => {
  test("--kind mqtt lists the readings; --kind timer --status failed none", async () => {
    const r = await fleet.cli("episodes", "watch/d1", "--kind", "mqtt");
    expect(r.code).toBe(0);
    expect(r.json.episodes.map((e: any) => e.stimulus)).toEqual(["id:m2", "id:m1"]);
    const failed = await fleet.cli("episodes", "watch/d1", "--kind", "timer", "--status", "failed");
    expect(failed.code).toBe(0);
    expect(failed.json.episodes).toEqual([]);
    const thrower = await fleet.cli("episodes", "thrower/v1", "--kind", "manual", "--status", "failed");
    expect(thrower.json.episodes).toHaveLength(1);
  });

  test("the human table has a kind column and says how to page on", async () => {
    const r = await runCli(["episodes", "watch/d1", "--kind", "timer", "--limit", "1", "--data-dir", fleet.dataDir]);
    expect(r.code).toBe(0);
    const [head, row, more] = r.stdout.trim().split("\n");
    expect(head).toMatch(/^ID\s+KIND\s+STATUS/);
    expect(row).toContain(" timer ");
    expect(more).toMatch(/^more: --before \d+$/);
  });

  test("a bad --kind or --status is a usage error (exit 2) naming the allowed values", async () => {
    const kind = await fleet.cli("episodes", "watch/d1", "--kind", "cron");
    expect(kind.code).toBe(2);
    expect(kind.stderr).toContain(
      'fleet: --kind must be one of mqtt, timer, webhook, inbox, manual, wake; got "cron" (cron fires are kind timer)',
    );
    const status = await fleet.cli("episodes", "watch/d1", "--status", "done");
    expect(status.code).toBe(2);
    expect(status.stderr).toContain('--status must be committed or failed, got "done"');
    const central = await fleet.cli("episodes", "watch/d1", "--kind", "mqtt", "--central", "http://127.0.0.1:9");
    expect(central.code).toBe(2);
    expect(central.stderr).toContain("--kind and --status filter local episodes only");
  });
});
