/**
 * The agents/host/main.ts subprocesses themselves: spawning one in its own process group with
 * the sandbox's command line and env, the warm-spare pool, the registry of live process
 * groups the gateway kills on shutdown, and the RSS scan of a process tree.
 */
import { closeSync, constants, openSync, readdirSync, readFileSync, statfsSync, statSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { encodeMessage, type ParentMessage } from "../../agents/protocol.ts";
import { LineReader, MALFORMED, type Pump, pump, TOO_DEEP } from "./channel.ts";
import {
  CHILD_ENV,
  hostCommand,
  hostRuntime,
  inGroupAt,
  type ProcessLimits,
  SPARE_GROUP_NICE,
  type SpawnOptions,
} from "./sandbox.ts";
import type { SandboxLedger } from "./leftovers.ts";
import { agentBinds, type AgentFiles, stageable } from "./sandbox-view.ts";
import { StagingRoot } from "./staging.ts";
import { hostScript } from "./host-runtime.ts";
import type { UidPool } from "./uids.ts";
import type { EpisodeCgroup } from "./memcg.ts";

/*
 * Synchronous /proc reads: each is a few microseconds of kernel work, where the promise
 * versions each took a trip through the thread pool (measured: ~1 ms of gateway CPU per scan).
 */
function readProc(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/** Children of a process: a single-threaded one (bwrap) has one list, others one per thread. */
function childrenOf(pid: number, threads: number): number[] {
  let tasks: string[] = [String(pid)];
  if (threads !== 1)
    try {
      tasks = readdirSync(`/proc/${pid}/task`);
    } catch {
      return [];
    }
  return tasks.flatMap((t) => readProc(`/proc/${pid}/task/${t}/children`).split(" ").filter(Boolean).map(Number));
}

/** The fields of /proc/<pid>/stat after the command name (state is [0]), or null when it is gone. */
function statFields(pid: number | "self"): string[] | null {
  const stat = readProc(`/proc/${pid}/stat`);
  return stat === "" ? null : stat.slice(stat.lastIndexOf(")") + 2).split(" ");
}

let pageKb: number | null = null;
/**
 * The kernel's page size in kB (4 on x86-64, 16 or 64 on some arm64 kernels): this process's
 * VmRSS over its resident pages, read once.
 */
function pageSizeKb(): number {
  if (pageKb === null) {
    const kb = Number(/VmRSS:\s+(\d+) kB/.exec(readProc("/proc/self/status"))?.[1]);
    const ratio = kb / Number(statFields("self")?.[21]);
    pageKb = Number.isFinite(ratio) && ratio > 0 ? ([4, 16, 64].find((p) => ratio < p * 2) ?? 64) : 4;
  }
  return pageKb;
}

/**
 * RSS of a process and all its descendants (bwrap and prlimit put the agent below the spawned pid),
 * every one of them: a scan that stopped after 256 let an agent hold 1.9 GB under memory_mb = 512
 * in processes started after 260 idle ones. One /proc/<pid>/stat read per process gives both its
 * resident pages and its thread count (`status` takes the kernel longer to render and us to
 * parse); the runner spaces scans of a big tree by their duration.
 */
export function rssMb(pid: number): number {
  let pages = 0;
  walkTree(pid, (_, f) => (pages += Number(f[21]) || 0));
  return (pages * pageSizeKb()) / 1024;
}

/**
 * Proportional set size of a process and all its descendants, in MB: each page counted once
 * across the processes that share it (a page mapped by n of them counts 1/n in each). The RSS
 * sum charges a shared page to every process that maps it: a thousand sleeping `sleep`s, each
 * with 1.7 MB of libc and its own binary resident, summed to 1.7 GB where they held ~0.6 GB.
 * `smaps_rollup` walks the process's page tables (~130 us for a Bun process, 8x a stat read),
 * so the runner asks for this only once the cheap RSS sum, never below it, passes the limit. A
 * process whose rollup cannot be read (Linux before 4.14) counts its whole RSS.
 */
export function pssMb(pid: number): { mb: number; processes: number } {
  let kb = 0;
  let processes = 0;
  walkTree(pid, (p, f) => {
    processes += 1;
    const pss = /^Pss:\s+(\d+) kB/m.exec(readProc(`/proc/${p}/smaps_rollup`))?.[1];
    kb += pss === undefined ? (Number(f[21]) || 0) * pageSizeKb() : Number(pss);
  });
  return { mb: kb / 1024, processes };
}

/** Calls `visit` with every live process of the tree under (and including) `pid` and its stat fields. */
function walkTree(pid: number, visit: (pid: number, stat: string[]) => void): void {
  const queue = [pid];
  for (let i = 0; i < queue.length; i++) {
    const p = queue[i]!;
    const f = statFields(p);
    if (f === null) continue;
    visit(p, f);
    for (const child of childrenOf(p, Number(f[17]) || 0)) queue.push(child);
  }
}

/**
 * Kernel memory a tmpfs file costs besides its data (its inode and dentry, ~1 KiB): what an
 * episode that creates files by the million holds though they are empty (its /tmp's size does not
 * bound their number: measured 281,000 files in 2 s).
 */
const TMPFS_INODE_BYTES = 1024;

let hostTmpDev: number | null = null;
/** statfs f_type of a tmpfs (linux/magic.h TMPFS_MAGIC). */
const TMPFS_MAGIC = 0x01021994;

/**
 * MB a bubblewrap sandbox holds in its private /tmp (a tmpfs: memory its RSS does not show), data
 * and files, read through the mount namespace of `pid`'s first child (the sandbox's init); 0 while
 * that child still sees the host's /tmp (bubblewrap is setting up), sees any /tmp that is not a
 * tmpfs (mid set-up or tear-down: once read as the host's 27 GB disk, an agent failed as oom), or
 * is gone.
 */
export function sandboxTmpMb(pid: number): number {
  const inner = childrenOf(pid, 1)[0];
  if (inner === undefined) return 0;
  const tmp = `/proc/${inner}/root/tmp`;
  try {
    hostTmpDev ??= statSync("/tmp").dev;
    if (statSync(tmp).dev === hostTmpDev) return 0;
    return tmpfsUsedMb(tmp);
  } catch {
    return 0;
  }
}

/** MB of data and files held in the tmpfs mounted at `path`; 0 when what is there is not a tmpfs. */
export function tmpfsUsedMb(path: string): number {
  const fs = statfsSync(path);
  if (fs.type !== TMPFS_MAGIC) return 0;
  return ((fs.blocks - fs.bfree) * fs.bsize + (fs.files - fs.ffree) * TMPFS_INODE_BYTES) / (1024 * 1024);
}

/** What a listener gets: a parsed line (or MALFORMED, TOO_DEEP, or an oversize marker) and its size in bytes. */
export type Listener = (raw: unknown, bytes: number) => void;

/** Key of the marker object delivered in place of a message that exceeded the cap. */
export const OVERSIZE: unique symbol = Symbol("oversize");
export { MALFORMED, TOO_DEEP };

/**
 * Bytes of stderr the gateway reads from one host process. Past them it stops reading, and the
 * episode fails as a flood: four agents writing 364 MB each took most of a core and 150 MB of
 * the gateway's memory, and slowed its acknowledgements ~8x (stdout is not read at all).
 */
export const MAX_STDERR_BYTES = 1024 * 1024;

/** Bytes of stderr kept for a failure's message (its tail explains a crash, e.g. "Out of memory"). */
const STDERR_TAIL_BYTES = 4000;

/** The last `max` bytes of `tail` followed by `chunk`. */
function lastBytes(tail: Uint8Array, chunk: Uint8Array, max: number): Uint8Array {
  if (chunk.length >= max) return chunk.slice(chunk.length - max);
  const keep = tail.subarray(Math.max(0, tail.length + chunk.length - max));
  const out = new Uint8Array(keep.length + chunk.length);
  out.set(keep);
  out.set(chunk, keep.length);
  return out;
}

/**
 * The host process groups of one owner (a gateway, a replay, a test): which serve an
 * episode now, and every one started (spares included), so shutdown can kill them all.
 */
export class ProcessTable {
  private readonly episodes = new Set<number>();
  private readonly all = new Set<number>();

  /** A host process group was started. */
  started(pid: number): void {
    this.all.add(pid);
  }

  /** It serves an episode now. */
  attached(pid: number): void {
    this.episodes.add(pid);
  }

  /** It was killed and has exited. */
  ended(pid: number): void {
    this.episodes.delete(pid);
    this.all.delete(pid);
  }

  /** Episode process groups alive now. */
  get running(): number {
    return this.episodes.size;
  }

  /** Process group ids of the episodes alive now. */
  episodePids(): number[] {
    return [...this.episodes];
  }

  /** Kill every episode's (and spare's) process group (shutdown, drain timeout). */
  killAll(): void {
    for (const pid of this.all) killGroup(pid);
  }
}

/** Set the nice of a process's scheduling autogroup (its session's); a process already gone is left. */
export function setAutogroup(pid: number, nice: number): void {
  let fd: number | null = null;
  try {
    // Opened to write only: no create, no truncate (writeFileSync's two more system calls, twice an episode).
    fd = openSync(`/proc/${pid}/autogroup`, constants.O_WRONLY);
    writeSync(fd, String(nice));
  } catch {
    // exited already, or /proc is read-only here: it runs at its group's default
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/** SIGKILL a process group, or the lone process if it has no group of its own. */
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

/**
 * One agents/host/main.ts subprocess. It serves exactly one episode, then its process group is
 * killed. Messages that arrive before the episode attaches (its "ready") are kept.
 */
export class HostProcess {
  readonly proc: ReturnType<typeof Bun.spawn>;
  readonly pid: number;
  /** The last bytes it wrote to stderr. */
  private stderrLast: Uint8Array = new Uint8Array(0);
  /** Whether it wrote more than MAX_STDERR_BYTES to stderr (reading stopped there). */
  stderrFlooded = false;
  /** Told once when it does (the runner fails its episode). */
  onStderrFlood: (() => void) | null = null;
  readonly stderrDone: Promise<void>;
  private listener: Listener | null = null;
  private early: [unknown, number][] = [];
  /** Largest message accepted from the child, in bytes (set per episode by `attach`; a spare only says "ready"). */
  private maxMessageBytes = 64 * 1024;
  readyAt: number | null = null;
  private readonly ledger: SandboxLedger | null;
  /** The uid it runs as, from the pool it goes back to once the process has exited (null: the gateway's). */
  readonly uid: number | null;
  private readonly uids: UidPool | null;
  private uidGiven = false;
  /** Our end of the child's channel. */
  private readonly channel: Pump;
  /** Its episode's memory cgroup (null where the gateway makes none). */
  readonly cgroup: EpisodeCgroup | null;

  constructor(
    readonly key: string,
    cmd: string[],
    spawnOpts: SpawnOptions,
    /** The owner's table of live process groups. */
    private readonly procs: ProcessTable,
    /** Its episode's memory_mb: the limit of its memory cgroup, where the gateway makes them. */
    memoryMb: number,
    /** A warm spare's staging root (bubblewrap): the agent's files are moved in by `prepare`. */
    private readonly root: StagingRoot | null = null,
  ) {
    this.uids = spawnOpts.uids;
    this.uid = this.uids?.take() ?? null;
    // Its memory cgroup, whose cgroup.procs it gets open on CGROUP_PROCS_FD to join (JOIN_CGROUP_ARG).
    this.cgroup = spawnOpts.memcg?.enter(memoryMb * 1024 * 1024) ?? null;
    let procsFd: number | null = null;
    try {
      if (spawnOpts.memcg) {
        if (this.cgroup === null) throw new Error("its memory cgroup could not be made");
        // The cgroup's own descriptor, kept open across its episodes: the child gets a copy.
        procsFd = this.cgroup.joinFile();
      }
      this.proc = Bun.spawn(cmd, {
        env: { ...CHILD_ENV },
        cwd: "/",
        detached: true,
        // stdin: gateway -> child; fd 3: child -> gateway (CHILD_CHANNEL_FD), both one JSON message per line.
        // stdout is not read: an agent's console.log must not be able to speak the protocol.
        stdio: procsFd === null ? ["pipe", "ignore", "pipe", "pipe"] : ["pipe", "ignore", "pipe", "pipe", procsFd],
        ...(this.uid !== null ? { uid: this.uid, gid: this.uid } : {}),
      });
    } catch (err) {
      this.giveUid();
      this.cgroup?.end();
      throw err;
    }
    this.pid = this.proc.pid;
    if (spawnOpts.autogroup != null) setAutogroup(this.pid, spawnOpts.autogroup);
    this.ledger = spawnOpts.ledger ?? null;
    this.ledger?.add(this.pid);
    const deliver = (raw: unknown, bytes: number): void => {
      if ((raw as { t?: unknown })?.t === "ready" && this.readyAt === null) this.readyAt = performance.now();
      if (this.listener) this.listener(raw, bytes);
      else this.early.push([raw, bytes]);
    };
    const reader = new LineReader(() => this.maxMessageBytes, {
      message: deliver,
      oversize: (bytes, cap, kind) => deliver({ [OVERSIZE]: true, bytes, cap, kind }, bytes),
    });
    this.channel = pump(this.proc.stdio[3] as unknown as number, reader);
    procs.started(this.pid);
    // Keep the last few KB of stderr (bytes, decoded only when asked for), up to MAX_STDERR_BYTES.
    const stderr = this.proc.stderr as ReadableStream<Uint8Array>;
    this.stderrDone = (async () => {
      const reader = stderr.getReader();
      let read = 0;
      for (;;) {
        const { value, done } = await reader.read().catch(() => ({ value: undefined, done: true }));
        if (done || value === undefined) break;
        this.stderrLast = lastBytes(this.stderrLast, value, STDERR_TAIL_BYTES);
        read += value.length;
        if (read > MAX_STDERR_BYTES) {
          this.stderrFlooded = true;
          this.onStderrFlood?.();
          await reader.cancel().catch(() => undefined);
          break;
        }
      }
    })();
  }

  /** The last few KB it wrote to stderr, as text. */
  get stderrTail(): string {
    return new TextDecoder().decode(this.stderrLast);
  }

  /** A host process started cold (no spare) for an agent whose files are mounted directly. */
  static start(
    limits: ProcessLimits,
    spawnOpts: SpawnOptions,
    files: AgentFiles | null,
    procs: ProcessTable,
  ): HostProcess {
    const cmd = hostCommand(limits, spawnOpts, { binds: files ? agentBinds(files) : [] });
    return new HostProcess("", cmd, spawnOpts, procs, limits.memoryMb);
  }

  /**
   * A warm spare: under bubblewrap its root is a staging directory, holding the files of
   * `expect` (the agent the pool expects it to serve) or nothing until `prepare`.
   */
  static spare(
    key: string,
    limits: ProcessLimits,
    spawnOpts: SpawnOptions,
    procs: ProcessTable,
    expect: AgentFiles | null = null,
  ): HostProcess {
    const files = spawnOpts.bwrap && expect !== null && stageable(expect) ? expect : null;
    // Looked up once per spare: it checks that the built runtime's files are still there.
    const script = hostScript(spawnOpts.bun);
    const root = spawnOpts.bwrap ? StagingRoot.for(hostRuntime(spawnOpts, script), files) : null;
    if (root) spawnOpts.ledger?.addRoot(dirname(root.dir));
    try {
      if (root && files) root.stage(files);
    } catch {
      // shown at `prepare` then, or the episode fails there as infra
    }
    try {
      const cmd = hostCommand(limits, spawnOpts, root ? { root } : {}, script);
      // It starts up in a group that yields to running episodes' (SPARE_GROUP_NICE); `SparePool.claim` raises it.
      return new HostProcess(key, cmd, inGroupAt(spawnOpts, SPARE_GROUP_NICE), procs, limits.memoryMb, root);
    } catch (err) {
      root?.remove();
      throw err;
    }
  }

  /** Show the agent's files inside a spare's sandbox (a cold process already mounts them). */
  prepare(files: AgentFiles | null): void {
    if (this.root && files) this.root.stage(files);
  }

  /** Whether a spare's root holds these files already. */
  holds(files: AgentFiles | null): boolean {
    return files !== null && (this.root?.holds(files) ?? false);
  }

  /**
   * Route messages to `fn`, replaying what arrived before. `fn` gets each message's size; a
   * message past `maxMessageBytes` is never buffered whole: `fn` gets an `oversize` marker instead.
   */
  attach(fn: Listener, maxMessageBytes: number): void {
    this.procs.attached(this.pid);
    this.maxMessageBytes = maxMessageBytes;
    this.listener = fn;
    for (const [m, bytes] of this.early.splice(0)) fn(m, bytes);
  }

  /** Send one message to the child (a child that is gone is reported by its exit, not here). */
  send(msg: ParentMessage): void {
    const stdin = this.proc.stdin as import("bun").FileSink;
    try {
      stdin.write(encodeMessage(msg));
      void Promise.resolve(stdin.flush()).catch(() => undefined);
    } catch {
      // EPIPE: the child died; its exit ends the episode
    }
  }

  /** Neither exited nor killed by a signal yet. */
  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Kill the whole process group and wait for the exit. */
  async kill(): Promise<void> {
    killGroup(this.pid);
    await this.proc.exited;
    this.channel.stop();
    await this.channel.done;
    void Promise.resolve((this.proc.stdin as import("bun").FileSink).end()).catch(() => undefined);
    this.cgroup?.end();
    this.root?.recycle();
    this.ledger?.remove(this.pid);
    this.procs.ended(this.pid);
    this.giveUid();
  }

  /** Once, when the process is gone (`kill` may be called again). */
  private giveUid(): void {
    if (this.uid !== null && !this.uidGiven) this.uids?.give(this.uid);
    this.uidGiven = true;
  }
}

/**
 * Warm spares: host processes started ahead of need (sandboxed, host.ts loaded, no agent
 * code, no state), so an episode does not wait for process start-up. Each still serves
 * exactly one episode: a fresh process per episode, only started earlier. Spares are keyed
 * by their limits (the prlimit command line); a request with other limits starts cold.
 *
 * A spare does not import the agent's module ahead of its start (issue 13's "spares warmed per
 * agent type"): what that would take off an episode's path is the module's load, 1.0-1.4 ms of CPU
 * for the policy bench's agent and 1.6-1.9 ms for temp-monitor in a fresh runtime that has the SDK
 * already, while a spare that ran one type's code could serve no other type's agents (they would
 * start cold, or wait for another spare).
 */
export class SparePool {
  private spares: HostProcess[] = [];
  private stopped = false;
  /** When each key (limits) was last taken, oldest first. */
  private readonly taken = new Map<string, number>();
  private takes = 0;
  private readonly keys = new Map<string, string>();

  constructor(
    /** How many idle spares to keep (0 = off). */
    readonly size: number,
    private readonly spawnOpts: SpawnOptions,
    /** The owner's process table; spares are registered in it when they start. */
    readonly procs: ProcessTable,
  ) {}

  /**
   * A ready spare for these limits, or null; a replacement starts in the background. An agent
   * whose files a staging root cannot show (under /tmp, hidden by the private tmpfs) starts cold.
   */
  take(limits: ProcessLimits, files: AgentFiles | null = null): HostProcess | null {
    const { spare, refill } = this.claim(limits, files);
    refill();
    return spare;
  }

  /**
   * `take` in two steps: the spare (or null) now, its replacement when the caller calls `refill`
   * (the runner does once the episode's start is sent: a replacement's spawn is not on its path).
   */
  claim(
    limits: ProcessLimits,
    files: AgentFiles | null = null,
    /** The nice its scheduling group takes now (where episodes get groups); the pool's by default. */
    groupNice: number | null | undefined = this.spawnOpts.autogroup,
  ): { spare: HostProcess | null; refill: () => void } {
    const key = this.keyOf(limits);
    for (const dead of this.spares.filter((h) => !h.alive)) void dead.kill();
    this.spares = this.spares.filter((h) => h.alive);
    // One that has said "ready" first: a spare still starting up (the replacement of the last one taken,
    // slowed by the load that took it) can keep an episode waiting for tens of ms, while moving the
    // agent's files into a ready one's root is a rename. Among those alike, one holding the files.
    let i = -1;
    let best = -1;
    for (let j = 0; j < this.spares.length; j++) {
      const h = this.spares[j]!;
      if (h.key !== key) continue;
      const rank = (h.readyAt !== null ? 2 : 0) + (h.holds(files) ? 1 : 0);
      if (rank > best) [i, best] = [j, rank];
    }
    const usable = i >= 0 && (files === null || !this.spawnOpts.bwrap || stageable(files));
    const spare = usable ? this.spares.splice(i, 1)[0]! : null;
    if (spare && groupNice != null) setAutogroup(spare.pid, groupNice);
    let done = false;
    const refill = () => {
      if (done) return;
      done = true;
      this.refill(limits, key, files);
    };
    return { spare, refill };
  }

  /** Spares are keyed by their command line, computed once per set of limits. */
  private keyOf(limits: ProcessLimits): string {
    const id = `${limits.timeoutMs}/${limits.memoryMb}/${limits.maxOpenFiles}/${limits.maxProcesses}`;
    let key = this.keys.get(id);
    if (key === undefined) this.keys.set(id, (key = hostCommand(limits, this.spawnOpts).join(" ")));
    return key;
  }

  /** Start spares for these limits up to the pool's size, expecting the agent whose `files` took one. */
  private refill(limits: ProcessLimits, key: string, files: AgentFiles | null): void {
    if (this.stopped || this.size === 0) return;
    this.taken.delete(key);
    this.taken.set(key, ++this.takes);
    while (this.spares.filter((x) => x.key === key).length < this.size) {
      try {
        this.spares.push(HostProcess.spare(key, limits, this.spawnOpts, this.procs, files));
      } catch {
        break;
      }
    }
    // Spares for other limits (other types' budgets) stay while the pool holds at most twice its
    // size: types taking turns each find theirs. Beyond that the least recently taken go first.
    // (Killing every other key's spares on each take made two alternating types spawn 3 processes
    // per episode.)
    const byAge = [...this.taken.keys()];
    while (this.spares.length > 2 * this.size && byAge.length > 1) {
      const oldest = byAge.shift()!;
      if (oldest === key) continue;
      for (const h of this.spares.filter((x) => x.key === oldest)) void h.kill();
      this.spares = this.spares.filter((x) => x.key !== oldest);
      this.taken.delete(oldest);
    }
  }

  /** Process groups of the idle spares (each spare's pid leads its group). */
  pids(): number[] {
    return this.spares.filter((h) => h.alive).map((h) => h.pid);
  }

  /** The idle spares, oldest first: whether each has said "ready", and whether it holds `files`. */
  idle(files: AgentFiles | null = null): { pid: number; ready: boolean; holds: boolean }[] {
    return this.spares
      .filter((h) => h.alive)
      .map((h) => ({ pid: h.pid, ready: h.readyAt !== null, holds: h.holds(files) }));
  }

  /** Kill every spare (shutdown). */
  async close(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.spares.splice(0).map((h) => h.kill()));
  }
}
