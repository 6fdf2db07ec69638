/**
 * Runs one episode in a fresh Bun subprocess (agents/host/main.ts): explicit minimal env (never
 * the parent's), its own process group (killed whole when the episode ends), a wall-clock
 * timeout, a memory ceiling (RLIMIT_DATA as a backstop plus an RSS watch) and, when the
 * gateway runs as root, an unprivileged uid so the child cannot read the gateway's
 * /proc/<pid>/environ. IPC is parsed at the edge; the child never touches the database.
 * The isolation itself is ./sandbox.ts; spawning, spares and kills are ./host-process.ts.
 */
import { MAX_JSON_DEPTH, parseChildMessage, type EpisodeRecord, type ParentMessage } from "../../agents/protocol.ts";
import {
  HostProcess,
  MALFORMED,
  MAX_STDERR_BYTES,
  OVERSIZE,
  ProcessTable,
  pssMb,
  rssMb,
  sandboxTmpMb,
  type SparePool,
  TOO_DEEP,
} from "./host-process.ts";
import { HOST_PATHS } from "../../agents/host/index.ts";
import { topics } from "../protocol.ts";
import { episodeFiles, type ProcessLimits, type SpawnOptions } from "./sandbox.ts";
import { spareCanLoad } from "./sandbox-view.ts";
import { hostScript } from "./host-runtime.ts";

// Callers (episode executor, replay, gateway, tests, benches) import the whole runner surface from here.
export {
  BURST_GROUP_NICE,
  BWRAP_ARGS,
  CHILD_ENV,
  defaultSpawnOptions,
  describeSandbox,
  episodeFiles,
  EPISODE_GROUP_NICE,
  EPISODE_NICE,
  FLOODED_GROUP_NICE,
  hostCommand,
  idleSpawnOptions,
  inGroupAt,
  inRootCpuGroup,
  nprocPerNamespace,
  runsAsUids,
  runtimeFor,
  SandboxError,
  sandboxCommand,
  sessionGroups,
  SPARE_GROUP_NICE,
  sharedUidWarning,
  weakSandboxWarning,
  type ProcessLimits,
  type SandboxMode,
  type SpawnOptions,
} from "./sandbox.ts";
export { ProcessTable, pssMb, rssMb, setAutogroup, SparePool, tmpfsUsedMb } from "./host-process.ts";
export {
  mkdirReadable,
  processTempDir,
  SandboxLedger,
  startTicks,
  sweepProcessDirs,
  type Swept,
  ticksNow,
} from "./leftovers.ts";
export { agentFiles } from "./sandbox-view.ts";
export { UidPool } from "./uids.ts";
export {
  claimUids,
  commandSpawnOptions,
  DEFAULT_UID_BLOCKS,
  type HeldUids,
  UID_CLAIMS_DIR,
  UID_CLAIMS_FILE,
  type UidClaim,
  uidClaims,
  UidRangeTaken,
  uidSpan,
} from "./uid-claims.ts";
export { EpisodeCgroup, MemoryCgroups, sweepCgroups } from "./memcg.ts";

/** How an episode failed (STYLE: retry decisions read this, not a message). */
export type FailureKind =
  | "threw"
  /** The agent threw `TerminalError`: quarantined at once, without retries. */
  | "terminal"
  | "timeout"
  | "oom"
  | "crashed"
  | "invalid_module"
  | "invalid_state"
  | "flood"
  | "protocol"
  /** The subprocess sent more bytes than the gateway accepts (one message, or the episode's records in all). */
  | "too_large"
  /**
   * Not the agent's doing: the subprocess could not be started (out of processes, fds or memory,
   * the sandbox failed to set up), so no agent code ran. Retries are not consumed for it.
   */
  | "infra";

/** How long a host process may take to say "ready" before its start counts as an infrastructure failure. */
export const STARTUP_TIMEOUT_MS = 30_000;

/** What a run produced. `records` holds what arrived before the end, even on failure. */
export type RunResult =
  | {
      readonly ok: true;
      readonly state: unknown;
      readonly records: EpisodeRecord[];
      readonly ms: number;
      /** The code's state version (`defineAgent({ version })`), when the host reported it. */
      readonly version?: number;
      /** The state version the episode migrated from, when it ran `migrate`. */
      readonly migratedFrom?: number;
      readonly start?: StartKind;
      /** How long the episode ran on its own clock (from its start sent to its end), what its timeout bounds. */
      readonly codeMs?: number;
    }
  | {
      readonly ok: false;
      readonly kind: FailureKind;
      readonly message: string;
      readonly records: EpisodeRecord[];
      readonly ms: number;
      readonly start?: StartKind;
      /** As for a success; absent when the episode never started (its process did not). */
      readonly codeMs?: number;
    };

/** How an episode's process started: taken from the warm spares, or spawned for it (cold). */
export type StartKind = "warm" | "cold";

/** Answers a tool call from the subprocess; records it as it sees fit. */
export type ToolHandler = (
  call: number,
  tool: string,
  args: readonly unknown[],
) => Promise<{ ok: boolean; result: unknown }>;

/** Sandbox and limits for one run: the subprocess's OS limits plus what the runner enforces on its output. */
export interface RunLimits extends ProcessLimits {
  readonly maxRecords: number;
  /** Bytes of all records of one episode (events, outputs, logs, tool calls); also the cap of its state. */
  readonly maxRecordBytes: number;
  /**
   * `[broker] max_packet_bytes`: an emit whose `out` message (with its topic) is larger fails the episode
   * as too_large. Absent (a replay, which reproduces history): not checked.
   */
  readonly maxPacketBytes?: number;
}

/**
 * How late the episode's timer may fire before the gateway counts itself stalled (`timedOut`):
 * far above a busy event loop's jitter, far below a stop the agent should not be blamed for.
 */
const STALL_MS = 250;

/** Room for the envelope around records (the child counts the records alone). */
const ENVELOPE_BYTES = 64 * 1024;

/**
 * Run one episode to completion or failure. Never throws. Its process group is registered
 * in `procs` (default: the pool's table, else a table of its own) while it lives.
 */
export async function runEpisode(
  start: Extract<ParentMessage, { t: "start" }>,
  limits: RunLimits,
  onTool: ToolHandler,
  spawnOpts: SpawnOptions,
  pool?: SparePool,
  procs: ProcessTable = pool?.procs ?? new ProcessTable(),
): Promise<RunResult> {
  const began = performance.now();
  const records: EpisodeRecord[] = [];
  let outcome: RunResult | null = null;
  /** When the episode's own clock started (its start sent), or null before. */
  let clockFrom: number | null = null;
  /** Tool calls dispatched and not answered yet. */
  let toolsInFlight = 0;
  /** The id of the last tool call the child made. */
  let lastCall = 0;
  /** Those calls, by call id: a failed episode's log records them as cancelled. */
  const pendingCalls = new Map<number, { tool: string; args: readonly unknown[] }>();
  let settle!: () => void;
  const settled = new Promise<void>((r) => (settle = r));

  type Outcome =
    | { ok: true; state: unknown; version?: number; migratedFrom?: number }
    | { ok: false; kind: FailureKind; message: string };
  const finish = (r: Outcome): void => {
    if (outcome) return;
    // Calls still in flight when the episode fails were made (an llm call is charged its hold): the log
    // keeps them, cancelled with the episode (the gate aborts them when the run returns).
    if (!r.ok)
      for (const [call, c] of pendingCalls)
        records.push({
          k: "tool",
          call,
          tool: c.tool,
          args: c.args,
          ok: false,
          result: { error: "failed", reason: `cancelled: the episode ended (${r.kind}) while the call was in flight` },
        });
    const end = performance.now();
    const codeMs = clockFrom === null ? {} : { codeMs: end - clockFrom };
    // A copy: nothing the child sends after the end reaches the result (the log stored).
    outcome = { ...r, records: [...records], ms: end - began, start: startKind, ...codeMs } as RunResult;
    settle();
  };

  let taken: HostProcess | null = null;
  let startKind: StartKind = "cold";
  // The pool's replacement for a spare taken (or for the limits of a cold start) is spawned once
  // this episode's start is on its way: its spawn is not on the episode's path.
  let refill = (): void => undefined;
  try {
    // Under bubblewrap the sandbox shows the agent's own files and nothing else of the project.
    const files = spawnOpts.bwrap ? episodeFiles(start.module, hostScript(spawnOpts.bun)) : null;
    const claimed =
      files === null || spareCanLoad(files, HOST_PATHS) ? pool?.claim(limits, files, spawnOpts.autogroup) : undefined;
    if (claimed) refill = claimed.refill;
    const spare = claimed?.spare ?? null;
    if (spare) startKind = "warm";
    taken = spare ?? HostProcess.start(limits, spawnOpts, files, procs);
    taken.prepare(files);
  } catch (err) {
    refill();
    await taken?.kill();
    return {
      ok: false,
      kind: "infra",
      message: `could not start the episode subprocess: ${String(err)}`,
      records,
      ms: performance.now() - began,
    };
  }
  const host = taken;
  /** Whether the kernel killed a process of the episode at its memory cgroup's limit (then: finished as oom). */
  const cgroupOom = (): boolean => {
    const kills = host.cgroup?.oomKills() ?? 0;
    if (kills === 0) return false;
    finish({
      ok: false,
      kind: "oom",
      message:
        `memory_mb ${limits.memoryMb} reached in the episode's memory cgroup (${kills} process(es) killed): ` +
        "it counts what RSS does not show, such as a memfd or shared memory",
    });
    return true;
  };
  let sent = false;
  // Enforced here, in the gateway, while the bytes arrive: the child's own limits are the agent's to break.
  const maxBytes = limits.maxRecordBytes + ENVELOPE_BYTES;
  let recordBytes = 0;
  const countRecords = (bytes: number): boolean => {
    recordBytes += bytes;
    if (recordBytes <= maxBytes) return true;
    finish({ ok: false, kind: "too_large", message: `the episode's records exceed ${limits.maxRecordBytes} bytes` });
    return false;
  };
  // What no device may send the broker, an emit may not publish either (an offline subscriber's queue keeps it).
  const outTopic = topics.out(start.agent.type, start.agent.key);
  let emits = 0;
  const emitFits = (data: unknown): boolean => {
    const max = limits.maxPacketBytes;
    if (max === undefined) return true;
    // The out message as the outbox will publish it (records.ts buildOutbox), + its topic and PUBLISH header.
    const envelope = JSON.stringify({ episode: start.episode, seq: emits++, agent: start.agent.id, data });
    const bytes = Buffer.byteLength(envelope) + Buffer.byteLength(outTopic) + 16;
    if (bytes <= max) return true;
    finish({
      ok: false,
      kind: "too_large",
      message: `an emit of ${bytes} bytes (its out message with its topic) exceeds [broker] max_packet_bytes (${max})`,
    });
    return false;
  };
  let timer: ReturnType<typeof setTimeout> | undefined;
  /**
   * The episode's timer fired (due at `due`). Fired late by more than STALL_MS, the gateway itself was
   * stopped or starved meanwhile (SIGSTOP, a paused VM, a loaded machine), and what the child sent before
   * its deadline may still wait unread in the channel: the timer fires before the pipe is read. So it
   * is read first, for as long as the stall lasted (at most the timeout again): a result that arrived
   * wins; an agent still running after that is a timeout.
   */
  const timedOut = (due: number, graced = false): void => {
    const late = performance.now() - due;
    if (!graced && late > STALL_MS) {
      timer = setTimeout(() => timedOut(due, true), Math.min(late, limits.timeoutMs));
      return;
    }
    finish({ ok: false, kind: "timeout", message: `episode exceeded ${limits.timeoutMs} ms` });
  };
  host.attach((raw, bytes) => {
    if (raw === MALFORMED)
      return finish({ ok: false, kind: "protocol", message: "subprocess sent a line that is not JSON" });
    if (raw === TOO_DEEP)
      return finish({
        ok: false,
        kind: "protocol",
        message: `subprocess sent a message nested deeper than ${MAX_JSON_DEPTH} levels (arrays and objects)`,
      });
    if (typeof raw === "object" && raw !== null && OVERSIZE in raw)
      return finish({
        ok: false,
        kind: "too_large",
        message:
          `${oversizeWhat((raw as { kind?: string | null }).kind ?? null)} exceeded ${maxBytes} bytes ` +
          `(refused after ${bytes} bytes; nothing of it kept)`,
      });
    const msg = parseChildMessage(raw, { replay: start.replay !== null });
    if (!msg)
      return finish({
        ok: false,
        kind: "protocol",
        message: `subprocess sent a malformed message: ${String(JSON.stringify(raw)).slice(0, 300)}`,
      });
    switch (msg.t) {
      case "ready": {
        // Said once, by the host: more of them would cost the gateway's thread and nothing the agent's budget.
        if (sent) return finish({ ok: false, kind: "protocol", message: "subprocess said ready twice" });
        sent = true;
        // The episode's own clock starts with its code: start-up time (a loaded machine) is not the agent's.
        clearTimeout(timer);
        clockFrom = performance.now();
        const due = clockFrom + limits.timeoutMs;
        timer = setTimeout(() => timedOut(due), limits.timeoutMs);
        host.send(start);
        return;
      }
      case "records":
        // An episode that has ended reads no further: its log is what it held when it ended.
        if (outcome || !countRecords(bytes)) return;
        for (const r of msg.records) if (r.k === "emit" && !emitFits(r.data)) return;
        if (records.length + msg.records.length > limits.maxRecords) {
          // The log keeps max_records, not the batch that passed them.
          records.push(...msg.records.slice(0, limits.maxRecords - records.length));
          return finish({ ok: false, kind: "flood", message: `more than ${limits.maxRecords} records` });
        }
        records.push(...msg.records);
        return;
      case "tool":
        // Nothing more runs for an episode that has ended (its process is being killed).
        if (outcome || !countRecords(bytes)) return;
        // The host numbers its calls 1, 2, 3...: an id out of turn would stand for two calls in the log and in replay.
        if (msg.call !== ++lastCall)
          return finish({
            ok: false,
            kind: "protocol",
            message: `tool call ${msg.call} out of turn (${lastCall} next)`,
          });
        // The gateway, not the child, writes the tool record: the child cannot forge a result.
        toolsInFlight++;
        pendingCalls.set(msg.call, { tool: msg.tool, args: msg.args });
        void onTool(msg.call, msg.tool, msg.args)
          .catch((err: unknown) => ({ ok: false, result: { error: "failed", reason: String(err) } }))
          .then((r) => {
            toolsInFlight--;
            pendingCalls.delete(msg.call);
            // The result is kept in the episode's log: it counts against the same cap as the child's records.
            if (outcome || !countRecords(Buffer.byteLength(JSON.stringify(r.result) ?? ""))) return;
            records.push({ k: "tool", call: msg.call, tool: msg.tool, args: msg.args, ok: r.ok, result: r.result });
            // The gateway's own records count against max_records like the child's (20,000 unawaited sends committed).
            if (records.length > limits.maxRecords)
              return finish({ ok: false, kind: "flood", message: `more than ${limits.maxRecords} records` });
            host.send({ t: "tool_result", call: msg.call, ok: r.ok, result: r.result });
          });
        return;
      case "done":
        // A process of the episode killed at its memory cgroup's limit fails it, as the RSS watch would.
        if (cgroupOom()) return;
        // The host answers every call before it ends (agents/host); a done before that would commit
        // what the calls did (a publish, a send) without their records.
        if (toolsInFlight > 0)
          return finish({
            ok: false,
            kind: "protocol",
            message: `the subprocess ended the episode with ${toolsInFlight} tool call(s) unanswered`,
          });
        return finish({
          ok: true,
          state: msg.state,
          ...(msg.version === undefined ? {} : { version: msg.version }),
          ...(msg.migrated_from === undefined ? {} : { migratedFrom: msg.migrated_from }),
        });
      case "error": {
        // RangeError "Out of memory": the RLIMIT_DATA backstop stopped an allocation before the RSS watch looked.
        const kind = msg.kind === "threw" && /^Out of memory\b/i.test(msg.message) ? "oom" : msg.kind;
        return finish({ ok: false, kind, message: msg.message + (msg.stack ? `\n${msg.stack}` : "") });
      }
      default: {
        const never: never = msg;
        return never;
      }
    }
  }, maxBytes);
  // Past MAX_STDERR_BYTES the gateway stops reading the child's stderr (reading it costs us, not the agent).
  const stderrFlood = (): void =>
    finish({
      ok: false,
      kind: "flood",
      message: `the subprocess wrote more than ${MAX_STDERR_BYTES} bytes to stderr (ctx.log is the episode's log)`,
    });
  if (host.stderrFlooded) stderrFlood();
  else host.onStderrFlood = stderrFlood;
  refill();

  const pid = host.pid;
  // A spare said "ready" long ago (attach replayed it); a cold process gets a bound on its start-up.
  if (!sent)
    timer = setTimeout(
      () =>
        finish({
          ok: false,
          kind: "infra",
          message: `the episode subprocess did not start within ${STARTUP_TIMEOUT_MS} ms`,
        }),
      STARTUP_TIMEOUT_MS,
    );
  // One scan at a time, and a scan that took long (a big process tree: a fork bomb) waits
  // 4x its own duration before the next, so the watch never costs the gateway more than
  // ~20% of a core however many processes the agent starts (RLIMIT_DATA is the backstop).
  // The interval doubles from rssPollMs up to 8x: short episodes are watched closely, and one
  // waiting seconds on a tool call is not scanned 20 times a second (RLIMIT_DATA still stops a
  // fast allocation in between, reported as oom too). The scan walks the tree (each thread's
  // children). Listing the episode's memory cgroup instead (one read) did not show in `bench.ts
  // episodes`: gateway CPU per episode 6.88, 7.54, 6.68 ms with it, 7.24, 7.22, 6.44 with the walk.
  let rssTimer: ReturnType<typeof setTimeout> | undefined;
  let rssEvery = spawnOpts.rssPollMs;
  const watchRss = (): void => {
    const scanBegan = performance.now();
    const mb = rssMb(pid);
    // Under bubblewrap its /tmp is memory too (its size, memory_mb, is only the backstop).
    const tmp = spawnOpts.bwrap ? sandboxTmpMb(pid) : 0;
    if (outcome || cgroupOom()) return;
    // The RSS sum counts a page shared by n processes n times: past the limit, the tree's
    // proportional set size (each page once) decides.
    const tree = mb + tmp > limits.memoryMb ? pssMb(pid) : undefined;
    if (tree && tree.mb + tmp > limits.memoryMb) {
      const held = `PSS ${tree.mb.toFixed(0)} MB${tree.processes > 1 ? ` of ${tree.processes} processes` : ""}`;
      const what = tmp >= 1 ? `${held} + /tmp ${tmp.toFixed(0)} MB` : held;
      finish({ ok: false, kind: "oom", message: `${what} exceeded memory_mb ${limits.memoryMb}` });
      return;
    }
    rssEvery = Math.min(rssEvery * 2, 8 * spawnOpts.rssPollMs);
    rssTimer = setTimeout(watchRss, Math.max(rssEvery, 4 * (performance.now() - scanBegan)));
  };
  rssTimer = setTimeout(watchRss, spawnOpts.rssPollMs);

  void host.proc.exited.then(async (code) => {
    // Killed after its end (the usual way): no stderr to wait for and nothing to report.
    if (outcome || cgroupOom()) return;
    await Promise.race([host.stderrDone, Bun.sleep(100)]);
    const oom = /out of memory/i.test(host.stderrTail);
    const detail = host.stderrTail.trim().split("\n").slice(-6).join("\n");
    finish({
      ok: false,
      // Before "ready" no agent code has run: the wrapper or the runtime could not start
      // (EAGAIN, EMFILE, ENOMEM, bwrap set-up).
      kind: !sent ? "infra" : oom ? "oom" : "crashed",
      message:
        `subprocess exited (code ${code}${host.proc.signalCode ? `, signal ${host.proc.signalCode}` : ""}) ` +
        `before finishing${detail ? `: ${detail}` : ""}`,
    });
  });

  await settled;
  clearTimeout(timer);
  clearTimeout(rssTimer);
  // The caller commits after the exit. Committing before it (s37, 7067d62: the kill sent, the exit a
  // promise the turn waited for) cut the p50 by ~1.5 ms but cost the gateway ~7% more CPU per episode
  // (six interleaved bench pairs, 3.06x vs 2.84x the bare loop), and no quiet agent's p99 measurably.
  await host.kill();
  return outcome!;
}

/** What an oversized message from the subprocess was, by its kind (`LineReader`): the agent's state, most often. */
function oversizeWhat(kind: string | null): string {
  switch (kind) {
    case "done":
      return "the agent's state (the subprocess's done message)";
    case "records":
      return "a batch of the episode's records from the subprocess";
    case "tool":
      return "a tool call's arguments from the subprocess";
    default:
      return kind === null ? "a message from the subprocess" : `a ${kind} message from the subprocess`;
  }
}
