/**
 * Intake and the queue book, in-process on a real libSQL file: one admission for every
 * source (retired, max_queue, reservations in flight), dedup, counts that follow the
 * store's queue, agent-to-agent sends, quarantine retries, and lifecycle refusal codes.
 */
import { afterAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { ToolGate } from "../gateway/episode/index.ts";
import { FleetEvents } from "../gateway/events.ts";
import { QueueBook, Roster, Scheduler } from "../gateway/fleet/index.ts";
import { Intake, createRouter, type Target } from "../gateway/intake/index.ts";
import { gcAll, resolveQuarantined } from "../gateway/ops/index.ts";
import { compileSpec, type FleetSpec } from "../gateway/spec/index.ts";
import { Store } from "../gateway/store/index.ts";
import { type AgentId, agentId, type StimulusId } from "../gateway/types.ts";

const log = pino({ level: "silent" });
const root = mkdtempSync(join(tmpdir(), "fleet-intake-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const spec: FleetSpec = (
  await compileSpec(
    `
[agents.mon]
module = "mon.ts"
subscribe = ["s/+/t"]
key = "{1}"
dedup = "id"
max_queue = 3
tools = ["send"]

[agents.sink]
module = "sink.ts"
max_queue = 2
`,
    "/srv/fleet.toml",
  )
).spec;

const enc = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));
const target = (type: string, key: string): Target => ({ agent: agentId(type, key)!, type: spec.agents[type]!, key });

let n = 0;
async function setup() {
  const store = await Store.open(join(root, `t${n++}.db`), { synchronous: "normal" });
  const notified: AgentId[] = [];
  const book = new QueueBook({ onQueued: (a) => notified.push(a) });
  await book.load(store);
  const events = new FleetEvents(log);
  const intakeEvents: { source: string; accepted: number; duplicates: number; duplicateTypes?: readonly string[] }[] =
    [];
  events.on("intake", (e) => intakeEvents.push(e));
  const route = createRouter(spec);
  // The data disk's reserve as the test sets it: null, or why outside stimuli are refused.
  const disk = { low: null as string | null };
  const intake = new Intake(
    store,
    {
      route,
      admit: (a, max) => book.admit(a, max),
      recorded: (a, seq, at) => book.recorded(a, seq, at),
      released: (a, k) => book.released(a, k),
      diskLow: () => disk.low,
    },
    events,
    log,
    () => 1_000,
  );
  const queuedInStore = async (a: string) => (await store.queuedSummary()).find((q) => q.agent === a)?.n ?? 0;
  return { store, book, intake, events, notified, intakeEvents, queuedInStore, disk };
}

let ctx: Awaited<ReturnType<typeof setup>>;
beforeEach(async () => {
  ctx = await setup();
});

describe("refused and rejected device messages", () => {
  test("each rejected message is recorded, and a flood of them logs one line with the count", async () => {
    const lines: { msg: string; rejected?: number; topic?: string }[] = [];
    const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    let clock = 1_000;
    const intake = new Intake(
      ctx.store,
      {
        route: createRouter(spec),
        admit: (a, max) => ctx.book.admit(a, max),
        recorded: (a, seq, at) => ctx.book.recorded(a, seq, at),
        released: (a, k) => ctx.book.released(a, k),
        diskLow: () => null,
      },
      ctx.events,
      logger,
      () => clock,
    );
    const long = `s/${"k".repeat(300)}/t`; // a key over 128 bytes: no valid agent
    for (let i = 0; i < 50; i++)
      expect(await intake.mqtt({ topic: long, payload: enc({ i }), qos: 1, retain: false })).toEqual({ ok: true });
    // An inbox naming no agent type is the broker's to log (with its other permanent refusals).
    const inbox = await intake.mqtt({ topic: "fleet/agents/nope/k/inbox", payload: enc(1), qos: 1, retain: false });
    expect(inbox).toMatchObject({ ok: false, permanent: true });
    expect(await ctx.store.countRejected()).toBe(50);
    expect(lines.map((l) => [l.msg.split(":")[0], l.rejected, l.topic?.length])).toEqual([["intake", 1, 201]]);
    clock += 10_000;
    await intake.mqtt({ topic: long, payload: enc({ i: 50 }), qos: 1, retain: false });
    expect(lines.at(-1)).toMatchObject({ rejected: 50 });
  });
});

describe("refusals of an agent with a full queue", () => {
  test("a refusal repeated every second logs one line a minute per agent and reason, each counted", async () => {
    const lines: { msg: string; agent?: string; source?: string; refused?: number }[] = [];
    const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    const counted: { source: string; type: string; code: string }[] = [];
    ctx.events.on("refused", (e) => counted.push(e));
    let clock = 1_000;
    const intake = new Intake(
      ctx.store,
      {
        route: createRouter(spec),
        admit: () => ({ ok: false, code: "queue_full", message: "queue full" }),
        recorded: () => {},
        released: () => {},
        diskLow: () => null,
      },
      ctx.events,
      logger,
      () => clock,
    );
    const fire = (key: string) =>
      intake.record([target("sink", key)], "timer", null, enc(1), `timer:${clock}` as StimulusId);
    for (let i = 0; i < 120; i++, clock += 1000) {
      await fire("a");
      await fire("b");
    }
    expect(counted).toHaveLength(240);
    expect(counted[0]).toEqual({ source: "timer", type: "sink", code: "queue_full" });
    // Each agent: its first refusal, then one line a minute later with the count since.
    expect(lines.map((l) => [l.agent, l.source, l.refused])).toEqual([
      ["sink/a", "timer", 1],
      ["sink/b", "timer", 1],
      ["sink/a", "timer", 60],
      ["sink/b", "timer", 60],
    ]);
  });
});

describe("MQTT redeliveries", () => {
  const client = { id: "door-1", username: null };
  const msg = (dup?: boolean) => ({
    topic: "s/b2/t",
    payload: enc({ open: true }), // no `id`: only a redelivery id can dedup it
    qos: 1 as const,
    retain: false,
    messageId: 1,
    ...(dup === undefined ? {} : { dup }),
  });

  test("without the DUP flag, the same client, packet id and payload again is a retransmission", async () => {
    await ctx.intake.mqtt(msg(), client);
    await ctx.intake.mqtt(msg(), client);
    expect(await ctx.queuedInStore("mon/b2")).toBe(1);
  });

  test("with DUP trusted, DUP = 0 is a new message that reused the packet id; DUP = 1 is a resend", async () => {
    await ctx.intake.mqtt(msg(false), client);
    await ctx.intake.mqtt(msg(false), client); // a new connection numbering from 1 again, the same reading
    expect(await ctx.queuedInStore("mon/b2")).toBe(2);
    await ctx.intake.mqtt(msg(true), client);
    expect(await ctx.queuedInStore("mon/b2")).toBe(2);
  });

  test("a new message that reused the packet id, refused for a full queue, is not acknowledged", async () => {
    expect(await ctx.intake.mqtt(msg(false), client)).toEqual({ ok: true });
    for (const messageId of [2, 3]) await ctx.intake.mqtt({ ...msg(false), messageId }, client);
    expect(await ctx.queuedInStore("mon/b2")).toBe(3); // max_queue
    // Packet id 1 again with DUP = 0: not the first one resent, a new reading; the queue has no room.
    const verdict = await ctx.intake.mqtt(msg(false), client);
    expect(verdict).toMatchObject({ ok: false, permanent: false });
    expect(await ctx.queuedInStore("mon/b2")).toBe(3);
  });
});

describe("intake admission", () => {
  test("an accepted stimulus is durably queued, counted by the book and announced to the scheduler", async () => {
    const r = await ctx.intake.mqtt({ topic: "s/b1/t", payload: enc({ id: "m1", v: 1 }), qos: 1, retain: false });
    expect(r).toEqual({ ok: true });
    expect(await ctx.queuedInStore("mon/b1")).toBe(1);
    expect(ctx.book.queued("mon/b1" as AgentId)).toBe(1);
    expect(ctx.notified).toEqual(["mon/b1" as AgentId]);
    expect(ctx.intakeEvents).toEqual([{ source: "mqtt", accepted: 1, duplicates: 0, duplicateTypes: [] }]);
  });

  test("the scheduler hears of a stimulus at its commit; the device is acknowledged after the WAL sync", async () => {
    const syncs: (() => void)[] = [];
    const store = await Store.open(join(root, `t${n++}.db`), {
      synchronous: "full",
      walSync: () => new Promise<void>((resolve) => syncs.push(resolve)),
    });
    try {
      const notified: AgentId[] = [];
      const book = new QueueBook({ onQueued: (a) => notified.push(a) });
      await book.load(store);
      const intake = new Intake(
        store,
        {
          route: createRouter(spec),
          admit: (a, max) => book.admit(a, max),
          recorded: (a, seq, at) => book.recorded(a, seq, at),
          released: (a, k) => book.released(a, k),
          diskLow: () => null,
        },
        new FleetEvents(log),
        log,
        () => 1_000,
      );
      let acked: unknown = null;
      const verdict = intake
        .mqtt({ topic: "s/b1/t", payload: enc({ id: "m1" }), qos: 1, retain: false })
        .then((v) => (acked = v));
      while (syncs.length === 0) await new Promise((r) => setImmediate(r));
      expect(notified).toEqual(["mon/b1" as AgentId]);
      expect(book.queued("mon/b1" as AgentId)).toBe(1);
      expect(acked).toBeNull();
      for (const release of syncs.splice(0)) release();
      expect(await verdict).toEqual({ ok: true });
    } finally {
      for (const release of syncs.splice(0)) release();
      await store.close();
    }
  });

  test("a store that fails to tell a turned-away retry from a new stimulus gives every admission back", async () => {
    // sink/a is full (max_queue 2), sink/b is not: one stimulus for both is admitted for sink/b only,
    // then the store is asked whether sink/a had it already (a retry is a duplicate, not a refusal).
    for (const id of ["f1", "f2"])
      await ctx.intake.record([target("sink", "a")], "manual", null, enc(id), `m:${id}` as StimulusId);
    ctx.store.findStimulus = async () => {
      throw new Error("database is locked");
    };
    const both = [target("sink", "a"), target("sink", "b")];
    await expect(ctx.intake.record(both, "manual", null, enc(1), "m:both" as StimulusId)).rejects.toThrow("locked");
    expect(ctx.book.queued("sink/b" as AgentId)).toBe(0);
    expect(await ctx.queuedInStore("sink/b")).toBe(0);
    // Its place was given back: sink/b still takes its whole max_queue of 2.
    expect([ctx.book.admit("sink/b" as AgentId, 2).ok, ctx.book.admit("sink/b" as AgentId, 2).ok]).toEqual([
      true,
      true,
    ]);
  });

  test("a duplicate is not queued again and gives its reserved place back", async () => {
    const msg = { topic: "s/b1/t", payload: enc({ id: "same" }), qos: 1 as const, retain: false };
    await ctx.intake.mqtt(msg);
    const r = await ctx.intake.record([target("mon", "b1")], "mqtt", "s/b1/t", msg.payload, null);
    expect(r.accepted).toEqual([]);
    expect(r.duplicates.map((d) => d.sid)).toEqual(["id:same"]);
    expect(ctx.book.queued("mon/b1" as AgentId)).toBe(1);
    // The duplicate's reservation was released: two more fit under max_queue 3.
    for (const id of ["x", "y"])
      expect((await ctx.intake.record([target("mon", "b1")], "manual", null, enc({ id }), null)).accepted).toHaveLength(
        1,
      );
    expect(await ctx.queuedInStore("mon/b1")).toBe(3);
  });

  test("past max_queue a stimulus is refused with code queue_full and nothing is written", async () => {
    for (let i = 0; i < 3; i++) await ctx.intake.record([target("mon", "b1")], "manual", null, enc({ id: i }), null);
    const r = await ctx.intake.record([target("mon", "b1")], "webhook", "hooks/h", enc({ id: 9 }), null);
    expect(r.refused).toEqual([{ agent: "mon/b1" as AgentId, code: "queue_full", reason: "queue full (max_queue 3)" }]);
    expect(await ctx.queuedInStore("mon/b1")).toBe(3);
    // An MQTT publish past it is refused too: no PUBACK, the device keeps it.
    const v = await ctx.intake.mqtt({ topic: "s/b1/t", payload: enc({ id: 10 }), qos: 1, retain: false });
    expect(v.ok).toBe(false);
  });

  test("concurrent intakes cannot overfill a queue: places in flight count against max_queue", async () => {
    const all = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        ctx.intake.record([target("mon", "b2")], "manual", null, enc({ id: `c${i}` }), null),
      ),
    );
    expect(all.flatMap((r) => r.accepted)).toHaveLength(3);
    expect(all.flatMap((r) => r.refused).every((r) => r.code === "queue_full")).toBe(true);
    expect(await ctx.queuedInStore("mon/b2")).toBe(3);
    expect(ctx.book.queued("mon/b2" as AgentId)).toBe(3);
  });

  test("a retired agent's stimuli are refused with code retired, from every source", async () => {
    ctx.book.retire("mon/b1" as AgentId);
    for (const kind of ["mqtt", "timer", "webhook", "manual", "inbox"] as const) {
      const r = await ctx.intake.record(
        [target("mon", "b1")],
        kind,
        null,
        enc({ id: kind }),
        `x:${kind}` as StimulusId,
      );
      expect(r.refused.map((x) => x.code)).toEqual(["retired"]);
    }
    expect(await ctx.queuedInStore("mon/b1")).toBe(0);
  });

  test("the book loads queued counts and retirements from the store at start", async () => {
    for (let i = 0; i < 2; i++) await ctx.intake.record([target("mon", "b1")], "manual", null, enc({ id: i }), null);
    await ctx.store.setAgentStatus("mon/b1" as AgentId, "retired", "by test");
    const fresh = new QueueBook();
    await fresh.load(ctx.store);
    expect(fresh.queued("mon/b1" as AgentId)).toBe(2);
    expect(fresh.total()).toBe(2);
    expect(fresh.isRetired("mon/b1" as AgentId)).toBe(true);
  });
});

describe("a data disk below [fleet] disk_free_limit_mb", () => {
  const LOW = "the data disk is low (12.0 MB free, below [fleet] disk_free_limit_mb = 50); try again later";

  test("refuses stimuli from outside with code disk_low and writes nothing, a rejected message's row too", async () => {
    const refused: { source: string; type: string; code: string }[] = [];
    ctx.events.on("refused", (e) => refused.push(e));
    ctx.disk.low = LOW;
    const manual = await ctx.intake.record([target("mon", "d1")], "manual", null, enc({ id: 1 }), null);
    expect(manual.refused).toEqual([{ agent: "mon/d1" as AgentId, code: "disk_low", reason: LOW }]);
    const hook = await ctx.intake.record([target("mon", "d1")], "webhook", "hooks/h", enc({ id: 2 }), null);
    expect(hook.refused.map((r) => r.code)).toEqual(["disk_low"]);
    // A device is refused for now (no PUBACK: it keeps the message), not for good.
    const v = await ctx.intake.mqtt({ topic: "s/d1/t", payload: enc({ id: 3 }), qos: 1, retain: false });
    expect(v).toEqual({ ok: false, reason: LOW });
    // A message naming no valid agent is not recorded as rejected either: it would write a row.
    const bad = await ctx.intake.mqtt({ topic: "s/bad key!/t", payload: enc({ id: 4 }), qos: 1, retain: false });
    expect(bad.ok).toBe(false);
    expect(await ctx.store.countRejected()).toBe(0);
    expect(await ctx.queuedInStore("mon/d1")).toBe(0);
    expect(ctx.book.queued("mon/d1" as AgentId)).toBe(0);
    expect(refused).toEqual([
      { source: "manual", type: "mon", code: "disk_low" },
      { source: "webhook", type: "mon", code: "disk_low" },
      { source: "mqtt", type: "mon", code: "disk_low" },
    ]);
  });

  test("timers and wake-ups, the fleet's own, still go in; outside stimuli again once there is room", async () => {
    ctx.disk.low = LOW;
    const timer = await ctx.intake.record([target("mon", "d2")], "timer", null, enc(null), "timer:1" as StimulusId);
    const wake = await ctx.intake.record([target("mon", "d2")], "wake", null, enc(null), "wake:w1" as StimulusId);
    expect(timer.accepted).toHaveLength(1);
    expect(wake.accepted).toHaveLength(1);
    ctx.disk.low = null;
    const v = await ctx.intake.mqtt({ topic: "s/d2/t", payload: enc({ id: 5 }), qos: 1, retain: false });
    expect(v.ok).toBe(true);
    expect(await ctx.queuedInStore("mon/d2")).toBe(3);
  });
});

describe("agent-to-agent sends go through the same admission", () => {
  const gateFor = (book: QueueBook) =>
    new ToolGate(
      { type: "mon", key: "k1", id: "mon/k1" },
      spec.agents.mon!,
      spec,
      {
        secrets: {},
        fetch,
        admit: (a, max) => book.admit(a, max),
        sendRefused: (a, code, reason) => ctx.intake.sendRefused(a, code, reason),
      },
      1000,
    );

  test("a send to a full queue is denied with the refusal recorded as the call's result, and counted", async () => {
    const counted: unknown[] = [];
    ctx.events.on("refused", (e) => counted.push(e));
    // sink's max_queue is 2
    for (const seq of [1001, 1002]) ctx.book.recorded("sink/a" as AgentId, seq, 1);
    const out = await gateFor(ctx.book).handle(1, "send", ["sink/a", { hi: 1 }]);
    expect(out).toEqual({
      ok: false,
      result: { error: "denied", reason: "send to sink/a refused: queue full (max_queue 2)" },
    });
    // As every source's refusals are (fleet_intake_refused_total): before, a refused send was only in its log.
    expect(counted).toEqual([{ source: "inbox", type: "sink", code: "queue_full" }]);
  });

  test("sends of one episode reserve places: the third send to a queue of two is refused", async () => {
    const g = gateFor(ctx.book);
    expect((await g.handle(1, "send", ["sink/b", 1])).ok).toBe(true);
    expect((await g.handle(2, "send", ["sink/b", 2])).ok).toBe(true);
    expect((await g.handle(3, "send", ["sink/b", 3])).ok).toBe(false);
    expect(g.sends).toHaveLength(2);
    // Another episode's intake sees the reservations too.
    const r = await ctx.intake.record([target("sink", "b")], "manual", null, enc({ id: 1 }), null);
    expect(r.refused.map((x) => x.code)).toEqual(["queue_full"]);
  });

  test("a send to a retired agent is denied", async () => {
    ctx.book.retire("sink/c" as AgentId);
    const out = await gateFor(ctx.book).handle(1, "send", ["sink/c", 1]);
    expect(out.result).toEqual({ error: "denied", reason: "send to sink/c refused: agent is retired" });
  });

  test("places given back by an episode that did not commit are free again", async () => {
    const g = gateFor(ctx.book);
    await g.handle(1, "send", ["sink/d", 1]);
    await g.handle(2, "send", ["sink/d", 2]);
    for (const s of g.sends) ctx.book.released(s.to.id);
    expect((await gateFor(ctx.book).handle(1, "send", ["sink/d", 3])).ok).toBe(true);
  });
});

describe("quarantine retry goes through the same admission", () => {
  async function quarantined(agent: AgentId, sid: string): Promise<number> {
    const [o] = await ctx.store.intake([
      {
        agent,
        type: agent.split("/")[0]!,
        key: agent.split("/")[1]!,
        sid: sid as StimulusId,
        kind: "manual",
        topic: null,
        payload: enc(1),
        receivedAt: 1,
      },
    ]);
    await ctx.store.writer.write([{ sql: "UPDATE stimuli SET state = 'quarantined' WHERE seq = ?", args: [o!.seq!] }]);
    return o!.seq!;
  }
  const port = (max: number) => ({
    admit: (a: AgentId) => ctx.book.admit(a, max),
    recorded: (a: AgentId, seq: number, at: number) => ctx.book.recorded(a, seq, at),
    released: (a: AgentId) => ctx.book.released(a),
  });

  test("a retried stimulus is counted back into its agent's queue", async () => {
    const seq = await quarantined("sink/q" as AgentId, "q1");
    const r = await resolveQuarantined(ctx.store, seq, "retry", port(2));
    expect(r).toMatchObject({ ok: true, state: "queued" });
    expect(ctx.book.queued("sink/q" as AgentId)).toBe(1);
    expect(await ctx.queuedInStore("sink/q")).toBe(1);
  });

  test("a retry into a full queue is refused with code queue_full and the stimulus stays quarantined", async () => {
    const seq = await quarantined("sink/f" as AgentId, "f1");
    for (const s of [1001, 1002]) ctx.book.recorded("sink/f" as AgentId, s, 1);
    const r = await resolveQuarantined(ctx.store, seq, "retry", port(2));
    expect(r).toMatchObject({ ok: false, code: "queue_full" });
    expect((await ctx.store.getStimulus(seq))?.state).toBe("quarantined");
  });

  test("a dropped stimulus's id is remembered dedup_days from the drop, not from its quarantine", async () => {
    const seq = await quarantined("sink/p" as AgentId, "p1");
    await ctx.store.writer.write([{ sql: "UPDATE stimuli SET done_at = 1 WHERE seq = ?", args: [seq] }]);
    const droppedAt = 30 * 86_400_000; // a month after it was quarantined
    expect(await resolveQuarantined(ctx.store, seq, "drop", undefined, droppedAt)).toMatchObject({ ok: true });
    // Retention the next minute (dedup_days = 7 by default): the id is still there to refuse a resend.
    await gcAll(ctx.store, spec, { now: droppedAt + 60_000 });
    expect(await ctx.store.getStimulus(seq)).toMatchObject({ state: "dropped", doneAt: droppedAt });
    await gcAll(ctx.store, spec, { now: droppedAt + 8 * 86_400_000 });
    expect(await ctx.store.getStimulus(seq)).toBeUndefined();
  });

  test("a stimulus retried or dropped meanwhile is not resolved twice; its admission is given back", async () => {
    const seq = await quarantined("sink/t" as AgentId, "t1");
    const stale = { ...port(2) };
    expect(await resolveQuarantined(ctx.store, seq, "drop")).toMatchObject({ ok: true });
    // A second operator's retry read it as quarantined a moment before: the write finds it dropped.
    await ctx.store.writer.write([{ sql: "UPDATE stimuli SET state = 'quarantined' WHERE seq = ?", args: [seq] }]);
    const getStimulus = ctx.store.getStimulus.bind(ctx.store);
    let first = true;
    ctx.store.getStimulus = async (s: number) => {
      const row = await getStimulus(s);
      if (first && row) {
        first = false;
        await ctx.store.writer.write([{ sql: "UPDATE stimuli SET state = 'dropped' WHERE seq = ?", args: [s] }]);
      }
      return row;
    };
    expect(await resolveQuarantined(ctx.store, seq, "retry", stale)).toMatchObject({
      ok: false,
      code: "not_quarantined",
      message: `stimulus ${seq} is dropped, not quarantined`,
    });
    expect(ctx.book.pending("sink/t" as AgentId)).toBe(0);
  });

  test("a retry for a retired agent is refused with code retired", async () => {
    const seq = await quarantined("sink/r" as AgentId, "r1");
    ctx.book.retire("sink/r" as AgentId);
    expect(await resolveQuarantined(ctx.store, seq, "retry", port(2))).toMatchObject({ ok: false, code: "retired" });
  });
});

describe("lifecycle results carry a code", () => {
  test("unknown agent: not_found; pausing or resuming a retired one: retired; retiring tells the book", async () => {
    const scheduler = new Scheduler({ maxConcurrent: 1, runTurn: async () => ({ kind: "empty" }), queued: () => 0 });
    const roster = new Roster(ctx.store, ctx.events, scheduler, ctx.book);
    expect(await roster.setLifecycle("mon/ghost" as AgentId, "pause")).toMatchObject({
      ok: false,
      code: "not_found",
    });
    // A name that is no agent leaves nothing behind (each one an operator mistyped stayed in memory).
    const stamps = (roster as unknown as { lifecycleStamps: Map<AgentId, number> }).lifecycleStamps;
    expect(stamps.size).toBe(0);
    await ctx.store.ensureAgents([{ id: "mon/z" as AgentId, type: "mon", key: "z" }]);
    expect(await roster.setLifecycle("mon/z" as AgentId, "retire")).toEqual({ ok: true, status: "retired" });
    expect(roster.lifecycleStamp("mon/z" as AgentId)).toBe(1);
    expect(ctx.book.isRetired("mon/z" as AgentId)).toBe(true);
    for (const action of ["pause", "resume"] as const)
      expect(await roster.setLifecycle("mon/z" as AgentId, action)).toEqual({
        ok: false,
        code: "retired",
        message: "mon/z is retired",
      });
    scheduler.stop();
  });
});

describe("a draining agent", () => {
  test("refuses new admissions with code draining while an admission already in flight is kept", async () => {
    const scheduler = new Scheduler({ maxConcurrent: 1, runTurn: async () => ({ kind: "empty" }), queued: () => 0 });
    const drained: AgentId[] = [];
    const book = new QueueBook({ onDrained: (a) => drained.push(a) });
    const roster = new Roster(ctx.store, ctx.events, scheduler, book);
    const id = "mon/d" as AgentId;
    await ctx.store.ensureAgents([{ id, type: "mon", key: "d" }]);
    // Admitted before the drain, written after: it is kept and holds the drain open.
    expect(book.admit(id, 3)).toEqual({ ok: true });
    expect(await roster.setLifecycle(id, "retire", { drain: true })).toEqual({ ok: true, status: "draining" });
    expect(book.admit(id, 3)).toMatchObject({ ok: false, code: "draining" });
    expect(book.pending(id)).toBe(1);
    expect(await roster.finishDrain(id)).toBe(false);
    // The place is given back unused (a duplicate): nothing is left, the book says so.
    book.released(id);
    expect(drained).toEqual([id]);
    expect(await roster.finishDrain(id)).toBe(true);
    expect((await ctx.store.getAgent(id))?.status).toBe("retired");
    expect(book.isRetired(id)).toBe(true);
    for (const action of ["pause", "resume"] as const)
      expect(await roster.setLifecycle(id, action)).toMatchObject({ ok: false, code: "retired" });
    scheduler.stop();
  });

  test("cannot be paused or resumed; a plain retire ends it at once; the book reloads it after a restart", async () => {
    const scheduler = new Scheduler({ maxConcurrent: 1, runTurn: async () => ({ kind: "empty" }), queued: () => 0 });
    const roster = new Roster(ctx.store, ctx.events, scheduler, ctx.book);
    const id = "mon/e" as AgentId;
    await ctx.intake.record([target("mon", "e")], "manual", null, enc({ id: "x" }), "id:x" as StimulusId);
    expect(await roster.setLifecycle(id, "retire", { drain: true })).toEqual({ ok: true, status: "draining" });
    const again = new QueueBook();
    await again.load(ctx.store);
    expect(again.isDraining(id)).toBe(true);
    expect(again.admit(id, 3)).toMatchObject({ ok: false, code: "draining" });
    for (const action of ["pause", "resume"] as const)
      expect(await roster.setLifecycle(id, action)).toMatchObject({ ok: false, code: "draining" });
    expect(await roster.setLifecycle(id, "retire")).toEqual({ ok: true, status: "retired" });
    expect(ctx.book.isDraining(id)).toBe(false);
    expect(ctx.book.isRetired(id)).toBe(true);
    scheduler.stop();
  });
});
