/**
 * The episode baseline: `Bun.spawn` of a tiny child + one IPC round trip + exit, with no
 * gateway around it. Two variants:
 *  - plain:   `bun bare-child.ts`, minimal env, pipes ignored;
 *  - wrapped: what the gateway's runner does to every episode (gateway/sandbox.ts, with its
 *             `defaultSpawnOptions()` and `sandboxCommand`): bubblewrap when it works here,
 *             prlimit (RLIMIT_DATA/NOFILE/CPU/NPROC), a uid/gid of its own when root, its own process group,
 *             a memory cgroup it joins itself where the runner makes them (root, cgroup v1), cwd "/",
 *             the runner's child env, stderr piped and drained, its session's scheduling group at the
 *             runner's nice (where the kernel has autogroups), oom_score_adj 1000 as the host sets it.
 * Both are ended the way the runner ends an episode: SIGKILL on the reply, then await exit.
 */
import { closeSync, openSync } from "node:fs";
import { join } from "node:path";
import { CGROUP_PROCS_FD, JOIN_CGROUP_ARG } from "../../agents/protocol.ts";
import {
  CHILD_ENV,
  defaultSpawnOptions,
  sandboxCommand,
  setAutogroup,
  type ProcessLimits,
  type SpawnOptions,
} from "../../gateway/episode/index.ts";
import { ROOT, defer, killPid } from "./harness.ts";

const CHILD = join(ROOT, "scripts/bench/bare-child.ts");
/**
 * What the child's sandbox shows besides the script: the protocol it imports. Two files, as the runner's
 * sandbox shows the built host runtime and its bytecode.
 */
const CHILD_VIEW = { binds: [{ kind: "file" as const, path: join(ROOT, "agents/protocol.ts") }] };
/** The limits the runner gives a bench fleet episode (procs.ts benchFleet, episode.ts runLimitsFor). */
const LIMITS: ProcessLimits = { timeoutMs: 10_000, memoryMb: 128, maxOpenFiles: 256, maxProcesses: 4096 };

/** Which baseline. */
export type BareVariant = "plain" | "wrapped";

let options: SpawnOptions | null = null;
/** The runner's spawn options on this machine, probed once (as the gateway does at start). */
export function spawnOptions(): SpawnOptions {
  options ??= defaultSpawnOptions();
  return options;
}

/** What `wrapped` adds on this machine, for the report. */
export function wrappingNote(): string {
  const s = spawnOptions();
  const parts = [
    s.bwrap ? "bwrap" : "no bwrap",
    s.prlimit ? "prlimit" : "no prlimit",
    s.uids !== null ? `a uid each from ${s.uids}` : "same uid",
    "own pgid",
    ...(s.memcg ? ["a memory cgroup each, joined by the child"] : []),
    ...(s.autogroup != null ? [`autogroup nice ${s.autogroup}`] : []),
    ...(s.idle
      ? ["SCHED_IDLE (chrt)"]
      : s.nice
        ? [`nice ${s.nice.value} (${s.autogroup != null ? "the child sets it" : "through the nice binary"})`]
        : []),
    "oom_score_adj 1000 (the child sets it)",
    "stderr pipe",
  ];
  return parts.join(", ");
}

const live = new Set<number>();
defer(() => {
  for (const pid of live) killPid(pid);
});

/** One spawn + ready + request/reply + kill + exit; resolves with its duration in ms. */
export async function bareOnce(variant: BareVariant): Promise<number> {
  return (await bareRoundTrip(variant)).ms;
}

/**
 * `bareOnce`, also with the CPU the spawned process used (user + system from wait4, ms): the child's
 * own for `plain`; for `wrapped`, only the outermost wrapper's (bwrap reaps the child).
 */
export async function bareRoundTrip(variant: BareVariant): Promise<{ ms: number; cpuMs: number }> {
  const began = performance.now();
  const s = spawnOptions();
  const wrapped = variant === "wrapped";
  // Where the runner gives each episode a memory cgroup to join, the wrapped child joins one too, the same way.
  const cgroup = wrapped ? (s.memcg?.enter(LIMITS.memoryMb * 1024 * 1024) ?? null) : null;
  // The wrapped command line is the runner's own builder, so the baseline cannot drift from it.
  const cmd = wrapped
    ? [...sandboxCommand(CHILD, LIMITS, s, CHILD_VIEW), ...(cgroup ? [JOIN_CGROUP_ARG] : [])]
    : [s.bun, CHILD];
  let answered = false;
  let replied!: () => void;
  const reply = new Promise<void>((r) => (replied = r));
  const uid = wrapped ? (s.uids?.take() ?? null) : null;
  const procsFd = cgroup ? openSync(join(cgroup.dir, "cgroup.procs"), "w") : null;
  const proc = Bun.spawn(cmd, {
    env: wrapped ? { ...CHILD_ENV } : { PATH: CHILD_ENV.PATH! },
    cwd: wrapped ? "/" : ROOT,
    detached: wrapped,
    stdio: childStdio(wrapped ? "pipe" : "ignore", procsFd),
    serialization: "json",
    ...(uid !== null ? { uid, gid: uid } : {}),
    ipc(msg: { t?: string }, child) {
      if (msg?.t === "ready") child.send({ t: "start", pad: "x".repeat(512) });
      else if (msg?.t === "done") {
        answered = true;
        replied();
      }
    },
  });
  if (procsFd !== null) closeSync(procsFd);
  live.add(proc.pid);
  if (wrapped && s.autogroup != null) setAutogroup(proc.pid, s.autogroup);
  if (wrapped) void new Response(proc.stderr as ReadableStream<Uint8Array>).text().catch(() => "");
  const timeout = setTimeout(() => killPid(proc.pid), 10_000);
  await Promise.race([reply, proc.exited]);
  clearTimeout(timeout);
  killPid(wrapped ? -proc.pid : proc.pid);
  await proc.exited;
  cgroup?.end();
  if (uid !== null) s.uids?.give(uid);
  live.delete(proc.pid);
  // A child that could not start (or join its cgroup) must not count as a fast round trip.
  if (!answered) throw new Error(`bare ${variant} child ended without answering (exit code ${proc.exitCode})`);
  return { ms: performance.now() - began, cpuMs: spawnedCpuMs(proc) };
}

/** stdin and stdout ignored; with `procsFd`, that cgroup.procs on CGROUP_PROCS_FD, as the runner passes it. */
function childStdio(
  stderr: "pipe" | "ignore",
  procsFd: number | null,
): ["ignore", "ignore", "pipe" | "ignore", ...("ignore" | number)[]] {
  const more: ("ignore" | number)[] = [];
  if (procsFd !== null) {
    while (3 + more.length < CGROUP_PROCS_FD) more.push("ignore");
    more.push(procsFd);
  }
  return ["ignore", "ignore", stderr, ...more];
}

/** User + system CPU of a spawned process that has exited (from wait4), ms. */
export function spawnedCpuMs(proc: ReturnType<typeof Bun.spawn>): number {
  const usage = proc.resourceUsage();
  return usage ? (Number(usage.cpuTime.user) + Number(usage.cpuTime.system)) / 1000 : Number.NaN;
}

/** `total` round trips, `concurrency` at a time; resolves with round trips per second. */
export async function bareRate(variant: BareVariant, total: number, concurrency: number): Promise<number> {
  let next = 0;
  const began = performance.now();
  const worker = async () => {
    while (next < total) {
      next++;
      await bareOnce(variant);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return total / ((performance.now() - began) / 1000);
}

/** `samples` serial round trips; resolves with their durations in ms. */
export async function bareLatencies(variant: BareVariant, samples: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < samples; i++) out.push(await bareOnce(variant));
  return out;
}
