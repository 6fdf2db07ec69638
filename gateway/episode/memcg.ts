/**
 * A memory cgroup for each episode, where the gateway may make them (root, cgroup v1's memory
 * controller): the limit `memory_mb` then covers what no process's RSS shows. An agent that
 * writes into a memfd without mapping it, or into SysV shared memory, holds memory the RSS watch
 * cannot see (measured: a 300 MB memfd beside an RSS of 9 MB); the kernel charges those pages to
 * the cgroup of the process that wrote them, and stops it at the limit.
 *
 * The episode's host process joins its cgroup as it starts, before it says it is ready: the gateway
 * passes it the cgroup's `cgroup.procs` open for writing (agents/protocol.ts `JOIN_CGROUP_ARG`), so
 * the kernel's cgroup migration (~0.2 ms of CPU and ~7 ms of waiting for an RCU grace period,
 * measured) is the child's, not the gateway's thread. The runtime's own start-up stays charged
 * where the gateway is; everything after, the agent's code and all it starts, is charged to the
 * episode. At the limit the kernel's OOM killer kills a process of the cgroup; the runner reads the
 * cgroup's kill count and ends the episode as `oom`. When the episode ends its remaining processes
 * are killed, and the empty cgroup serves a later episode.
 *
 * Each gateway makes its cgroups under a folder of its own, `fleet-<pid>.<start time>`, in its own
 * memory cgroup; folders of gateways no longer running (a kill -9) are emptied and removed at start.
 */
import {
  closeSync,
  constants,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmdirSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { startTicks } from "./leftovers.ts";

/** The memory controller's v1 mount. */
const V1_ROOT = "/sys/fs/cgroup/memory";

/** This process's episode cgroups once looked for (`MemoryCgroups.open`); null: none can be made here. */
let opened: MemoryCgroups | null | undefined;

/** The episode cgroups of one gateway. */
export class MemoryCgroups {
  private next = 0;
  /**
   * Cgroups of ended episodes, empty, for the next ones: making and removing one costs the
   * gateway ~0.1 ms of CPU, reusing one a write of its limit when that changed.
   */
  private readonly free: EpisodeCgroup[] = [];

  private constructor(
    /** This gateway's folder of episode cgroups. */
    readonly dir: string,
  ) {}

  /**
   * This process's folder of episode cgroups, made now (and those of gateways no longer running
   * removed), or null where it cannot make cgroups: not root, no v1 memory controller mounted,
   * or a cgroup file system it may not write.
   */
  static open(): MemoryCgroups | null {
    if (opened === undefined) opened = MemoryCgroups.make();
    return opened;
  }

  private static make(): MemoryCgroups | null {
    if (process.getuid?.() !== 0) return null;
    const own = ownCgroup();
    if (own === null) return null;
    const base = join(V1_ROOT, own);
    if (!existsSync(join(base, "cgroup.procs"))) return null;
    try {
      sweepCgroups(base);
      const dir = join(base, `fleet-${process.pid}.${startTicks(process.pid) ?? 0}`);
      mkdirSync(dir, { recursive: true });
      const made = new MemoryCgroups(dir);
      // One made and limited: a file system that takes the folder but not the rest is no use.
      const probe = made.enter(1024 * 1024);
      if (probe === null) return null;
      probe.end();
      process.once("exit", () => removeAll(dir));
      return made;
    } catch {
      return null;
    }
  }

  /** An empty cgroup limited to `limitBytes` for an episode (reused, or made now), or null when it could not be. */
  enter(limitBytes: number): EpisodeCgroup | null {
    let cg = this.free.pop();
    if (cg === undefined) {
      const dir = join(this.dir, `e${this.next++}`);
      try {
        mkdirSync(dir);
      } catch {
        return null;
      }
      cg = new EpisodeCgroup(dir, this);
    }
    if (!cg.begin(limitBytes)) {
      cg.remove();
      return null;
    }
    return cg;
  }

  /**
   * An ended episode's cgroup, emptied: kept for the next episode when nothing is left in it,
   * else removed (memory still charged to it, such as a SysV segment a sandbox without an ipc
   * namespace left, must not count against the next episode).
   */
  reuse(cg: EpisodeCgroup): void {
    if (this.free.length < KEEP_FREE && cg.chargedBytes() <= REUSE_BELOW_BYTES) this.free.push(cg);
    else cg.remove();
  }
}

/** Empty cgroups kept for reuse, at most. */
const KEEP_FREE = 32;
/** An ended episode's cgroup is reused while at most this much stays charged to it (cached file pages). */
const REUSE_BELOW_BYTES = 8 * 1024 * 1024;

/** One episode's memory cgroup. */
export class EpisodeCgroup {
  private limitBytes = -1;
  /** The cgroup's kill count when the episode entered it (a reused cgroup counts on). */
  private killsBefore = 0;
  private ended = false;
  /**
   * Its files read or written on every episode, kept open while it lives: opening a cgroup file costs
   * more than reading it. memory.oom_control and memory.usage_in_bytes are read from offset 0, where the
   * kernel makes their text anew (not so cgroup.procs for reading: v1 keeps a pid list read from it for
   * a second, so its reads open it afresh); cgroup.procs is open for writing, for the episode to join.
   */
  private readonly files = new Map<string, number>();

  constructor(
    readonly dir: string,
    private readonly owner: MemoryCgroups,
  ) {}

  /**
   * Ready it for an episode limited to `limitBytes`, of memory and of memory plus swap (where the
   * kernel accounts swap: else an episode past its limit would be swapped out, not stopped); false
   * when the limit could not be set. The kernel wants memory+swap >= memory at every step, so a
   * lower limit is written memory first, a higher one memory+swap first.
   */
  begin(limitBytes: number): boolean {
    this.ended = false;
    this.killsBefore = this.oomKillCount();
    if (limitBytes === this.limitBytes) return true;
    const files = ["memory.limit_in_bytes", ...(swapAccounted(this.dir) ? ["memory.memsw.limit_in_bytes"] : [])];
    // A fresh cgroup has no limit (-1 here): any limit lowers it.
    if (this.limitBytes >= 0 && limitBytes > this.limitBytes) files.reverse();
    try {
      for (const f of files) writeFileSync(join(this.dir, f), String(limitBytes));
      this.limitBytes = limitBytes;
      return true;
    } catch {
      return false;
    }
  }

  /** Move a process into it (episodes join by themselves: JOIN_CGROUP_ARG); false when it is gone. */
  add(pid: number): boolean {
    try {
      writeFileSync(join(this.dir, "cgroup.procs"), String(pid));
      return true;
    } catch {
      return false;
    }
  }

  /** How many of the episode's processes the kernel killed at the limit. */
  oomKills(): number {
    return this.oomKillCount() - this.killsBefore;
  }

  /** Its cgroup.procs, open for writing: an episode's host process joins by writing its pid there. */
  joinFile(): number {
    return this.file("cgroup.procs", constants.O_WRONLY);
  }

  /** Bytes charged to it now (Infinity when it cannot be read). */
  chargedBytes(): number {
    try {
      return Number(this.read("memory.usage_in_bytes"));
    } catch {
      return Number.POSITIVE_INFINITY;
    }
  }

  /** `oom_kill` of its memory.oom_control (Linux 4.13+; 0 before, or when the cgroup is gone). */
  private oomKillCount(): number {
    try {
      return Number(/^oom_kill (\d+)$/m.exec(this.read("memory.oom_control"))?.[1] ?? 0);
    } catch {
      return 0;
    }
  }

  /** One of its files, opened once. */
  private file(name: string, flags: number): number {
    let fd = this.files.get(name);
    if (fd === undefined) this.files.set(name, (fd = openSync(join(this.dir, name), flags)));
    return fd;
  }

  /** A file's text now, read from offset 0 of the descriptor kept open. */
  private read(name: string): string {
    const n = readSync(this.file(name, constants.O_RDONLY), text, 0, text.length, 0);
    return text.toString("latin1", 0, n);
  }

  /** Remove it for good: its processes killed, its files closed, the folder removed (later, while one holds it). */
  remove(): void {
    for (const fd of this.files.values())
      try {
        closeSync(fd);
      } catch {
        // closed already
      }
    this.files.clear();
    removeCgroup(this.dir);
  }

  /**
   * The episode ended: kill what is still in it, and once it is empty give it back for the next
   * episode. A process killed holds it until its parent reaps it: the sandbox's own init within
   * milliseconds, but init for one that left the episode's group, which may take a second. So it is
   * looked at after 10 ms, then again after twice as long each time up to 5 s, then removed (when it can
   * be: else the gateway's exit or the next start's sweep does). Once per episode.
   */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    // Its process group was killed just now: look once they have had time to go.
    setTimeout(() => this.emptied(20), 10).unref();
  }

  private emptied(waitMs: number): void {
    if (killAllIn(this.dir) === 0) this.owner.reuse(this);
    else if (waitMs <= 5000) setTimeout(() => this.emptied(waitMs * 2), waitMs).unref();
    else this.remove();
  }
}

/** Kill what is in a cgroup and remove it, trying again later while a killed process holds it. */
function removeCgroup(dir: string, waitMs = 250): void {
  killAllIn(dir);
  if (!tryRmdir(dir) && waitMs <= 4000) setTimeout(() => removeCgroup(dir, waitMs * 2), waitMs).unref();
}

let swapFile: boolean | null = null;
/** Whether the kernel accounts swap per cgroup (memory.memsw.*: swapaccount=1), looked up once. */
function swapAccounted(dir: string): boolean {
  swapFile ??= existsSync(join(dir, "memory.memsw.limit_in_bytes"));
  return swapFile;
}

/** What one read of a cgroup's memory.oom_control or memory.usage_in_bytes fills (under 100 bytes). */
const text = Buffer.alloc(256);

/** This process's path in the v1 memory hierarchy (`/proc/self/cgroup`), or null. */
function ownCgroup(): string | null {
  try {
    const line = readFileSync("/proc/self/cgroup", "latin1")
      .split("\n")
      .find((l) => l.split(":")[1]?.split(",").includes("memory"));
    return line?.slice(line.indexOf(":", line.indexOf(":") + 1) + 1) ?? null;
  } catch {
    return null;
  }
}

/** SIGKILL every process in a cgroup; how many it held (0 also when it is gone). */
function killAllIn(dir: string): number {
  let procs: string[] = [];
  try {
    procs = readFileSync(join(dir, "cgroup.procs"), "latin1").split("\n").filter(Boolean);
  } catch {
    return 0;
  }
  for (const pid of procs)
    try {
      process.kill(Number(pid), "SIGKILL");
    } catch {
      // gone already
    }
  return procs.length;
}

/** Whether `dir` is gone now (removed, or was not there). */
function tryRmdir(dir: string): boolean {
  try {
    rmdirSync(dir);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === "ENOENT";
  }
}

/** Empty and remove a gateway's folder of episode cgroups (later, while killed processes hold them). */
function removeAll(dir: string, waitMs = 250): void {
  let children: string[] = [];
  try {
    children = readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return;
  }
  for (const c of children) {
    killAllIn(join(dir, c));
    tryRmdir(join(dir, c));
  }
  if (!tryRmdir(dir) && waitMs <= 4000) setTimeout(() => removeAll(dir, waitMs * 2), waitMs).unref();
}

/**
 * Remove the folders of episode cgroups of gateways no longer running (`fleet-<pid>.<start time>`
 * under `base` whose process is gone, or whose pid another process has now: a kill -9), killing
 * what is left in them; how many there were. A folder named by pid alone (gateways before the start
 * time was added) goes when that pid is gone.
 */
export function sweepCgroups(base: string): number {
  let n = 0;
  for (const e of readdirSync(base, { withFileTypes: true })) {
    const m = /^fleet-(\d+)(?:\.(\d+))?$/.exec(e.name);
    if (!e.isDirectory() || !m) continue;
    const pid = Number(m[1]);
    if (m[2] === undefined ? processAlive(pid) : startTicks(pid) === m[2]) continue;
    removeAll(join(base, e.name));
    n++;
  }
  return n;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === "EPERM";
  }
}
