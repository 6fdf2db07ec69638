/**
 * The episode runner with real subprocesses (small fixture agents in test/fixtures/unit),
 * and the tool gate against local HTTP and OpenAI-style servers.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  EPISODE_OOM_SCORE_ADJ,
  type EpisodeRecord,
  MAX_JSON_DEPTH,
  NICE_ARG,
  type ParentMessage,
} from "../agents/protocol.ts";
import { HOST_ENTRY, HOST_PATHS, PROTOCOL_ENTRY, SDK_ENTRY } from "../agents/host/index.ts";
import {
  CHILD_ENV,
  defaultSpawnOptions,
  bytecodeOf,
  describeSandbox,
  episodeFiles,
  hostCommand,
  hostScript,
  EPISODE_GROUP_NICE,
  EPISODE_NICE,
  FLOODED_GROUP_NICE,
  idleSpawnOptions,
  inRootCpuGroup,
  ProcessTable,
  rssMb,
  runEpisode,
  runtimeFor,
  sessionGroups,
  SPARE_GROUP_NICE,
  SparePool,
  UidPool,
  type FailureKind,
  type RunLimits,
  type RunResult,
  type SpawnOptions,
  type ToolHandler,
  tmpfsUsedMb,
} from "../gateway/episode/index.ts";
import { compileSpec, DEFAULT_SANDBOX_UIDS } from "../gateway/spec/index.ts";
import type { FleetSpec } from "../gateway/spec/index.ts";
import type { AgentId } from "../gateway/types.ts";
import { ToolGate, type ToolEnv } from "../gateway/episode/index.ts";
import { firstDivergence, replayInputs } from "../gateway/ops/index.ts";
import { secureDataDir, writePrivateFile } from "../gateway/store/index.ts";
import { isSandboxUid } from "./helpers/policy.ts";

// Subprocess tests on a busy 2-core machine: generous bounds, no timing assertions.
setDefaultTimeout(30_000);

const FIXTURES = fileURLToPath(new URL("./fixtures/unit/", import.meta.url));
/** Agents every suite shares (one copy, in test/fixtures/agents); the rest are this suite's own. */
const SHARED = new Set(["throws", "exits", "loops"]);
const fixture = (name: string) =>
  SHARED.has(name) ? fileURLToPath(new URL(`./fixtures/agents/${name}.ts`, import.meta.url)) : `${FIXTURES}${name}.ts`;

const LIMITS: RunLimits = {
  timeoutMs: 20_000,
  memoryMb: 256,
  maxRecords: 10_000,
  maxRecordBytes: 8 * 1024 * 1024,
  maxOpenFiles: 256,
  maxProcesses: 4096,
};
const SPAWN: SpawnOptions = defaultSpawnOptions();

type Start = Extract<ParentMessage, { t: "start" }>;

function start(module: string, payload: unknown = { v: 1 }, over: Partial<Start> = {}): Start {
  return {
    t: "start",
    episode: "0190f000-0000-7000-8000-000000000001",
    agent: { type: "unit", key: "k1", id: "unit/k1" },
    module: fixture(module),
    config: { threshold: 80 },
    state: null,
    fresh: true,
    stimulus: { id: "id:1", kind: "manual", payload, received_at: 1_700_000_000_000 },
    replay: null,
    limits: { max_records: 10_000, max_record_bytes: 8 * 1024 * 1024 },
    wakes: { pending: [], max: 100 },
    ...over,
  };
}

/** This process's nice value (field 19 of /proc/self/stat). */
function ownNice(): number {
  const stat = readFileSync("/proc/self/stat", "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
}

const noTools: ToolHandler = async () => ({ ok: false, result: { error: "denied", reason: "no tools in this test" } });

/** Whether a process is gone (a zombie waiting for init counts as gone). */
function gone(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return true;
  }
  try {
    return /^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return true;
  }
}

/** Every descendant pid of `pid`, read from /proc/<pid>/task/<tid>/children. */
function descendantsOf(pid: number): number[] {
  const out: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const p = queue.shift()!;
    let tasks: string[] = [];
    try {
      tasks = readdirSync(`/proc/${p}/task`);
    } catch {
      continue;
    }
    for (const t of tasks) {
      let children = "";
      try {
        children = readFileSync(`/proc/${p}/task/${t}/children`, "utf8");
      } catch {
        // the task ended meanwhile
      }
      for (const c of children.split(" ").filter(Boolean).map(Number)) {
        out.push(c);
        queue.push(c);
      }
    }
  }
  return out;
}

/** The process table the runs below register their subprocesses in. */
const PROCS = new ProcessTable();

/** Poll until `cond` holds; fails after `ms` (a bound, not a timing assertion). */
async function waitUntil(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await Bun.sleep(10);
  }
}

/** Run an episode and report the subprocess pid it used (runEpisode registers it before its first await). */
async function run(
  s: Start,
  limits: Partial<RunLimits> = {},
  onTool: ToolHandler = noTools,
  spawn: SpawnOptions = SPAWN,
): Promise<RunResult & { pid: number }> {
  const before = new Set(PROCS.episodePids());
  const pending = runEpisode(s, { ...LIMITS, ...limits }, onTool, spawn, undefined, PROCS);
  const pids = PROCS.episodePids().filter((p) => !before.has(p));
  expect(pids).toHaveLength(1);
  const result = await pending;
  return { ...result, pid: pids[0]! };
}

/** Expect a failed run of `kind` whose subprocess is gone. */
function expectFailure(r: RunResult & { pid: number }, kind: FailureKind): Extract<RunResult, { ok: false }> {
  if (r.ok) throw new Error(`expected a ${kind} failure, got success with state ${JSON.stringify(r.state)}`);
  expect({ kind: r.kind, message: r.message }).toEqual({ kind, message: expect.any(String) });
  expect(PROCS.episodePids()).not.toContain(r.pid);
  expect(() => process.kill(r.pid, 0)).toThrow();
  return r;
}

const decisions = (records: readonly EpisodeRecord[]) => records.filter((r) => r.k === "decide");

describe("runEpisode: success", () => {
  test("returns the new state and the records in the order the agent wrote them", async () => {
    const r = await run(start("records", { v: 42 }));
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    expect(r.state).toEqual({ count: 1, last: { v: 42 } });
    expect(r.records.map((x) => x.k)).toEqual(["decide", "emit", "now", "random", "log"]);
    const [decide, emit, now, random, log] = r.records as [
      Extract<EpisodeRecord, { k: "decide" }>,
      Extract<EpisodeRecord, { k: "emit" }>,
      Extract<EpisodeRecord, { k: "now" }>,
      Extract<EpisodeRecord, { k: "random" }>,
      Extract<EpisodeRecord, { k: "log" }>,
    ];
    expect(decide).toEqual({ k: "decide", name: "saw", data: { id: "id:1", payload: { v: 42 } } });
    expect(emit).toEqual({ k: "emit", data: { hello: "unit/k1" } });
    expect(now.v).toBeNumber();
    expect(random.v).toBeGreaterThanOrEqual(0);
    expect(random.v).toBeLessThan(1);
    // The log line carries the recorded now/random values, so the order is the call order.
    expect(log).toEqual({ k: "log", level: "info", msg: `note ${JSON.stringify({ t: now.v, r: random.v })}` });
    expect(PROCS.episodePids()).not.toContain(r.pid);
    expect(() => process.kill(r.pid, 0)).toThrow();
  });

  test("ctx.log records each line at its level: ctx.log() is info, ctx.log.debug|warn|error their own", async () => {
    const r = await run(start("terminal", "ok"));
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    expect(r.records.filter((x) => x.k === "log")).toEqual([
      { k: "log", level: "debug", msg: "checking id:1" },
      { k: "log", level: "info", msg: "plain info" },
      { k: "log", level: "warn", msg: '{"odd":true}' },
      { k: "log", level: "error", msg: "refusing" },
    ]);
  });

  test("continues from the given state when the agent is not fresh", async () => {
    const r = await run(start("records", "x", { fresh: false, state: { count: 41, last: null } }));
    expect(r.ok && r.state).toEqual({ count: 42, last: "x" });
  });

  test("replay answers now() and random() from the recorded inputs", async () => {
    const r = await run(start("records", 1, { replay: { now: [123], random: [0.25], tools: [] } }));
    if (!r.ok) throw new Error(r.message);
    expect(r.records.filter((x) => x.k === "now" || x.k === "random")).toEqual([
      { k: "now", v: 123 },
      { k: "random", v: 0.25 },
    ]);
  });
});

describe("runEpisode: tool calls", () => {
  test("a tool call round-trips through the handler and is recorded with the handler's result", async () => {
    const seen: { call: number; tool: string; args: readonly unknown[] }[] = [];
    const r = await run(
      start("tool-caller", { tool: "publish", args: ["alerts/k1", { t: 90 }, { retain: true }] }),
      {},
      async (call, tool, args) => {
        seen.push({ call, tool, args });
        return { ok: true, result: { queued: true, topic: "alerts/k1", echo: args[1] } };
      },
    );
    if (!r.ok) throw new Error(r.message);
    expect(seen).toEqual([{ call: 1, tool: "publish", args: ["alerts/k1", { t: 90 }, { retain: true }] }]);
    expect(r.records).toEqual([
      {
        k: "tool",
        call: 1,
        tool: "publish",
        args: ["alerts/k1", { t: 90 }, { retain: true }],
        ok: true,
        result: { queued: true, topic: "alerts/k1", echo: { t: 90 } },
      },
      { k: "decide", name: "result", data: { queued: true, topic: "alerts/k1", echo: { t: 90 } } },
    ]);
  });

  test.each([
    ["ctx.tools.send", "send"],
    ["ctx.send", "ctx.send"],
  ])("%s reaches the gateway as the send tool", async (_how, tool) => {
    const seen: { tool: string; args: unknown[] }[] = [];
    const r = await run(start("tool-caller", { tool, args: ["other/k2", { hi: 1 }] }), {}, async (_call, t, args) => {
      seen.push({ tool: t, args: [...args] });
      return { ok: true, result: { queued: true, to: "other/k2" } };
    });
    if (!r.ok) throw new Error(r.message);
    expect(seen).toEqual([{ tool: "send", args: ["other/k2", { hi: 1 }] }]);
    expect(decisions(r.records)).toEqual([{ k: "decide", name: "result", data: { queued: true, to: "other/k2" } }]);
  });

  test("a denied tool surfaces in the agent as a catchable ToolDenied", async () => {
    const r = await run(start("tool-caller", { tool: "http", args: ["http://example.invalid/"] }), {}, async () => ({
      ok: false,
      result: { error: "denied", reason: 'tool "http" is not in agents.unit.tools' },
    }));
    if (!r.ok) throw new Error(r.message);
    expect(r.records[0]).toMatchObject({ k: "tool", tool: "http", ok: false, result: { error: "denied" } });
    expect(decisions(r.records)).toEqual([
      {
        k: "decide",
        name: "denied",
        data: { name: "ToolDenied", tool: "http", reason: 'tool "http" is not in agents.unit.tools' },
      },
    ]);
    expect(r.state).toEqual({ calls: 1 });
  });

  test("a failed tool surfaces as ToolFailed, and a handler that throws becomes a failed result", async () => {
    const failed = await run(start("tool-caller", { tool: "llm", args: [{ prompt: "hi" }] }), {}, async () => ({
      ok: false,
      result: { error: "failed", reason: "llm endpoint answered 503" },
    }));
    expect(failed.ok && decisions(failed.records)).toEqual([
      { k: "decide", name: "failed", data: { name: "ToolFailed", tool: "llm", reason: "llm endpoint answered 503" } },
    ]);
    const threw = await run(start("tool-caller", { tool: "llm", args: [{ prompt: "hi" }] }), {}, async () => {
      throw new Error("handler bug");
    });
    if (!threw.ok) throw new Error(threw.message);
    expect(decisions(threw.records)[0]).toMatchObject({
      name: "failed",
      data: { name: "ToolFailed", reason: expect.stringContaining("handler bug") },
    });
  });

  test("a failed episode keeps what the agent recorded before it threw, live and in replay alike", async () => {
    const live = await run(start("log-then-throw"));
    if (live.ok) throw new Error("expected a failure");
    expect(live.kind).toBe("threw");
    expect(live.records.map((r) => r.k)).toEqual(["tool", "log", "decide", "emit", "now", "pending_wakes", "wake"]);
    expect(live.records[1]).toEqual({ k: "log", level: "warn", msg: "the sensor value looks wrong" });
    const replayed = await run(start("log-then-throw", { v: 1 }, { replay: replayInputs(live.records) }));
    if (replayed.ok) throw new Error("expected the replay to fail too");
    expect(replayed.records.map((r) => r.k)).toEqual(live.records.map((r) => r.k));
    expect(firstDivergence(live.records, replayed.records)).toBeNull();
  });

  test("an episode killed at its timeout while it waits keeps what it recorded since its last tool call", async () => {
    const r = await run(start("log-then-hang", { hang: true }), { timeoutMs: 1000 });
    if (r.ok) throw new Error("expected a timeout");
    expect(r.kind).toBe("timeout");
    expect(r.records.map((x) => x.k)).toEqual(["tool", "log", "decide"]);
    expect(r.records[1]).toMatchObject({ k: "log", msg: "waiting for the valve to answer" });
  });

  test("records made while a call is unanswered follow its record, live and in replay alike", async () => {
    const slow: ToolHandler = async () => {
      await Bun.sleep(300);
      return { ok: true, result: null };
    };
    const live = await run(start("log-then-hang", { hang: false }), {}, slow);
    if (!live.ok) throw new Error(live.message);
    expect(live.records.map((x) => x.k)).toEqual(["tool", "log", "log", "decide"]);
    expect(live.records.filter((x) => x.k === "log").map((x) => (x as { msg: string }).msg)).toEqual([
      "meanwhile",
      "after",
    ]);
    const replayed = await run(start("log-then-hang", { hang: false }, { replay: replayInputs(live.records) }));
    if (!replayed.ok) throw new Error(replayed.message);
    expect(firstDivergence(live.records, replayed.records)).toBeNull();
  });

  test("a failed episode's kept records stay within max_records, as a committed episode's do", async () => {
    const r = await run(
      start("log-then-throw", { flood: 50 }, { limits: { max_records: 20, max_record_bytes: 1 << 20 } }),
    );
    if (r.ok) throw new Error("expected a failure");
    expect(r.kind).toBe("flood");
    expect(r.records.length).toBeLessThanOrEqual(21);
    expect(r.records.filter((x) => x.k === "log")).toHaveLength(20);
  });

  test("concurrent calls answered out of call order replay as MATCH, each with its own result", async () => {
    const payload = { slow: "http://h/slow", fast: "http://h/fast" };
    // Live, the slow first call is answered after the fast second one.
    const live = await run(start("tool-race", payload), {}, async (_call, _tool, args) => {
      if (args[0] === payload.slow) await Bun.sleep(300);
      return { ok: true, result: { url: args[0] } };
    });
    if (!live.ok) throw new Error(live.message);
    expect(live.records.filter((r) => r.k === "tool").map((r) => (r as { call: number }).call)).toEqual([2, 1]);
    const replayed = await run(start("tool-race", payload, { replay: replayInputs(live.records) }));
    if (!replayed.ok) throw new Error(replayed.message);
    expect(firstDivergence(live.records, replayed.records)).toBeNull();
    expect(decisions(replayed.records).at(-1)).toEqual({
      k: "decide",
      name: "both",
      data: [{ url: payload.slow }, { url: payload.fast }],
    });
  });
});

/** The sandbox modes this machine supports: bubblewrap when it works here, and the plain uid drop. */
const SANDBOXES = (["bwrap", "uid"] as const).flatMap((mode) => {
  try {
    return [[mode, defaultSpawnOptions(mode, { allowWeak: true })] as const];
  } catch {
    return [];
  }
});

describe.each(SANDBOXES)(
  "runEpisode in sandbox %s: failures end the episode and leave no process behind",
  (_mode, spawn) => {
    test("a throw fails with kind threw and the agent's message", async () => {
      const r = expectFailure(await run(start("throws"), {}, noTools, spawn), "threw");
      expect(r.message).toContain("throws fixture refuses stimulus");
    });

    test("a TerminalError fails with kind terminal", async () => {
      const r = expectFailure(await run(start("terminal", "bad"), {}, noTools, spawn), "terminal");
      expect(r.message).toContain("reading is malformed");
    });

    test("an infinite loop fails with kind timeout", async () => {
      const r = expectFailure(await run(start("loops"), { timeoutMs: 500 }, noTools, spawn), "timeout");
      expect(r.message).toContain("500 ms");
    });

    test("unbounded allocation fails with kind oom", async () => {
      const r = expectFailure(await run(start("hog"), { memoryMb: 64 }, noTools, spawn), "oom");
      expect(r.message.toLowerCase()).toMatch(/memory/);
    });

    test("memory held by the agent's child processes counts against memory_mb (oom)", async () => {
      // The RSS watch on its own (without the memory cgroup, which would race it).
      const watched = { ...spawn, memcg: null };
      const r = expectFailure(await run(start("child-hog"), { memoryMb: 128 }, noTools, watched), "oom");
      expect(r.message).toMatch(/^PSS \d+ MB of \d+ processes exceeded memory_mb 128/);
      if (spawn.memcg == null) return;
      // The memory cgroup on its own: an RSS watch that never gets to look.
      const blind = { ...spawn, rssPollMs: 600_000 };
      const cg = expectFailure(await run(start("child-hog"), { memoryMb: 128 }, noTools, blind), "oom");
      expect(cg.message).toContain("memory_mb 128 reached in the episode's memory cgroup");
    });

    test("pages many processes share count once: 150 sleeps whose RSS sum passes memory_mb commit", async () => {
      // The RSS watch on its own, as above; it scans every 50-400 ms while they sleep.
      const watched = { ...spawn, memcg: null };
      const r = await run(start("sleepers", { n: 150, hold_ms: 1500 }), { memoryMb: 160 }, noTools, watched);
      if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
      const seen = r.state as { n: number; rssSumMb: number };
      expect(seen.n).toBe(150);
      // What an RSS sum charged them: more than memory_mb, each libc and binary page 150 times.
      expect(seen.rssSumMb).toBeGreaterThan(160);
    });

    test("an episode's process is the OOM killer's first choice, before the gateway (oom_score_adj 1000)", async () => {
      const r = await run(start("priority"), {}, noTools, spawn);
      if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
      expect((r.state as { oom: number }).oom).toBe(EPISODE_OOM_SCORE_ADJ);
      expect(EPISODE_OOM_SCORE_ADJ).toBe(1000);
      // The gateway (this process) keeps its own.
      expect(Number(readFileSync("/proc/self/oom_score_adj", "utf8"))).toBeLessThan(EPISODE_OOM_SCORE_ADJ);
    });

    test.if(spawn.nice != null)("an episode runs below the gateway's priority (nice 19: devices first)", async () => {
      const r = await run(start("priority"), {}, noTools, spawn);
      if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
      // `nice -n` is relative to whatever this test process runs at (a CI runner may be niced), capped at 19.
      expect(r.state).toMatchObject({ nice: Math.min(19, ownNice() + EPISODE_NICE), policy: 0 });
    });

    test.if(spawn.nice != null && spawn.autogroup != null)(
      "where its session is a scheduling group, the episode lowers its own priority: no `nice` exec, the same nice",
      async () => {
        const wrapped = { ...spawn, autogroup: null };
        const limits = { timeoutMs: 5000, memoryMb: 128, maxOpenFiles: 64, maxProcesses: 16 };
        expect(hostCommand(limits, spawn)).not.toContain(spawn.nice!.bin);
        expect(hostCommand(limits, spawn)).toContain(`${NICE_ARG}=${EPISODE_NICE}`);
        expect(hostCommand(limits, wrapped)[0]).toBe(spawn.nice!.bin);
        expect(hostCommand(limits, wrapped).some((a) => a.startsWith(NICE_ARG))).toBe(false);
        const nice: number[] = [];
        for (const opts of [spawn, wrapped]) {
          const r = await run(start("priority"), {}, noTools, opts);
          if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
          nice.push((r.state as { nice: number }).nice);
        }
        expect(nice).toEqual([Math.min(19, ownNice() + EPISODE_NICE), Math.min(19, ownNice() + EPISODE_NICE)]);
      },
    );

    // Its own session (the process-group kill) is a scheduling group of its own where the kernel has
    // autogroups; a group's weight, not its processes' nice, decides its share against the gateway.
    test.if(spawn.autogroup != null)(
      "where sessions are scheduling groups (autogroup), an episode's group runs below the gateway's, a flood's lower",
      async () => {
        const ours = readFileSync("/proc/self/autogroup", "utf8");
        const groups: (number | null)[] = [];
        for (const opts of [spawn, idleSpawnOptions(spawn)]) {
          const r = await run(start("priority"), {}, noTools, opts);
          if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
          groups.push((r.state as { group: number | null }).group);
        }
        expect(groups).toEqual([EPISODE_GROUP_NICE, FLOODED_GROUP_NICE]);
        // The gateway's own group (this process's) is left as it was.
        expect(readFileSync("/proc/self/autogroup", "utf8")).toBe(ours);
      },
    );

    test.if(idleSpawnOptions(spawn).idle != null)(
      "a flooded agent's episode runs under SCHED_IDLE, below every nice value",
      async () => {
        const r = await run(start("priority"), {}, noTools, idleSpawnOptions(spawn));
        if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
        expect((r.state as { policy: number }).policy).toBe(5); // SCHED_IDLE
      },
    );

    test.if(spawn.prlimit !== null)(
      "allocation stopped by the RLIMIT_DATA backstop (before the RSS watch looks) is still oom",
      async () => {
        // An RSS watch that never gets to look: only prlimit --data can stop the agent.
        const blind = { ...spawn, rssPollMs: 600_000 };
        expectFailure(await run(start("fast-hog"), { memoryMb: 64 }, noTools, blind), "oom");
      },
    );

    // A memfd written but not mapped is memory in no process's RSS: only the episode's memory cgroup sees it.
    test.if(spawn.memcg != null && Bun.which("python3") !== null)(
      "memory held where RSS does not show it (an unmapped memfd) counts toward memory_mb in the episode's cgroup",
      async () => {
        const fits = await run(start("memfd", { mb: 16 }), { memoryMb: 128 }, noTools, spawn);
        if (!fits.ok) throw new Error(`${fits.kind}: ${fits.message}`);
        expect(decisions(fits.records)[0]!.data).toEqual({ held: true, signal: null });
        const r = expectFailure(await run(start("memfd", { mb: 300 }), { memoryMb: 128 }, noTools, spawn), "oom");
        expect(r.message).toContain("memory_mb 128 reached in the episode's memory cgroup");
      },
    );

    test.if(spawn.memcg != null)(
      "a process the agent moved out of the episode's process group (setsid) ends with the episode",
      async () => {
        const r = await run(start("detach"), {}, noTools, spawn);
        if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
        const { pid } = decisions(r.records)[0]!.data as { pid: number };
        expect(pid).toBeGreaterThan(0);
        // Under bubblewrap the pid is the sandbox's own; outside it, the host's: gone either way.
        if (!spawn.bwrap) await waitUntil(() => !existsSync(`/proc/${pid}`), `detached sleep ${pid} killed`);
        // Nothing is left in any episode's cgroup.
        const left = () =>
          readdirSync(spawn.memcg!.dir, { withFileTypes: true })
            .filter((e) => e.isDirectory())
            .flatMap((e) => readFileSync(join(spawn.memcg!.dir, e.name, "cgroup.procs"), "utf8").split("\n"))
            .filter(Boolean);
        await waitUntil(() => left().length === 0, "the episode's cgroup emptied");
      },
    );

    test("stderr past 1 MiB fails the episode as flood; the gateway reads no more of it", async () => {
      // Four agents writing 364 MB each to stderr took most of the gateway's core and slowed its acknowledgements.
      const r = expectFailure(await run(start("stderr-flood", { mb: 64 }), {}, noTools, spawn), "flood");
      expect(r.message).toContain(`more than ${1024 * 1024} bytes to stderr`);
      const quiet = await run(start("stderr-flood", { mb: 0.5 }), {}, noTools, spawn);
      expect(quiet.ok).toBe(true);
      // Below the bound a crash's message still ends with what it wrote last.
      const crashed = await run(start("stderr-flood", { mb: 0.5, exit: true }), {}, noTools, spawn);
      expect(expectFailure(crashed, "crashed").message).toEndWith("last words");
    });

    test("process.exit(3) fails with kind crashed and names the exit code", async () => {
      const r = expectFailure(await run(start("exits"), {}, noTools, spawn), "crashed");
      expect(r.message).toContain("code 3");
    });

    test("a module without a defineAgent default export fails with kind invalid_module", async () => {
      const r = expectFailure(await run(start("no-agent"), {}, noTools, spawn), "invalid_module");
      expect(r.message).toContain("defineAgent");
    });

    test("a module that does not exist fails with kind threw and names the module", async () => {
      const r = expectFailure(await run(start("does-not-exist"), {}, noTools, spawn), "threw");
      expect(r.message).toContain("does-not-exist");
    });

    test("a state that cannot become JSON (a BigInt) fails with a message about the state", async () => {
      const r = await run(start("bigint-state"), {}, noTools, spawn);
      if (r.ok) throw new Error("expected a failure");
      expect(["threw", "invalid_state"]).toContain(r.kind);
      expectFailure(r, r.kind);
      expect(r.message).toMatch(/state/i);
      expect(r.message).toMatch(/BigInt/);
    });

    test("an agent that calls ctx.log 100,000 times fails with kind flood", async () => {
      const r = expectFailure(await run(start("flood"), {}, noTools, spawn), "flood");
      expect(r.message).toContain("10000");
    });

    test("an agent that catches the flood error still fails with kind flood", async () => {
      expectFailure(await run(start("flood", { swallow: true }), {}, noTools, spawn), "flood");
    });

    test("a process the agent started is killed with the episode", async () => {
      let descendants: number[] = [];
      let episodePid = 0;
      const before = new Set(PROCS.episodePids());
      const r = await run(
        start("spawner"),
        {},
        async () => {
          // The agent has started its grandchild before this call: note the whole process tree now.
          episodePid = PROCS.episodePids().find((p) => !before.has(p)) ?? 0;
          descendants = descendantsOf(episodePid);
          return { ok: true, result: { queued: true } };
        },
        spawn,
      );
      expectFailure(r, "threw");
      expect(episodePid).toBe(r.pid);
      // At least the agent's own `sleep` below the subprocess (bubblewrap and prlimit add levels).
      expect(descendants.length).toBeGreaterThanOrEqual(1);
      await waitUntil(() => descendants.every(gone), "every process of the episode is gone");
    });
  },
);

describe.each(SANDBOXES)("runEpisode in sandbox %s: environment", (_mode, spawn) => {
  test("the child environment is exactly CHILD_ENV, whatever the gateway's holds", async () => {
    process.env.FLEET_TEST_SECRET = "must-not-leak";
    try {
      const r = await run(start("env", { gateway_pid: process.pid }), {}, noTools, spawn);
      if (!r.ok) throw new Error(r.message);
      const seen = decisions(r.records)[0]!.data as { env: Record<string, string> };
      expect(seen.env).toEqual({ ...CHILD_ENV });
    } finally {
      delete process.env.FLEET_TEST_SECRET;
    }
  });

  test("memory_mb values whose data limit once aborted Bun at start (640-775 MB) run an episode", async () => {
    for (const memoryMb of [640, 700, 768, 1700]) {
      const r = await run(start("env", { gateway_pid: process.pid }), { memoryMb }, noTools, spawn);
      expect({ memoryMb, ok: r.ok, message: r.ok ? "" : r.message }).toEqual({ memoryMb, ok: true, message: "" });
    }
  });

  test("the agent's process holds no file of the gateway's open (its memory cgroup's procs file too)", async () => {
    const r = await run(start("env", { gateway_pid: process.pid }), {}, noTools, spawn);
    if (!r.ok) throw new Error(r.message);
    const { fds } = decisions(r.records)[0]!.data as { fds: string[] };
    expect(fds.length).toBeGreaterThanOrEqual(3);
    const gateways = (f: string) => f.includes("cgroup") || f.includes(tmpdir()) || f.includes(process.cwd());
    expect(fds.filter(gateways)).toEqual([]);
  });

  test.if(process.getuid?.() === 0)(
    "as root, the agent runs as a sandbox uid and cannot read the gateway's /proc/<pid>/environ",
    async () => {
      const r = await run(start("env", { gateway_pid: process.pid }), {}, noTools, spawn);
      if (!r.ok) throw new Error(r.message);
      const seen = decisions(r.records)[0]!.data as { gatewayEnv: string; uid: number };
      expect(isSandboxUid(seen.uid)).toBe(true);
      // EACCES when only the uid differs; ENOENT when a pid namespace hides the gateway altogether.
      expect(["EACCES", "ENOENT"]).toContain(seen.gatewayEnv);
    },
  );

  test.if(process.getuid?.() === 0)(
    "as root, episodes running at once each run as a uid of their own, given back to the pool when they end",
    async () => {
      const uids = new UidPool({ first: DEFAULT_SANDBOX_UIDS.first + 4000, count: 3 });
      const own = { ...spawn, uids };
      const runs = await Promise.all(
        [1, 2, 3].map(() => run(start("env", { gateway_pid: process.pid }), {}, noTools, own)),
      );
      const seen = runs.map((r) => {
        if (!r.ok) throw new Error(r.message);
        return (decisions(r.records)[0]!.data as { uid: number }).uid;
      });
      expect(seen.sort()).toEqual([uids.range.first, uids.range.first + 1, uids.range.first + 2]);
      expect(uids.inUse).toBe(0);
    },
  );
});

// ---- the tool gate ---------------------------------------------------------------------

const SECRET = "s3cr3t-token-value";
const LLM_KEY = "llm-key-value";

interface Seen {
  path: string;
  headers: Record<string, string>;
  body: string;
}

let server: ReturnType<typeof Bun.serve>;
const seen: Seen[] = [];
/** How each /hang request ended. */
const hangs: string[] = [];
let spec: FleetSpec;
let port = 0;

beforeAll(async () => {
  server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      const url = new URL(req.url);
      const body = await req.text();
      seen.push({ path: url.pathname, headers: Object.fromEntries(req.headers), body });
      if (url.pathname === "/v1/chat/completions") {
        const r = JSON.parse(body) as { messages: { content: string }[] };
        const mode = r.messages.at(-1)?.content ?? "";
        // "usage: {...}" plays an endpoint that reports that usage; the others misbehave as named.
        if (mode.startsWith("usage: "))
          return Response.json({ choices: [{ message: { content: "ok" } }], usage: JSON.parse(mode.slice(7)) });
        if (mode === "silence") await Bun.sleep(2500);
        if (mode === "answer 500") return new Response("overloaded", { status: 500 });
        if (mode === "answer html") return new Response("<html></html>", { headers: { "content-type": "text/html" } });
        if (mode === "answer 2 MB") return new Response(`{"choices":[],"pad":"${"x".repeat(2 * 1024 * 1024)}"}`);
        return Response.json({
          id: "chatcmpl-1",
          object: "chat.completion",
          choices: [
            {
              index: 0,
              message: {
                role: "assistant",
                // "echo key" plays an endpoint that echoes the request's Authorization header.
                content:
                  r.messages.at(-1)?.content === "echo key"
                    ? `key=${req.headers.get("authorization")}`
                    : `echo: ${r.messages.at(-1)?.content}`,
              },
              finish_reason: "stop",
            },
          ],
          // "no usage" plays an endpoint that reports none.
          ...(r.messages.at(-1)?.content === "no usage"
            ? {}
            : { usage: { prompt_tokens: 7, completion_tokens: 5, total_tokens: 12 } }),
        });
      }
      if (url.pathname === "/echo") {
        const auth = req.headers.get("authorization") ?? "";
        return Response.json({ auth, note: `token was ${auth}` }, { headers: { "x-echo": auth } });
      }
      if (url.pathname === "/echo-escaped") {
        // The header echoed in JSON with `/` escaped too, and once more with every character \u-escaped.
        const auth = req.headers.get("authorization") ?? "";
        const u = [...auth].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`).join("");
        return new Response(`{"auth":${JSON.stringify(auth).replaceAll("/", "\\/")},"u":"${u}"}`);
      }
      if (url.pathname === "/hang") {
        // Answers after 3 s, unless the client goes away first.
        const gone = await Promise.race([
          new Promise<boolean>((r) => req.signal.addEventListener("abort", () => r(true))),
          Bun.sleep(3000).then(() => false),
        ]);
        hangs.push(gone ? "cancelled" : "answered");
        return new Response("late");
      }
      if (url.pathname === "/cookies") {
        const headers = new Headers({ "x-many": "a" });
        headers.append("x-many", "b");
        headers.append("set-cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT");
        headers.append("set-cookie", "b=2");
        return new Response("ok", { headers });
      }
      if (url.pathname === "/redirect")
        return new Response(null, { status: 302, headers: { location: "http://example.invalid/steal" } });
      if (url.pathname === "/deep") return new Response(`${"[".repeat(1500)}${"]".repeat(1500)}`);
      if (url.pathname === "/shallow")
        return new Response(`${"[".repeat(MAX_JSON_DEPTH)}${"]".repeat(MAX_JSON_DEPTH)}`);
      return new Response("plain text", { status: 200 });
    },
  });
  port = server.port!;
  spec = (
    await compileSpec(
      `
[llm]
url = "http://127.0.0.1:${port}/v1"
model = "tiny"
api_key_env = "LLM_KEY"
timeout_ms = 1000

[agents.mon]
module = "mon.ts"
subscribe = ["s/+/t"]
tools = ["publish", "send", "http", "llm"]
publish = ["alerts/#", "ops/+/notice"]
http_hosts = ["127.0.0.1:${port}"]
secrets = ["API_TOKEN", "QUOTED_TOKEN", "UNSET_TOKEN", "SPACED", "INNER", "OUTER"]

[agents.mon.budget]
tool_calls_per_episode = 3
tokens_per_day = 1000

[agents.narrow]
module = "narrow.ts"
tools = ["publish"]

[agents.priced]
module = "priced.ts"
tools = ["publish", "http"]
publish = ["alerts/#"]
http_hosts = ["127.0.0.1:${port}"]

[agents.priced.budget]
tool_costs = { publish = 1, http = 2 }
cost_per_day = 10
`,
      "/srv/fleet.toml",
    )
  ).spec;
});

afterAll(() => server?.stop(true));

/** A secret JSON escapes three ways: its quote, its backslash and (some servers) its slash. */
const QUOTED = 'tok"en/with\\slash';
const ENV: ToolEnv = {
  secrets: {
    API_TOKEN: SECRET,
    QUOTED_TOKEN: QUOTED,
    OTHER_SECRET: "other-secret-value",
    LLM_KEY,
    // Stray spaces (an EnvironmentFile): a header value is sent trimmed.
    SPACED: " SpaceSecret99 ",
    // One secret inside another.
    INNER: "Alpha1234",
    OUTER: "PRIVATEpartAlpha1234restPRIVATE",
  },
  fetch,
};

/** A fresh gate for one episode of `<type>/k1`. */
function gate(type = "mon", tokensLeft = 1000, costLeft?: number): ToolGate {
  return new ToolGate({ type, key: "k1", id: `${type}/k1` }, spec.agents[type]!, spec, ENV, tokensLeft, costLeft);
}

describe("the memory watch's process scan", () => {
  /** A shell's 300 idle children, then (last) one holding 256 MB. */
  const WIDE = 'i=0; while [ $i -lt 300 ]; do sleep 100 & i=$((i+1)); done; "$0" -e "$1" & wait';
  const HOG =
    "const k = []; for (let i = 0; i < 256; i++) k.push(new Uint8Array(1 << 20).fill(1)); setInterval(() => k, 1e3);";
  const rssOf = (pid: number) => {
    try {
      return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;
    } catch {
      return 0;
    }
  };

  test("counts every process of a tree: memory in the 302nd counts (a scan once stopped after 256)", async () => {
    // Without a memory cgroup (not root, cgroup v2 only) such a tree held 1.9 GB under memory_mb = 512.
    const sh = Bun.spawn(["/bin/sh", "-c", WIDE, process.execPath, HOG], { stdio: ["ignore", "ignore", "ignore"] });
    try {
      const hog = () => descendantsOf(sh.pid).at(-1) ?? sh.pid;
      await waitUntil(
        () => descendantsOf(sh.pid).length === 301 && rssOf(hog()) > 200,
        "the last child holds 200 MB",
        60_000,
      );
      const total = [sh.pid, ...descendantsOf(sh.pid)].reduce((mb, pid) => mb + rssOf(pid), 0);
      expect(rssMb(sh.pid)).toBeGreaterThan(0.9 * total);
    } finally {
      for (const pid of descendantsOf(sh.pid)) process.kill(pid, "SIGKILL");
      sh.kill("SIGKILL");
    }
  });
});

describe("the sandbox's /tmp in the memory watch", () => {
  test("only a tmpfs counts: a disk seen mid set-up reads 0, not its GBs in use", () => {
    expect(tmpfsUsedMb("/")).toBe(0); // the root disk: several GB in use
    const before = tmpfsUsedMb("/dev/shm");
    const file = `/dev/shm/fleet-tmpfs-test-${process.pid}`;
    writeFileSync(file, Buffer.alloc(3 * 1024 * 1024, 1));
    try {
      expect(tmpfsUsedMb("/dev/shm") - before).toBeGreaterThanOrEqual(3);
    } finally {
      rmSync(file, { force: true });
    }
  });
});

describe("ToolGate: allowlist and budget", () => {
  test("a tool outside the type's allowlist is denied", async () => {
    const out = await gate("narrow").handle(1, "http", ["http://127.0.0.1/"]);
    expect(out).toEqual({
      ok: false,
      result: { error: "denied", reason: 'tool "http" is not in agents.narrow.tools' },
    });
  });

  test("calls past tool_calls_per_episode are denied", async () => {
    const g = gate();
    for (let i = 1; i <= 3; i++) expect((await g.handle(i, "publish", [`alerts/${i}`, i])).ok).toBe(true);
    const fourth = await g.handle(4, "publish", ["alerts/4", 4]);
    expect(fourth).toEqual({
      ok: false,
      result: { error: "denied", reason: "budget tool_calls_per_episode (3) exhausted" },
    });
    expect(g.publishes).toHaveLength(3);
    expect(g.calls).toBe(4);
  });
});

describe("ToolGate: tool_costs and cost_per_day", () => {
  test("a call whose cost would pass what is left of cost_per_day is denied; calls made at once share it", async () => {
    const g = gate("priced", 1000, 5);
    const outs = await Promise.all([1, 2, 3].map((i) => g.handle(i, "http", [`http://127.0.0.1:${port}/plain`])));
    expect(outs.map((o) => o.ok)).toEqual([true, true, false]);
    expect(outs[2]).toEqual({
      ok: false,
      result: { error: "denied", reason: "budget cost_per_day (10) exhausted: this call costs 2, 1 left today" },
    });
    // A cheaper call still fits in what is left.
    expect((await g.handle(4, "publish", ["alerts/x", 1])).ok).toBe(true);
    expect(g.cost).toBe(5);
  });

  test("a refused call is not charged: only calls that went out are", async () => {
    const g = gate("priced", 1000, 10);
    const refused = [
      await g.handle(1, "http", ["http://10.0.0.1/x"]),
      await g.handle(2, "http", [42]),
      await g.handle(3, "publish", ["elsewhere/x", 1]),
    ];
    expect(refused.map((o) => o.ok && o.result)).toEqual([false, false, false]);
    expect(g.cost).toBe(0);
    expect((await g.handle(4, "http", [`http://127.0.0.1:${port}/plain`])).ok).toBe(true);
    expect(g.cost).toBe(2);
  });
});

describe("ToolGate: publish", () => {
  test.each([
    ["its own fleet/agents/<type>/<key>/... topics", "fleet/agents/mon/k1/custom"],
    ["a topic matching a publish pattern (#)", "alerts/boiler/high"],
    ["a topic matching a publish pattern (+)", "ops/east/notice"],
  ])("allows %s", async (_what, topic) => {
    const g = gate();
    expect(await g.handle(1, "publish", [topic, { t: 1 }])).toEqual({ ok: true, result: { queued: true, topic } });
    expect(g.publishes).toEqual([{ topic, payload: '{"t":1}', qos: 1, retain: false }]);
  });

  test("refuses a payload the broker would not take from a device (max_packet_bytes, default 256 KiB)", async () => {
    const g = gate();
    const fits = "x".repeat(200 * 1024);
    expect((await g.handle(1, "publish", ["alerts/big", fits])).ok).toBe(true);
    const out = await g.handle(2, "publish", ["alerts/huge", "x".repeat(300 * 1024), { retain: true }]);
    expect(out).toMatchObject({ ok: false, result: { error: "denied" } });
    expect((out.result as { reason: string }).reason).toContain("exceeds [broker] max_packet_bytes (262144)");
    expect(g.publishes.map((p) => p.topic)).toEqual(["alerts/big"]);
  });

  test("keeps qos 0 and retain from the options", async () => {
    const g = gate();
    await g.handle(1, "publish", ["alerts/x", "raw text", { qos: 0, retain: true }]);
    expect(g.publishes).toEqual([{ topic: "alerts/x", payload: "raw text", qos: 0, retain: true }]);
  });

  test.each([
    ["a topic outside the publish patterns", "kitchen/toaster"],
    ["a topic one level too deep for +", "ops/east/west/notice"],
    ["another agent's topics", "fleet/agents/mon/k2/out"],
    ["the gateway's own namespace", "fleet/episodes"],
    ["a wildcard topic (#)", "alerts/#"],
    ["a wildcard topic (+)", "alerts/+/high"],
    ["a wildcard under its own topics", "fleet/agents/mon/k1/#"],
    ["its own out topic (the gateway's: ctx.emit writes it)", "fleet/agents/mon/k1/out"],
    ["its own status topic", "fleet/agents/mon/k1/status"],
    ["its own inbox", "fleet/agents/mon/k1/inbox"],
    ["$SYS", "$SYS/broker/clients"],
    ["an empty topic", ""],
  ])("refuses %s", async (_what, topic) => {
    const g = gate();
    const out = await g.handle(1, "publish", [topic, 1]);
    expect(out.ok).toBe(false);
    expect(out.result).toMatchObject({ error: "denied" });
    expect(g.publishes).toEqual([]);
  });

  test("refuses a topic that is not a string", async () => {
    expect((await gate().handle(1, "publish", [42, 1])).ok).toBe(false);
  });
});

describe("ToolGate: send", () => {
  test("queues an inbox message for an agent of a known type", async () => {
    const g = gate();
    expect(await g.handle(1, "send", ["narrow/default", { hi: 1 }])).toEqual({
      ok: true,
      result: { queued: true, to: "narrow/default" },
    });
    expect(g.sends).toEqual([
      { to: { type: "narrow", key: "default", id: "narrow/default" as AgentId }, payload: '{"hi":1}' },
    ]);
  });

  test("denies a payload larger than [broker] max_packet_bytes (what no device may send)", async () => {
    const g = gate();
    expect((await g.handle(1, "send", ["narrow/default", "x".repeat(200 * 1024)])).ok).toBe(true);
    const out = await g.handle(2, "send", ["narrow/default", "x".repeat(300 * 1024)]);
    expect(out).toMatchObject({ ok: false, result: { error: "denied" } });
    expect((out.result as { reason: string }).reason).toContain("exceeds [broker] max_packet_bytes (262144)");
    expect(g.sends).toHaveLength(1);
  });

  test("denies a send to an unknown type", async () => {
    const g = gate();
    expect(await g.handle(1, "send", ["ghost/x", 1])).toEqual({
      ok: false,
      result: { error: "denied", reason: 'no agent type "ghost" in this fleet' },
    });
    expect(g.sends).toEqual([]);
  });

  test("denies a send to something that is not an agent id", async () => {
    expect((await gate().handle(1, "send", ["no-slash", 1])).ok).toBe(false);
    expect((await gate().handle(1, "send", [{ id: "mon/k2" }, 1])).ok).toBe(false);
  });

  test("counts the sends that led to its stimulus once; every send is denied at [fleet] max_send_hops", async () => {
    const asked: [string, number][] = [];
    const refused: [string, string][] = [];
    const atHops = (hops: number) =>
      new ToolGate(
        { type: "mon", key: "k1", id: "mon/k1" },
        spec.agents.mon!,
        spec,
        {
          ...ENV,
          sendHops: async (sid, maxSteps) => {
            asked.push([sid, maxSteps]);
            return hops;
          },
          sendRefused: (agent, code) => refused.push([agent, code]),
        },
        1000,
        undefined,
        "inbox:0190f000-0000-7000-8000-000000000001:0",
      );
    const below = atHops(15);
    expect((await below.handle(1, "send", ["narrow/default", 1])).ok).toBe(true);
    expect((await below.handle(2, "send", ["narrow/default", 2])).ok).toBe(true);
    expect(asked).toEqual([["inbox:0190f000-0000-7000-8000-000000000001:0", 68]]);
    const at = atHops(16);
    const out = await at.handle(1, "send", ["narrow/default", 1]);
    expect(out).toMatchObject({ ok: false, result: { error: "denied" } });
    expect((out.result as { reason: string }).reason).toBe(
      "send to narrow/default refused: this episode's stimulus is already 16 sends from where it came into the " +
        "fleet ([fleet] max_send_hops = 16); agents sending to each other in a loop?",
    );
    expect(at.sends).toEqual([]);
    // Counted for the target, as intake counts what it refuses.
    expect(refused).toEqual([["narrow/default", "send_hops"]]);
  });
});

describe("ToolGate: http", () => {
  test("denies a host that is not in http_hosts, without calling it", async () => {
    const before = seen.length;
    const out = await gate().handle(1, "http", [`http://localhost:${port}/plain`]);
    expect(out).toEqual({
      ok: false,
      result: { error: "denied", reason: `host localhost:${port} is not in agents.mon.http_hosts` },
    });
    expect(seen.length).toBe(before);
  });

  test("an http_hosts entry host:port allows that port, the scheme's default one included", async () => {
    const { spec: s } = await compileSpec(
      `[agents.h]\nmodule = "h.ts"\ntools = ["http"]\nhttp_hosts = ["LOCALHOST:${port}", "127.0.0.1:80"]\n`,
      "/srv/fleet.toml",
    );
    const g = new ToolGate({ type: "h", key: "k1", id: "h/k1" }, s.agents.h!, s, ENV, 0);
    expect(await g.handle(1, "http", [`http://localhost:${port}/plain`])).toMatchObject({ ok: true });
    expect(await g.handle(2, "http", [`http://LOCALHOST:${port}/plain`])).toMatchObject({ ok: true });
    // Port 80 is http's default, so the URL drops it: allowed (the call fails, nothing listens there).
    for (const url of ["http://127.0.0.1/", "http://127.0.0.1:80/"])
      expect(await g.handle(3, "http", [url])).toMatchObject({ ok: false, result: { error: "failed" } });
    expect(await g.handle(4, "http", ["https://127.0.0.1/"])).toMatchObject({ result: { error: "denied" } });
  });

  test("a call still in flight when the episode ends is aborted with it", async () => {
    const g = gate("mon", 1000);
    const pending = Promise.all([
      g.handle(1, "http", [`http://127.0.0.1:${port}/hang`]),
      g.handle(2, "llm", [{ prompt: "silence", max_tokens: 100 }]),
    ]);
    await Bun.sleep(200);
    g.end();
    const [http, llm] = await pending;
    // Each says the episode's end stopped it (the llm call's own timeout, 1 s, would say it timed out).
    const ended = { ok: false, result: { error: "failed", reason: expect.stringContaining("the episode ended") } };
    expect(http).toMatchObject(ended);
    // The llm request was sent: it is charged what it held, as a timed-out one.
    expect(llm).toMatchObject(ended);
    expect(g.tokens).toBe(100);
    await Bun.sleep(100);
    expect(hangs.at(-1)).toBe("cancelled");
  });

  test("denies schemes other than http and https", async () => {
    expect((await gate().handle(1, "http", ["file:///etc/passwd"])).result).toMatchObject({ error: "denied" });
  });

  test("calls an allowed host and returns status, headers and body", async () => {
    const out = await gate().handle(1, "http", [`http://127.0.0.1:${port}/plain`]);
    expect(out).toMatchObject({ ok: true, result: { status: 200, body: "plain text" } });
  });

  test("injects a declared secret into headers and redacts it from what the agent gets back", async () => {
    const before = seen.length;
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo`,
      { headers: { authorization: "Bearer {{secret:API_TOKEN}}" } },
    ]);
    // The server received the real value...
    expect(seen.slice(before).map((s) => s.headers.authorization)).toEqual([`Bearer ${SECRET}`]);
    // ...the agent never sees it: not in the body, the parsed JSON, or the response headers.
    if (!out.ok) throw new Error(JSON.stringify(out.result));
    const result = out.result as {
      status: number;
      body: string;
      json: { auth: string };
      headers: Record<string, string>;
    };
    expect(result.status).toBe(200);
    expect(JSON.stringify(result)).not.toContain(SECRET);
    expect(result.json.auth).toBe("Bearer [secret:API_TOKEN]");
    expect(result.headers["x-echo"]).toBe("Bearer [secret:API_TOKEN]");
  });

  test("redacts a secret a JSON response writes escaped, and from the parsed json however it was escaped", async () => {
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo-escaped`,
      { headers: { authorization: "Bearer {{secret:QUOTED_TOKEN}}" } },
    ]);
    if (!out.ok) throw new Error(JSON.stringify(out.result));
    const result = out.result as { body: string; json: { auth: string; u: string } };
    expect(result.json).toEqual({ auth: "Bearer [secret:QUOTED_TOKEN]", u: "Bearer [secret:QUOTED_TOKEN]" });
    expect(result.body).toContain('"auth":"Bearer [secret:QUOTED_TOKEN]"');
    const escaped = JSON.stringify(QUOTED).slice(1, -1);
    for (const form of [QUOTED, escaped, escaped.replaceAll("/", "\\/")])
      expect(JSON.stringify(result.json)).not.toContain(form);
  });

  test.each([
    ["sent trimmed (stray spaces in its variable)", "SPACED", ["SpaceSecret99"]],
    ["containing another secret", "OUTER", ["PRIVATE", "rest", "Alpha1234"]],
  ])("redacts a secret %s whole", async (_how, name, parts) => {
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo`,
      { headers: { authorization: `{{secret:${name}}}` } },
    ]);
    if (!out.ok) throw new Error(JSON.stringify(out.result));
    const result = out.result as { json: { auth: string }; headers: Record<string, string> };
    expect(result.json.auth).toBe(`[secret:${name}]`);
    expect(result.headers["x-echo"]).toBe(`[secret:${name}]`);
    for (const part of parts) expect(JSON.stringify(result)).not.toContain(part);
  });

  test("redacts a secret a JSON body writes \\u-escaped from the body text too", async () => {
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo-escaped`,
      { headers: { authorization: "Bearer {{secret:API_TOKEN}}" } },
    ]);
    if (!out.ok) throw new Error(JSON.stringify(out.result));
    const { body } = out.result as { body: string };
    expect(JSON.parse(body)).toEqual({ auth: "Bearer [secret:API_TOKEN]", u: "Bearer [secret:API_TOKEN]" });
    expect(body).not.toContain("\\u0073\\u0033");
  });

  test.each(["Host", "connection", "Transfer-Encoding", "content-length", "proxy-authorization", "upgrade"])(
    "denies a %s header set by the agent, without calling the host",
    async (name) => {
      const before = seen.length;
      const out = await gate().handle(1, "http", [
        `http://127.0.0.1:${port}/echo`,
        { headers: { [name]: "evil.example" } },
      ]);
      expect(out).toEqual({
        ok: false,
        result: { error: "denied", reason: `header ${name} is set by the gateway, not by the agent` },
      });
      expect(seen.length).toBe(before);
    },
  );

  test("denies a secret whose variable is not set rather than sending an empty credential", async () => {
    const before = seen.length;
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo`,
      { headers: { authorization: "Bearer {{secret:UNSET_TOKEN}}" } },
    ]);
    expect(out).toEqual({
      ok: false,
      result: { error: "denied", reason: "secret UNSET_TOKEN is not set in the gateway's environment" },
    });
    expect(seen.length).toBe(before);
  });

  test("denies a secret the type did not declare, without calling the host", async () => {
    const before = seen.length;
    const out = await gate().handle(1, "http", [
      `http://127.0.0.1:${port}/echo`,
      { headers: { authorization: "Bearer {{secret:OTHER_SECRET}}" } },
    ]);
    expect(out).toEqual({
      ok: false,
      result: { error: "denied", reason: "secret OTHER_SECRET is not in agents.mon.secrets" },
    });
    expect(seen.length).toBe(before);
  });

  test("gives a body nested deeper than an event log can hold as text only (no json)", async () => {
    const deep = await gate().handle(1, "http", [`http://127.0.0.1:${port}/deep`]);
    expect(deep).toMatchObject({ ok: true, result: { status: 200, body: expect.stringMatching(/^\[{1500}/) } });
    expect((deep as { result: object }).result).not.toHaveProperty("json");
    const shallow = await gate().handle(1, "http", [`http://127.0.0.1:${port}/shallow`]);
    expect((shallow as { result: object }).result).toHaveProperty("json");
  });

  test("keeps every set-cookie header, one per line; other repeated headers are joined with commas", async () => {
    const out = await gate().handle(1, "http", [`http://127.0.0.1:${port}/cookies`]);
    expect(out).toMatchObject({
      ok: true,
      result: { headers: { "x-many": "a, b", "set-cookie": "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT\nb=2" } },
    });
  });

  test("does not follow redirects (they could lead to a host outside the allowlist)", async () => {
    const out = await gate().handle(1, "http", [`http://127.0.0.1:${port}/redirect`]);
    expect(out).toMatchObject({ ok: true, result: { status: 302 } });
  });
});

describe("ToolGate: llm", () => {
  test("returns the completion text and meters usage.total_tokens", async () => {
    const g = gate("mon", 1000);
    const before = seen.length;
    const out = await g.handle(1, "llm", [{ prompt: "is 91.5 C too hot?", max_tokens: 64 }]);
    expect(out).toEqual({
      ok: true,
      result: { text: "echo: is 91.5 C too hot?", usage: { prompt_tokens: 7, completion_tokens: 5, total_tokens: 12 } },
    });
    expect(g.tokens).toBe(12);
    const req = seen.slice(before);
    expect(req.map((s) => s.path)).toEqual(["/v1/chat/completions"]);
    expect(JSON.parse(req[0]!.body)).toEqual({
      model: "tiny",
      messages: [{ role: "user", content: "is 91.5 C too hot?" }],
      max_tokens: 64,
    });
    expect(req[0]!.headers.authorization).toBe(`Bearer ${LLM_KEY}`);
    await g.handle(2, "llm", [{ messages: [{ role: "user", content: "again" }] }]);
    expect(g.tokens).toBe(24);
  });

  test("an endpoint that echoes the API key does not hand it to the agent", async () => {
    const out = await gate("mon", 1000).handle(1, "llm", [{ prompt: "echo key" }]);
    expect(out).toMatchObject({ ok: true, result: { text: "key=Bearer [secret:LLM_KEY]" } });
    expect(JSON.stringify(out)).not.toContain(LLM_KEY);
  });

  test("caps max_tokens at what is left of the day's budget", async () => {
    const before = seen.length;
    await gate("mon", 10).handle(1, "llm", [{ prompt: "hi", max_tokens: 512 }]);
    expect(JSON.parse(seen[before]!.body).max_tokens).toBe(10);
  });

  test("is denied when no tokens are left, without calling the endpoint", async () => {
    const before = seen.length;
    const out = await gate("mon", 0).handle(1, "llm", [{ prompt: "hi" }]);
    expect(out).toEqual({ ok: false, result: { error: "denied", reason: "budget tokens_per_day (1000) exhausted" } });
    expect(seen.length).toBe(before);
  });

  test("calls made at once share what is left: each holds its max_tokens until answered", async () => {
    const g = gate("mon", 100);
    const before = seen.length;
    const outs = await Promise.all(
      Array.from({ length: 10 }, (_, i) => g.handle(i + 1, "llm", [{ prompt: `p${i}`, max_tokens: 60 }])),
    );
    // The first holds 60, the second gets the 40 left, the rest are denied before any answer.
    expect(outs.map((o) => o.ok)).toEqual([true, true, false, false, false, false, false, false, false, false]);
    expect(seen.slice(before).map((s) => JSON.parse(s.body).max_tokens)).toEqual([60, 40]);
    expect(g.tokens).toBe(24); // settled on the usage reported: 12 each
  });

  test("an endpoint that reports no usage is charged the max_tokens it was allowed", async () => {
    const g = gate("mon", 1000);
    const out = await g.handle(1, "llm", [{ prompt: "no usage", max_tokens: 50 }]);
    expect(out).toMatchObject({ ok: true, result: { usage: { completion_tokens: 50, total_tokens: 50 } } });
    expect(g.tokens).toBe(50);
  });

  test.each([
    ["reports usage {} (none)", "usage: {}", 100],
    ["reports no completion count", 'usage: {"prompt_tokens":10}', 100],
    ["reports a total below its parts", 'usage: {"prompt_tokens":100,"completion_tokens":300,"total_tokens":1}', 400],
    ["reports a total above its parts", 'usage: {"prompt_tokens":1,"completion_tokens":2,"total_tokens":30}', 30],
    ["reports counts as strings", 'usage: {"prompt_tokens":"10","completion_tokens":"5"}', 100],
    ["reports fractional counts", 'usage: {"prompt_tokens":1.5,"completion_tokens":2.5}', 100],
    ["reports negative counts", 'usage: {"prompt_tokens":-10,"completion_tokens":-5}', 100],
  ])("an endpoint that %s still answers, and is charged as documented", async (_what, prompt, tokens) => {
    const g = gate("mon", 1000);
    const out = await g.handle(1, "llm", [{ prompt, max_tokens: 100 }]);
    expect(out).toMatchObject({ ok: true, result: { text: "ok", usage: { total_tokens: tokens } } });
    expect(g.tokens).toBe(tokens);
  });

  test.each([
    ["times out (it may have spent what it held)", "silence", 100, "The operation timed out."],
    ["answers a 200 that is not a completion", "answer html", 100, "not a chat completion"],
    ["answers more than the size cap", "answer 2 MB", 100, "llm response larger than 1048576 bytes"],
    ["answers an error status", "answer 500", 0, "llm endpoint answered 500"],
  ])("a call whose endpoint %s fails, and is charged as documented", async (_what, prompt, tokens, reason) => {
    const g = gate("mon", 1000);
    const out = await g.handle(1, "llm", [{ prompt, max_tokens: 100 }]);
    expect(out).toMatchObject({ ok: false, result: { error: "failed", reason: expect.stringContaining(reason) } });
    expect(g.tokens).toBe(tokens);
  });

  test("a call denied while the day's tokens are held by calls in flight says so", async () => {
    const g = gate("mon", 100);
    const first = g.handle(1, "llm", [{ prompt: "silence", max_tokens: 100 }]);
    const second = await g.handle(2, "llm", [{ prompt: "hi" }]);
    expect(second).toEqual({
      ok: false,
      result: {
        error: "denied",
        reason: "budget tokens_per_day (1000) exhausted: 100 held by llm calls in flight until they are answered",
      },
    });
    await first;
  });

  test("is denied once this episode has used up what was left", async () => {
    const g = gate("mon", 12);
    expect((await g.handle(1, "llm", [{ prompt: "one" }])).ok).toBe(true);
    expect(await g.handle(2, "llm", [{ prompt: "two" }])).toMatchObject({ ok: false, result: { error: "denied" } });
  });
});

describe("ToolGate: bad arguments are denied with a reason naming the argument", () => {
  test.each([
    ["publish", [42, 1], "publish topic must be a string"],
    ["publish", ["alerts/x", 1, { qos: 2 }], "publish options.qos must be 0 or 1"],
    ["publish", ["alerts/x", 1, { retain: "yes" }], "publish options.retain must be true or false"],
    ["publish", ["alerts/x", 1, { retian: true }], "publish options has unknown key(s) retian"],
    ["publish", ["alerts/x", 1, "fast"], "publish options must be an object { retain?, qos? }"],
    ["publish", ["alerts/x", 1, {}, "extra"], "publish takes (topic, payload, options), got 4 argument(s)"],
    ["send", [{ id: "mon/k2" }, 1], "send agent must be an agent id <type>/<key>"],
    ["send", ["no-slash", 1], 'send agent must be an agent id <type>/<key>, got "no-slash"'],
    [
      "send",
      [`mon/${"k".repeat(200)}`, 1],
      "send agent must be an agent id <type>/<key>: its key is longer than 128 bytes (200), " +
        `got "mon/${"k".repeat(76)}..."`,
    ],
    ["send", [], "send takes (agent, payload), got 0 argument(s)"],
    ["http", [7], "http url must be a string"],
    ["http", ["not a url"], 'http url must be an absolute URL, got "not a url"'],
    ["http", ["http://127.0.0.1/", { headers: { a: 1 } }], "http init.headers.a must be a string"],
    ["http", ["http://127.0.0.1/", { timeout_ms: -5 }], "http init.timeout_ms must be positive"],
    ["http", ["http://127.0.0.1/", { method: "GET /x" }], "http init.method must be an HTTP method"],
    ["http", ["http://127.0.0.1/", { redirect: "follow" }], "http init has unknown key(s) redirect"],
    ["llm", [], "llm takes (request), got 0 argument(s)"],
    ["llm", [{}], "llm request needs messages or prompt"],
    ["llm", [{ prompt: 5 }], "llm request.prompt must be a string"],
    ["llm", [{ prompt: "hi", max_tokens: 1.5 }], "llm request.max_tokens must be an integer"],
    [
      "llm",
      [{ messages: [{ role: "wizard", content: "x" }] }],
      "llm request.messages[0].role must be system, user or assistant",
    ],
  ] as const)("%s %j: %s", async (tool, args, reason) => {
    const before = seen.length;
    const g = gate();
    expect(await g.handle(1, tool, args)).toEqual({ ok: false, result: { error: "denied", reason } });
    // Nothing was queued or called.
    expect(g.publishes).toEqual([]);
    expect(g.sends).toEqual([]);
    expect(seen.length).toBe(before);
  });

  test("a tool that is not built in is denied by name", async () => {
    expect(await gate().handle(1, "shell", ["rm -rf /"])).toEqual({
      ok: false,
      result: { error: "denied", reason: 'unknown tool "shell" (built-in tools: publish, http, llm, send)' },
    });
  });
});

describe("runEpisode with the tool gate", () => {
  test("an allowed publish is queued by the gate and recorded; a disallowed one is caught by the agent", async () => {
    const g = gate();
    const ok = await run(start("tool-caller", { tool: "publish", args: ["alerts/k1", { t: 95 }] }), {}, (c, t, a) =>
      g.handle(c, t, a),
    );
    const denied = await run(start("tool-caller", { tool: "publish", args: ["kitchen/toaster", 1] }), {}, (c, t, a) =>
      g.handle(c, t, a),
    );
    if (!ok.ok || !denied.ok) throw new Error("episodes should succeed");
    expect(g.publishes).toEqual([{ topic: "alerts/k1", payload: '{"t":95}', qos: 1, retain: false }]);
    expect(ok.records[0]).toMatchObject({
      k: "tool",
      tool: "publish",
      ok: true,
      result: { queued: true, topic: "alerts/k1" },
    });
    expect(decisions(denied.records)[0]).toMatchObject({
      name: "denied",
      data: { name: "ToolDenied", reason: expect.stringContaining("agents.mon.publish") },
    });
  });
});

/**
 * A checkout under /tmp cannot use warm spares: the sandbox's private /tmp hides files a
 * spare's staging root would link (such agents start cold, by design; docs/sandbox.md).
 */
const CHECKOUT_UNDER_TMP = fileURLToPath(new URL("..", import.meta.url)).startsWith("/tmp/");

describe("warm spares", () => {
  test.skipIf(CHECKOUT_UNDER_TMP)(
    "each episode still gets a fresh process: a spare serves exactly one episode and is then killed",
    async () => {
      const pool = new SparePool(2, SPAWN, PROCS);
      try {
        const pids: number[] = [];
        const hostPids: number[] = [];
        let state: unknown = null;
        for (let i = 0; i < 4; i++) {
          const before = new Set(pool.pids());
          const r = await runEpisode(
            start("whoami", { i }, { state, fresh: state === null }),
            LIMITS,
            noTools,
            SPAWN,
            pool,
          );
          expect(r.ok).toBe(true);
          if (!r.ok) return;
          state = r.state;
          const emit = r.records.find((x) => x.k === "emit") as { data: { pid: number; seen: number[] } };
          pids.push(emit.data.pid);
          // From the second episode on, the host came from the pool of spares started earlier.
          if (i > 0) expect(before.size).toBeGreaterThan(0);
          if (i > 0) expect(r.start).toBe("warm");
          for (const p of before) if (!pool.pids().includes(p)) hostPids.push(p);
        }
        // The state carried over (via the checkpoint handed in), the process never did.
        expect((state as { seen: number[] }).seen).toHaveLength(4);
        expect(hostPids.length).toBeGreaterThanOrEqual(3);
        // Every host process taken from the pool is gone once its episode ended.
        await waitGone(hostPids);
        expect(hostPids.every(gone)).toBe(true);
      } finally {
        await pool.close();
      }
      expect(pool.pids()).toEqual([]);
    },
  );

  test("types with different limits taking turns each find their spares (none killed to make room)", async () => {
    const pool = new SparePool(1, SPAWN, PROCS);
    const other = { ...LIMITS, memoryMb: LIMITS.memoryMb * 2 };
    try {
      expect(pool.take(LIMITS)).toBeNull(); // primes one spare for each
      expect(pool.take(other)).toBeNull();
      const primed = pool.pids();
      expect(primed).toHaveLength(2);
      const a = pool.take(LIMITS);
      const b = pool.take(other);
      expect(a).not.toBeNull();
      expect(b).not.toBeNull();
      expect([a!.pid, b!.pid].sort()).toEqual([...primed].sort());
      await Promise.all([a!.kill(), b!.kill()]);
      // A third set of limits: the pool holds at most twice its size, the least recently taken go.
      const third = { ...LIMITS, maxOpenFiles: 128 };
      pool.take(third);
      expect(pool.pids()).toHaveLength(2);
      expect(pool.take(LIMITS)).toBeNull(); // its spare went for the third's
      const kept = pool.take(third); // the most recently taken keep theirs
      expect(kept).not.toBeNull();
      await kept!.kill();
    } finally {
      await pool.close();
    }
  });

  test.skipIf(CHECKOUT_UNDER_TMP)(
    "an episode taken from the spares is attached (and sent its start) before the replacement spare is started",
    async () => {
      const seen: string[] = [];
      class Recording extends ProcessTable {
        override started(pid: number): void {
          seen.push(`started ${pid}`);
          super.started(pid);
        }
        override attached(pid: number): void {
          seen.push(`attached ${pid}`);
          super.attached(pid);
        }
      }
      const pool = new SparePool(1, SPAWN, new Recording());
      try {
        pool.take(LIMITS); // primes a spare
        await waitUntil(() => pool.pids().length > 0, "a spare is up");
        const [spare] = pool.pids();
        const r = await runEpisode(start("records"), LIMITS, noTools, SPAWN, pool);
        expect(r.start).toBe("warm");
        const replacement = pool.pids()[0];
        expect(replacement).toBeDefined();
        expect(seen.indexOf(`attached ${spare}`)).toBeGreaterThanOrEqual(0);
        expect(seen.indexOf(`attached ${spare}`)).toBeLessThan(seen.indexOf(`started ${replacement}`));
      } finally {
        await pool.close();
      }
    },
  );

  // A spare's start-up is on nobody's path: it must not take a core's share from running episodes.
  test.if(SPAWN.autogroup != null && !CHECKOUT_UNDER_TMP)(
    "a spare waits in a scheduling group below running episodes' and is raised to theirs when an episode takes it",
    async () => {
      const groupOf = (pid: number) =>
        Number(/ nice (-?\d+)/.exec(readFileSync(`/proc/${pid}/autogroup`, "utf8"))?.[1]);
      const pool = new SparePool(1, SPAWN, PROCS);
      try {
        pool.take(LIMITS); // primes a spare
        await waitUntil(() => pool.pids().length > 0, "a spare is up");
        expect(groupOf(pool.pids()[0]!)).toBe(SPARE_GROUP_NICE);
        const r = await runEpisode(start("priority"), LIMITS, noTools, SPAWN, pool);
        if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
        expect(r.start).toBe("warm");
        expect((r.state as { group: number | null }).group).toBe(EPISODE_GROUP_NICE);
        // Its replacement waits low again.
        expect(groupOf(pool.pids()[0]!)).toBe(SPARE_GROUP_NICE);
      } finally {
        await pool.close();
      }
    },
  );

  test("a spare is started with the same sandbox and limits as a cold episode process", async () => {
    const pool = new SparePool(1, SPAWN, PROCS);
    try {
      pool.take(LIMITS); // primes a spare for these limits
      await Bun.sleep(50);
      const r = await runEpisode(start("env", { gateway_pid: process.pid }), LIMITS, noTools, SPAWN, pool);
      expect(r.ok).toBe(true);
      const env = (
        r.records.find((x) => x.k === "decide") as { data: { env: Record<string, string>; gatewayEnv: string } }
      ).data;
      expect(Object.keys(env.env).sort()).toEqual(Object.keys(CHILD_ENV).sort());
      expect(env.gatewayEnv).not.toBe("readable");
    } finally {
      await pool.close();
    }
  });
});

async function waitGone(pids: readonly number[]): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline && !pids.every(gone)) await Bun.sleep(20);
}

describe("the IPC edge", () => {
  test("a subprocess sending a malformed or forged message fails its episode as protocol, and is killed", async () => {
    const r = await runEpisode(start("bad-ipc"), LIMITS, noTools, SPAWN);
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.kind).toBe("protocol");
    expect(r.message).toContain("malformed");
    // The forged tool record never reached the log.
    expect(r.records.some((x) => x.k === "tool")).toBe(false);
  });

  test("a 64 MB message fails the episode as too_large once the cap is read; the gateway buffers none", async () => {
    const rssBefore = process.memoryUsage().rss;
    const r = await run(start("raw-ipc", { huge_mb: 64 }));
    const f = expectFailure(r, "too_large");
    expect(f.message).toContain(`exceeded ${LIMITS.maxRecordBytes + 64 * 1024} bytes`);
    // Refused after at most the cap plus one pipe read, not after 64 MB.
    const refusedAfter = Number(/refused after (\d+) bytes/.exec(f.message)?.[1]);
    expect(refusedAfter).toBeGreaterThan(LIMITS.maxRecordBytes);
    expect(refusedAfter).toBeLessThan(LIMITS.maxRecordBytes + 2 * 1024 * 1024);
    expect(f.records).toEqual([]);
    // Growth well below the message's size (Bun's ipc channel held it whole, ~1 GB for the gateway).
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(48 * 1024 * 1024);
  });

  test("a state past the cap fails as too_large naming the agent's state", async () => {
    const f = expectFailure(await run(start("big-state", { mb: 12 })), "too_large");
    expect(f.message).toStartWith("the agent's state (the subprocess's done message) exceeded");
    // Any other kind of message is named by its kind.
    const g = expectFailure(await run(start("raw-ipc", { huge_mb: 12 })), "too_large");
    expect(g.message).toStartWith("a batch of the episode's records from the subprocess exceeded");
  });

  test("records that pass the per-message cap but not the episode's total fail as too_large", async () => {
    const r = await run(start("raw-ipc", { chunks: 12, chunk_mb: 1 }));
    const f = expectFailure(r, "too_large");
    expect(f.message).toContain(`records exceed ${LIMITS.maxRecordBytes} bytes`);
    expect(f.records.length).toBeLessThanOrEqual(8);
  });

  test.each([
    ["a log record with an unknown level", { k: "log", level: "shout", msg: "x" }],
    ["a log line longer than MAX_LOG_CHARS", { k: "log", level: "info", msg: "z".repeat(5000) }],
    ["a now record that is not a number", { k: "now", v: "soon" }],
    ["a random record outside [0, 1)", { k: "random", v: 7 }],
    ["a decide record without a name", { k: "decide", data: 1 }],
    ["an unknown record kind", { k: "exfiltrate", data: 1 }],
  ])("%s fails the episode as protocol, naming what was sent", async (_what, record) => {
    const r = expectFailure(await run(start("raw-ipc", { records: [record] })), "protocol");
    expect(r.message).toContain("malformed");
    expect(r.message).toContain(JSON.stringify(record).slice(0, 40));
    expect(r.records).toEqual([]);
  });

  test("a flood of blank lines fails the episode as too_large once they pass the message cap", async () => {
    const r = expectFailure(await run(start("raw-ipc", { newlines_mb: 64 })), "too_large");
    // Refused after about the cap, not after 64 MB of newlines the gateway's thread stepped through.
    const refusedAfter = Number(/refused after (\d+) bytes/.exec(r.message)?.[1]);
    expect(refusedAfter).toBeGreaterThan(LIMITS.maxRecordBytes);
    expect(refusedAfter).toBeLessThan(LIMITS.maxRecordBytes + 2 * 1024 * 1024);
  });

  test("a second ready fails the episode as protocol: the host says it once", async () => {
    const r = expectFailure(await run(start("raw-ipc", { lines: [{ t: "ready" }, { t: "ready" }] })), "protocol");
    expect(r.message).toBe("subprocess said ready twice");
  });

  test("a tool call id out of turn (reused, or skipped) fails the episode as protocol; it is not run", async () => {
    const calls: number[] = [];
    const onTool: ToolHandler = async (call) => {
      calls.push(call);
      await Bun.sleep(50);
      return { ok: true, result: { queued: true } };
    };
    const call = (id: number) => ({ t: "tool", call: id, tool: "publish", args: ["alerts/x", id] });
    const reused = expectFailure(await run(start("raw-ipc", { lines: [call(1), call(1)] }), {}, onTool), "protocol");
    expect(reused.message).toBe("tool call 1 out of turn (2 next)");
    expect(calls).toEqual([1]);
    // The call that went out is in the failed log, as cancelled or answered: the reused id did not hide it.
    expect(reused.records.filter((x) => x.k === "tool").map((x) => (x as { call: number }).call)).toEqual([1]);
    calls.length = 0;
    const skipped = expectFailure(await run(start("raw-ipc", { lines: [call(2)] }), {}, onTool), "protocol");
    expect(skipped.message).toBe("tool call 2 out of turn (1 next)");
    expect(calls).toEqual([]);
  });

  test("records past max_records fail the episode as flood; the log keeps max_records, nothing after", async () => {
    // 30 batches of 1,000 written at once: the gateway stops at the batch that passes 10,000 and reads no further.
    const batch = { t: "records", records: Array.from({ length: 1000 }, () => ({ k: "now", v: 1 })) };
    const r = expectFailure(await run(start("raw-ipc", { lines: Array(30).fill(batch) })), "flood");
    expect(r.message).toContain(`more than ${LIMITS.maxRecords} records`);
    expect(r.records).toHaveLength(LIMITS.maxRecords);
  });

  test("a tool call and done in one write fail the episode as protocol; a call after done is not run", async () => {
    const calls: string[] = [];
    const onTool: ToolHandler = async (_call, tool) => {
      calls.push(tool);
      await Bun.sleep(20);
      return { ok: true, result: { queued: true } };
    };
    const lines = [
      { t: "tool", call: 1, tool: "publish", args: ["alerts/race", 1, { retain: true }] },
      { t: "done", state: null },
    ];
    const r = expectFailure(await run(start("raw-ipc", { lines }), {}, onTool), "protocol");
    expect(r.message).toContain("1 tool call(s) unanswered");
    // A call after done is not run at all.
    calls.length = 0;
    const after = await run(start("raw-ipc", { lines: [{ t: "done", state: null }, lines[0]] }), {}, onTool);
    expect(after.ok).toBe(true);
    expect(calls).toEqual([]);
  });

  test("tool results count against the records cap: big answers fail the episode as too_large", async () => {
    let calls = 0;
    const big = "x".repeat(1024 * 1024);
    const r = expectFailure(
      await run(start("tool-loop", { n: 20 }), { maxRecordBytes: 3 * 1024 * 1024 }, async () => {
        calls++;
        return { ok: true, result: { status: 200, body: big } };
      }),
      "too_large",
    );
    expect(r.message).toContain("records exceed");
    expect(calls).toBeLessThan(5);
    expect(r.records.filter((x) => x.k === "tool").length).toBeLessThan(4);
  });

  test("tool records count against max_records: an episode of 50 tool calls fails as flood at 20", async () => {
    const answered: ToolHandler = async () => ({ ok: true, result: { status: 200 } });
    const r = expectFailure(await run(start("tool-loop", { n: 50 }), { maxRecords: 20 }, answered), "flood");
    expect(r.message).toBe("more than 20 records");
  });

  test("the time a stalled gateway stood still is not the agent's: it reads the result before timing out", async () => {
    // The gateway's thread stands still for 2.5 s (as when stopped or starved) answering a tool call; the
    // agent is done 200 ms after the answer. Its 1 s timer, long due, must not fire before the pipe is read.
    const stalling: ToolHandler = async () => {
      Bun.sleepSync(2500);
      return { ok: true, result: { queued: true } };
    };
    const r = await run(start("tool-then-sleep", { ms: 200 }), { timeoutMs: 1000 }, stalling);
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    expect(r.state).toEqual({ n: 1 });
  });

  test("a stalled gateway still times out an agent that is not done: the extra wait is bounded", async () => {
    const stalling: ToolHandler = async () => {
      setTimeout(() => Bun.sleepSync(1500), 0);
      return { ok: true, result: { queued: true } };
    };
    const r = await run(start("tool-then-sleep", { ms: 60_000 }), { timeoutMs: 1000 }, stalling);
    expect(expectFailure(r, "timeout").ms).toBeLessThan(10_000);
  });

  test("a tool call in flight when the episode times out is in its log, cancelled", async () => {
    const never: ToolHandler = () => new Promise(() => undefined);
    const r = await run(start("tool-caller", { tool: "llm", args: [{ prompt: "slow" }] }), { timeoutMs: 500 }, never);
    expectFailure(r, "timeout");
    expect(r.records.filter((x) => x.k === "tool")).toEqual([
      {
        k: "tool",
        call: 1,
        tool: "llm",
        args: [{ prompt: "slow" }],
        ok: false,
        result: { error: "failed", reason: "cancelled: the episode ended (timeout) while the call was in flight" },
      },
    ]);
  });

  test("an emit whose out message passes [broker] max_packet_bytes fails the episode as too_large", async () => {
    // A 7 MB emit was published, and queued whole for every offline persistent subscriber of out.
    const limit = { maxPacketBytes: 256 * 1024 };
    const r = expectFailure(await run(start("big-emit", { bytes: 300 * 1024 }), limit), "too_large");
    expect(r.message).toContain("exceeds [broker] max_packet_bytes (262144)");
    expect((await run(start("big-emit", { bytes: 200 * 1024 }), limit)).ok).toBe(true);
  });

  test("a tool call the agent does not await is answered and recorded before the episode ends", async () => {
    const calls: string[] = [];
    const r = await run(start("tool-unawaited"), {}, async (_call, tool) => {
      calls.push(tool);
      await Bun.sleep(20);
      return { ok: true, result: { queued: true } };
    });
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    expect(calls).toEqual(["publish"]);
    expect(r.records).toEqual([
      { k: "tool", call: 1, tool: "publish", args: ["alerts/k1", { t: 1 }], ok: true, result: { queued: true } },
    ]);
  });
});

describe("the IPC channel", () => {
  test("an agent's console.log on stdout cannot speak the protocol", async () => {
    const r = await run(start("stdout-forger"));
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    expect(r.state).toEqual({ honest: true });
    expect(r.records).toEqual([{ k: "emit", data: "from ctx" }]);
  });
});

// ---- what the sandbox shows of the host's files -------------------------------------------

const SNOOP = fileURLToPath(new URL("./fixtures/policy/snoop.ts", import.meta.url));
const REPO = fileURLToPath(new URL("../", import.meta.url)).replace(/\/$/, "");
type Snooped = { ok: true; sample: string } | { ok: false; code: string };

/** Run the snoop fixture on `ask` (optionally from a warm spare) and return what it saw. */
async function snoop(spawn: SpawnOptions, ask: Record<string, string[]>, pool?: SparePool) {
  const r = await runEpisode(start("records", ask, { module: SNOOP }), LIMITS, noTools, spawn, pool);
  if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
  return (r.state as { seen: Record<string, Snooped> }).seen;
}

const BWRAP = SANDBOXES.find(([mode]) => mode === "bwrap")?.[1];

describe.if(BWRAP !== undefined)("the bubblewrap sandbox shows an agent only what an episode needs", () => {
  // Made when the tests run (not when they are collected, skipped or filtered out, which would leave it).
  const hostTmp = join(tmpdir(), `fleet-snoop-${process.pid}`);
  const hostFile = join(hostTmp, "private.txt");
  beforeAll(() => {
    mkdirSync(hostTmp, { recursive: true, mode: 0o755 });
    writeFileSync(hostFile, "host tmp");
    chmodSync(hostTmp, 0o755);
    chmodSync(hostFile, 0o644);
  });
  afterAll(() => rmSync(hostTmp, { recursive: true, force: true }));

  const ask = {
    read: [
      SNOOP,
      join(REPO, "test/fixtures/policy/snoop-lib.ts"),
      join(REPO, "agents/sdk/index.ts"),
      join(REPO, "test/fixtures/policy/steady.ts"),
      join(REPO, "test/fixtures/unit/records.ts"),
      join(REPO, "agents/host/main.ts"),
      join(REPO, "agents/sdk/testing.ts"),
      join(REPO, "package.json"),
      join(REPO, "fleet.toml"),
      hostFile,
      "/etc/passwd",
      "/root/.bashrc",
    ],
    list: ["/", REPO, join(REPO, "test/fixtures/policy")],
    write: ["/tmp/agent-scratch.txt", SNOOP, "/agent.txt", "/usr/agent.txt", "/dev/agent.txt", "/dev/shm/agent.txt"],
  };

  test.each([
    ["started cold (its files mounted)", false] as const,
    ...(CHECKOUT_UNDER_TMP
      ? []
      : [["taken from the warm spares (its files staged into the spare's root)", true] as const]),
  ])(
    "%s: its module, local imports and the SDK are readable; other agents, the project, host /tmp and /etc are not",
    async (_how, warm) => {
      const pool = warm ? new SparePool(1, BWRAP!, PROCS) : undefined;
      try {
        if (pool) {
          pool.take(LIMITS); // primes a spare for these limits
          await waitUntil(() => pool.pids().length > 0, "a spare is up");
        }
        const before = pool ? new Set(pool.pids()) : null;
        const seen = await snoop(BWRAP!, ask, pool);
        if (before) expect(pool!.pids().some((p) => before.has(p))).toBe(false); // the episode used the spare
        const ok = (k: string) => seen[k]?.ok === true;
        expect(ok(`read ${SNOOP}`)).toBe(true);
        expect(ok(`read ${join(REPO, "test/fixtures/policy/snoop-lib.ts")}`)).toBe(true);
        expect(ok(`read ${join(REPO, "agents/sdk/index.ts")}`)).toBe(true);
        for (const hidden of ask.read.slice(3))
          expect({ hidden, seen: seen[`read ${hidden}`] }).toEqual({ hidden, seen: { ok: false, code: "ENOENT" } });
        // The folder of the agent holds only its own two files; the project root only the runtime's folders.
        const listed = (p: string) => (seen[`list ${p}`] as { sample: string }).sample.split(",").sort();
        expect(listed(join(REPO, "test/fixtures/policy"))).toEqual(["snoop-lib.ts", "snoop.ts"]);
        expect(listed(REPO)).not.toContain("package.json");
        expect(listed("/")).not.toContain("etc");
        expect(listed("/")).not.toContain("root");
        // A private /tmp it can write; the module itself it cannot.
        expect(seen["write /tmp/agent-scratch.txt"]).toEqual({ ok: true, sample: "written" });
        expect(existsSync("/tmp/agent-scratch.txt")).toBe(false);
        expect(seen[`write ${SNOOP}`]).toMatchObject({ ok: false });
        // Nothing else: bubblewrap's root and /dev are tmpfs (memory no limit counts), read-only inside.
        for (const path of ["/agent.txt", "/usr/agent.txt", "/dev/agent.txt", "/dev/shm/agent.txt"])
          expect({ path, seen: seen[`write ${path}`] }).toEqual({ path, seen: { ok: false, code: "EROFS" } });
      } finally {
        await pool?.close();
      }
    },
  );

  test("it cannot make a user namespace of its own (one could mount a tmpfs no memory watch counts)", async () => {
    // Where no memory cgroup runs (not root, or cgroup v2 only), such a tmpfs was memory_mb's escape.
    const r = await run(start("nested-userns"), {}, noTools, BWRAP!);
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    const tried = r.state as { code: number; stderr: string };
    expect(tried.code).not.toBe(0);
    expect(tried.stderr).toMatch(/unshare failed/);
  });

  test("its private /tmp holds at most memory_mb: past it a write fails with ENOSPC", async () => {
    // The size alone, faster than the memory watch (which counts /tmp too: the next tests) would see it,
    // and without the memory cgroup, which charges /tmp's pages too.
    const unwatched = { ...BWRAP!, rssPollMs: 60_000, memcg: null };
    const r = await run(start("tmpfill", { max_mb: 1024 }), { memoryMb: 128 }, noTools, unwatched);
    if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
    const filled = decisions(r.records)[0]!.data as { written_mb: number; error: string | null };
    expect(filled.error).toBe("ENOSPC");
    expect(filled.written_mb).toBeGreaterThan(100);
    expect(filled.written_mb).toBeLessThanOrEqual(128);
  });

  // The next two watch RSS and /tmp alone: where episodes get memory cgroups, the kernel's count of the
  // same pages may reach the limit first (an oom too, said otherwise), whichever of the two looks sooner.
  test("what it keeps in /tmp counts toward memory_mb: memory plus /tmp past it is oom", async () => {
    const watchOnly = { ...BWRAP!, memcg: null };
    // 40 MB of its own (private: its PSS, all that counts of its memory besides /tmp, is at least that; a Bun
    // process's shared pages split among every Bun process on the box, 8 MB or less of it on a busy CI box) and
    // 100 MB in /tmp, held 1.5 s: the watch, which looks every 400 ms by then, sees 140 MB. Without /tmp: 40-60.
    const ask = { max_mb: 100, pause_ms: 20, hold_ms: 1500, heap_mb: 40 };
    const r = await run(start("tmpfill", ask), { memoryMb: 128 }, noTools, watchOnly);
    const failure = expectFailure(r, "oom");
    expect(failure.message).toMatch(/^PSS \d+ MB of \d+ processes \+ \/tmp \d+ MB exceeded memory_mb 128/);
  });

  test("so do empty files by the hundred thousand: kernel memory (inodes) its size does not bound", async () => {
    const watchOnly = { ...BWRAP!, memcg: null };
    const r = await run(start("tmpfill", { files: 1_000_000 }), { memoryMb: 128 }, noTools, watchOnly);
    const failure = expectFailure(r, "oom");
    expect(failure.message).toMatch(/\+ \/tmp \d+ MB exceeded memory_mb 128/);
  });
});

describe.if(BWRAP !== undefined && !CHECKOUT_UNDER_TMP)("warm spares' roots are reused", () => {
  test("a root emptied after its episode shows the next agent nothing of the one before", async () => {
    const pool = new SparePool(1, BWRAP!, PROCS);
    const before = fixture("records");
    try {
      pool.take(LIMITS); // primes a spare
      await waitUntil(() => pool.pids().length > 0, "a spare is up");
      const first = await runEpisode(start("records"), LIMITS, noTools, BWRAP!, pool);
      expect(first.ok).toBe(true);
      // Two more from the pool: the second starts in the first one's root, emptied when it ended.
      let seen: Record<string, Snooped> = {};
      for (let i = 0; i < 2; i++) {
        await waitUntil(() => pool.pids().length > 0, "a spare is up");
        seen = await snoop(BWRAP!, { read: [before, SNOOP] }, pool);
      }
      expect(seen[`read ${before}`]).toEqual({ ok: false, code: "ENOENT" });
      expect(seen[`read ${SNOOP}`]?.ok).toBe(true);
    } finally {
      await pool.close();
    }
  });
});

describe("what a sandbox shows of the host runtime", () => {
  test("built: its script and bytecode, not the host's sources; the SDK imported by path: its entry alone", () => {
    const script = hostScript(process.execPath);
    expect(script).not.toBe(HOST_ENTRY);
    const shown = runtimeFor(process.execPath, script).map((b) => b.path);
    expect(shown).toContain(script);
    expect(shown).toContain(bytecodeOf(script));
    const inHost = (p: string) => HOST_PATHS.some((h) => p === h || p.startsWith(`${h}/`));
    expect(shown.filter(inHost)).toEqual([]);
    // records.ts imports the SDK by its path: the resolver must find that file, which the script answers.
    const files = episodeFiles(fixture("records"), script).files;
    expect(files.filter(inHost)).toEqual([SDK_ENTRY]);
    expect(files).not.toContain(PROTOCOL_ENTRY);
  });

  test("from its sources (a Bun that cannot build it): the whole host runtime, left out of the agent's files", () => {
    const shown = runtimeFor(process.execPath, HOST_ENTRY).map((b) => b.path);
    for (const p of HOST_PATHS) expect(shown).toContain(p);
    expect(episodeFiles(fixture("records"), HOST_ENTRY).files.filter((f) => f.includes("/agents/"))).toEqual([]);
  });
});

describe.if(BWRAP !== undefined && !CHECKOUT_UNDER_TMP)("warm spares expect the agent that took the last one", () => {
  test("a replacement spare holds the files of the agent whose episode took the last one", async () => {
    const pool = new SparePool(1, BWRAP!, PROCS);
    const files = episodeFiles(fixture("records"), hostScript(process.execPath));
    try {
      pool.take(LIMITS); // primes a spare for no agent in particular
      await waitUntil(() => pool.pids().length > 0, "a spare is up");
      expect((await runEpisode(start("records"), LIMITS, noTools, BWRAP!, pool)).start).toBe("warm");
      const { spare, refill } = pool.claim(LIMITS, files);
      refill();
      expect(spare?.holds(files)).toBe(true);
      await spare?.kill();
      // It serves that agent as any spare does.
      await waitUntil(() => pool.pids().length > 0, "a spare is up");
      const r = await runEpisode(start("records"), LIMITS, noTools, BWRAP!, pool);
      expect({ ok: r.ok, start: r.start }).toEqual({ ok: true, start: "warm" });
    } finally {
      await pool.close();
    }
  });
});

describe.if(BWRAP !== undefined && !CHECKOUT_UNDER_TMP)("warm spares that are ready go first", () => {
  test("a ready spare is taken before the replacement still starting up that holds the agent's files", async () => {
    const pool = new SparePool(2, BWRAP!, PROCS);
    const files = episodeFiles(fixture("records"), hostScript(process.execPath));
    try {
      pool.take(LIMITS); // primes two spares for no agent in particular
      await waitUntil(() => pool.pids().length === 2, "two spares are up");
      await waitUntil(() => pool.idle().every((h) => h.ready), "both spares said ready");
      const first = pool.claim(LIMITS, files);
      first.refill(); // its replacement holds the agent's files, and has not started up yet
      expect(pool.idle(files).map(({ ready, holds }) => ({ ready, holds }))).toEqual([
        { ready: true, holds: false },
        { ready: false, holds: true },
      ]);
      const second = pool.claim(LIMITS, files);
      second.refill();
      expect(second.spare?.readyAt).not.toBeNull();
      // The files are moved into the ready one's root: it serves the agent as the other would have.
      second.spare?.prepare(files);
      expect(second.spare?.holds(files)).toBe(true);
      await Promise.all([first.spare?.kill(), second.spare?.kill()]);
    } finally {
      await pool.close();
    }
  });
});

describe.if(BWRAP !== undefined && !CHECKOUT_UNDER_TMP)("warm spares and npm packages", () => {
  test("an agent importing a package from its own app folder's node_modules runs from a warm spare", async () => {
    // An app folder of its own (node_modules folders are not committed), in /var/tmp: the sandbox's
    // private /tmp hides host /tmp, and a checkout may not be writable by the user the suite runs as.
    const app = mkdtempSync("/var/tmp/fleet-pkg-app-");
    const pkg = join(app, "node_modules", "tiny-pkg");
    mkdirSync(join(pkg, "lib"), { recursive: true });
    writeFileSync(join(pkg, "package.json"), JSON.stringify({ name: "tiny-pkg", main: "index.js" }));
    writeFileSync(join(pkg, "lib", "answer.js"), "module.exports = 42;");
    symlinkSync(join(pkg, "lib", "answer.js"), join(pkg, "answer.js"));
    writeFileSync(join(pkg, "index.js"), 'module.exports = { answer: require("./answer.js") };');
    writeFileSync(
      join(app, "agent.ts"),
      `import { defineAgent } from ${JSON.stringify(join(REPO, "agents/sdk/index.ts"))};
import tiny from "tiny-pkg";
export default defineAgent<{ answer: number }>({
  init: () => ({ answer: 0 }),
  onStimulus(_s, ctx) { ctx.state.answer = tiny.answer; },
});
`,
    );
    const pool = new SparePool(1, BWRAP!, PROCS);
    try {
      pool.take(LIMITS); // primes a spare
      await waitUntil(() => pool.pids().length > 0, "a spare is up");
      for (let i = 0; i < 2; i++) {
        await waitUntil(() => pool.pids().length > 0, "a spare is up");
        const r = await runEpisode(
          start("records", {}, { module: join(app, "agent.ts") }),
          LIMITS,
          noTools,
          BWRAP!,
          pool,
        );
        if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
        expect({ start: r.start, state: r.state }).toEqual({ start: "warm", state: { answer: 42 } });
      }
    } finally {
      await pool.close();
      rmSync(app, { recursive: true, force: true });
    }
  });
});

describe.if(process.getuid?.() === 0)("without namespaces (sandbox uid)", () => {
  test("a 0600 file in a 0700 directory (the data dir) is out of reach of the episode's uid", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-datadir-"));
    try {
      secureDataDir(dir);
      writePrivateFile(join(dir, "gateway.json"), '{"secret":true}');
      const seen = await snoop(defaultSpawnOptions("uid", { allowWeak: true }), {
        read: [join(dir, "gateway.json")],
        list: [dir],
      });
      expect(seen[`read ${join(dir, "gateway.json")}`]).toEqual({ ok: false, code: "EACCES" });
      expect(seen[`list ${dir}`]).toEqual({ ok: false, code: "EACCES" });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  test("an episode cannot signal another episode's process: each runs as a uid of its own", async () => {
    const spawn = defaultSpawnOptions("uid", { allowWeak: true });
    const procs = new ProcessTable();
    const before = new Set(procs.episodePids());
    const holding = runEpisode(start("signal", { hold_ms: 3000 }), LIMITS, noTools, spawn, undefined, procs);
    const [held] = procs.episodePids().filter((p) => !before.has(p));
    // It runs as its uid from the spawn on (set before the first exec), and holds for 3 s.
    const trying = await runEpisode(start("signal", { pids: [held] }), LIMITS, noTools, spawn, undefined, procs);
    const first = await holding;
    if (!trying.ok || !first.ok) throw new Error("an episode failed");
    const tried = decisions(trying.records)[0]!.data as { uid: number; tried: Record<string, string> };
    const holder = decisions(first.records)[0]!.data as { pid: number; uid: number };
    expect(holder.pid).toBe(held!);
    expect(tried.uid).not.toBe(holder.uid);
    expect(tried.tried).toEqual({ [String(held)]: "EPERM" });
  });
});

// The kernel lets a process without CAP_SYS_ADMIN set an autogroup's nice once per 100 ms across
// the machine; a gateway that is not root must not claim a group nice most episodes would not get.
// Run where this process can set them (root with CAP_SYS_ADMIN; a container's root often lacks it,
// and then finds them fixed itself: the runEpisode autogroup tests skip there for the same reason).
describe.if(process.getuid?.() === 0 && sessionGroups() === "settable")("scheduling groups as another uid", () => {
  test("a gateway without CAP_SYS_ADMIN finds autogroup nices fixed and says so in its start-up line", () => {
    const sandbox = fileURLToPath(new URL("../gateway/episode/sandbox.ts", import.meta.url));
    const script =
      `const s = await import(${JSON.stringify(sandbox)});` +
      "const o = s.defaultSpawnOptions('none', { allowWeak: true });" +
      "console.log(JSON.stringify({ groups: s.sessionGroups(), autogroup: o.autogroup, line: s.describeSandbox(o) }));";
    const r = Bun.spawnSync([process.execPath, "-e", script], {
      uid: 65534,
      gid: 65534,
      env: { PATH: CHILD_ENV.PATH!, HOME: "/tmp", BUN_RUNTIME_TRANSPILER_CACHE_PATH: "0" },
      cwd: "/",
    });
    expect(r.stderr.toString()).toBe("");
    const seen = JSON.parse(r.stdout.toString()) as { groups: string; autogroup: number | null; line: string };
    expect(seen.groups).toBe("fixed");
    expect(seen.autogroup).toBeNull();
    expect(seen.line).toContain("scheduling group at the default nice");
    // We set them: the episodes get the group nice the docs promise.
    expect(defaultSpawnOptions("none", { allowWeak: true }).autogroup).toBe(EPISODE_GROUP_NICE);
  });
});

// Where this process itself cannot set them at will (no CAP_SYS_ADMIN, often a container's root).
describe.if(sessionGroups() === "fixed")("scheduling groups this process may not set", () => {
  test("the episodes get no group nice, and the start-up line says they run at the default one", () => {
    const options = defaultSpawnOptions("none", { allowWeak: true });
    expect(options.autogroup).toBeNull();
    expect(describeSandbox(options)).toContain("scheduling group at the default nice");
  });
});

// Autogroups schedule only the root cpu cgroup's tasks: in a cpu cgroup (a systemd service with CPU
// accounting, a container with a quota) a group nice changes nothing, and the start-up line must not claim one.
describe("whether this process is where sessions are scheduling groups (the root cpu cgroup)", () => {
  const dir = mkdtempSync(join(tmpdir(), "cpu-cgroup-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  /** A /proc/self/cgroup of `lines`, and a cgroup v2 mount whose cgroups list these controllers. */
  const fake = (lines: string[], controllers: Record<string, string> = {}) => {
    const at = mkdtempSync(join(dir, "case-"));
    writeFileSync(join(at, "cgroup"), `${lines.join("\n")}\n`);
    for (const [cgroup, list] of Object.entries(controllers)) {
      mkdirSync(join(at, "mount", cgroup), { recursive: true });
      writeFileSync(join(at, "mount", cgroup, "cgroup.controllers"), `${list}\n`);
    }
    return inRootCpuGroup(join(at, "cgroup"), join(at, "mount"));
  };

  test("cgroup v1: only the cpu hierarchy's path counts", () => {
    expect(fake(["4:memory:/process_api/x", "2:cpu,cpuacct:/", "1:name=systemd:/"])).toBe(true);
    expect(fake(["4:memory:/", "2:cpu,cpuacct:/system.slice/fleet.service"])).toBe(false);
  });

  test("cgroup v2: in a cpu cgroup when the controller is on in ours or any cgroup above it", () => {
    expect(fake(["0::/"])).toBe(true);
    expect(fake(["0::/system.slice/fleet.service"], { "system.slice/fleet.service": "memory pids" })).toBe(true);
    expect(fake(["0::/system.slice/fleet.service"], { "system.slice/fleet.service": "cpuset cpu io memory" })).toBe(
      false,
    );
    // Ours lists no cpu (its parent keeps it for itself): its tasks are scheduled in the parent's group.
    expect(
      fake(["0::/system.slice/fleet.service"], { "system.slice": "cpu memory", "system.slice/fleet.service": "" }),
    ).toBe(false);
    // cpuset is not cpu.
    expect(fake(["0::/a/b"], { a: "cpuset memory", "a/b": "cpuset" })).toBe(true);
  });

  test("no cgroups at all, or a cgroup we cannot see: autogroups are left to decide", () => {
    expect(inRootCpuGroup(join(dir, "missing"), join(dir, "no-mount"))).toBe(true);
    expect(fake(["0::/elsewhere/x"])).toBe(true);
  });
});
