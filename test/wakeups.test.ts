/**
 * Durable wake-ups (agents/README.md, docs/guarantees.md): `ctx.wakeIn` / `ctx.wakeAt` /
 * `ctx.cancelWake` in a real episode subprocess, the wake-up clock against a real libSQL
 * file on a fake clock, and `agent-fleets/testing`'s fake of them. The executor's side
 * (written with the commit, a failed episode schedules nothing) is in executor.test.ts;
 * kill -9 and replay are in e2e.wakeups.test.ts.
 */
import { afterAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import pino from "pino";
import { testAgent, stimuli } from "agent-fleets/testing";
import { defineAgent } from "../agents/sdk/index.ts";
import doorWatcher from "../agents/examples/door-watcher.ts";
import type { EpisodeRecord, ParentMessage } from "../agents/protocol.ts";
import {
  buildWakes,
  defaultSpawnOptions,
  runEpisode,
  toStimulus,
  wakeStimulusPayload,
  type RunLimits,
} from "../gateway/episode/index.ts";
import { type IntakeReport, type Target, WakeClock, WAKE_RETRY_MS } from "../gateway/intake/index.ts";
import { gcPass } from "../gateway/ops/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { Store } from "../gateway/store/index.ts";
import type { AgentId, StimulusId } from "../gateway/types.ts";

setDefaultTimeout(30_000);
const root = mkdtempSync(join(tmpdir(), "fleet-wakeups-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

type Start = Extract<ParentMessage, { t: "start" }>;
const WAKER = fileURLToPath(new URL("./fixtures/wake/waker.ts", import.meta.url));
const DEEP = fileURLToPath(new URL("./fixtures/wake/deep.ts", import.meta.url));
const EPISODE = "0190f000-0000-7000-8000-00000000000a";
const LIMITS: RunLimits = {
  timeoutMs: 20_000,
  memoryMb: 256,
  maxRecords: 10_000,
  maxRecordBytes: 8 * 1024 * 1024,
  maxOpenFiles: 256,
  maxProcesses: 4096,
};

function start(payload: unknown, over: Partial<Start> = {}): Start {
  return {
    t: "start",
    episode: EPISODE,
    agent: { type: "waker", key: "k1", id: "waker/k1" },
    module: WAKER,
    config: {},
    state: null,
    fresh: true,
    stimulus: { id: "id:1", kind: "manual", payload, received_at: 1_700_000_000_000 },
    replay: null,
    limits: { max_records: 10_000, max_record_bytes: 8 * 1024 * 1024 },
    wakes: { pending: [], max: 100 },
    ...over,
  };
}

async function run(s: Start): Promise<{ records: EpisodeRecord[]; emits: unknown[]; ok: boolean }> {
  const r = await runEpisode(
    s,
    LIMITS,
    async () => ({ ok: false, result: { error: "denied" } }),
    defaultSpawnOptions(),
  );
  if (!r.ok) throw new Error(`episode failed: ${r.kind}: ${r.message}`);
  return { records: r.records, emits: r.records.flatMap((x) => (x.k === "emit" ? [x.data] : [])), ok: r.ok };
}

describe("ctx.wakeIn / wakeAt / cancelWake in an episode subprocess", () => {
  test("wakeIn records the pending set, the clock it read and a wake-up due that long after", async () => {
    const { records, emits } = await run(start({ in: "10s", data: { door: "d1" } }));
    const now = records.find((r) => r.k === "now");
    expect(now?.k).toBe("now");
    const at = (now as { v: number }).v + 10_000;
    expect(records.filter((r) => r.k === "pending_wakes" || r.k === "wake")).toEqual([
      { k: "pending_wakes", ids: [] },
      { k: "wake", id: `${EPISODE}.w1`, at, data: { door: "d1" } },
    ]);
    expect(emits).toEqual([{ set: [`${EPISODE}.w1`] }]);
  });

  test("wakeAt takes an absolute time; a number delay is milliseconds", async () => {
    const a = await run(start({ at: 1_800_000_000_000 }));
    expect(a.records.find((r) => r.k === "wake")).toMatchObject({ at: 1_800_000_000_000, data: null });
    const b = await run(start({ in: 250 }));
    const now = (b.records.find((r) => r.k === "now") as { v: number }).v;
    expect(b.records.find((r) => r.k === "wake")).toMatchObject({ at: now + 250 });
  });

  test("past max_wakeups pending, wakeIn throws ToolDenied and sets nothing more", async () => {
    const { records, emits } = await run(start({ many: 3, in: "1m" }, { wakes: { pending: ["old.w1"], max: 2 } }));
    expect(records.filter((r) => r.k === "wake").map((r) => (r as { id: string }).id)).toEqual([`${EPISODE}.w1`]);
    expect(emits[0]).toMatchObject({
      refused: "ToolDenied",
      message: "tool wake denied: the agent already has 2 wake-ups pending (max_wakeups 2)",
      set: [`${EPISODE}.w1`],
    });
  });

  test("a bad delay is a TypeError naming the value", async () => {
    const { records, emits } = await run(start({ in: "soon" }));
    expect(records.some((r) => r.k === "wake")).toBe(false);
    expect(emits[0]).toMatchObject({ refused: "TypeError", message: expect.stringContaining('"soon"') });
  });

  test("a delay too long to be due names the delay, not the time it sums to", async () => {
    const { records, emits } = await run(start({ in: 1e300 }));
    expect(records.some((r) => r.k === "wake")).toBe(false);
    expect(emits[0]).toMatchObject({
      refused: "TypeError",
      message: expect.stringMatching(/^wake delay 1e\+300 is too long/),
    });
  });

  test.each(["wake", "emit"] as const)(
    "a %s value nested as deep as its record allows is taken; one level more is a TypeError at the call",
    async (what) => {
      const deep = (depth: number) => start({ depth, what }, { module: DEEP });
      const ok = await run(deep(197));
      expect(ok.records.some((r) => r.k === what)).toBe(true);
      const over = await run(deep(198));
      const name = what === "wake" ? "wake-up payload" : "emitted payload";
      expect(over.emits).toEqual([
        { refused: "TypeError", message: `${name} nests deeper than 197 levels (arrays and objects)` },
      ]);
    },
  );

  test("cancelWake is true and recorded for a pending id, false and unrecorded for any other", async () => {
    const pending = { wakes: { pending: ["e1.w1"], max: 100 } };
    const hit = await run(start({ cancel: "e1.w1" }, pending));
    expect(hit.emits).toEqual([{ cancelled: "e1.w1", was_pending: true }]);
    expect(hit.records.filter((r) => r.k === "cancel_wake")).toEqual([{ k: "cancel_wake", id: "e1.w1" }]);
    const miss = await run(start({ cancel: "e9.w9" }, pending));
    expect(miss.emits).toEqual([{ cancelled: "e9.w9", was_pending: false }]);
    expect(miss.records.some((r) => r.k === "cancel_wake")).toBe(false);
  });

  test("in a replay the pending set comes from the recording, not from the start message", async () => {
    const { emits } = await run(
      start(
        { cancel: "rec.w1" },
        { replay: { now: [], random: [], tools: [], pending_wakes: ["rec.w1"] }, wakes: { pending: [], max: 100 } },
      ),
    );
    expect(emits).toEqual([{ cancelled: "rec.w1", was_pending: true }]);
  });
});

const clockSpec = await compileSpec('[agents.waker]\nmodule = "w.ts"\n', "/srv/fleet.toml");

test("over max_wakeups (a reload lowered it) the gateway fails only an episode that sets one", () => {
  const pending = Array.from({ length: 20 }, (_, i) => `old.w${i + 1}`);
  const check = (records: EpisodeRecord[]) => buildWakes(EPISODE, "gw", "waker/k1" as AgentId, records, pending, 10, 0);
  expect(
    check([
      { k: "log", level: "info", msg: "hi" },
      { k: "emit", data: 1 },
    ]),
  ).toMatchObject({ ok: true });
  const cancels = pending.map((id): EpisodeRecord => ({ k: "cancel_wake", id }));
  expect(check(cancels)).toMatchObject({ ok: true, cancels: pending });
  const wake: EpisodeRecord = { k: "wake", id: `${EPISODE}.w1`, at: 5, data: null };
  expect(check([wake])).toEqual({ ok: false, message: "a wake-up was set with max_wakeups (10) already pending" });
  // Cancelled down to 9 first, it may set one again (as ctx.wakeAt would let it).
  expect(check([...cancels.slice(0, 11), wake])).toMatchObject({ ok: true, wakes: [{ id: `${EPISODE}.w1` }] });
});

test("ctx.wakeIn is denied over a lowered max_wakeups, and cancelWake still works", async () => {
  const pending = Array.from({ length: 20 }, (_, i) => `old.w${i + 1}`);
  const r = await run(start({ in: 1000 }, { wakes: { pending, max: 10 } }));
  expect(r.emits).toContainEqual(expect.objectContaining({ refused: "ToolDenied", set: [] }));
  const c = await run(start({ cancel: "old.w1" }, { wakes: { pending, max: 10 } }));
  expect(c.emits).toEqual([{ cancelled: "old.w1", was_pending: true }]);
});

describe("the wake-up clock", () => {
  const type = clockSpec.spec.agents.waker!;
  const A = "waker/a" as AgentId;
  let n = 0;
  let store: Store;
  let clock: number;
  let timers: { fn: () => void; ms: number }[];
  let refuse: Map<AgentId, "retired" | "queue_full">;
  let recordCalls: number;

  beforeEach(async () => {
    store = await Store.open(join(root, `clock${n++}.db`), { synchronous: "normal" });
    clock = 1_000_000;
    timers = [];
    refuse = new Map();
    recordCalls = 0;
  });

  function clockWith(types: Record<string, typeof type> = { waker: type }) {
    return new WakeClock({
      store,
      target: (agent) => {
        const [t, key] = agent.split("/") as [string, string];
        const spec = types[t];
        return spec ? { agent, type: spec, key } : null;
      },
      record: async (target: Target, payload: Uint8Array, sid: StimulusId): Promise<IntakeReport> => {
        recordCalls++;
        const code = refuse.get(target.agent);
        if (code) return { accepted: [], duplicates: [], refused: [{ agent: target.agent, code, reason: code }] };
        const [o] = await store.intake([
          {
            agent: target.agent,
            type: target.type.name,
            key: target.key,
            sid,
            kind: "wake",
            topic: null,
            payload,
            receivedAt: clock,
          },
        ]);
        return o!.seq === null
          ? { accepted: [], duplicates: [{ agent: target.agent, sid }], refused: [] }
          : { accepted: [{ agent: target.agent, sid, seq: o!.seq }], duplicates: [], refused: [] };
      },
      payload: wakeStimulusPayload,
      log: pino({ level: "silent" }),
      now: () => clock,
      setTimer: (fn, ms) => {
        const t = { fn, ms };
        timers.push(t);
        return t;
      },
      clearTimer: (h) => {
        timers = timers.filter((t) => t !== h);
      },
    });
  }

  async function setWake(id: string, agent: AgentId, dueAt: number, payload: unknown = null) {
    await store.client.execute({
      sql: `INSERT INTO wakeups (id, gateway, agent, due_at, payload, set_by, created_at) VALUES (?,?,?,?,?,?,?)`,
      args: [id, store.gatewayId, agent, dueAt, JSON.stringify(payload), id.split(".")[0]!, clock],
    });
  }
  const rows = async (sql: string): Promise<Record<string, unknown>[]> =>
    (await store.client.execute(sql)).rows.map((r) => ({ ...r }));

  test("a due wake-up becomes one `wake` stimulus carrying its payload, and is marked fired", async () => {
    await setWake("ep1.w1", A, clock - 5, { door: "d1" });
    const wc = clockWith();
    await wc.start();
    const [s] = await rows("SELECT seq FROM stimuli");
    const stim = toStimulus((await store.getStimulus(Number(s!.seq)))!);
    expect(stim).toEqual({
      id: "wake:ep1.w1",
      kind: "wake",
      payload: { door: "d1" },
      wake: { id: "ep1.w1", due_at: clock - 5, set_by: "ep1" },
      received_at: clock,
    });
    expect(await rows("SELECT state, done_at FROM wakeups")).toEqual([{ state: "fired", done_at: clock }]);
    expect(wc.fired).toBe(1);
  });

  test("a wake-up not yet due waits: the clock arms for its due time and fires it then", async () => {
    await setWake("ep1.w1", A, clock + 4000);
    const wc = clockWith();
    await wc.start();
    expect(await rows("SELECT COUNT(*) AS n FROM stimuli")).toEqual([{ n: 0 }]);
    expect(timers.map((t) => t.ms)).toEqual([4000]);
    clock += 4000;
    timers.shift()!.fn();
    await wc.stop();
    expect(await rows("SELECT sid FROM stimuli")).toEqual([{ sid: "wake:ep1.w1" }]);
  });

  test("a sooner wake-up set by a commit re-arms the clock; a later one does not", async () => {
    await setWake("ep1.w1", A, clock + 60_000);
    const wc = clockWith();
    await wc.start();
    expect(timers.map((t) => t.ms)).toEqual([60_000]);
    wc.scheduled(clock + 1000);
    expect(timers.map((t) => t.ms)).toEqual([1000]);
    wc.scheduled(clock + 30_000);
    expect(timers.map((t) => t.ms)).toEqual([1000]);
  });

  test("fired once: a wake-up recorded just before a crash is marked fired, not recorded again", async () => {
    await setWake("ep1.w1", A, clock - 1);
    // The crash: the stimulus is in, the row still says pending.
    await store.intake([
      {
        agent: A,
        type: "waker",
        key: "a",
        sid: "wake:ep1.w1" as StimulusId,
        kind: "wake",
        topic: null,
        payload: new Uint8Array(),
        receivedAt: clock,
      },
    ]);
    await clockWith().start();
    expect(await rows("SELECT COUNT(*) AS n FROM stimuli")).toEqual([{ n: 1 }]);
    expect(await rows("SELECT state FROM wakeups")).toEqual([{ state: "fired" }]);
  });

  test("a retired agent's or a removed type's wake-up is dropped with the reason", async () => {
    await setWake("ep1.w1", A, clock - 1);
    await setWake("ep2.w1", "gone/x" as AgentId, clock - 1);
    refuse.set(A, "retired");
    const wc = clockWith();
    await wc.start();
    expect(await rows("SELECT id, state, done_by FROM wakeups ORDER BY id")).toEqual([
      { id: "ep1.w1", state: "dropped", done_by: "the agent is retired" },
      { id: "ep2.w1", state: "dropped", done_by: "the agent's type is not in the spec" },
    ]);
    expect(wc.dropped).toBe(2);
  });

  test("a full queue keeps the wake-up pending and looks again after a pause, not in a loop", async () => {
    await setWake("ep1.w1", A, clock - 1);
    refuse.set(A, "queue_full");
    await clockWith().start();
    expect(await rows("SELECT state FROM wakeups")).toEqual([{ state: "pending" }]);
    expect(recordCalls).toBe(1);
    expect(timers.map((t) => t.ms)).toEqual([WAKE_RETRY_MS]);
    refuse.clear();
    clock += WAKE_RETRY_MS;
    timers.shift()!.fn();
    await waitUntil(async () => (await rows("SELECT state FROM wakeups"))[0]?.state === "fired");
  });

  test("a failed read of the next due time looks again after a pause", async () => {
    await setWake("ep1.w1", A, clock + 4000);
    const read = store.nextWakeDue.bind(store);
    store.nextWakeDue = async () => {
      store.nextWakeDue = read;
      throw new Error("database is locked");
    };
    await clockWith().start();
    expect(timers.map((t) => t.ms)).toEqual([WAKE_RETRY_MS]);
  });

  test("an agent with a full queue does not hold up another's wake-ups due after its own", async () => {
    const B = "waker/b" as AgentId;
    // More than a batch of A's due first, all refused: B's comes after them in due order.
    for (let i = 0; i < 600; i++) await setWake(`epA.w${i + 1}`, A, clock - 1000 + i);
    await setWake("epB.w1", B, clock - 1);
    refuse.set(A, "queue_full");
    const wc = clockWith();
    await wc.start();
    expect(await rows("SELECT state FROM wakeups WHERE agent = 'waker/b'")).toEqual([{ state: "fired" }]);
    // A's first was tried, not its 600: the rest stay out of the looks while it is blocked.
    expect(recordCalls).toBe(2);
    expect(timers.map((t) => t.ms)).toEqual([WAKE_RETRY_MS]);
    // B's next one, due before the retry, is not held up to it; the retry tries only A's soonest.
    await setWake("epB.w2", B, clock + 300);
    wc.scheduled(clock + 300);
    expect(timers.map((t) => t.ms)).toEqual([300]);
    clock += 300;
    timers.shift()!.fn();
    await waitUntil(async () => (await rows("SELECT state FROM wakeups WHERE id = 'epB.w2'"))[0]?.state === "fired");
    expect(recordCalls).toBe(3);
    refuse.clear();
    clock += WAKE_RETRY_MS;
    timers.shift()!.fn();
    await waitUntil(async () => (await rows("SELECT COUNT(*) AS n FROM wakeups WHERE state = 'fired'"))[0]?.n === 602);
    await wc.stop();
  });
});

async function waitUntil(cond: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("agent-fleets/testing fakes wake-ups", () => {
  test("NaN, Infinity and a too long delay are refused showing the value given", async () => {
    const errors: string[] = [];
    const agent = testAgent(
      defineAgent({
        init: () => ({}),
        onStimulus(_s, ctx) {
          for (const f of [() => ctx.wakeIn(Number.NaN), () => ctx.wakeAt(Infinity), () => ctx.wakeIn("99999999999d")])
            try {
              f();
            } catch (err) {
              errors.push((err as Error).message);
            }
        },
      }),
    );
    await agent.run(stimuli.manual({}));
    expect(errors).toEqual([
      'wake delay must be milliseconds >= 0 or like "10s", "5m", "2h"; got NaN',
      "wake time must be epoch milliseconds; got Infinity",
      expect.stringMatching(/^wake delay "99999999999d" is too long/),
    ]);
  });

  test("the door watcher alerts when the door stays open, via its wake-up", async () => {
    const door = testAgent(doorWatcher, { key: "d1", config: { open_after: "5m" }, tools: ["publish"] });
    const opened = await door.run(stimuli.mqtt("doors/d1/state", { open: true }));
    expect(opened.wakes).toHaveLength(1);
    expect(door.wakeups.map((w) => w.due_at - opened.wakes[0]!.due_at)).toEqual([0]);
    const alert = await door.fireWake();
    expect(alert.stimulus.kind).toBe("wake");
    expect(alert.published).toEqual([{ topic: "alerts/doors/d1", payload: expect.objectContaining({ door: "d1" }) }]);
    expect(door.wakeups).toEqual([]);
  });

  test("closing the door first cancels the wake-up: nothing is pending, nothing alerts", async () => {
    const door = testAgent(doorWatcher, { key: "d1", tools: ["publish"] });
    await door.run(stimuli.mqtt("doors/d1/state", { open: true }));
    const closed = await door.run(stimuli.mqtt("doors/d1/state", { open: false }));
    expect(closed.cancelled).toHaveLength(1);
    expect(door.wakeups).toEqual([]);
    expect(() => door.fireWake()).toThrow("no wake-up is pending");
  });

  test("a failed episode's wake-ups are not scheduled", async () => {
    const waker = (await import("./fixtures/wake/waker.ts")).default;
    const agent = testAgent(waker);
    const r = await agent.run(stimuli.manual({ in: "1s", fail: true }));
    expect(r.status).toBe("failed");
    expect(agent.wakeups).toEqual([]);
  });
});

describe("retention of wake-ups", () => {
  test("settled wake-ups are collected after dedup_days; a pending one is kept however old", async () => {
    const store = await Store.open(join(root, "gc.db"), { synchronous: "normal" });
    const DAY = 86_400_000;
    const now = 100 * DAY;
    const put = (id: string, state: string, doneAt: number | null) =>
      store.client.execute({
        sql: `INSERT INTO wakeups (id, gateway, agent, due_at, payload, set_by, created_at, state, done_at)
          VALUES (?, 'gw', 'waker/a', 0, 'null', 'ep', 0, ?, ?)`,
        args: [id, state, doneAt],
      });
    await put("old-fired", "fired", now - 8 * DAY);
    await put("old-cancelled", "cancelled", now - 8 * DAY);
    await put("recent-fired", "fired", now - DAY);
    await put("old-pending", "pending", null);
    await gcPass(store, clockSpec.spec, { now });
    const left = await store.client.execute("SELECT id FROM wakeups ORDER BY id");
    expect(left.rows.map((r) => r.id)).toEqual(["old-pending", "recent-fired"]);
    await store.close();
  });
});
