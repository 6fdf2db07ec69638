/**
 * The scheduler with an injected runTurn and queue counts (the queue book's role):
 * per-agent serialism, the fleet-wide bound, round-robin fairness, waits, parking and
 * waking, and idle().
 */
import { describe, expect, spyOn, test } from "bun:test";
import { burstSlots, QuietPace, Scheduler, type TurnResult } from "../gateway/fleet/index.ts";
import { MAX_TIMER_MS } from "../gateway/types.ts";
import { waitFor } from "./helpers/gateway.ts";
import type { AgentId } from "../gateway/types.ts";

/** Test agent names are valid ids. */
const id = (s: string) => s as AgentId;

/** Resolve after the current I/O turn: lets other turns interleave without using wall time. */
const tick = () => new Promise<void>((r) => setImmediate(r));

/** Poll `cond` every millisecond until it holds; fails after 3 s (a bound, not a timing assertion). */
const holds = (cond: () => boolean, what: string): Promise<boolean> => waitFor(cond, 3000, what, 1);

/**
 * A fake fleet: per-agent queue lengths, and a runTurn that behaves like the episode
 * executor (look at the head, run for a few ticks, report) while recording what it saw.
 */
class FakeFleet {
  readonly queues = new Map<string, number>();
  readonly turns: string[] = [];
  readonly running = new Set<string>();
  overlaps = 0;
  maxRunning = 0;
  /** Per-agent override of a turn's outcome, consulted before the queue. */
  readonly script = new Map<string, (agent: string) => TurnResult | null>();
  ticksPerTurn = 2;

  add(agent: string, n: number): void {
    this.queues.set(agent, (this.queues.get(agent) ?? 0) + n);
  }

  get pending(): number {
    let n = 0;
    for (const q of this.queues.values()) n += q;
    return n;
  }

  /** The queue book's count, as the scheduler reads it. */
  readonly queued = (agent: string): number => this.queues.get(agent) ?? 0;

  turnsOf(agent: string): number {
    return this.turns.filter((a) => a === agent).length;
  }

  readonly runTurn = async (agent: string): Promise<TurnResult> => {
    if (this.running.has(agent)) this.overlaps++;
    this.running.add(agent);
    this.maxRunning = Math.max(this.maxRunning, this.running.size);
    this.turns.push(agent);
    try {
      const scripted = this.script.get(agent)?.(agent) ?? null;
      for (let i = 0; i < this.ticksPerTurn; i++) await tick();
      if (scripted) return scripted;
      const q = this.queues.get(agent) ?? 0;
      if (q === 0) return { kind: "empty" };
      this.queues.set(agent, q - 1);
      return { kind: "ran" };
    } finally {
      this.running.delete(agent);
    }
  };
}

function setup(maxConcurrent: number) {
  const fleet = new FakeFleet();
  const scheduler = new Scheduler({ maxConcurrent, runTurn: fleet.runTurn, queued: fleet.queued });
  /** Queue `n` stimuli for `agent`, telling the scheduler like the queue book does. */
  const enqueue = (agent: string, n = 1) => {
    fleet.add(agent, n);
    scheduler.notify(id(agent));
  };
  const drained = () =>
    holds(() => fleet.pending === 0 && scheduler.active === 0 && scheduler.busyAgents === 0, "all queues drained");
  return { fleet, scheduler, enqueue, drained };
}

/**
 * A scheduler whose turns each wait to be released by hand: `started` lists the agents whose
 * turns began, `finish()` releases everything until the scheduler is idle.
 */
function gated(opts: {
  maxConcurrent: number;
  queued?: (a: AgentId) => number;
  flooded?: (a: AgentId) => boolean;
  pace?: QuietPace;
  now?: () => number;
}) {
  const release: (() => void)[] = [];
  const started: string[] = [];
  const scheduler = new Scheduler({
    queued: () => 1,
    ...opts,
    runTurn: async (a) => {
      started.push(a);
      await new Promise<void>((r) => release.push(r));
      return { kind: "empty" };
    },
  });
  const finish = async () => {
    while (scheduler.active > 0 || release.length > 0) {
      for (const r of release.splice(0)) r();
      await tick();
    }
    await scheduler.idle();
  };
  return { scheduler, release, started, finish };
}

describe("scheduler", () => {
  test("runs one episode at a time per agent", async () => {
    const { fleet, enqueue, drained } = setup(4);
    for (let i = 0; i < 20; i++) enqueue("a");
    for (let i = 0; i < 5; i++) enqueue("b");
    await drained();
    expect(fleet.overlaps).toBe(0);
    expect(fleet.turnsOf("a")).toBeGreaterThanOrEqual(20);
    expect(fleet.maxRunning).toBe(2); // a and b together, never a twice
  });

  test("never runs more than maxConcurrent episodes across agents", async () => {
    const { fleet, enqueue, drained } = setup(3);
    for (let a = 0; a < 10; a++) enqueue(`agent-${a}`, 5);
    await drained();
    expect(fleet.maxRunning).toBe(3);
    expect(fleet.overlaps).toBe(0);
    for (let a = 0; a < 10; a++) expect(fleet.turnsOf(`agent-${a}`)).toBeGreaterThanOrEqual(5);
  });

  test.each([1, 2, 3])("round-robin: a quiet agent is not starved by a flooded one (maxConcurrent %i)", async (max) => {
    const { fleet, enqueue, drained } = setup(max);
    enqueue("flooded", 1000);
    enqueue("quiet", 1);
    await holds(() => fleet.turnsOf("quiet") > 0, "the quiet agent's first turn");
    expect(fleet.turns.indexOf("quiet")).toBeLessThan(max + 1);
    await drained();
    expect(fleet.turnsOf("flooded")).toBeGreaterThanOrEqual(1000);
  });

  test("round-robin: an agent arriving while others are busy gets a turn within maxConcurrent + 1 turns", async () => {
    const max = 2;
    const { fleet, enqueue, drained } = setup(max);
    for (let i = 0; i < 300; i++) for (const a of ["f1", "f2", "f3"]) enqueue(a);
    await holds(() => fleet.turns.length >= 50, "50 turns of the flooded agents");
    const arrivedAt = fleet.turns.length;
    enqueue("late", 1);
    await holds(() => fleet.turnsOf("late") > 0, "the late agent's first turn");
    expect(fleet.turns.indexOf("late") - arrivedAt).toBeLessThan(max + 1);
    await drained();
  });

  test("a waiting agent is retried after its time passes, and does not hold up others", async () => {
    const { fleet, scheduler, enqueue, drained } = setup(1);
    let until = 0;
    let retriedAt = 0;
    fleet.script.set("backoff", () => {
      if (until === 0) {
        until = Date.now() + 40;
        return { kind: "wait", until };
      }
      retriedAt ||= Date.now();
      return null;
    });
    enqueue("backoff", 1);
    enqueue("other", 3);
    await drained();
    expect(fleet.turnsOf("backoff")).toBeGreaterThanOrEqual(2);
    // The retry started no earlier than it was allowed to.
    expect(retriedAt).toBeGreaterThanOrEqual(until);
    // The other agent got the slot as soon as backoff reported its wait.
    expect(fleet.turns[1]).toBe("other");
    expect(scheduler.active).toBe(0);
  });

  test("new stimuli for a waiting agent do not bypass its wait", async () => {
    const { fleet, enqueue, drained } = setup(2);
    let until = 0;
    const startedAt: number[] = [];
    fleet.script.set("w", () => {
      startedAt.push(Date.now());
      if (until === 0) {
        until = Date.now() + 40;
        return { kind: "wait", until };
      }
      return null;
    });
    enqueue("w", 1);
    await holds(() => until > 0 && fleet.running.size === 0, "the first (waiting) turn");
    enqueue("w", 2);
    await drained();
    expect(startedAt.slice(1).every((t) => t >= until)).toBe(true);
  });

  test("an agent whose wait has passed runs once enqueued and keeps going until its queue is empty", async () => {
    let clock = 1_000_000;
    const fleet = new FakeFleet();
    const scheduler = new Scheduler({
      maxConcurrent: 1,
      runTurn: fleet.runTurn,
      queued: fleet.queued,
      now: () => clock,
    });
    let waited = false;
    fleet.script.set("a", () => {
      if (waited) return null;
      waited = true;
      return { kind: "wait", until: clock + 3_600_000 }; // its timer will not fire during this test
    });
    fleet.add("a", 1);
    scheduler.notify(id("a"));
    await holds(() => waited && scheduler.active === 0, "the waiting turn");
    clock += 7_200_000; // the wait is over on the injected clock
    fleet.add("a", 3);
    scheduler.notify(id("a"));
    await holds(
      () => fleet.pending === 0 && scheduler.active === 0 && scheduler.busyAgents === 0,
      "a drained without its timer",
    );
    scheduler.stop();
  });

  test("a parked agent does not run until wake()", async () => {
    const { fleet, scheduler, enqueue, drained } = setup(2);
    let paused = true;
    fleet.script.set("p", () => (paused ? { kind: "parked" } : null));
    enqueue("p", 2);
    enqueue("other", 2);
    await holds(
      () => fleet.turnsOf("p") === 1 && fleet.queues.get("other") === 0 && scheduler.active === 0,
      "p parked, other done",
    );
    // More stimuli for a parked agent are kept, not run.
    enqueue("p", 1);
    for (let i = 0; i < 50; i++) await tick();
    await Bun.sleep(20);
    expect(fleet.turnsOf("p")).toBe(1);
    expect(fleet.queues.get("p")).toBe(3);
    paused = false;
    scheduler.wake(id("p"));
    await drained();
    expect(fleet.queues.get("p")).toBe(0);
  });

  test("work that waits on a park or a wait contends for no slot; running and ready agents do", async () => {
    const { fleet, scheduler, enqueue, drained } = setup(1);
    fleet.script.set("p", () => ({ kind: "parked" }));
    fleet.script.set("w", () => ({ kind: "wait", until: Date.now() + 60_000 }));
    enqueue("p", 3);
    enqueue("w", 3);
    await holds(
      () => fleet.turnsOf("p") === 1 && fleet.turnsOf("w") === 1 && scheduler.active === 0,
      "p and w set aside",
    );
    // Both keep their work (and their entries), but neither contends.
    expect(scheduler.busyAgents).toBe(2);
    expect(scheduler.contendingAgents).toBe(0);
    // One slot: a runs, b waits for it; both contend.
    fleet.ticksPerTurn = 20;
    enqueue("a", 1);
    enqueue("b", 1);
    expect(scheduler.active).toBe(1);
    expect(scheduler.contendingAgents).toBe(2);
    await holds(() => fleet.queues.get("a") === 0 && fleet.queues.get("b") === 0 && scheduler.active === 0, "a, b ran");
    expect(scheduler.contendingAgents).toBe(0);
    fleet.script.clear();
    scheduler.wake(id("p"));
    scheduler.wake(id("w"));
    await drained();
    expect(scheduler.contendingAgents).toBe(0);
  });

  test("wake() of an agent with nothing queued starts no turn and keeps no entry", async () => {
    const { fleet, scheduler, drained } = setup(2);
    scheduler.wake(id("idle-agent"));
    await drained();
    expect(fleet.turns).toEqual([]);
    expect(scheduler.busyAgents).toBe(0);
  });

  test("notify() of agents with nothing queued keeps no entry (a rollout wakes every agent of a type)", async () => {
    const { fleet, scheduler, drained } = setup(2);
    for (let i = 0; i < 100; i++) scheduler.notify(id(`idle-${i}`));
    await drained();
    expect(fleet.turns).toEqual([]);
    expect(scheduler.busyAgents).toBe(0);
    expect(scheduler.contendingAgents).toBe(0);
  });

  test("a wait longer than a timer can hold is armed in steps, not re-armed every millisecond", async () => {
    const { fleet, scheduler, enqueue } = setup(1);
    const month = 30 * 86_400_000;
    fleet.script.set("w", () => ({ kind: "wait", until: Date.now() + month }));
    const delays: number[] = [];
    const real = globalThis.setTimeout;
    const spy = spyOn(globalThis, "setTimeout").mockImplementation(((fn: () => void, ms?: number) => {
      delays.push(ms ?? 0);
      return real(fn, ms);
    }) as typeof setTimeout);
    try {
      enqueue("w", 1);
      await holds(() => fleet.turnsOf("w") === 1 && scheduler.active === 0, "w waits");
      await Bun.sleep(50);
      // One timer, at the longest delay a timer holds; past it setTimeout fires at once (and it
      // was re-armed every millisecond: ~50 timers in this sleep).
      expect(delays.filter((ms) => ms > 1000)).toEqual([MAX_TIMER_MS]);
      expect(fleet.turnsOf("w")).toBe(1);
    } finally {
      spy.mockRestore();
      scheduler.stop();
    }
  });

  test("a stimulus queued while a turn finds the queue empty still gets its turn", async () => {
    const { fleet, scheduler, drained } = setup(2);
    // The turn looks at an empty queue; intake commits a stimulus and tells the scheduler
    // before that turn reports back "empty".
    let raced = false;
    fleet.script.set("a", () => {
      if (raced) return null;
      raced = true;
      queueMicrotask(() => {
        fleet.add("a", 1);
        scheduler.notify(id("a"));
      });
      return { kind: "empty" };
    });
    fleet.add("a", 0);
    fleet.queues.set("a", 1); // the book still counts one the turn will not find
    scheduler.wake(id("a"));
    await drained();
    expect(fleet.queues.get("a")).toBe(0);
    expect(fleet.turnsOf("a")).toBeGreaterThanOrEqual(2);
  });

  test("a wake() that arrives while a turn parks the agent is not lost", async () => {
    const { fleet, scheduler, enqueue, drained } = setup(2);
    // The turn reads "paused"; the operator resumes (and wakes) before the turn reports back.
    let paused = true;
    fleet.script.set("r", () => {
      if (!paused) return null;
      queueMicrotask(() => {
        paused = false;
        scheduler.wake(id("r"));
      });
      return { kind: "parked" };
    });
    enqueue("r", 1);
    await drained();
    expect(fleet.queues.get("r")).toBe(0);
  });

  test("a wake() that arrives while a turn decides to wait re-examines the agent at once", async () => {
    const { fleet, scheduler, enqueue, drained } = setup(2);
    let first = true;
    fleet.script.set("q", () => {
      if (!first) return null;
      first = false;
      queueMicrotask(() => scheduler.wake(id("q"))); // e.g. an operator retries the stimulus now
      return { kind: "wait", until: Date.now() + 3_600_000 };
    });
    enqueue("q", 1);
    await drained();
    expect(fleet.queues.get("q")).toBe(0);
  });

  test("a turn that throws is treated as a wait, not a crash of the scheduler", async () => {
    const fleet = new FakeFleet();
    let thrown = false;
    const scheduler = new Scheduler({
      maxConcurrent: 1,
      queued: fleet.queued,
      runTurn: async (agent) => {
        if (agent === "bad" && !thrown) {
          thrown = true;
          throw new Error("bug");
        }
        return fleet.runTurn(agent);
      },
    });
    fleet.add("bad", 1);
    fleet.add("good", 2);
    scheduler.notify(id("bad"));
    scheduler.notify(id("good"));
    await holds(() => fleet.queues.get("good") === 0, "good drained");
    expect(thrown).toBe(true);
    scheduler.stop();
  });

  test("idle() resolves at once when nothing runs", async () => {
    const { scheduler } = setup(2);
    await scheduler.idle();
    expect(scheduler.active).toBe(0);
  });

  test("after stop(), idle() resolves when the running turns finish and no new turn starts", async () => {
    const release: (() => void)[] = [];
    const started: string[] = [];
    const scheduler = new Scheduler({
      maxConcurrent: 2,
      queued: () => 5,
      runTurn: async (agent) => {
        started.push(agent);
        await new Promise<void>((r) => release.push(r));
        return { kind: "ran" };
      },
    });
    scheduler.notify(id("a"));
    scheduler.notify(id("b"));
    scheduler.notify(id("c"));
    expect(scheduler.active).toBe(2);
    scheduler.stop();
    let idle = false;
    const done = scheduler.idle().then(() => (idle = true));
    await tick();
    expect(idle).toBe(false);
    for (const r of release.splice(0)) r();
    await done;
    expect(idle).toBe(true);
    expect(scheduler.active).toBe(0);
    for (let i = 0; i < 10; i++) await tick();
    expect(started).toEqual(["a", "b"]);
  });

  test("setMaxConcurrent raises the bound and starts what now fits", async () => {
    const { scheduler, finish } = gated({ maxConcurrent: 1 });
    for (const a of ["a", "b", "c"]) scheduler.notify(id(a));
    expect(scheduler.active).toBe(1);
    scheduler.setMaxConcurrent(3);
    expect(scheduler.active).toBe(3);
    await finish();
  });

  test("a cap given as a rule of the limit follows a change of the limit while it holds", async () => {
    const { scheduler, finish } = gated({ maxConcurrent: 4 });
    scheduler.setCap(burstSlots);
    expect(scheduler.capacity).toBe(1);
    // A redeploy raises max_concurrent_episodes mid-burst: the burst's cap is a quarter of the new one.
    scheduler.setMaxConcurrent(16);
    expect(scheduler.capacity).toBe(4);
    scheduler.setMaxConcurrent(2);
    expect(scheduler.capacity).toBe(1);
    scheduler.setCap(null);
    expect(scheduler.capacity).toBe(2);
    await finish();
  });

  test("a cap lowers the bound without stopping running turns; lifting it starts what now fits", async () => {
    const { scheduler, release, finish } = gated({ maxConcurrent: 4 });
    for (const a of ["a", "b"]) scheduler.notify(id(a));
    expect(scheduler.active).toBe(2);
    scheduler.setCap(1);
    expect(scheduler.capacity).toBe(1);
    // Both running turns go on; new work waits while the cap holds.
    for (const a of ["c", "d", "e"]) scheduler.notify(id(a));
    expect(scheduler.active).toBe(2);
    for (const r of release.splice(0)) r();
    await holds(() => release.length === 1, "one turn started under the cap");
    expect(scheduler.active).toBe(1);
    scheduler.setCap(null);
    expect(scheduler.capacity).toBe(4);
    expect(scheduler.active).toBe(3);
    await finish();
  });

  test("under a cap only flooded agents wait for a slot below it; an agent with little queued takes any", async () => {
    const backlog = new Map<string, number>([
      ["f1", 100],
      ["f2", 100],
      ["f3", 100],
      ["quiet", 1],
    ]);
    const { scheduler, started, finish } = gated({
      maxConcurrent: 4,
      queued: (a) => backlog.get(a) ?? 0,
      flooded: (a) => (backlog.get(a) ?? 0) >= 8,
    });
    scheduler.setCap(1);
    for (const a of ["f1", "f2", "f3", "quiet"]) scheduler.notify(id(a));
    // One flooded agent under the cap; the quiet one beside it; the other floods wait.
    expect(started).toEqual(["f1", "quiet"]);
    scheduler.setCap(null);
    // Lifting the cap starts the held floods, in the order they arrived.
    expect(started).toEqual(["f1", "quiet", "f2", "f3"]);
    await finish();
  });

  test("under a cap agents that are not flooded start at a pace, the fewest starts in the burst first", async () => {
    let t = 1_000;
    const backlog = new Map<string, number>([
      ["busy", 5],
      ["a", 1],
      ["b", 1],
      ["ping", 1],
      ["flood", 100],
    ]);
    const pace = new QuietPace(0.5, 2);
    pace.ran(50); // a start per 100 ms once the bucket's two are spent
    const { scheduler, started, release, finish } = gated({
      maxConcurrent: 8,
      queued: (a) => backlog.get(a) ?? 0,
      flooded: (a) => (backlog.get(a) ?? 0) >= 8,
      pace,
      now: () => t,
    });
    scheduler.setCap(1);
    // A flooded agent is not paced: it takes the slot below the cap.
    scheduler.notify(id("flood"));
    expect(started).toEqual(["flood"]);
    for (const a of ["busy", "a", "b"]) scheduler.notify(id(a));
    // Two at once from the bucket (two per slot of the cap); the third waits for the pace though slots are free.
    expect(started).toEqual(["flood", "busy", "a"]);
    // "busy" comes back with more work while "ping" arrives: "ping" has not started in this burst, "busy" has.
    release.splice(1, 1)[0]!();
    await tick();
    scheduler.notify(id("busy"));
    scheduler.notify(id("ping"));
    t += 100;
    await holds(() => started.length === 4, "one more start after 100 ms");
    expect(started[3]).toBe("b");
    t += 100;
    await holds(() => started.length === 5, "the next start after another 100 ms");
    expect(started[4]).toBe("ping");
    // Lifting the cap starts whoever the pace still held, at once.
    scheduler.setCap(null);
    expect(started.slice(5)).toEqual(["busy"]);
    await finish();
  });
});
