/**
 * `/metrics` (docs/http-api.md) and the matching `fleet/health` summary, against an in-process
 * gateway running real episode subprocesses: the exposition parses strictly, counters move
 * with real episodes, and series are per agent *type*: 10,000 agents add none.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Gateway } from "../gateway/gateway.ts";
import { agentId, type AgentId } from "../gateway/types.ts";
import {
  FleetMetrics,
  type MetricsHost,
  publishFacts,
  republishStatuses,
  RollingCounts,
} from "../gateway/observe/index.ts";
import type { Broker } from "../broker/index.ts";
import { FleetEvents } from "../gateway/events.ts";
import { authed, connectMqtt, publishQos1, subscribe, TestFleet, waitFor } from "./helpers/gateway.ts";
import { parseExposition, sampleValue, samplesOf, scrape, type Exposition } from "./helpers/prom.ts";
import { counterType, fleetHeader, throwerType } from "./helpers/toml.ts";
import { apiOf, inProcessGateway } from "./helpers/in-process.ts";

const TOML =
  fleetHeader("metrics-test") +
  counterType("counter", "m/+/in", { extra: "\n[agents.counter.budget]\nepisodes_per_hour = 100\n" }) +
  throwerType("t/+/in");

/** Metric families /metrics must carry, by name. */
const REQUIRED: Record<string, string> = {
  fleet_episodes_total: "counter",
  fleet_episode_duration_seconds: "histogram",
  fleet_episode_starts_total: "counter",
  fleet_stimulus_wait_seconds: "histogram",
  fleet_stimuli_total: "counter",
  fleet_dedup_hits_total: "counter",
  fleet_queue_depth: "gauge",
  fleet_queue_oldest_age_seconds: "gauge",
  fleet_type_queue_depth: "gauge",
  fleet_budget_episodes_hour_used: "gauge",
  fleet_budget_max_ratio: "gauge",
  fleet_agents: "gauge",
  fleet_broker_clients: "gauge",
  fleet_broker_messages_in_total: "counter",
  fleet_broker_messages_out_total: "counter",
  fleet_broker_offline_dropped_total: "counter",
  fleet_broker_offline_queued_messages: "gauge",
  fleet_broker_offline_queued_bytes: "gauge",
  fleet_broker_bytes_received_total: "counter",
  fleet_broker_bytes_sent_total: "counter",
  fleet_broker_retained_messages: "gauge",
  fleet_broker_subscriptions: "gauge",
  fleet_broker_sessions: "gauge",
  fleet_broker_sessions_expired_total: "counter",
  fleet_broker_oversized_packets_total: "counter",
  fleet_broker_logins_refused_total: "counter",
  fleet_broker_logins_busy_total: "counter",
  fleet_db_commit_seconds: "histogram",
  fleet_retention_collected_total: "counter",
  fleet_retention_round_seconds: "histogram",
  fleet_retention_behind: "gauge",
  fleet_subprocesses_alive: "gauge",
  fleet_episode_slots: "gauge",
  fleet_episodes_paced: "gauge",
  process_cpu_seconds_total: "counter",
  process_resident_memory_bytes: "gauge",
};

let dir: string;
let gw: Gateway;
let base: string;
let token: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-metrics-"));
  writeFileSync(join(dir, "fleet.toml"), TOML);
  // Budget gauges read the current hour's window: run the gateway on a clock that starts a
  // minute into an hour, so a suite that happens to run across hh:00 still sees one window.
  const began = Date.now();
  const hourStart = Math.floor(began / 3_600_000) * 3_600_000 + 60_000;
  const now = () => hourStart + (Date.now() - began);
  gw = inProcessGateway(join(dir, "fleet.toml"), join(dir, "data"), { healthIntervalMs: 250, now });
  await gw.start();
  ({ base, token } = apiOf(gw, join(dir, "data")));
});

afterAll(async () => {
  await gw?.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function send(topic: string, payload: unknown): Promise<Response> {
  return fetch(`${base}/api/send`, authed(token, { method: "POST", body: JSON.stringify({ topic, payload }) }));
}

/** Scrape until `probe` holds (the DB-backed gauges are cached for a second). */
async function scrapeUntil(
  probe: (x: Exposition) => boolean,
  what: string,
  timeoutMs = 20_000,
): Promise<Exposition & { text: string }> {
  return waitFor(
    async () => {
      const x = await scrape(base);
      return probe(x) ? x : undefined;
    },
    timeoutMs,
    what,
    100,
  );
}

describe("/metrics", () => {
  test("a fresh gateway exposes every required family, typed, in valid exposition text", async () => {
    const res = await fetch(`${base}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/plain");
    const x = parseExposition(await res.text());
    for (const [name, type] of Object.entries(REQUIRED)) {
      expect({ name, type: x.types.get(name) }).toEqual({ name, type });
      expect(x.help.get(name)?.length ?? 0).toBeGreaterThan(0);
    }
    expect(sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" })).toBe(0);
    expect(sampleValue(x, "fleet_agents", { type: "counter", status: "idle" })).toBe(0);
    // No [replication]: no fleet_replication_* series (an `_up 0` would fire the center-down alert).
    expect([...x.types.keys()].filter((name) => name.startsWith("fleet_replication_"))).toEqual([]);
  }, 60_000);

  test("episode, intake, dedup, failure, budget and commit-latency metrics move with real episodes", async () => {
    const before = await scrape(base);
    const commitsBefore = sampleValue(before, "fleet_db_commit_seconds_count") ?? 0;

    for (const [i, key] of ["a", "b", "c"].entries())
      expect((await send(`m/${key}/in`, { id: `s${i}`, v: i })).status).toBe(202);
    expect((await send("m/a/in", { id: "s0", v: 0 })).status).toBe(200); // duplicate
    const mqtt = await connectMqtt(gw.broker.port);
    try {
      await publishQos1(mqtt, "m/a/in", { id: "mq1", v: 9 });
      expect((await send("t/x/in", { id: "boom" })).status).toBe(202);

      const x = await scrapeUntil(
        (x) =>
          sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" }) === 4 &&
          sampleValue(x, "fleet_episodes_total", { type: "thrower", outcome: "failed" }) === 1,
        "4 committed counter episodes and 1 failed thrower episode in /metrics",
      );
      expect(sampleValue(x, "fleet_episode_duration_seconds_count", { type: "counter" })).toBe(4);
      expect(sampleValue(x, "fleet_episode_duration_seconds_sum", { type: "counter" })).toBeGreaterThan(0);
      expect(sampleValue(x, "fleet_episode_duration_seconds_bucket", { type: "counter", le: "+Inf" })).toBe(4);
      // Every stimulus, committed or quarantined, records once how long it waited for its episode.
      expect(sampleValue(x, "fleet_stimulus_wait_seconds_count", { type: "counter" })).toBe(4);
      expect(sampleValue(x, "fleet_stimulus_wait_seconds_count", { type: "thrower" })).toBe(1);
      // Every episode's process started one way or the other: a warm spare or spawned for it.
      const started = (start: string) => sampleValue(x, "fleet_episode_starts_total", { type: "counter", start }) ?? 0;
      expect(started("warm") + started("cold")).toBe(4);
      expect(sampleValue(x, "fleet_episode_failures_total", { type: "thrower", kind: "threw" })).toBe(1);
      expect(sampleValue(x, "fleet_stimuli_quarantined_total", { type: "thrower" })).toBe(1);
      expect(sampleValue(x, "fleet_stimuli_total", { source: "manual" })).toBe(4);
      expect(sampleValue(x, "fleet_stimuli_total", { source: "mqtt" })).toBe(1);
      expect(sampleValue(x, "fleet_dedup_hits_total", { source: "manual", type: "counter" })).toBe(1);
      expect(sampleValue(x, "fleet_db_commit_seconds_count")).toBeGreaterThan(commitsBefore);
      expect(sampleValue(x, "fleet_broker_messages_in_total")).toBeGreaterThanOrEqual(1);
      expect(sampleValue(x, "fleet_broker_clients")).toBe(1);

      // Gauges from a snapshot cached up to a second, whose parts are read a moment apart (the queue book at once,
      // the store's aggregates after): one taken as the fourth episode committed can count its budget use and
      // still its stimulus as queued.
      const g = await scrapeUntil(
        (x) =>
          sampleValue(x, "fleet_budget_episodes_hour_used", { type: "counter" }) === 4 &&
          sampleValue(x, "fleet_queue_depth") === 0,
        "budget use of 4 counter episodes, and none queued",
      );
      expect(sampleValue(g, "fleet_agents", { type: "counter", status: "idle" })).toBe(3);
      expect(sampleValue(g, "fleet_agents", { type: "thrower", status: "idle" })).toBe(1);
      // Agent a ran 2 of its 100 episodes this hour: the type's closest agent is at 2%.
      expect(sampleValue(g, "fleet_budget_max_ratio", { type: "counter", budget: "episodes_per_hour" })).toBeCloseTo(
        0.02,
        5,
      );
      expect(sampleValue(g, "fleet_budget_limit", { type: "counter", budget: "episodes_per_hour" })).toBe(100);
      expect(sampleValue(g, "fleet_queue_depth")).toBe(0);
      expect(sampleValue(g, "fleet_queue_oldest_age_seconds")).toBe(0);
      expect(sampleValue(g, "fleet_subprocesses_alive")).toBe(0);
      // No intake burst: every slot of max_concurrent_episodes (default 4).
      expect(sampleValue(g, "fleet_episode_slots")).toBe(4);
      expect(sampleValue(g, "fleet_episodes_paced")).toBe(0);
    } finally {
      await mqtt.endAsync();
    }
  }, 60_000);

  test("a paused agent's waiting stimuli show as queue depth and lag, and their wait once they run", async () => {
    const waits = (x: Exposition, le: string) =>
      sampleValue(x, "fleet_stimulus_wait_seconds_bucket", { type: "counter", le }) ?? 0;
    const before = await scrape(base);
    expect((await fetch(`${base}/api/agents/counter/b/pause`, authed(token, { method: "POST" }))).status).toBe(200);
    expect((await send("m/b/in", { id: "while-paused" })).status).toBe(202);
    const recordedBy = Date.now();
    // The queue's depth is counted live; agents by status come from a snapshot of the store reused for up to a
    // second (snapshotTtlMs): on a busy box a scrape can show the queued stimulus before the pause.
    const x = await scrapeUntil(
      (x) =>
        sampleValue(x, "fleet_type_queue_depth", { type: "counter" }) === 1 &&
        sampleValue(x, "fleet_agents", { type: "counter", status: "paused" }) === 1,
      "1 queued counter stimulus, its agent paused",
    );
    expect(sampleValue(x, "fleet_queue_depth")).toBe(1);
    expect(sampleValue(x, "fleet_type_queue_depth", { type: "thrower" })).toBe(0);
    await scrapeUntil((x) => (sampleValue(x, "fleet_queue_oldest_age_seconds") ?? 0) > 0, "a growing lag");
    await Bun.sleep(Math.max(0, recordedBy + 1100 - Date.now()));

    const heldMs = Date.now() - recordedBy;
    expect((await fetch(`${base}/api/agents/counter/b/resume`, authed(token, { method: "POST" }))).status).toBe(200);
    const after = await scrapeUntil(
      (x) =>
        sampleValue(x, "fleet_queue_depth") === 0 &&
        sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" }) === 5,
      "the queue drained after resume",
    );
    // Its one episode observed a wait of at least the time the pause held it: over a second.
    expect(waits(after, "+Inf") - waits(before, "+Inf")).toBe(1);
    expect(waits(after, "1") - waits(before, "1")).toBe(0);
    const sum = (x: Exposition) => sampleValue(x, "fleet_stimulus_wait_seconds_sum", { type: "counter" }) ?? 0;
    expect(sum(after) - sum(before)).toBeGreaterThanOrEqual(heldMs / 1000 - 0.001);
  }, 60_000);

  test("fleet/health carries the same counts, rates, lag and budget burn as /metrics", async () => {
    const mqtt = await connectMqtt(gw.broker.port);
    try {
      const sub = await subscribe(mqtt, "fleet/health");
      // Rates are live; the per-type part comes from the store snapshot (up to a second old):
      // wait for a tick whose snapshot has seen all 5 counter episodes.
      const msg = await sub.next(
        (m) => m.json?.rates?.episodes >= 6 && m.json?.types?.counter?.episodes_hour === 5,
        10_000,
        "a fleet/health with the last minute's 6 episodes",
      );
      const h = msg.json;
      const x = await scrapeUntil(
        (x) => sampleValue(x, "fleet_budget_episodes_hour_used", { type: "counter" }) === 5,
        "/metrics with the same snapshot",
      );
      expect(h.rates.episodes).toBe(
        (sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" }) ?? 0) +
          (sampleValue(x, "fleet_episodes_total", { type: "thrower", outcome: "failed" }) ?? 0),
      );
      expect(h.rates.failures).toBe(1);
      expect(h.rates.failure_ratio).toBeCloseTo(1 / 6, 3);
      expect(h.rates.episodes_per_min).toBe(6);
      expect(h.types.counter.episodes_hour).toBe(
        sampleValue(x, "fleet_budget_episodes_hour_used", { type: "counter" }),
      );
      expect(h.types.counter.agents).toEqual({ idle: 3, paused: 0, draining: 0, failed: 0, retired: 0 });
      expect(h.budget_burn).toBeCloseTo(0.02, 3); // agents a and b: 2 of their 100 episodes this hour
      expect(h.lag_ms).toBe(0);
      expect(h.queued_stimuli).toBe(0);
      // When it was made: a retained copy's age (fleet reshard --create-sessions reads it).
      expect(Math.abs(h.at - Date.now())).toBeLessThan(60_000);
      expect(typeof h.db.commits).toBe("number");
      expect(h.subprocesses).toBe(0);
      await sub.close();
    } finally {
      await mqtt.endAsync();
    }
  }, 60_000);

  test("10,000 agents add no series: labels carry types, never keys", async () => {
    const fleetSeries = (x: Exposition) => x.samples.filter((s) => s.name.startsWith("fleet_")).length;
    const before = await scrape(base);

    const list: { id: AgentId; type: string; key: string }[] = [];
    for (let i = 0; i < 10_000; i++) {
      const type = i % 2 ? "counter" : "thrower";
      list.push({ id: agentId(type, `device-${i}`)!, type, key: `device-${i}` });
    }
    await gw.store.ensureAgents(list);
    for (let i = 0; i < 30; i++)
      await gw.store.setAgentStatus(list[i]!.id, (["paused", "failed", "retired"] as const)[i % 3]!, "test");

    // Gauges may lag the store by the snapshot's second: wait for the statuses set last.
    const after = await scrapeUntil(
      (x) => sampleValue(x, "fleet_agents", { type: "thrower", status: "retired" }) === 5,
      "10,000 agents counted",
    ); // i = 2, 8, 14, 20, 26
    expect(fleetSeries(after)).toBe(fleetSeries(before));
    expect(after.text).not.toContain("device-");
    const allowed = new Set([
      "type",
      "outcome",
      "source",
      "status",
      "kind",
      "budget",
      "le",
      "fleet",
      "version",
      "reload_error",
      "space",
      "major",
      "minor",
      "patch",
      "start",
    ]);
    for (const s of after.samples)
      for (const l of Object.keys(s.labels))
        expect({ series: s.name, label: l, allowed: allowed.has(l) }).toEqual({
          series: s.name,
          label: l,
          allowed: true,
        });
    const total = samplesOf(after, "fleet_agents").reduce((n, s) => n + s.value, 0);
    expect(total).toBe(10_000 + 4);
    expect(sampleValue(after, "fleet_agents", { type: "counter", status: "paused" })).toBe(5);
    // The whole exposition (process metrics included) stays the size of a handful of types.
    expect(after.seriesCount).toBeLessThan(before.seriesCount + 20);
  }, 60_000);
});

describe("retention metrics", () => {
  test("background retention rounds count what they collect, their time, and whether they kept up", async () => {
    // Two seconds of history, and a round every 200 ms: the episodes age out during the test.
    const rdir = mkdtempSync(join(tmpdir(), "fleet-metrics-retention-"));
    writeFileSync(
      join(rdir, "fleet.toml"),
      fleetHeader("metrics-retention") +
        counterType("counter", "m/+/in") +
        "\n[retention]\nepisodes_days = 0.00002\ndedup_days = 0.00002\nredelivery_minutes = 0.01\n",
    );
    const rgw = inProcessGateway(join(rdir, "fleet.toml"), join(rdir, "data"), { gcIntervalMs: 200 });
    try {
      await rgw.start();
      const { base: rbase, token: rtoken } = apiOf(rgw, join(rdir, "data"));
      const fresh = await scrape(rbase);
      for (const kind of ["episodes", "checkpoints", "tombstoned", "stimuli", "usage_rows", "bundles"])
        expect(sampleValue(fresh, "fleet_retention_collected_total", { kind })).toBe(0);
      expect(sampleValue(fresh, "fleet_retention_behind")).toBe(0);

      for (const key of ["a", "b", "c"]) {
        const res = await fetch(
          `${rbase}/api/send`,
          authed(rtoken, { method: "POST", body: JSON.stringify({ topic: `m/${key}/in`, payload: { id: key } }) }),
        );
        expect(res.status).toBe(202);
      }
      const x = await waitFor(
        async () => {
          const x = await scrape(rbase);
          const n = (kind: string) => sampleValue(x, "fleet_retention_collected_total", { kind }) ?? 0;
          return n("episodes") === 3 && n("stimuli") === 3 ? x : undefined;
        },
        30_000,
        "three episodes and their stimuli collected by background retention",
        100,
      );
      expect(sampleValue(x, "fleet_retention_round_seconds_count")).toBeGreaterThanOrEqual(1);
      expect(sampleValue(x, "fleet_retention_round_seconds_sum")).toBeGreaterThan(0);
      expect(sampleValue(x, "fleet_retention_behind")).toBe(0);
      const left = await rgw.store.client.execute("SELECT count(*) FROM episodes");
      expect(Number(left.rows[0]![0])).toBe(0);
    } finally {
      await rgw.stop();
      rmSync(rdir, { recursive: true, force: true });
    }
  }, 60_000);
});

describe("process metrics", () => {
  /** Times the thread blocked (slept in the event loop) so far: /proc's voluntary context switches. */
  const sleeps = (pid: number): number =>
    Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/task/${pid}/status`, "utf8"))?.[1]);

  test.if(process.platform === "linux")(
    "an idle gateway's event loop sleeps between its timers: no 10 ms lag sampler wakes it 100 times a second",
    async () => {
      const fleet = new TestFleet(TOML);
      try {
        const info = await fleet.start();
        await Bun.sleep(1000); // start-up's own work settles
        const before = sleeps(fleet.pid);
        await Bun.sleep(2000);
        // Its own timers wake it a few times a second (rollouts, token and config polls); the
        // sampler alone made ~200 wake-ups in these 2 s.
        expect(sleeps(fleet.pid) - before).toBeLessThan(80);
        // The process metrics still answer (loopback probes need no token).
        const text = await (await fetch(`http://127.0.0.1:${info.http_port}/metrics`)).text();
        expect(text).toContain("process_cpu_seconds_total");
        expect(text).not.toContain("nodejs_eventloop_lag");
      } finally {
        await fleet.dispose();
      }
    },
    60_000,
  );
});

describe("rolling rates", () => {
  test("count only the last minute", () => {
    let now = 1_000_000;
    const r = new RollingCounts(["e"], () => now, 60);
    r.add("e", 3);
    now += 30_000;
    r.add("e");
    expect(r.sum("e")).toBe(4);
    now += 31_000; // the first add is now 61 s old
    expect(r.sum("e")).toBe(1);
    now += 120_000;
    expect(r.sum("e")).toBe(0);
    r.add("e");
    expect(r.sum("e")).toBe(1);
  }, 60_000);
});

describe("fleet_stimulus_wait_seconds", () => {
  test("is observed once per stimulus, by the episode that settled it: retried attempts add nothing", async () => {
    const events = new FleetEvents();
    const host = { events, spec: { spec: { agents: { w: {} } } }, store: { writer: {} } } as unknown as MetricsHost;
    const metrics = new FleetMetrics(host, { processMetrics: false });
    const episode = (status: "committed" | "failed", quarantined: boolean, waitMs: number) =>
      events.emit("episode", {
        episode: "e",
        agent: "w/q",
        type: "w",
        stimulus: "s",
        status,
        checkpoint: null,
        ms: 5,
        waitMs,
        quarantined,
      });
    // A poison stimulus: a retried attempt, then the one that quarantines it (after the backoff).
    episode("failed", false, 10);
    episode("failed", true, 1_210);
    // A good stimulus, after a retry.
    episode("failed", false, 5);
    episode("committed", false, 400);
    const x = parseExposition(await metrics.registry.getSingleMetricAsString("fleet_stimulus_wait_seconds"));
    expect(sampleValue(x, "fleet_stimulus_wait_seconds_count", { type: "w" })).toBe(2);
    expect(sampleValue(x, "fleet_stimulus_wait_seconds_sum", { type: "w" })).toBeCloseTo(1.61, 5);
    metrics.close();
  });
});

describe("fleet_agent_status_changes_total", () => {
  test("is unchanged by the statuses every start republishes, which still restore each retained topic", async () => {
    const events = new FleetEvents();
    const host = { events, spec: { spec: { agents: { w: {} } } }, store: { writer: {} } } as unknown as MetricsHost;
    const metrics = new FleetMetrics(host, { processMetrics: false });
    const retained = new Map<string, Record<string, unknown>>();
    const broker = {
      publish: async (topic: string, payload: string, opts: { retain?: boolean }) => {
        if (opts.retain) retained.set(topic, JSON.parse(payload));
      },
    } as unknown as Broker;
    publishFacts(events, () => broker);
    // 600 agents (three pages), as the agents table has them at start.
    const agents = Array.from({ length: 600 }, (_, i) => ({
      id: `w/k${String(i).padStart(3, "0")}` as AgentId,
      status: i === 7 ? ("paused" as const) : ("active" as const),
      reason: i === 7 ? "paused by operator" : null,
      headHash: null as string | null,
    }));
    const store = {
      agentStatusPage: async (after: string, limit: number) => agents.filter((a) => a.id > after).slice(0, limit),
    };
    const changes = async () =>
      samplesOf(
        parseExposition(await metrics.registry.getSingleMetricAsString("fleet_agent_status_changes_total")),
        "fleet_agent_status_changes_total",
      ).reduce((n, x) => n + x.value, 0);

    expect(await republishStatuses(store, events)).toBe(600);
    expect(await changes()).toBe(0);
    expect(retained.size).toBe(600);
    expect(retained.get("fleet/agents/w/k007/status")).toEqual({ status: "paused", reason: "paused by operator" });
    expect(retained.get("fleet/agents/w/k000/status")).toEqual({ status: "idle" });
    // A real transition still counts.
    events.emit("status", { agent: "w/k000", status: "running" });
    expect(await changes()).toBe(1);
    metrics.close();
  });
});
