/**
 * The episode executor in-process: a real libSQL file, a fake runner returning scripted
 * RunResults (no subprocess), a fake clock. Commit, failure + retry + quarantine, budget
 * pause, retired agent, corrupt checkpoint, sends, shutdown; what `fleet trace` makes of the episodes.
 */
import { afterAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import type { ParentMessage } from "../agents/protocol.ts";
import { budgetWindows, COMMIT_GATHER_MS, EpisodeExecutor, TURN_ERROR_BACKOFF_MS } from "../gateway/episode/index.ts";
import type { EpisodeDeps, RunResult, ToolHandler } from "../gateway/episode/index.ts";
import { FleetEvents, type FleetEventMap } from "../gateway/events.ts";
import { QueueBook, Roster, Scheduler } from "../gateway/fleet/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { episodeForTopic, traceEpisode } from "../gateway/ops/index.ts";
import { episodeStatus, Store } from "../gateway/store/index.ts";
import type { AgentId, StimulusId } from "../gateway/types.ts";

const log = pino({ level: "silent" });
const root = mkdtempSync(join(tmpdir(), "fleet-executor-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const sv = await compileSpec(
  `
[agents.mon]
module = "mon.ts"
tools = ["send"]

[agents.mon.budget]
episodes_per_hour = 3

[agents.mon.retry]
max_attempts = 2
backoff_ms = 100
`,
  "/srv/fleet.toml",
);

const A = "mon/a" as AgentId;
const B = "mon/b" as AgentId;
const HOUR = 3_600_000;

type Start = Extract<ParentMessage, { t: "start" }>;
type Script = (start: Start, onTool: ToolHandler) => Promise<RunResult> | RunResult;

const ok = (state: unknown, records: RunResult["records"] = []): RunResult => ({ ok: true, state, records, ms: 3 });
const threw = (message: string): RunResult => ({ ok: false, kind: "threw", message, records: [], ms: 3 });

let n = 0;
async function setup(spec = sv, logger = log, deps: Partial<EpisodeDeps> = {}) {
  const store = await Store.open(join(root, `e${n++}.db`), { synchronous: "normal" });
  let clock = 10 * HOUR + 1000; // early in an hour window
  const book = new QueueBook();
  const events = new FleetEvents(logger);
  const seen: { kind: keyof FleetEventMap; e: unknown }[] = [];
  for (const kind of ["episode", "status", "rejected", "intake"] as const)
    events.on(kind, (e) => seen.push({ kind, e }));
  const script: Script[] = [];
  const starts: Start[] = [];
  const published: { episode: string; topics: string[] }[] = [];
  let stopping = false;
  let running = 1;
  let drained: ((agent: AgentId) => Promise<unknown>) | null = null;
  const executor = new EpisodeExecutor({
    store,
    spec: () => spec,
    run: async (start, _limits, onTool) => {
      starts.push(start);
      const step = script.shift();
      return step ? step(start, onTool) : ok(start.state);
    },
    toolEnv: { secrets: {}, fetch, admit: (a, max) => book.admit(a, max) },
    events,
    log: logger,
    now: () => clock,
    stopping: () => stopping,
    queue: book,
    publishCommitted: (episode, rows) => published.push({ episode, topics: rows.map((r) => r.topic) }),
    running: () => running,
    drained: async (a) => drained?.(a),
    ...deps,
  });
  let sid = 0;
  /** Queue one stimulus for `agent` as intake would. */
  const queue = async (agent: AgentId = A, kind: "manual" | "timer" = "manual") => {
    const [type, key] = agent.split("/") as [string, string];
    const [o] = await store.intake([
      {
        agent,
        type,
        key,
        sid: `id:${sid++}` as StimulusId,
        kind,
        topic: null,
        payload: new TextEncoder().encode(JSON.stringify({ v: sid })),
        receivedAt: clock,
      },
    ]);
    book.recorded(agent, o!.seq!, o!.receivedAt);
  };
  const rows = async (sql: string, args: (string | number)[] = []) => (await store.client.execute({ sql, args })).rows;
  return {
    store,
    book,
    executor,
    script,
    starts,
    published,
    seen,
    queue,
    rows,
    tick: (ms: number) => {
      clock += ms;
    },
    now: () => clock,
    setStopping: (v: boolean) => {
      stopping = v;
    },
    setRunning: (v: number) => {
      running = v;
    },
    /** What a draining agent's ended turn calls (the gateway's roster.finishDrain). */
    setDrained: (f: (agent: AgentId) => Promise<unknown>) => {
      drained = f;
    },
  };
}

let t: Awaited<ReturnType<typeof setup>>;
beforeEach(async () => {
  t = await setup();
});

describe("executor: commit", () => {
  test("a successful episode commits its checkpoint, log and outbox, and its stimulus leaves the queue", async () => {
    await t.queue();
    t.script.push(() => ok({ n: 1 }, [{ k: "emit", data: { hello: 1 } }]));
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    expect(t.starts[0]).toMatchObject({ fresh: true, state: null, agent: { id: A } });
    const [agent] = await t.rows("SELECT head_seq, head_hash, episodes FROM agents WHERE id = ?", [A]);
    expect(agent).toMatchObject({ head_seq: 1, episodes: 1 });
    expect(await t.rows("SELECT state FROM stimuli WHERE agent = ?", [A])).toEqual([{ state: "done" } as never]);
    expect(await t.rows(`SELECT ${episodeStatus.ofSql("status")} AS status FROM episodes`)).toEqual([
      { status: "committed" } as never,
    ]);
    expect(t.published[0]!.topics).toEqual(["fleet/agents/mon/a/out", "fleet/episodes"]);
    expect(t.book.queued(A)).toBe(0);
    expect(t.seen.filter((s) => s.kind === "episode").map((s) => (s.e as { status: string }).status)).toEqual([
      "committed",
    ]);
  });

  test("the next episode starts from the committed state", async () => {
    await t.queue();
    await t.queue();
    t.script.push(() => ok({ n: 1 }));
    await t.executor.turn(A);
    await t.executor.turn(A);
    expect(t.starts[1]).toMatchObject({ fresh: false, state: { n: 1 } });
    expect(t.book.queued(A)).toBe(0);
  });

  test("an empty queue is an empty turn and runs nothing", async () => {
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    expect(t.starts).toHaveLength(0);
  });

  test("a stimulus recorded while a turn reads an empty queue stays counted", async () => {
    // The turn's read sees no head; intake records one before the turn reports back.
    const read = t.store.turnInputs.bind(t.store);
    t.store.turnInputs = async (agent, windows, head) => {
      const inputs = await read(agent, windows, head);
      await t.queue(agent);
      return inputs;
    };
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    expect(t.book.queued(A)).toBe(1);
  });
});

describe("executor: the gateway's log", () => {
  test("gets an episode's ctx.log lines up to 100 and 16 KiB, the line past it cut", async () => {
    // 100 lines of 4096 characters put 430 KB in the gateway's log per episode.
    const lines: string[] = [];
    const u = await setup(sv, pino({ level: "debug" }, { write: (line: string) => void lines.push(line) }));
    await u.queue();
    const chatty = Array.from({ length: 100 }, () => ({ k: "log", level: "info", msg: "x".repeat(4000) }) as const);
    u.script.push(() => ok({ n: 1 }, chatty));
    expect(await u.executor.turn(A)).toEqual({ kind: "ran" });
    const copied = lines.map((l) => JSON.parse(l).msg as string).filter((msg) => msg.startsWith("xxx"));
    const cut = "... (cut: the episode's log has it all)";
    expect(copied.map((msg) => msg.length)).toEqual([4000, 4000, 4000, 4000, 384 + cut.length]);
    expect(copied.at(-1)).toEndWith(`x${cut}`);
    const short = Array.from({ length: 150 }, (_, i) => ({ k: "log", level: "info", msg: `line ${i}` }) as const);
    lines.length = 0;
    await u.queue();
    u.script.push(() => ok({ n: 2 }, short));
    expect(await u.executor.turn(A)).toEqual({ kind: "ran" });
    expect(lines.filter((l) => JSON.parse(l).msg.startsWith("line "))).toHaveLength(100);
  });
});

describe("executor: the queue book and the rows", () => {
  test("a head the book has that is no longer queued is read again from the rows, and the real head runs", async () => {
    await t.queue();
    await t.queue();
    const [first, second] = t.book.seqs(A);
    // Something the book was not told of finished the first.
    await t.store.writer.write([{ sql: "UPDATE stimuli SET state = 'dropped' WHERE seq = ?", args: [first!] }]);
    t.script.push(() => ok({ n: 1 }));
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    expect(await t.rows("SELECT seq, state FROM stimuli WHERE agent = ? ORDER BY seq", [A])).toEqual([
      { seq: first!, state: "dropped" } as never,
      { seq: second!, state: "done" } as never,
    ]);
    expect(t.book.queued(A)).toBe(0);
    expect(t.book.total()).toBe(0);
  });
});

describe("executor: failure, retry, quarantine", () => {
  test("a failed episode keeps its checkpoint, waits out its backoff, then is quarantined", async () => {
    await t.queue();
    t.script.push(
      () => threw("boom 1"),
      () => threw("boom 2"),
    );
    expect(await t.executor.turn(A)).toEqual({ kind: "wait", until: t.now() + 100 });
    let [s] = await t.rows("SELECT state, attempts, last_error FROM stimuli");
    expect(s).toMatchObject({ state: "queued", attempts: 1, last_error: "boom 1" });
    expect(t.book.queued(A)).toBe(1);
    // Before the backoff is over the turn only waits.
    expect((await t.executor.turn(A)).kind).toBe("wait");
    expect(t.starts).toHaveLength(1);
    t.tick(100);
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    [s] = await t.rows("SELECT state, attempts FROM stimuli");
    expect(s).toMatchObject({ state: "quarantined", attempts: 2 });
    expect(t.book.queued(A)).toBe(0);
    const [agent] = await t.rows("SELECT head_seq, failures FROM agents");
    expect(agent).toMatchObject({ head_seq: 0, failures: 2 });
    const quarantined = t.seen
      .filter((x) => x.kind === "episode")
      .map((x) => (x.e as { quarantined: boolean }).quarantined);
    expect(quarantined).toEqual([false, true]);
  });

  test("a TerminalError is quarantined at once, without retries", async () => {
    await t.queue();
    t.script.push(() => ({ ok: false, kind: "terminal", message: "malformed", records: [], ms: 3 }));
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    const [s] = await t.rows("SELECT state, attempts FROM stimuli");
    expect(s).toMatchObject({ state: "quarantined", attempts: 1 });
    expect(t.book.queued(A)).toBe(0);
  });

  test("an episode aborted by shutdown books its usage only and leaves its stimulus queued", async () => {
    await t.queue();
    t.setStopping(true);
    t.script.push(async (_start, onTool) => {
      await onTool(1, "send", [{ type: "mon", key: "b" }, { hi: 1 }]);
      await onTool(2, "send", [{ type: "mon", key: "b" }, { hi: 2 }]);
      return { ok: false, kind: "crashed", message: "killed", records: [], ms: 1 };
    });
    expect(await t.executor.turn(A)).toEqual({ kind: "parked" });
    expect(await t.rows("SELECT COUNT(*) AS n FROM episodes")).toEqual([{ n: 0 } as never]);
    expect(await t.rows("SELECT state, attempts FROM stimuli")).toEqual([{ state: "queued", attempts: 0 } as never]);
    expect(t.book.queued(A)).toBe(1);
    // Its calls were made (and are made again after the restart): the attempt counts against its budgets.
    const usage = await t.rows("SELECT episodes, tool_calls FROM budget_usage WHERE agent = ?", [A]);
    expect(usage).toEqual([{ episodes: 1, tool_calls: 2 } as never, { episodes: 1, tool_calls: 2 } as never]);
    expect(await t.rows("SELECT failures FROM agents WHERE id = ?", [A])).toEqual([{ failures: 0 } as never]);
  });
});

describe("executor: a turn that fails unexpectedly", () => {
  test("is tried again after a backoff that doubles while it keeps failing, reset by a good turn", async () => {
    await t.queue();
    const broken = () => {
      throw new Error("the store refused the commit");
    };
    const waits: number[] = [];
    for (let i = 0; i < 4; i++) {
      t.script.push(broken);
      const r = await t.executor.turn(A);
      expect(r.kind).toBe("wait");
      waits.push((r as { until: number }).until - t.now());
    }
    const first = TURN_ERROR_BACKOFF_MS.first;
    expect(waits).toEqual([first, 2 * first, 4 * first, 8 * first]);
    // Nothing was recorded for the stimulus: it is still queued, its attempts untouched.
    expect(await t.rows("SELECT state, attempts FROM stimuli")).toEqual([
      expect.objectContaining({ state: "queued", attempts: 0 }),
    ]);
    expect((await t.executor.turn(A)).kind).not.toBe("wait");
    await t.queue();
    t.script.push(broken);
    const again = await t.executor.turn(A);
    expect((again as { until: number }).until - t.now()).toBe(first);
  });
});

describe("executor: budgets, retirement, integrity", () => {
  test("an agent at episodes_per_hour is paused until the hour ends without running; then it runs again", async () => {
    for (let i = 0; i < 4; i++) await t.queue();
    for (let i = 0; i < 3; i++) expect((await t.executor.turn(A)).kind).toBe("ran");
    const hourEnds = budgetWindows(t.now()).hourEnds;
    expect(await t.executor.turn(A)).toEqual({ kind: "wait", until: hourEnds });
    expect(t.starts).toHaveLength(3);
    const [a] = await t.rows("SELECT status, reason, paused_until FROM agents");
    expect(a).toMatchObject({
      status: "paused",
      reason: "budget episodes_per_hour (3) reached",
      paused_until: hourEnds,
    });
    t.tick(hourEnds - t.now());
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    expect((await t.rows("SELECT status FROM agents"))[0]).toMatchObject({ status: "active" });
  });

  test("a retired agent runs nothing: what waits for it is refused with the reason recorded", async () => {
    await t.queue();
    await t.queue();
    await t.store.setAgentStatus(A, "retired", "retired by operator");
    // Empty, not parked: the scheduler gives the agent a turn again when something more is recorded.
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    expect(t.starts).toHaveLength(0);
    const rows = await t.rows("SELECT state, last_error FROM stimuli");
    expect(rows.map((r) => r.state)).toEqual(["rejected", "rejected"]);
    expect(rows[0]!.last_error).toBe("agent is retired (retired by operator)");
    expect(t.book.queued(A)).toBe(0);
    expect(t.seen.find((s) => s.kind === "rejected")?.e).toMatchObject({ agent: A, count: 2 });
  });

  test("a send admitted before its target retired, recorded after, is refused by the next turn", async () => {
    await t.queue();
    await t.store.setAgentStatus(A, "retired", "retired by operator");
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    await t.queue(); // recorded after the refusal, as a send reserved before the retirement is
    expect(t.book.queued(A)).toBe(1);
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    expect(t.starts).toHaveLength(0);
    expect((await t.rows("SELECT state FROM stimuli ORDER BY seq")).map((r) => r.state)).toEqual([
      "rejected",
      "rejected",
    ]);
    expect(t.book.queued(A)).toBe(0);
  });

  test("an agent whose type is gone is retired; what waits for it is refused, not left queued", async () => {
    const other = await setup(await compileSpec('[agents.other]\nmodule = "o.ts"\n', "/srv/fleet.toml"));
    await other.queue();
    await other.queue();
    expect(await other.executor.turn(A)).toEqual({ kind: "empty" });
    expect(other.starts).toHaveLength(0);
    expect((await other.rows("SELECT status, reason FROM agents"))[0]).toMatchObject({
      status: "retired",
      reason: "type mon is not in the fleet spec",
    });
    const rows = await other.rows("SELECT state, last_error FROM stimuli");
    expect(rows.map((r) => [r.state, r.last_error])).toEqual([
      ["rejected", "agent is retired (type mon is not in the fleet spec)"],
      ["rejected", "agent is retired (type mon is not in the fleet spec)"],
    ]);
  });

  test("a checkpoint that does not match its hash fails the agent with a clear reason and runs nothing", async () => {
    await t.queue();
    await t.queue();
    t.script.push(() => ok({ n: 1 }));
    await t.executor.turn(A);
    await t.store.client.execute({ sql: `UPDATE checkpoints SET state = '{"n":999}' WHERE agent = ?`, args: [A] });
    expect(await t.executor.turn(A)).toEqual({ kind: "parked" });
    expect(t.starts).toHaveLength(1);
    const [a] = await t.rows("SELECT status, reason FROM agents");
    expect(a!.status).toBe("failed");
    expect(String(a!.reason)).toContain("mon/a");
    // The stimulus still waits; nothing was lost.
    expect((await t.rows("SELECT state FROM stimuli ORDER BY seq")).map((r) => r.state)).toEqual(["done", "queued"]);
  });

  test("an agent whose checkpoint fails while it drains is retired, and what waited for it is refused", async () => {
    const scheduler = new Scheduler({ maxConcurrent: 1, runTurn: async () => ({ kind: "empty" }), queued: () => 0 });
    const roster = new Roster(t.store, new FleetEvents(log), scheduler, t.book);
    t.setDrained((a) => roster.finishDrain(a));
    await t.queue();
    await t.queue();
    t.script.push(() => ok({ n: 1 }));
    await t.executor.turn(A);
    await t.store.client.execute({ sql: `UPDATE checkpoints SET state = '{"n":999}' WHERE agent = ?`, args: [A] });
    expect(await roster.setLifecycle(A, "retire", { drain: true })).toEqual({ ok: true, status: "draining" });
    await t.executor.turn(A);
    const [a] = await t.rows("SELECT status, reason FROM agents");
    expect(a!.status).toBe("retired");
    expect(String(a!.reason)).toStartWith("failed while draining, retired: ");
    expect(String(a!.reason)).toContain("mon/a");
    expect(t.book.isRetired(A)).toBe(true);
    // Its next turn refuses what still waited, with the reason recorded (nothing is left queued).
    await t.executor.turn(A);
    expect((await t.rows("SELECT state FROM stimuli ORDER BY seq")).map((r) => r.state)).toEqual(["done", "rejected"]);
    expect(t.starts).toHaveLength(1);
    scheduler.stop();
  });
});

describe("executor: sends", () => {
  test("a send is written with the sender's commit and queued for its target under the seq written", async () => {
    await t.queue();
    t.script.push(async (_s, onTool) => {
      expect((await onTool(1, "send", [B, { hi: 1 }])).ok).toBe(true);
      expect((await onTool(2, "send", [B, { hi: 2 }])).ok).toBe(true);
      return ok({ n: 1 });
    });
    await t.executor.turn(A);
    const rows = await t.rows("SELECT seq, agent, kind, sid FROM stimuli WHERE agent = ? ORDER BY seq", [B]);
    expect(rows).toHaveLength(2);
    expect(rows[0]).toMatchObject({ kind: "inbox" });
    expect(String(rows[0]!.sid)).toStartWith("inbox:");
    expect(t.book.seqs(B)).toEqual(rows.map((r) => Number(r.seq)));
    expect(t.book.head(B)).toBe(Number(rows[0]!.seq));
    expect(t.seen.find((s) => s.kind === "intake")?.e).toEqual({ source: "inbox", accepted: 2, duplicates: 0 });
  });

  test("a failed episode's sends are not written and their reserved places are given back", async () => {
    await t.queue();
    t.script.push(async (_s, onTool) => {
      await onTool(1, "send", [B, 1]);
      return threw("after send");
    });
    await t.executor.turn(A);
    expect(await t.rows("SELECT COUNT(*) AS n FROM stimuli WHERE agent = ?", [B])).toEqual([{ n: 0 } as never]);
    expect(t.book.queued(B)).toBe(0);
    // The place is free again: a queue of one still admits one.
    expect(t.book.admit(B, 1).ok).toBe(true);
  });

  test("a commit that throws gives the sends' places back and the stimulus stays queued", async () => {
    await t.queue();
    t.script.push(async (_s, onTool) => {
      await onTool(1, "send", [B, 1]);
      return ok({ n: 1 });
    });
    t.store.commitEpisode = async () => {
      throw new Error("disk full");
    };
    expect((await t.executor.turn(A)).kind).toBe("wait");
    expect(t.book.admit(B, 1).ok).toBe(true);
    expect(t.book.queued(A)).toBe(1);
    expect(await t.rows("SELECT state FROM stimuli WHERE agent = ?", [A])).toEqual([{ state: "queued" } as never]);
  });

  test("a failure whose source map is unreadable gives the sends' places back; its stimulus stays queued", async () => {
    // The failure's message is put in the sources' terms (the bundle's source map) before anything is
    // recorded: a store that cannot read the map throws there, and the turn fails unexpectedly.
    t = await setup(sv, log, {
      bundleFor: () => "b".repeat(64),
      bundleFile: async () => "/bundles/mon.js",
      inSourceTerms: async () => {
        throw new Error("source map unreadable");
      },
    });
    await t.queue();
    t.script.push(async (_s, onTool) => {
      await onTool(1, "send", [B, 1]);
      return threw("at /bundles/mon.js:1:10");
    });
    expect((await t.executor.turn(A)).kind).toBe("wait");
    expect(t.book.queued(B)).toBe(0);
    expect(t.book.admit(B, 1).ok).toBe(true);
    expect(t.book.queued(A)).toBe(1);
    expect(await t.rows("SELECT state, attempts FROM stimuli WHERE agent = ?", [A])).toEqual([
      { state: "queued", attempts: 0 } as never,
    ]);
  });
});

describe("executor: commits in a backlog", () => {
  /** The gather window of each commit the executor asks the store for, with the commit itself done as usual. */
  function gathers(): number[] {
    const asked: number[] = [];
    const commit = t.store.commitEpisode.bind(t.store);
    t.store.commitEpisode = (c, gatherMs = 0) => {
      asked.push(gatherMs);
      return commit(c, gatherMs);
    };
    return asked;
  }

  test("an episode whose stimulus waited in a backlog while others run may wait for company to commit", async () => {
    const asked = gathers();
    await t.queue();
    t.tick(200);
    t.setRunning(4);
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    expect(asked).toEqual([COMMIT_GATHER_MS]);
    expect(await t.rows("SELECT state FROM stimuli WHERE agent = ?", [A])).toEqual([{ state: "done" } as never]);
  });

  test("an agent that is not behind, or the only episode running, commits at once", async () => {
    const asked = gathers();
    await t.queue();
    t.tick(5);
    t.setRunning(4);
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    await t.queue(B);
    t.tick(200);
    t.setRunning(1);
    expect(await t.executor.turn(B)).toEqual({ kind: "ran" });
    expect(asked).toEqual([0, 0]);
  });
});

describe("executor: wake-ups", () => {
  const wake = (start: Start, n: number, at: number, data: unknown = null) =>
    ({ k: "wake", id: `${start.episode}.w${n}`, at, data }) as const;

  test("wake-ups are written with the episode's commit, and the next episode is told they are pending", async () => {
    await t.queue();
    await t.queue();
    t.script.push((s) => ok({}, [wake(s, 1, t.now() + 5000, { door: "d1" }), wake(s, 2, t.now() + 9000)]));
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    const first = t.starts[0]!.episode;
    const rows = await t.rows("SELECT id, agent, due_at, payload, set_by, state FROM wakeups ORDER BY due_at");
    expect(rows).toEqual([
      {
        id: `${first}.w1`,
        agent: A,
        due_at: t.now() + 5000,
        payload: '{"door":"d1"}',
        set_by: first,
        state: "pending",
      },
      { id: `${first}.w2`, agent: A, due_at: t.now() + 9000, payload: "null", set_by: first, state: "pending" },
    ] as never);
    await t.executor.turn(A);
    expect(t.starts[1]!.wakes).toEqual({ pending: [`${first}.w1`, `${first}.w2`], max: 100 });
  });

  test("a cancelled wake-up is marked cancelled by the episode that cancelled it", async () => {
    await t.queue();
    await t.queue();
    t.script.push((s) => ok({}, [wake(s, 1, t.now() + 5000)]));
    await t.executor.turn(A);
    const id = `${t.starts[0]!.episode}.w1`;
    t.script.push(() => ok({}, [{ k: "cancel_wake", id }]));
    await t.executor.turn(A);
    const [row] = await t.rows("SELECT state, done_by FROM wakeups WHERE id = ?", [id]);
    expect(row).toEqual({ state: "cancelled", done_by: t.starts[1]!.episode } as never);
  });

  /** The wake-up clock fires `id` now, as it does: the `wake` stimulus recorded, then the row marked fired. */
  async function fireWake(id: string): Promise<void> {
    const [o] = await t.store.intake([
      {
        agent: A,
        type: "mon",
        key: "a",
        sid: `wake:${id}` as StimulusId,
        kind: "wake",
        topic: null,
        payload: new TextEncoder().encode('{"data":null}'),
        receivedAt: t.now(),
      },
    ]);
    t.book.recorded(A, o!.seq!, o!.receivedAt);
    await t.store.settleWakes([id], "fired", t.now());
  }

  test("a wake-up that fell due while its cancelling episode ran is cancelled; its queued run is dropped", async () => {
    await t.queue();
    await t.queue();
    t.script.push((s) => ok({}, [wake(s, 1, t.now() + 5000)]));
    await t.executor.turn(A);
    const id = `${t.starts[0]!.episode}.w1`;
    t.script.push(async () => {
      // The wake-up clock fires it now: its stimulus is queued behind this episode, its row marked fired.
      await fireWake(id);
      return ok({}, [{ k: "cancel_wake", id }]);
    });
    await t.executor.turn(A);
    const [row] = await t.rows("SELECT state, done_by FROM wakeups WHERE id = ?", [id]);
    expect(row).toEqual({ state: "cancelled", done_by: t.starts[1]!.episode } as never);
    const [stim] = await t.rows("SELECT state, last_error FROM stimuli WHERE sid = ?", [`wake:${id}`]);
    expect(stim).toEqual({
      state: "dropped",
      last_error: `its wake-up was cancelled by episode ${t.starts[1]!.episode}`,
    } as never);
    expect(t.book.queued(A)).toBe(0);
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
  });

  test("a wake-up the clock read as due before its cancel committed, and recorded after, never runs", async () => {
    await t.queue();
    await t.queue();
    t.script.push((s) => ok({}, [wake(s, 1, t.now() + 5000)]));
    await t.executor.turn(A);
    const id = `${t.starts[0]!.episode}.w1`;
    t.script.push(() => ok({}, [{ k: "cancel_wake", id }]));
    await t.executor.turn(A); // the cancel commits: the row is cancelled, no stimulus of it is queued yet
    // The clock's intake of what it read as due a moment before lands now.
    await fireWake(id); // its row: found cancelled, unchanged
    const starts = t.starts.length;
    expect(await t.executor.turn(A)).toEqual({ kind: "empty" });
    expect(t.starts).toHaveLength(starts);
    const [stim] = await t.rows("SELECT state, last_error FROM stimuli WHERE sid = ?", [`wake:${id}`]);
    expect(stim).toEqual({
      state: "dropped",
      last_error: `its wake-up was cancelled by episode ${t.starts[1]!.episode}`,
    } as never);
    expect(t.book.queued(A)).toBe(0);
  });

  test("an episode cannot cancel another agent's wake-up", async () => {
    await t.queue(A);
    await t.queue(B);
    t.script.push((s) => ok({}, [wake(s, 1, t.now() + 5000)]));
    await t.executor.turn(A);
    const id = `${t.starts[0]!.episode}.w1`;
    t.script.push(() => ok({}, [{ k: "cancel_wake", id }]));
    expect(await t.executor.turn(B)).toEqual({ kind: "ran" });
    expect(await t.rows("SELECT state FROM wakeups WHERE id = ?", [id])).toEqual([{ state: "pending" }] as never);
  });

  test("a failed episode schedules and publishes nothing: its wake-ups and emits are only in its log", async () => {
    await t.queue();
    t.script.push((s) => ({
      ok: false,
      kind: "threw",
      message: "boom",
      records: [{ k: "emit", data: { alarm: 1 } }, wake(s, 1, t.now())],
      ms: 3,
    }));
    expect((await t.executor.turn(A)).kind).toBe("wait");
    expect(await t.rows("SELECT id FROM wakeups")).toEqual([]);
    expect(t.published.flatMap((p) => p.topics)).not.toContain("fleet/agents/mon/a/out");
    expect((await t.rows("SELECT kind FROM events")).map((e) => e.kind)).toEqual([
      "stimulus",
      "emit",
      "wake",
      "failure",
    ]);
  });

  test("a wake-up id the episode did not issue fails the episode as a protocol violation", async () => {
    await t.queue();
    t.script.push(() => ok({}, [{ k: "wake", id: "someone-else.w1", at: t.now(), data: null }]));
    await t.executor.turn(A);
    expect(await t.rows("SELECT id FROM wakeups")).toEqual([]);
    const [ep] = await t.rows(`SELECT ${episodeStatus.ofSql("status")} AS status, error_kind, error FROM episodes`);
    expect(ep).toMatchObject({ status: "failed", error_kind: "protocol" });
    expect(String(ep!.error)).toContain("was not issued by this episode");
  });

  test("a subprocess that sets more than max_wakeups fails the episode and schedules none", async () => {
    await t.queue();
    t.script.push((s) =>
      ok(
        {},
        Array.from({ length: 101 }, (_, i) => wake(s, i + 1, t.now() + i)),
      ),
    );
    await t.executor.turn(A);
    expect(await t.rows("SELECT id FROM wakeups")).toEqual([]);
    const [ep] = await t.rows("SELECT error_kind, error FROM episodes");
    expect(ep).toMatchObject({
      error_kind: "protocol",
      error: "a wake-up was set with max_wakeups (100) already pending",
    });
  });
});

describe("executor: timer fires that piled up coalesce by catch_up", () => {
  const timerSpec = (catchUp: string) =>
    compileSpec(`[agents.mon]\nmodule = "mon.ts"\nevery = "1m"\ncatch_up = "${catchUp}"\n`, "/srv/fleet.toml");

  for (const policy of ["one", "none"]) {
    test(`catch_up = "${policy}": queued fires run once, on the newest; the rest are dropped with why`, async () => {
      const u = await setup(await timerSpec(policy));
      for (let i = 0; i < 3; i++) await u.queue(A, "timer");
      await u.queue(A); // a device message behind them still runs
      expect(await u.executor.turn(A)).toEqual({ kind: "ran" });
      expect(await u.executor.turn(A)).toEqual({ kind: "ran" });
      expect(await u.executor.turn(A)).toEqual({ kind: "empty" });
      expect(u.starts.map((s) => s.stimulus.id)).toEqual(["id:2", "id:3"]);
      const rows = await u.rows("SELECT sid, state, last_error FROM stimuli ORDER BY seq");
      expect(rows.map((r) => [r.sid, r.state])).toEqual([
        ["id:0", "dropped"],
        ["id:1", "dropped"],
        ["id:2", "done"],
        ["id:3", "done"],
      ]);
      expect(rows[0]!.last_error).toBe(`superseded by a newer timer fire (catch_up = "${policy}")`);
      expect(u.book.queued(A)).toBe(0);
    });
  }

  test('catch_up = "all": every queued fire runs, oldest first', async () => {
    const u = await setup(await timerSpec("all"));
    for (let i = 0; i < 3; i++) await u.queue(A, "timer");
    for (let i = 0; i < 3; i++) expect(await u.executor.turn(A)).toEqual({ kind: "ran" });
    expect(u.starts.map((s) => s.stimulus.id)).toEqual(["id:0", "id:1", "id:2"]);
  });
});

describe("executor: fleet trace --topic finds the episode whose output was published last", () => {
  const published = (topic: string): RunResult["records"] => [
    { k: "tool", call: 1, tool: "publish", args: [topic, { v: 1 }], ok: true, result: { seq: 0 } },
  ];
  const idOf = async (topic: string, at?: number) => {
    const r = await episodeForTopic(t.store, topic, at);
    return "code" in r ? r.code : r.agent;
  };

  test("by commit time: a slow episode that started first published last, and nothing before it ended", async () => {
    await t.queue(A);
    await t.queue(B);
    const t0 = t.now();
    let release = () => {};
    const slow = new Promise<void>((r) => {
      release = r;
    });
    // A starts first and commits 6 s later; B starts 1 s after A and commits at once.
    t.script.push(async () => {
      await slow;
      t.tick(5000);
      return ok({}, [{ k: "emit", data: { v: "A" } }, ...published("alerts/shared")]);
    });
    const turnA = t.executor.turn(A);
    while (t.starts.length === 0) await Bun.sleep(1);
    t.tick(1000);
    t.script.push(() => ok({}, published("alerts/shared")));
    expect(await t.executor.turn(B)).toEqual({ kind: "ran" });
    release();
    expect(await turnA).toEqual({ kind: "ran" });
    expect(t.now()).toBe(t0 + 6000);

    expect(await idOf("alerts/shared")).toBe(A);
    expect(await idOf("alerts/shared", t0 + 3000)).toBe(B);
    expect(await idOf("alerts/shared", t0 + 6000)).toBe(A);
    expect(await idOf("fleet/agents/mon/a/out", t0 + 3000)).toBe("not_found");
    expect(await idOf("fleet/agents/mon/a/out", t0 + 6000)).toBe(A);
  });
});

describe("executor: fleet trace of a failed episode", () => {
  test("shows its emits, publishes and sends as recorded but not delivered: no seq, not sent", async () => {
    await t.queue(A);
    const records: RunResult["records"] = [
      { k: "emit", data: { v: "F" } },
      { k: "tool", call: 1, tool: "publish", args: ["alerts/f", { v: "F" }], ok: true, result: { seq: 0 } },
      { k: "tool", call: 2, tool: "send", args: ["mon/b", { v: "F" }], ok: true, result: { queued: true } },
    ];
    t.script.push(() => ({ ok: false, kind: "threw", message: "after-effects", records, ms: 3 }));
    t.script.push(() => ok({}, records));
    await t.executor.turn(A);
    t.tick(100);
    expect(await t.executor.turn(A)).toEqual({ kind: "ran" });
    const [failed, committed] = t.starts.map((s) => s.episode);
    const effects = async (episode: string) => {
      const r = await traceEpisode(t.store, episode);
      if ("code" in r) throw new Error(r.message);
      return r.episode.effects.map((e) => ({ ...e, episodes: undefined }));
    };
    expect(await effects(failed!)).toEqual([
      { kind: "emit", topic: "fleet/agents/mon/a/out", seq: null, data: { v: "F" }, episodes: undefined },
      { kind: "publish", topic: "alerts/f", seq: null, ok: true, episodes: undefined },
      { kind: "send", to: "mon/b", ok: true, sent: false, episodes: undefined },
    ]);
    expect(await effects(committed!)).toEqual([
      { kind: "emit", topic: "fleet/agents/mon/a/out", seq: 0, data: { v: "F" }, episodes: undefined },
      { kind: "publish", topic: "alerts/f", seq: 1, ok: true, episodes: undefined },
      { kind: "send", to: "mon/b", ok: true, sent: true, episodes: undefined },
    ]);
  });
});
