/**
 * Unit tests of the example agents (run in-process against a fake ctx) and of the
 * simulator's reading model.
 */
import { describe, expect, test } from "bun:test";
import { ToolDenied } from "../agents/sdk/index.ts";
import type { AgentContext, AgentDefinition, AgentRef, Stimulus } from "../agents/sdk/index.ts";
import tempMonitor from "../agents/examples/temp-monitor.ts";
import type { TempMonitorConfig, TempMonitorState } from "../agents/examples/temp-monitor.ts";
import anomaly from "../agents/examples/anomaly.ts";
import type { AnomalyConfig, AnomalyState } from "../agents/examples/anomaly.ts";
import { makeDevices, mulberry32, nextHumidity, nextTemperature } from "../scripts/simulate.ts";
import type { DeviceState } from "../scripts/simulate.ts";

/** What a fake ctx saw during one or more episodes. */
interface Recorded {
  decisions: { name: string; data: unknown }[];
  emits: unknown[];
  publishes: { topic: string; payload: unknown }[];
  logs: unknown[][];
}

/**
 * Drives an agent the way the host does, minus the subprocess: state is carried between
 * episodes through a JSON round trip, exactly like a checkpoint.
 */
class Harness<S, C> {
  readonly rec: Recorded = { decisions: [], emits: [], publishes: [], logs: [] };
  state: S | undefined;
  private clock = 1_700_000_000_000;
  private seq = 0;
  readonly agent: AgentRef;

  constructor(
    private readonly def: AgentDefinition<S, C>,
    private readonly config: C,
    key = "boiler-1",
    private readonly allowPublish = true,
  ) {
    this.agent = { type: "test", key, id: `test/${key}` };
  }

  /** Run one episode; returns what that episode alone recorded. */
  async stimulus(payload: unknown, kind: Stimulus["kind"] = "mqtt"): Promise<Recorded> {
    if (this.state === undefined) this.state = await this.def.init({ agent: this.agent, config: this.config });
    const episode: Recorded = { decisions: [], emits: [], publishes: [], logs: [] };
    const rand = mulberry32(this.seq + 1);
    const ctx: AgentContext<S, C> = {
      agent: this.agent,
      state: JSON.parse(JSON.stringify(this.state)) as S,
      config: this.config,
      episode: `ep-${this.seq}`,
      decide: (name, data) => void episode.decisions.push({ name, data }),
      emit: (data) => void episode.emits.push(data),
      send: async (to) => ({ queued: true, to }),
      tools: {
        send: async (to) => ({ queued: true, to }),
        publish: async (topic, p) => {
          if (!this.allowPublish) throw new ToolDenied("publish", "not in the type's tools allowlist");
          episode.publishes.push({ topic, payload: p });
          return { queued: true, topic };
        },
        http: async () => {
          throw new ToolDenied("http", "not allowed");
        },
        llm: async () => {
          throw new ToolDenied("llm", "not allowed");
        },
      },
      now: () => (this.clock += 1000),
      random: rand,
      log: Object.assign((...args: unknown[]) => void episode.logs.push(args), {
        debug: (...args: unknown[]) => void episode.logs.push(args),
        info: (...args: unknown[]) => void episode.logs.push(args),
        warn: (...args: unknown[]) => void episode.logs.push(args),
        error: (...args: unknown[]) => void episode.logs.push(args),
      }),
      wakeIn: () => {
        throw new ToolDenied("wake", "not in this harness");
      },
      wakeAt: () => {
        throw new ToolDenied("wake", "not in this harness");
      },
      cancelWake: () => false,
    };
    const stim = {
      id: `s-${this.seq++}`,
      kind,
      topic: kind === "mqtt" ? `sensors/${this.agent.key}/temperature` : undefined,
      payload,
      received_at: this.clock,
    } as Stimulus;
    await this.def.onStimulus(stim, ctx);
    // Commit like the host: the checkpoint is whatever JSON the state serialises to.
    this.state = JSON.parse(JSON.stringify(ctx.state)) as S;
    this.rec.decisions.push(...episode.decisions);
    this.rec.emits.push(...episode.emits);
    this.rec.publishes.push(...episode.publishes);
    this.rec.logs.push(...episode.logs);
    return episode;
  }

  /** Feed readings in order. */
  async feed(values: readonly unknown[]): Promise<void> {
    for (const v of values) await this.stimulus(typeof v === "number" ? { id: "x", value: v, unit: "C", ts: 0 } : v);
  }
}

const monitor = (config: TempMonitorConfig = { threshold: 80 }) =>
  new Harness<TempMonitorState, TempMonitorConfig>(tempMonitor, config);
const detector = (config: AnomalyConfig = {}, allowPublish = true) =>
  new Harness<AnomalyState, AnomalyConfig>(anomaly, config, "boiler-1", allowPublish);
const names = (rec: Recorded) => rec.decisions.map((d) => d.name);

describe("temp-monitor", () => {
  test("alerts once when crossing the threshold and clears only below threshold minus hysteresis", async () => {
    const h = monitor({ threshold: 80, hysteresis: 2 });
    await h.feed([70, 79.9, 80, 81.2]);
    expect(names(h.rec)).toEqual(["alert"]);
    expect(h.rec.publishes).toEqual([
      { topic: "alerts/boiler-1", payload: { level: "alert", value: 81.2, threshold: 80, agent: "test/boiler-1" } },
    ]);

    // Inside the hysteresis band [78, 80]: still in alarm, nothing new.
    await h.feed([79, 78.5, 78]);
    expect(names(h.rec)).toEqual(["alert"]);
    expect(h.state?.alarm).toBe(true);

    await h.feed([77.9]);
    expect(names(h.rec)).toEqual(["alert", "clear"]);
    expect(h.state).toEqual({ alarm: false, count: 8, last: 77.9 });
    const clear = h.rec.publishes[1];
    expect(clear?.topic).toBe("alerts/boiler-1");
    expect(clear?.payload).toMatchObject({
      level: "clear",
      value: 77.9,
      threshold: 80,
      max: 81.2,
      agent: "test/boiler-1",
    });

    // Every numeric reading emits its value, alarm flag and count.
    expect(h.rec.emits.at(3)).toEqual({ value: 81.2, alarm: true, count: 4 });
    expect(h.rec.emits.at(-1)).toEqual({ value: 77.9, alarm: false, count: 8 });

    // Crossing again after a clear is a new alert.
    await h.feed([85]);
    expect(names(h.rec)).toEqual(["alert", "clear", "alert"]);
  });

  test("a repeated high reading does not re-alert", async () => {
    const h = monitor();
    await h.feed([81, 85, 81, 90, 80.5]);
    expect(names(h.rec)).toEqual(["alert"]);
    expect(h.rec.publishes).toHaveLength(1);
    expect(h.state).toMatchObject({ alarm: true, count: 5, last: 80.5, max: 90 });
  });

  test("a non-numeric payload is recorded as ignored", async () => {
    const h = monitor();
    await h.feed([85]);
    const ep = await h.stimulus({ id: "x", value: "hot", unit: "C" });
    expect(names(ep)).toEqual(["ignored"]);
    expect(ep.emits).toEqual([]);
    await h.stimulus("not a number");
    await h.stimulus({ id: "x", temp: 12 });
    await h.stimulus("");
    // Alarm untouched, but every message counted.
    expect(h.state).toMatchObject({ alarm: true, count: 5, last: 85 });
    expect(names(h.rec)).toEqual(["alert", "ignored", "ignored", "ignored", "ignored"]);
  });

  test("a bare number, a numeric string and a custom field are all readings", async () => {
    const h = monitor({ threshold: 80, field: "t" });
    await h.stimulus(81);
    await h.stimulus("70");
    await h.stimulus({ t: 85 });
    expect(names(h.rec)).toEqual(["alert", "clear", "alert"]);
  });

  test("a temp-monitor without a numeric threshold fails the episode instead of never alerting", async () => {
    const h = new Harness<TempMonitorState, TempMonitorConfig>(tempMonitor, {} as TempMonitorConfig);
    await expect(h.stimulus({ value: 99 })).rejects.toThrow("config.threshold");
  });

  test("a timer stimulus emits a heartbeat summary and changes nothing", async () => {
    const h = monitor();
    await h.feed([82]);
    const before = h.state;
    const ep = await h.stimulus(null, "timer");
    expect(ep.emits).toEqual([{ heartbeat: true, alarm: true, count: 1, last: 82 }]);
    expect(ep.decisions).toEqual([]);
    expect(h.state).toEqual(before!);
  });
});

describe("anomaly", () => {
  const steady = (n: number, seed = 7) => {
    const r = mulberry32(seed);
    return Array.from({ length: n }, () => 50 + (r() - 0.5)); // 50 ± 0.5
  };

  test("anomaly detector flags a spike after warmup and not during warmup", async () => {
    const h = detector({ warmup: 10 });
    // A spike at reading 5 is inside the warmup: learned from, never flagged.
    await h.feed([...steady(4), 90, ...steady(5, 8)]);
    expect(names(h.rec)).toEqual([]);
    expect(h.state?.n).toBe(10);

    const g = detector({ warmup: 10 });
    await g.feed(steady(30));
    expect(names(g.rec)).toEqual([]);
    const ep = await g.stimulus({ value: 60 });
    expect(names(ep)).toEqual(["anomaly"]);
    const data = ep.decisions[0]?.data as { x: number; mean: number; std: number; zscore: number };
    expect(data.x).toBe(60);
    expect(data.zscore).toBeGreaterThan(3);
    expect(ep.emits).toEqual([{ anomaly: true, ...data }]);
    expect(ep.publishes).toEqual([
      { topic: "alerts/anomaly/boiler-1", payload: { level: "anomaly", ...data, agent: "test/boiler-1" } },
    ]);
    expect(g.state?.anomalies).toBe(1);
    // The spike is folded into the estimate (see agents/examples/anomaly.ts).
    expect(g.state?.n).toBe(31);
    expect(g.state?.last).toBe(60);
  });

  test("a denied publish does not fail the episode", async () => {
    const h = detector({ warmup: 10 }, false);
    await h.feed(steady(30));
    const ep = await h.stimulus({ value: 60 });
    expect(names(ep)).toEqual(["anomaly"]);
    expect(ep.publishes).toEqual([]);
    expect(ep.logs).toHaveLength(1);
    expect(h.state?.anomalies).toBe(1);
  });

  test("EWMA mean converges to a steady signal", async () => {
    const h = detector({ alpha: 0.1 });
    await h.feed([0]);
    await h.feed(Array.from({ length: 100 }, () => 20));
    // After k steps the gap shrinks by (1 - alpha)^k: 20 * 0.9^100 ≈ 5e-4. The variance the
    // jump inflated decays more slowly (it is fed by the shrinking gap), hence the looser bound.
    expect(h.state?.mean).toBeCloseTo(20, 2);
    expect(Math.sqrt(h.state?.var ?? Infinity)).toBeLessThan(0.2);
    expect(h.rec.emits.at(-1)).toMatchObject({ x: 20 });
    const last = h.rec.emits.at(-1) as { mean: number; std: number };
    expect(last.mean).toBeCloseTo(20, 2);
    expect(last.std).toBeLessThan(0.2);
  });

  test("the first reading initialises the mean with zero variance", async () => {
    const h = detector();
    await h.feed([42]);
    expect(h.state).toEqual({ n: 1, mean: 42, var: 0, anomalies: 0, last: 42 });
    expect(h.rec.emits).toEqual([{ x: 42, mean: 42, std: 0, z: 0 }]);
  });
});

test("state survives a JSON round trip", async () => {
  // The harness already checkpoints through JSON between episodes; compare it with a run
  // that keeps the live object, to show nothing in the state depends on not being serialised.
  const readings = [70, 82, 85, 79, 77, "bad", 81, 60];
  const viaJson = monitor();
  await viaJson.feed(readings);

  let live = (await tempMonitor.init({ agent: viaJson.agent, config: { threshold: 80 } })) as TempMonitorState;
  const liveDecisions: string[] = [];
  for (const v of readings) {
    const ctx = {
      agent: viaJson.agent,
      state: live,
      config: { threshold: 80 },
      decide: (name: string) => void liveDecisions.push(name),
      emit: () => {},
      tools: { publish: async (topic: string) => ({ queued: true, topic }) },
      now: () => 0,
      random: () => 0,
      log: () => {},
    } as unknown as AgentContext<TempMonitorState, TempMonitorConfig>;
    await tempMonitor.onStimulus(
      { id: "s", kind: "mqtt", topic: "t", payload: typeof v === "number" ? { value: v } : v, received_at: 0 },
      ctx,
    );
    live = ctx.state;
  }
  expect(names(viaJson.rec)).toEqual(liveDecisions);
  expect(JSON.parse(JSON.stringify(live))).toEqual(viaJson.state!);
  expect(viaJson.state).toEqual(JSON.parse(JSON.stringify(viaJson.state)));

  const a = detector();
  await a.feed([...steady10(), 200]);
  expect(a.state?.anomalies).toBe(1);
  expect(JSON.parse(JSON.stringify(a.state))).toEqual(a.state!);
});

function steady10(): number[] {
  return [50, 50.4, 49.7, 50.2, 49.9, 50.1, 50.3, 49.8, 50, 50.2];
}

describe("simulator reading model", () => {
  const opts = { anomalyRate: 0.01, excursionsPerHour: 2 };

  /** `seconds` of 1 Hz temperature readings for every device. */
  const series = (seed: number, devices: number, seconds: number): number[][] => {
    let states: DeviceState[] = makeDevices(devices, seed, 1);
    const out: number[][] = states.map(() => []);
    for (let t = 0; t < seconds; t++) {
      states = states.map((s, i) => {
        const r = nextTemperature(s, t, opts);
        out[i]?.push(r.reading.value);
        return r.state;
      });
    }
    return out;
  };

  test("the generator is deterministic for a seed", () => {
    expect(series(42, 3, 600)).toEqual(series(42, 3, 600));
    expect(series(42, 3, 600)).not.toEqual(series(43, 3, 600));
  });

  test("a step is pure: the same state and time give the same reading", () => {
    const [dev] = makeDevices(1, 1, 100);
    const a = nextTemperature(dev!, 5, opts);
    const b = nextTemperature(dev!, 5, opts);
    expect(a).toEqual(b);
    expect(a.reading.id).toBe("boiler-1-100");
    expect(a.state.seq).toBe(101);
    expect(nextHumidity(a.state, 5).reading).toMatchObject({ id: "boiler-1-h-100", unit: "%" });
  });

  test("resting temperatures sit between 60 and 75 plus drift", () => {
    const quiet = { anomalyRate: 0, excursionsPerHour: 0 };
    for (const dev of makeDevices(20, 3)) {
      expect(dev.profile.base).toBeGreaterThanOrEqual(60);
      expect(dev.profile.base).toBeLessThan(75);
      let s = dev;
      for (let t = 0; t < 300; t++) {
        const r = nextTemperature(s, t, quiet);
        s = r.state;
        expect(r.reading.value).toBeGreaterThan(55);
        expect(r.reading.value).toBeLessThan(80);
      }
    }
  });

  test("a long run produces excursions above 80 that last a while", () => {
    // 10 devices for 2 simulated hours at 2 excursions/hour each: ~40 expected.
    const runs = series(2024, 10, 7200).map((values) => {
      let longest = 0;
      let current = 0;
      for (const v of values) {
        current = v > 80 ? current + 1 : 0;
        longest = Math.max(longest, current);
      }
      return longest;
    });
    // One-off spikes cannot make a 30-reading run; only an excursion can.
    expect(Math.max(...runs)).toBeGreaterThanOrEqual(30);
    expect(runs.filter((n) => n >= 30).length).toBeGreaterThanOrEqual(3);
  });

  test("spikes occur at roughly the anomaly rate", () => {
    let s = makeDevices(1, 9)[0]!;
    let spikes = 0;
    for (let t = 0; t < 20000; t++) {
      const r = nextTemperature(s, t, { anomalyRate: 0.01, excursionsPerHour: 0 });
      s = r.state;
      if (r.spike) spikes += 1;
    }
    expect(spikes).toBeGreaterThan(120);
    expect(spikes).toBeLessThan(280);
  });
});
