/**
 * The fleet's timer scheduler (gateway/intake/timers.ts) on a fake clock with manual
 * timeouts: fires at aligned scheduled times, catch-up after downtime, redeploys, the
 * one-minute sleep cap, a failed fire retried, and stop().
 */
import { describe, expect, test } from "bun:test";
import pino from "pino";
import {
  CATCH_UP_ALL_MAX,
  FAILED_FIRE_RETRY_MS,
  firesBetween,
  MAX_TIMER_SLEEP_MS,
  nextFire,
  Timers,
} from "../gateway/intake/index.ts";
import { compileSpec, type FleetSpec } from "../gateway/spec/index.ts";

const log = pino({ level: "silent" });
const S = 1000;

async function specWith(types: Record<string, string>): Promise<FleetSpec> {
  const text = Object.entries(types)
    .map(([name, timer]) => `[agents.${name}]\nmodule = "m.ts"\n${timer}\n`)
    .join("\n");
  return (await compileSpec(text, "/srv/fleet.toml")).spec;
}

const settle = async () => {
  for (let i = 0; i < 10; i++) await new Promise<void>((r) => setImmediate(r));
};

/** A clock that moves only when told, and the timeouts armed on it. */
class FakeClock {
  t: number;
  private armed: { fn: () => void; at: number; id: number }[] = [];
  private ids = 0;
  constructor(start: number) {
    this.t = start;
  }
  readonly now = () => this.t;
  readonly setTimer = (fn: () => void, ms: number) => {
    const id = ++this.ids;
    this.armed.push({ fn, at: this.t + ms, id });
    return id;
  };
  readonly clearTimer = (id: unknown) => {
    this.armed = this.armed.filter((a) => a.id !== id);
  };
  /** Delays of the timeouts armed now. */
  get delays(): number[] {
    return this.armed.map((a) => a.at - this.t);
  }
  /** Move forward `ms`, running each timeout when its time comes (and the work it starts). */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    for (;;) {
      const next = this.armed.filter((a) => a.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!next) break;
      this.armed = this.armed.filter((a) => a !== next);
      this.t = Math.max(this.t, next.at);
      next.fn();
      await settle();
    }
    this.t = end;
  }
}

function setup(
  start: number,
  opts: { last?: Record<string, number>; fail?: (at: number) => boolean; log?: typeof log } = {},
) {
  const clock = new FakeClock(start);
  const fires: { type: string; at: number; now: number }[] = [];
  const saved = new Map<string, number>(Object.entries(opts.last ?? {}));
  const timers = new Timers({
    fire: async (type, at, now) => {
      if (opts.fail?.(at)) throw new Error("store down");
      fires.push({ type: type.name, at, now });
    },
    lastFire: async (type) => saved.get(type) ?? null,
    saveLastFire: async (type, at) => {
      saved.set(type, at);
    },
    log: opts.log ?? log,
    now: clock.now,
    setTimer: clock.setTimer,
    clearTimer: clock.clearTimer,
  });
  return { clock, fires, saved, timers };
}

describe("timers", () => {
  test("an interval fires at each aligned scheduled time and remembers the last one", async () => {
    const spec = await specWith({ tick: 'every = "10s"' });
    const { clock, fires, saved, timers } = setup(1_000_000_003);
    await timers.update(spec);
    expect(fires).toEqual([]); // a first start has nothing to catch up
    await clock.advance(30 * S);
    expect(fires.map((f) => f.at)).toEqual([1_000_010_000, 1_000_020_000, 1_000_030_000]);
    expect(fires.every((f) => f.now === f.at)).toBe(true);
    expect(saved.get("tick")).toBe(1_000_030_000);
    expect(timers.fired).toBe(3);
  });

  test.each([
    ["none", []],
    ["one", [1_000_050_000]],
    ["all", [1_000_010_000, 1_000_020_000, 1_000_030_000, 1_000_040_000, 1_000_050_000]],
  ] as const)("catch_up = %s after downtime", async (policy, expected) => {
    const spec = await specWith({ tick: `every = "10s"\ncatch_up = "${policy}"` });
    const lines: { replayed?: number; msg: string }[] = [];
    const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    const { fires, timers } = setup(1_000_055_000, { last: { tick: 1_000_000_000 }, log: logger });
    await timers.update(spec);
    expect(fires.map((f) => f.at)).toEqual([...expected]);
    // The log counts what was replayed (five fires were missed; "one" replays the newest).
    const said = lines.filter((l) => l.msg.startsWith("timer catch-up")).map((l) => l.replayed);
    expect(said).toEqual(expected.length === 0 ? [] : [expected.length]);
  });

  test.each([
    ["none", [1_000_030_000]],
    ["one", [1_000_030_000]],
    ["all", [1_000_010_000, 1_000_020_000, 1_000_030_000]],
  ] as const)("a tick that comes late past several scheduled times follows catch_up = %s", async (policy, expected) => {
    const spec = await specWith({ tick: `every = "10s"\ncatch_up = "${policy}"` });
    const { clock, fires, timers } = setup(1_000_000_003);
    await timers.update(spec);
    clock.t += 35 * S; // the event loop was blocked: the 10 s timeout runs at 35 s
    await clock.advance(0);
    expect(fires.map((f) => f.at)).toEqual([...expected]);
    await clock.advance(5 * S);
    expect(fires.at(-1)!.at).toBe(1_000_040_000); // and back on schedule
  });

  test.each([
    ["none", 0],
    ["one", 1],
    ["all", 18],
  ] as const)("a timer that never fired before a shutdown catches up (%s) after 3 h down", async (policy, n) => {
    const spec = await specWith({ hourly: `every = "10m"\ncatch_up = "${policy}"` });
    const start = 1_700_000_400_000 + 1000; // just past a 10-minute boundary: stopped 50 s later
    const first = setup(start);
    await first.timers.update(spec);
    await first.clock.advance(50 * S);
    await first.timers.stop();
    expect(first.fires).toEqual([]);
    const { fires, timers } = setup(start + 3 * 3600 * S, { last: Object.fromEntries(first.saved) });
    await timers.update(spec);
    expect(fires).toHaveLength(n);
    if (n > 0) expect(fires.at(-1)!.at).toBe(1_700_000_400_000 + 3 * 3600 * S);
  });

  test("catch_up = all replays at most CATCH_UP_ALL_MAX fires, the newest", async () => {
    const spec = await specWith({ tick: 'every = "1s"\ncatch_up = "all"' });
    const { fires, timers } = setup(10_000_000, { last: { tick: 10_000_000 - 1000 * S } });
    await timers.update(spec);
    expect(fires).toHaveLength(CATCH_UP_ALL_MAX);
    expect(fires.at(-1)!.at).toBe(10_000_000);
  });

  test.each([
    ["one", 1],
    ["all", CATCH_UP_ALL_MAX],
  ] as const)(
    "a seconds cron down for a week catches up (%s) at once, not walking every missed fire",
    async (policy, n) => {
      const spec = await specWith({ sec: `cron = "* * * * * *"\ncatch_up = "${policy}"` });
      const start = 1_700_000_000_000;
      const { fires, timers } = setup(start + 7 * 86_400 * S, { last: { sec: start } });
      const t0 = performance.now();
      await timers.update(spec);
      expect(performance.now() - t0).toBeLessThan(3000);
      expect(fires).toHaveLength(n);
      expect(fires.at(-1)!.at).toBe(start + 7 * 86_400 * S);
    },
  );

  test("a forward clock jump of a week on a seconds cron fires the newest at once", async () => {
    const spec = await specWith({ sec: 'cron = "* * * * * *"' });
    const start = 1_700_000_000_000;
    const { clock, fires, timers } = setup(start);
    await timers.update(spec);
    clock.t += 7 * 86_400 * S; // no RTC, then NTP sets the clock
    const t0 = performance.now();
    await clock.advance(0);
    expect(performance.now() - t0).toBeLessThan(3000);
    expect(fires.map((f) => f.at)).toEqual([start + 7 * 86_400 * S]);
  });

  test("a redeploy keeps an unchanged timer's plan and stops a removed type's", async () => {
    const both = await specWith({ a: 'every = "10s"', b: 'every = "10s"' });
    const onlyA = await specWith({ a: 'every = "10s"' });
    const { clock, fires, timers } = setup(2_000_000_000);
    await timers.update(both);
    await clock.advance(10 * S);
    await timers.update(onlyA);
    await clock.advance(20 * S);
    expect(fires.filter((f) => f.type === "a")).toHaveLength(3);
    expect(fires.filter((f) => f.type === "b")).toHaveLength(1);
  });

  test("a schedule changed by a redeploy starts from now: no catch-up for the time before the change", async () => {
    const hourly = await specWith({ t: 'cron = "0 * * * *"' });
    const every2s = await specWith({ t: 'every = "2s"\ncatch_up = "all"' });
    const { clock, fires, saved, timers } = setup(3_600_000 * 500 - 1);
    await timers.update(hourly);
    await clock.advance(1);
    expect(fires.map((f) => f.at)).toEqual([3_600_000 * 500]);
    await clock.advance(30 * S);
    await timers.update(every2s);
    expect(fires).toHaveLength(1); // 22:00:02 ... 22:00:30 were never due
    expect(saved.get("t")).toBe(3_600_000 * 500 + 30 * S); // a restart catches up from the change
    await clock.advance(2 * S);
    expect(fires.map((f) => f.at)).toEqual([3_600_000 * 500, 3_600_000 * 500 + 32 * S]);
  });

  test("a timer removed by a redeploy and added back later replays nothing from its absence", async () => {
    const withTimer = await specWith({ t: 'every = "10s"\ncatch_up = "all"' });
    const without = await specWith({ t: "" });
    const { clock, fires, timers } = setup(1_000_000_000);
    await timers.update(withTimer);
    await clock.advance(10 * S);
    await timers.update(without);
    await clock.advance(60 * S);
    await timers.update(withTimer);
    expect(fires.map((f) => f.at)).toEqual([1_000_010_000]);
    await clock.advance(10 * S);
    expect(fires.map((f) => f.at)).toEqual([1_000_010_000, 1_000_080_000]);
  });

  test("the scheduler never sleeps longer than a minute, so a clock jump is noticed", async () => {
    const spec = await specWith({ hourly: 'every = "1h"' });
    const { clock, timers } = setup(3_600_000 * 100 + 1);
    await timers.update(spec);
    expect(clock.delays).toEqual([MAX_TIMER_SLEEP_MS]);
  });

  test("a fire that cannot be recorded is retried after a pause, with the same scheduled time", async () => {
    const spec = await specWith({ tick: 'every = "10s"' });
    let failures = 1;
    const { clock, fires, saved, timers } = setup(1_000_000_000, { fail: () => failures-- > 0 });
    await timers.update(spec);
    await clock.advance(10 * S);
    expect(fires).toEqual([]);
    expect(clock.delays).toEqual([FAILED_FIRE_RETRY_MS]);
    await clock.advance(FAILED_FIRE_RETRY_MS);
    expect(fires.map((f) => f.at)).toEqual([1_000_010_000]);
    expect(saved.get("tick")).toBe(1_000_010_000);
  });

  test("stop() waits for the fire in progress, and nothing fires after it", async () => {
    const spec = await specWith({ tick: 'every = "10s"' });
    const clock = new FakeClock(1_000_000_000);
    let release!: () => void;
    const fired: number[] = [];
    const timers = new Timers({
      fire: async (_type, at) => {
        await new Promise<void>((r) => (release = r));
        fired.push(at);
      },
      lastFire: async () => null,
      saveLastFire: async () => {},
      log,
      now: clock.now,
      setTimer: clock.setTimer,
      clearTimer: clock.clearTimer,
    });
    await timers.update(spec);
    void clock.advance(10 * S);
    await settle();
    let stopped = false;
    const stopping = timers.stop().then(() => (stopped = true));
    await settle();
    expect(stopped).toBe(false);
    release();
    await stopping;
    expect(fired).toEqual([1_000_010_000]);
    await clock.advance(60 * S);
    expect(fired).toEqual([1_000_010_000]);
  });
});

describe("timer arithmetic", () => {
  test("nextFire is strictly after and aligned to the epoch; firesBetween keeps the newest", async () => {
    const timer = (await specWith({ t: 'every = "10s"' })).agents.t!.timer!;
    expect(nextFire(timer, 20_000)).toBe(30_000);
    expect(nextFire(timer, 20_001)).toBe(30_000);
    expect(firesBetween(timer, 0, 50_000, 2)).toEqual([40_000, 50_000]);
    const cron = (await specWith({ c: 'cron = "*/5 * * * *"' })).agents.c!.timer!;
    expect(nextFire(cron, 0)).toBe(300_000);
    expect(firesBetween(cron, 0, 900_000, 10)).toEqual([300_000, 600_000, 900_000]);
  });

  test("cron is read in UTC with seconds first in the 6-field form; every lines up with the epoch", async () => {
    const at8 = (await specWith({ c: 'cron = "0 8 * * *"' })).agents.c!.timer!;
    expect(new Date(nextFire(at8, Date.UTC(2030, 0, 1))!).toISOString()).toBe("2030-01-01T08:00:00.000Z");
    const secs = (await specWith({ c: 'cron = "30 0 8 * * *"' })).agents.c!.timer!;
    expect(new Date(nextFire(secs, Date.UTC(2030, 0, 1))!).toISOString()).toBe("2030-01-01T08:00:30.000Z");
    const weekly = (await specWith({ w: 'every = "7d"' })).agents.w!.timer!;
    expect(new Date(nextFire(weekly, Date.UTC(2030, 0, 1))!).toISOString()).toBe("2030-01-03T00:00:00.000Z");
  });
});
