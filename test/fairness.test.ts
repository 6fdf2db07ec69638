/**
 * Fairness at spawning: an agent with a backlog does not take the last warm spare, so an agent
 * waiting on one stimulus still gets a warm start (docs/sandbox.md "Warm spares and fairness").
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Gateway } from "../gateway/gateway.ts";
import { authed, fixture, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, counterType, fleetHeader } from "./helpers/toml.ts";
import { connectAsync, type MqttClient } from "mqtt";
import {
  BURST_GROUP_NICE,
  defaultSpawnOptions,
  EPISODE_GROUP_NICE,
  EPISODE_NICE,
  FLOODED_GROUP_NICE,
  idleSpawnOptions,
} from "../gateway/episode/index.ts";
import { apiOf, inProcessGateway } from "./helpers/in-process.ts";
import { BURST_RATE, BURST_WINDOW_MS, burstSlots } from "../gateway/fleet/index.ts";

/** A gateway in this process on a fleet.toml of its own, and its HTTP API. */
class Fleet {
  private constructor(
    private readonly dir: string,
    private readonly gw: Gateway,
    readonly base: string,
    readonly token: string,
  ) {}

  static async start(toml: string): Promise<Fleet> {
    const dir = mkdtempSync(join(tmpdir(), "fleet-fairness-"));
    writeFileSync(join(dir, "fleet.toml"), toml);
    const gw = inProcessGateway(join(dir, "fleet.toml"), join(dir, "data"));
    await gw.start();
    const { base, token } = apiOf(gw, join(dir, "data"));
    return new Fleet(dir, gw, base, token);
  }

  async stop(): Promise<void> {
    await this.gw.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Stop the gateway (its data dir stays until `stop`); the agents whose episodes began meanwhile. */
  async stopGateway(): Promise<string[]> {
    const began: string[] = [];
    const off = this.gw.events.on("status", (e) => {
      if (e.status === "running") began.push(e.agent);
    });
    try {
      await this.gw.stop();
    } finally {
      off();
    }
    return began;
  }

  get mqttPort(): number {
    return this.gw.broker.port;
  }

  async gauge(name: string): Promise<number | undefined> {
    return sampleValue(await scrape(this.base), name);
  }

  post(path: string, body?: unknown): Promise<Response> {
    return fetch(
      `${this.base}${path}`,
      authed(this.token, { method: "POST", body: body === undefined ? undefined : JSON.stringify(body) }),
    );
  }

  /**
   * Queue ten stimuli for nicelog/`key` while paused, run `beforeResume`, let them go, and read the priorities its
   * episodes ran at.
   */
  async niceLog(
    key: string,
    beforeResume: () => Promise<void> = async () => undefined,
  ): Promise<{ nice: (number | "idle")[]; groups: (number | null)[] }> {
    expect((await this.post(`/api/agents/nicelog/${key}/pause`)).status).toBe(200);
    for (let i = 1; i <= 10; i++)
      expect((await this.post("/api/send", { topic: `n/${key}/in`, payload: { id: `${key}${i}` } })).status).toBe(202);
    await beforeResume();
    expect((await this.post(`/api/agents/nicelog/${key}/resume`)).status).toBe(200);
    return this.logOf(key, 10);
  }

  /** The priorities of the episodes nicelog/`key` has run (nice, group nice), once it has run `n`. */
  async logOf(key: string, n: number): Promise<{ nice: (number | "idle")[]; groups: (number | null)[] }> {
    return waitFor(
      async () => {
        const r = await fetch(`${this.base}/api/agents/nicelog/${key}/state`, authed(this.token));
        const body = (await r.json()) as { state?: { nice?: (number | "idle")[]; groups?: (number | null)[] } };
        const { nice, groups } = body.state ?? {};
        return nice?.length === n ? { nice, groups: groups ?? [] } : undefined;
      },
      30_000,
      `${n} episode(s) of nicelog/${key}`,
      50,
    );
  }

  /**
   * Run `body` while a device publishes to counter/sink (paused) faster than the burst rate, once
   * the burst has lowered the slots to `slots`; the device is `body`'s to publish with too.
   */
  async duringBurst<T>(slots: number, body: (device: MqttClient) => Promise<T>): Promise<T> {
    expect((await this.post("/api/agents/counter/sink/pause")).status).toBe(200);
    const device = await connectAsync(`mqtt://127.0.0.1:${this.mqttPort}`, { reconnectPeriod: 0 });
    let flooding = true;
    const flood = (async () => {
      for (let i = 0; flooding; i++) {
        for (let j = 0; j < BURST_RATE / 10; j++)
          device.publish("f/sink/in", JSON.stringify({ id: `s${i}-${j}` }), { qos: 1 });
        await Bun.sleep(20);
      }
    })();
    try {
      await waitFor(
        async () => ((await this.gauge("fleet_episode_slots")) === slots ? true : undefined),
        20_000,
        "the burst to lower the slots",
        20,
      );
      return await body(device);
    } finally {
      flooding = false;
      await flood;
      // At once: the flood's unacknowledged publishes must not hold a failed check's report back.
      await device.endAsync(true);
    }
  }

  /** Episodes of agent type `type` started warm and cold, and committed, so far. */
  async starts(type = "counter"): Promise<{ warm: number; cold: number; committed: number }> {
    const x = await scrape(this.base);
    return {
      warm: sampleValue(x, "fleet_episode_starts_total", { type, start: "warm" }) ?? 0,
      cold: sampleValue(x, "fleet_episode_starts_total", { type, start: "cold" }) ?? 0,
      committed: sampleValue(x, "fleet_episodes_total", { type, outcome: "committed" }) ?? 0,
    };
  }
}

/**
 * counter/sink, the agent `duringBurst` floods while it is paused. Its queue holds a minute of the flood:
 * at the default max_queue (10,000) intake refuses it after a few seconds on a contended box (no PUBACK),
 * the recorded rate falls under BURST_RATE and the burst a test runs in ends before the test does.
 */
const SINK = counterType("counter", "f/+/in", { instances: ["sink"], extra: "max_queue = 1000000\n" });

const nicelog = (instances: string[], extra?: string) =>
  agentType("nicelog", fixture("nice-log"), ["n/+/in"], { dedup: "id", instances, extra });

/** The nice an episode runs at normally: relative to this process (the gateway runs in it), capped at 19. */
function normalNice(): number {
  const stat = readFileSync("/proc/self/stat", "utf8");
  const own = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
  return Math.min(19, own + EPISODE_NICE);
}

describe("warm spares under a flood", () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-test", { maxConcurrent: 1, fleet: "warm_spares = 1" }) +
        counterType("counter", "f/+/in", { instances: ["a", "b"] }) +
        nicelog(["x"]),
    );
  });
  afterAll(() => fleet?.stop());

  test("an agent with a backlog leaves the last spare to others and starts cold; its last one is warm", async () => {
    // Ten for a, queued while it is paused (a flood is 8 or more queued).
    expect((await fleet.post("/api/agents/counter/a/pause")).status).toBe(200);
    for (const id of Array.from({ length: 10 }, (_, i) => `a${i + 1}`))
      expect((await fleet.post("/api/send", { topic: "f/a/in", payload: { id } })).status).toBe(202);
    // Then one for b: the pool is empty, so it starts cold and a spare is started behind it. It runs just
    // before a's backlog is let go: a backlog is a flood only while another agent's start is recent
    // (FLOOD_PEERS_WINDOW_MS), and on a busy machine the sends alone took seconds of that window.
    expect((await fleet.post("/api/send", { topic: "f/b/in", payload: { id: "b1" } })).status).toBe(202);
    await waitFor(async () => ((await fleet.starts()).committed === 1 ? true : undefined), 20_000, "b's episode", 50);
    expect((await fleet.post("/api/agents/counter/a/resume")).status).toBe(200);
    const done = await waitFor(
      async () => {
        const s = await fleet.starts();
        return s.committed === 11 ? s : undefined;
      },
      30_000,
      "a's ten episodes",
      50,
    );
    // b cold (no spare yet); a1 cold (10 queued, b's start a moment ago: flooded, one spare left); a2 and a3
    // cold too while b's start is within the window, which a machine too busy to run them in time is not
    // (test/flood-rule.test.ts holds the window to a clock); a4-a10 warm (fewer than 8 queued). Without the
    // rule a1 takes the spare b left and only b starts cold.
    expect(done.committed).toBe(11);
    expect(done.cold).toBeGreaterThanOrEqual(2);
    expect(done.cold).toBeLessThanOrEqual(4);
    expect(done.warm).toBe(11 - done.cold);
  }, 60_000);

  test.if(defaultSpawnOptions().nice != null)(
    "a flooded agent's episodes run under SCHED_IDLE, in groups at nice 19, until its backlog is short",
    async () => {
      // Another agent's episode a moment before the backlog is let go: a flood (gateway/fleet/flood.ts) while
      // that start is recent (FLOOD_PEERS_WINDOW_MS), so it runs once the ten are queued, not before: on a busy
      // machine the sends alone took seconds of that window.
      const state = await fleet.niceLog("x", async () => {
        const before = (await fleet.starts()).committed;
        const sent = await fleet.post("/api/send", { topic: "f/b/in", payload: { id: "b-before-nicelog" } });
        expect(sent.status).toBe(202);
        await waitFor(
          async () => ((await fleet.starts()).committed > before ? true : undefined),
          20_000,
          "b's episode",
          50,
        );
      });
      // 10, 9 and 8 queued: flooded; then fewer than 8.
      const normal = normalNice();
      const flood = idleSpawnOptions(defaultSpawnOptions()).idle ? "idle" : normal;
      expect(state.nice).toEqual([flood, flood, flood, normal, normal, normal, normal, normal, normal, normal]);
      // Where each episode is a scheduling group of its own, the flooded agent's groups yield too:
      // SCHED_IDLE alone ranks its processes only within their group.
      // (Where this process may not set their nice, they run at the default one: not asserted here.)
      if (defaultSpawnOptions().autogroup != null) {
        const [low, usual] = [FLOODED_GROUP_NICE, EPISODE_GROUP_NICE];
        expect(state.groups).toEqual([low, low, low, usual, usual, usual, usual, usual, usual, usual]);
      }
    },
    60_000,
  );
});

describe("a backlog with no one to yield to", () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-alone", { maxConcurrent: 1, fleet: "warm_spares = 1" }) + nicelog(["y"]),
    );
  });
  afterAll(() => fleet?.stop());

  test.if(defaultSpawnOptions().nice != null)(
    "an agent with a backlog while no other agent has work is no flood: its episodes run at the usual priority",
    async () => {
      const state = await fleet.niceLog("y");
      expect(state.nice).toEqual(Array(10).fill(normalNice()));
      if (defaultSpawnOptions().autogroup != null) expect(state.groups).toEqual(Array(10).fill(EPISODE_GROUP_NICE));
    },
    60_000,
  );
});

describe("a backlog beside work that waits on a pause", () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-paused", { maxConcurrent: 1, fleet: "warm_spares = 1" }) + nicelog(["z", "p"]),
    );
  });
  afterAll(() => fleet?.stop());

  test.if(defaultSpawnOptions().nice != null)(
    "work that waits on a pause is no one to yield to: a backlog beside it runs at the usual priority",
    async () => {
      // p's stimulus waits while p is paused (an operator's pause; a quarantine holds work the same way).
      expect((await fleet.post("/api/agents/nicelog/p/pause")).status).toBe(200);
      expect((await fleet.post("/api/send", { topic: "n/p/in", payload: { id: "p1" } })).status).toBe(202);
      const state = await fleet.niceLog("z");
      expect(state.nice).toEqual(Array(10).fill(normalNice()));
      if (defaultSpawnOptions().autogroup != null) expect(state.groups).toEqual(Array(10).fill(EPISODE_GROUP_NICE));
      // p's work is still there, and runs once p is let go.
      expect((await fleet.post("/api/agents/nicelog/p/resume")).status).toBe(200);
      expect((await fleet.logOf("p", 1)).nice).toEqual([normalNice()]);
    },
    60_000,
  );
});

describe("quiet agents during an intake burst (devices first)", () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-burst", { maxConcurrent: 2, drainTimeoutMs: 1000, fleet: "warm_spares = 1" }) +
        SINK +
        nicelog(["lane", "x", "y"], "\n[agents.nicelog.budget]\nepisode_timeout_ms = 120000\n"),
    );
  });
  afterAll(() => fleet?.stop());

  test.if(defaultSpawnOptions().autogroup != null)(
    "an agent's episode beside another quiet agent's yields while devices burst, and only then",
    async () => {
      // One quiet agent's episode holds the lane: it stays past the test's end (stopping the gateway aborts it).
      const send = (topic: string, payload: unknown) => fleet.post("/api/send", { topic, payload });
      expect((await send("n/lane/in", { id: "lane1", holdMs: 100_000 })).status).toBe(202);
      await waitFor(
        async () => ((await fleet.gauge("fleet_episodes_running")) === 1 ? true : undefined),
        20_000,
        "lane's episode",
        50,
      );
      // No burst: another quiet agent's episode beside it runs at the usual priority.
      expect((await send("n/x/in", { id: "x1" })).status).toBe(202);
      expect((await fleet.logOf("x", 1)).groups).toEqual([EPISODE_GROUP_NICE]);

      // Devices publish to a paused agent faster than the burst rate until the test is done.
      await fleet.duringBurst(burstSlots(2), async () => {
        expect((await send("n/y/in", { id: "y1" })).status).toBe(202);
        expect((await fleet.logOf("y", 1)).groups).toEqual([BURST_GROUP_NICE]);
      });
      // All the while the lane's episode ran: nothing of it is committed yet.
      const lane = await fetch(`${fleet.base}/api/agents/nicelog/lane/state`, authed(fleet.token));
      expect(((await lane.json()) as { state?: unknown }).state ?? null).toBeNull();
    },
    60_000,
  );
});

describe("quiet agents' starts during an intake burst (devices first, in time)", () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-pace", { maxConcurrent: 4, drainTimeoutMs: 1000 }) + SINK + counterType("quiet", "q/+/in"),
    );
  });
  afterAll(() => fleet?.stop());

  test("during a burst, agents with a stimulus each start at a pace, and every one of them runs", async () => {
    const committed = async () => (await fleet.starts("quiet")).committed;
    // One quiet episode before the burst: the pace follows the turns it has seen.
    expect((await fleet.post("/api/send", { topic: "q/first/in", payload: { id: "first" } })).status).toBe(202);
    await waitFor(async () => ((await committed()) === 1 ? true : undefined), 20_000, "the first episode", 50);

    await fleet.duringBurst(burstSlots(4), async (device) => {
      // Twelve quiet agents, one stimulus each, at once: the bucket lets two start, the rest wait their turn.
      const quiet = Array.from({ length: 12 }, (_, i) => `k${i}`);
      await Promise.all(
        quiet.map((k) => device.publishAsync(`q/${k}/in`, JSON.stringify({ id: `q-${k}` }), { qos: 1 })),
      );
      const paced = await waitFor(
        async () => {
          const n = (await fleet.gauge("fleet_episodes_paced")) ?? 0;
          return n > 0 ? n : undefined;
        },
        20_000,
        "an agent waiting for the pace",
        5,
      );
      expect(paced).toBeLessThanOrEqual(quiet.length);
      // The pace slows them; it never stops them while the burst goes on.
      await waitFor(
        async () => ((await committed()) === 1 + quiet.length ? true : undefined),
        60_000,
        "all of them",
        50,
      );
      // The burst goes on (the premise): on a loaded box one 250 ms window of it can fall under the rate and
      // restore the slots for a moment (CI saw 4 here once), so this waits for the flood to lower them again.
      await waitFor(
        async () => ((await fleet.gauge("fleet_episode_slots")) === burstSlots(4) ? true : undefined),
        20_000,
        "the burst to hold the slots down",
        20,
      );
      expect(await fleet.gauge("fleet_episodes_paced")).toBe(0);
    });
  }, 120_000);
});

describe("stopping during an intake burst", () => {
  test("starts none of the episodes the burst held back: ending the burst does not reopen the slots", async () => {
    const fleet = await Fleet.start(
      fleetHeader("fairness-stop", { maxConcurrent: 4, drainTimeoutMs: 5000 }) + SINK + counterType("quiet", "q/+/in"),
    );
    try {
      // One quiet episode first: the pace follows the turns it has seen.
      expect((await fleet.post("/api/send", { topic: "q/first/in", payload: { id: "first" } })).status).toBe(202);
      await waitFor(async () => ((await fleet.starts("quiet")).committed === 1 ? true : undefined), 20_000, "one", 50);
      const began = await fleet.duringBurst(burstSlots(4), async (device) => {
        await Promise.all(
          Array.from({ length: 12 }, (_, i) =>
            device.publishAsync(`q/k${i}/in`, JSON.stringify({ id: `q-${i}` }), { qos: 1 }),
          ),
        );
        await waitFor(
          async () => (((await fleet.gauge("fleet_episodes_paced")) ?? 0) > 0 ? true : undefined),
          20_000,
          "an agent waiting for the pace",
          5,
        );
        // The stop ends the burst too; until 2026-12-08 that lifted the cap before the scheduler
        // stopped, and every agent the pace held started while the gateway drained.
        return fleet.stopGateway();
      });
      expect(began).toEqual([]);
    } finally {
      await fleet.stop();
    }
  }, 120_000);
});

describe("what counts as an intake burst (devices first)", () => {
  const TICKERS = 200; // one fire records 200 stimuli in a quarter-second window: over BURST_RATE
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await Fleet.start(
      fleetHeader("fairness-kinds", { maxConcurrent: 4, drainTimeoutMs: 1000 }) +
        SINK +
        counterType("tick", "t/+/in", {
          instances: Array.from({ length: TICKERS }, (_, i) => `k${i}`),
          extra: 'every = "1s"\n',
        }),
    );
  });
  afterAll(() => fleet?.stop());

  test("a timer waking many agents at once is no burst; devices publishing as many messages are", async () => {
    expect(TICKERS * (1000 / BURST_WINDOW_MS)).toBeGreaterThan(BURST_RATE);
    const timerStimuli = async () =>
      sampleValue(await scrape(fleet.base), "fleet_stimuli_total", { source: "timer" }) ?? 0;
    // Watch the slots through two fires of the timer (each 200 stimuli at once).
    const slots = new Set<number>();
    await waitFor(
      async () => {
        slots.add((await fleet.gauge("fleet_episode_slots")) ?? -1);
        return (await timerStimuli()) >= 2 * TICKERS ? true : undefined;
      },
      30_000,
      "two fires of the timer",
      10,
    );
    expect([...slots]).toEqual([4]);

    // As many messages from a device, at once: a burst.
    expect((await fleet.post("/api/agents/counter/sink/pause")).status).toBe(200);
    const device = await connectAsync(`mqtt://127.0.0.1:${fleet.mqttPort}`, { reconnectPeriod: 0 });
    try {
      const lowered = waitFor(
        async () => ((await fleet.gauge("fleet_episode_slots")) === burstSlots(4) ? true : undefined),
        20_000,
        "the device's burst to lower the slots",
        5,
      );
      await Promise.all(
        Array.from({ length: TICKERS }, (_, i) =>
          device.publishAsync("f/sink/in", JSON.stringify({ id: `d${i}` }), { qos: 1 }),
        ),
      );
      expect(await lowered).toBe(true);
    } finally {
      await device.endAsync();
    }
  }, 60_000);
});
