/**
 * Runs one episode in a fresh Bun subprocess (agents/host.ts): explicit minimal env (never
 * the parent's), its own process group (killed whole when the episode ends), a wall-clock
 * timeout, a memory ceiling (RLIMIT_DATA as a backstop plus an RSS watch) and, when the
 * gateway runs as root, an unprivileged uid so the child cannot read the gateway's
 * /proc/<pid>/environ. IPC is parsed at the edge; the child never touches the database.
 */
import { fileURLToPath } from "node:url";
import { readdir, readFile } from "node:fs/promises";
import { parseChildMessage, type EpisodeRecord, type ParentMessage } from "../agents/protocol.ts";

const HOST = fileURLToPath(new URL("../agents/host.ts", import.meta.url));

/** How an episode failed (STYLE: retry decisions read this, not a message). */
export type FailureKind = "threw" | "timeout" | "oom" | "crashed" | "invalid_module" | "invalid_state" | "flood" | "protocol";

/** What a run produced. `records` holds what arrived before the end, even on failure. */
export type RunResult =
  | { readonly ok: true; readonly state: unknown; readonly records: EpisodeRecord[]; readonly ms: number }
  | { readonly ok: false; readonly kind: FailureKind; readonly message: string; readonly records: EpisodeRecord[]; readonly ms: number };

/** Answers a tool call from the subprocess; records it as it sees fit. */
export type ToolHandler = (call: number, tool: string, args: readonly unknown[]) => Promise<{ ok: boolean; result: unknown }>;

/** Sandbox and limits for one run. */
export interface RunLimits {
  readonly timeoutMs: number;
  readonly memoryMb: number;
  readonly maxRecords: number;
  readonly maxRecordBytes: number;
  readonly maxOpenFiles: number;
  readonly maxProcesses: number;
}

/** How subprocesses are started; injected so tests and benches can vary it. */
export interface SpawnOptions {
  /** Path of the bun executable (defaults to the running one). */
  readonly bun: string;
  /** Run the child as this uid/gid (root only); null keeps the gateway's. */
  readonly uid: number | null;
  readonly gid: number | null;
  /** Wrap with prlimit for RLIMIT_DATA/NOFILE/NPROC when available. */
  readonly prlimit: string | null;
  /** Run inside bubblewrap (own pid/net/ipc namespaces, read-only root) when set. */
  readonly bwrap: string | null;
  /** How often the RSS watch samples, ms. */
  readonly rssPollMs: number;
}

/** Isolation modes of `[fleet] sandbox`. */
export type SandboxMode = "auto" | "bwrap" | "uid" | "none";

function which(names: readonly string[]): string | null {
  return names.find((p) => Bun.file(p).size > 0) ?? null;
}

let bwrapWorks: boolean | null = null;
/** Whether bubblewrap can create the namespaces we ask for here (probed once). */
function probeBwrap(bwrap: string): boolean {
  if (bwrapWorks === null) {
    const r = Bun.spawnSync([bwrap, ...BWRAP_ARGS, "--", "/bin/true"], { env: {}, stdout: "ignore", stderr: "ignore" });
    bwrapWorks = r.exitCode === 0;
  }
  return bwrapWorks;
}

const BWRAP_ARGS = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent"];

/**
 * Spawn options for a sandbox mode on this machine. Root drops to nobody (65534), so the
 * child cannot read the gateway's /proc/<pid>/environ; bubblewrap adds its own pid, net and
 * ipc namespaces (no network: tools go through the gateway) and a read-only root.
 */
export function defaultSpawnOptions(mode: SandboxMode = "auto"): SpawnOptions {
  const root = process.getuid?.() === 0;
  const prlimit = which(["/usr/bin/prlimit", "/bin/prlimit"]);
  const bwrapPath = mode === "auto" || mode === "bwrap" ? which(["/usr/bin/bwrap", "/bin/bwrap"]) : null;
  const bwrap = bwrapPath && probeBwrap(bwrapPath) ? bwrapPath : null;
  if (mode === "bwrap" && !bwrap) throw new Error('sandbox = "bwrap" but bubblewrap is not installed or cannot create namespaces here');
  const dropUid = root && mode !== "none";
  return { bun: process.execPath, uid: dropUid ? 65534 : null, gid: dropUid ? 65534 : null, prlimit, bwrap, rssPollMs: 50 };
}

/** One line for the start-up log: what an episode is isolated by. */
export function describeSandbox(o: SpawnOptions): string {
  const parts = [o.uid !== null ? `uid ${o.uid}` : "same uid as the gateway", o.bwrap ? "bubblewrap (pid/net/ipc namespaces, read-only root)" : "no namespaces", o.prlimit ? "rlimits" : "no rlimits"];
  return parts.join(", ");
}

/** The only environment an agent subprocess gets. */
export const CHILD_ENV: Readonly<Record<string, string>> = Object.freeze({
  PATH: "/usr/local/bin:/usr/bin:/bin",
  HOME: "/nonexistent",
  TZ: "UTC",
  NO_COLOR: "1",
  // A transpiler cache under HOME would be shared state between episodes; turn it off.
  BUN_RUNTIME_TRANSPILER_CACHE_PATH: "0",
  // The child's cwd; bubblewrap sets PWD itself, so name it here and the env is the same in every sandbox mode.
  PWD: "/",
});

// Bun itself maps a few hundred MB of private memory at start; RLIMIT_DATA below that
// aborts the runtime (measured: 268 MB aborts, 300 MB starts), so the hard backstop sits
// above the budget and the RSS watch enforces the budget itself.
const RUNTIME_DATA_MB = 384;

async function childrenOf(pid: number): Promise<number[]> {
  try {
    const tasks = await readdir(`/proc/${pid}/task`);
    const lists = await Promise.all(tasks.map((t) => readFile(`/proc/${pid}/task/${t}/children`, "utf8").catch(() => "")));
    return lists.flatMap((l) => l.split(" ").filter(Boolean).map(Number));
  } catch {
    return [];
  }
}

/** RSS of a process and all its descendants (bwrap and prlimit put the agent below the spawned pid). */
async function rssMb(pid: number): Promise<number | null> {
  let total = 0;
  let seen = 0;
  const queue = [pid];
  while (queue.length > 0 && seen < 256) {
    const p = queue.shift()!;
    seen++;
    try {
      const status = await readFile(`/proc/${p}/status`, "utf8");
      const m = /VmRSS:\s+(\d+) kB/.exec(status);
      if (m) total += Number(m[1]) / 1024;
    } catch {
      continue;
    }
    queue.push(...(await childrenOf(p)));
  }
  return seen > 0 ? total : null;
}

/** Process groups of episodes running now; the gateway kills them all on shutdown. */
export const liveEpisodeGroups = new Set<number>();

/** Every host process group, spares included. */
const allHostGroups = new Set<number>();

/** Kill every running episode's (and spare's) process group (shutdown, drain timeout). */
export function killAllEpisodes(): void {
  for (const pid of allHostGroups) killGroup(pid);
}

function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

/** The prlimit/bwrap command line for a host process with these limits. */
function hostCommand(limits: RunLimits, spawnOpts: SpawnOptions): string[] {
  const cmd = [spawnOpts.bun, HOST];
  if (spawnOpts.bwrap) cmd.unshift(spawnOpts.bwrap, ...BWRAP_ARGS, "--");
  if (spawnOpts.prlimit) {
    const dataBytes = (limits.memoryMb + RUNTIME_DATA_MB) * 1024 * 1024;
    // RLIMIT_CPU backstop: an agent spinning after its gateway died (kill -9, no bwrap
    // --die-with-parent) would run forever; CPU time can exceed wall time only by its threads.
    const cpuSeconds = 2 * Math.ceil(limits.timeoutMs / 1000) + 2;
    cmd.unshift(spawnOpts.prlimit, `--data=${dataBytes}`, `--nofile=${limits.maxOpenFiles}`, `--cpu=${cpuSeconds}`, ...(spawnOpts.uid !== null ? [`--nproc=${limits.maxProcesses}`] : []));
  }
  return cmd;
}

/**
 * One agents/host.ts subprocess. It serves exactly one episode, then its process group is
 * killed. Messages that arrive before the episode attaches (its "ready") are kept.
 */
class HostProcess {
  readonly proc: ReturnType<typeof Bun.spawn>;
  readonly pid: number;
  stderrTail = "";
  readonly stderrDone: Promise<void>;
  private listener: ((raw: unknown) => void) | null = null;
  private early: unknown[] = [];
  readyAt: number | null = null;

  constructor(
    readonly key: string,
    cmd: string[],
    spawnOpts: SpawnOptions,
  ) {
    this.proc = Bun.spawn(cmd, {
      env: { ...CHILD_ENV },
      cwd: "/",
      detached: true,
      stdin: "ignore",
      stdout: "ignore",
      stderr: "pipe",
      serialization: "json",
      ...(spawnOpts.uid !== null ? { uid: spawnOpts.uid, gid: spawnOpts.gid ?? spawnOpts.uid } : {}),
      ipc: (raw) => {
        if ((raw as { t?: unknown })?.t === "ready" && this.readyAt === null) this.readyAt = performance.now();
        if (this.listener) this.listener(raw);
        else this.early.push(raw);
      },
    });
    this.pid = this.proc.pid;
    allHostGroups.add(this.pid);
    // Keep the last few KB of stderr: it explains crashes (e.g. "Out of memory").
    const stderr = this.proc.stderr as ReadableStream<Uint8Array>;
    this.stderrDone = (async () => {
      const reader = stderr.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read().catch(() => ({ value: undefined, done: true }));
        if (done) break;
        this.stderrTail = (this.stderrTail + dec.decode(value)).slice(-4000);
      }
    })();
  }

  /** Route messages to `fn`, replaying what arrived before. */
  attach(fn: (raw: unknown) => void): void {
    liveEpisodeGroups.add(this.pid);
    this.listener = fn;
    for (const m of this.early.splice(0)) fn(m);
  }

  send(msg: ParentMessage): void {
    this.proc.send(msg);
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Kill the whole process group and wait for the exit. */
  async kill(): Promise<void> {
    killGroup(this.pid);
    await this.proc.exited;
    liveEpisodeGroups.delete(this.pid);
    allHostGroups.delete(this.pid);
  }
}

/**
 * Warm spares: host processes started ahead of need (sandboxed, host.ts loaded, no agent
 * code, no state), so an episode does not wait for process start-up. Each still serves
 * exactly one episode: a fresh process per episode, only started earlier. Spares are keyed
 * by their limits (the prlimit command line); a request with other limits starts cold.
 */
export class SparePool {
  private spares: HostProcess[] = [];
  private stopped = false;

  constructor(
    /** How many idle spares to keep (0 = off). */
    readonly size: number,
    private readonly spawnOpts: SpawnOptions,
  ) {}

  /** A ready spare for these limits, or null; a replacement starts in the background. */
  take(limits: RunLimits): HostProcess | null {
    const key = hostCommand(limits, this.spawnOpts).join(" ");
    this.spares = this.spares.filter((h) => h.alive || (void h.kill(), false));
    const i = this.spares.findIndex((h) => h.key === key);
    const found = i >= 0 ? this.spares.splice(i, 1)[0]! : null;
    this.refill(limits, key);
    return found;
  }

  private refill(limits: RunLimits, key: string): void {
    if (this.stopped || this.size === 0) return;
    // Spares for other limits are dropped: keep the pool for what runs now.
    for (const h of this.spares.filter((x) => x.key !== key)) void h.kill();
    this.spares = this.spares.filter((x) => x.key === key);
    while (this.spares.length < this.size) {
      try {
        this.spares.push(new HostProcess(key, hostCommand(limits, this.spawnOpts), this.spawnOpts));
      } catch {
        return;
      }
    }
  }

  /** Process groups of the idle spares (each spare's pid leads its group). */
  pids(): number[] {
    return this.spares.filter((h) => h.alive).map((h) => h.pid);
  }

  /** Kill every spare (shutdown). */
  async close(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.spares.splice(0).map((h) => h.kill()));
  }
}

/** Run one episode to completion or failure. Never throws. */
export async function runEpisode(
  start: Extract<ParentMessage, { t: "start" }>,
  limits: RunLimits,
  onTool: ToolHandler,
  spawnOpts: SpawnOptions,
  pool?: SparePool,
): Promise<RunResult> {
  const began = performance.now();
  const records: EpisodeRecord[] = [];
  let outcome: RunResult | null = null;
  let settle!: () => void;
  const settled = new Promise<void>((r) => (settle = r));

  type Outcome = { ok: true; state: unknown } | { ok: false; kind: FailureKind; message: string };
  const finish = (r: Outcome): void => {
    if (outcome) return;
    outcome = { ...r, records, ms: performance.now() - began } as RunResult;
    settle();
  };

  let host: HostProcess;
  try {
    host = pool?.take(limits) ?? new HostProcess("", hostCommand(limits, spawnOpts), spawnOpts);
  } catch (err) {
    return { ok: false, kind: "crashed", message: `could not start subprocess: ${String(err)}`, records, ms: performance.now() - began };
  }
  let sent = false;
  host.attach((raw) => {
    const msg = parseChildMessage(raw, { replay: start.replay !== null });
    if (!msg) return finish({ ok: false, kind: "protocol", message: "subprocess sent a malformed message" });
    switch (msg.t) {
      case "ready":
        if (!sent) {
          sent = true;
          host.send(start);
        }
        return;
      case "records":
        records.push(...msg.records);
        if (records.length > limits.maxRecords) finish({ ok: false, kind: "flood", message: `more than ${limits.maxRecords} records` });
        return;
      case "tool":
        // The gateway, not the child, writes the tool record: the child cannot forge a result.
        void onTool(msg.call, msg.tool, msg.args)
          .catch((err: unknown) => ({ ok: false, result: { error: "failed", reason: String(err) } }))
          .then((r) => {
            if (outcome) return;
            records.push({ k: "tool", call: msg.call, tool: msg.tool, args: msg.args, ok: r.ok, result: r.result });
            host.send({ t: "tool_result", call: msg.call, ok: r.ok, result: r.result });
          });
        return;
      case "done":
        return finish({ ok: true, state: msg.state });
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
  });

  const pid = host.pid;
  const timer = setTimeout(() => finish({ ok: false, kind: "timeout", message: `episode exceeded ${limits.timeoutMs} ms` }), limits.timeoutMs);
  // One scan at a time, and a scan that took long (a big process tree: a fork bomb) waits
  // 4x its own duration before the next, so the watch never costs the gateway more than
  // ~20% of a core however many processes the agent starts (RLIMIT_DATA is the backstop).
  let rssTimer: ReturnType<typeof setTimeout> | undefined;
  const watchRss = async (): Promise<void> => {
    const scanBegan = performance.now();
    const mb = await rssMb(pid);
    if (outcome) return;
    if (mb !== null && mb > limits.memoryMb) return finish({ ok: false, kind: "oom", message: `RSS ${mb.toFixed(0)} MB exceeded memory_mb ${limits.memoryMb}` });
    rssTimer = setTimeout(() => void watchRss(), Math.max(spawnOpts.rssPollMs, 4 * (performance.now() - scanBegan)));
  };
  rssTimer = setTimeout(() => void watchRss(), spawnOpts.rssPollMs);

  void host.proc.exited.then(async (code) => {
    await Promise.race([host.stderrDone, Bun.sleep(100)]);
    const oom = /out of memory/i.test(host.stderrTail);
    const detail = host.stderrTail.trim().split("\n").slice(-6).join("\n");
    finish({
      ok: false,
      kind: oom ? "oom" : "crashed",
      message: `subprocess exited (code ${code}${host.proc.signalCode ? `, signal ${host.proc.signalCode}` : ""}) before finishing${detail ? `: ${detail}` : ""}`,
    });
  });

  await settled;
  clearTimeout(timer);
  clearTimeout(rssTimer);
  await host.kill();
  return outcome!;
}
