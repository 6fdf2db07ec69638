/**
 * How an agent subprocess is isolated: the sandbox mode probed on this machine, the only
 * environment the child gets, and the prlimit/bubblewrap command line that wraps it.
 * Pure of process state except the one-time probes (bubblewrap, chrt, autogroups); spawning
 * lives in ./host-process.ts.
 */
import { existsSync, readFileSync, realpathSync, statSync, writeFileSync } from "node:fs";
import { release } from "node:os";
import { HOST_ENTRY, HOST_MODULES, HOST_PATHS } from "../../agents/host/index.ts";
import { JOIN_CGROUP_ARG, NICE_ARG } from "../../agents/protocol.ts";
import { bytecodeOf, hostScript } from "./host-runtime.ts";
import type { SandboxLedger } from "./leftovers.ts";
import { type AgentFiles, agentFiles, bindArgs, runtimeBinds, type Bind } from "./sandbox-view.ts";
import type { StagingRoot } from "./staging.ts";
import { DEFAULT_SANDBOX_UIDS, type UidRange } from "../spec/index.ts";
import { UidPool } from "./uids.ts";
import { MemoryCgroups } from "./memcg.ts";

/** How subprocesses are started; injected so tests and benches can vary it. */
export interface SpawnOptions {
  /** Path of the bun executable (defaults to the running one). */
  readonly bun: string;
  /**
   * Run each child as a uid (and gid) of its own from this pool (root only); null keeps the
   * gateway's. One pool per gateway: copies of these options share it.
   */
  readonly uids: UidPool | null;
  /** Wrap with prlimit for RLIMIT_DATA/NOFILE/NPROC when available. */
  readonly prlimit: string | null;
  /** Run inside bubblewrap (own pid/net/ipc namespaces, read-only root) when set. */
  readonly bwrap: string | null;
  /**
   * Set RLIMIT_NPROC inside the sandbox (prlimit after bubblewrap's `--`), where the kernel counts
   * it in the sandbox's own user namespace: bubblewrap not run as root (`nprocPerNamespace`). Where
   * episodes run as a uid each (`uids`), it is set outside, and counts per uid.
   */
  readonly nprocInside?: boolean;
  /** Start the episode's process tree at this nice value through the `nice` binary (null: as the gateway). */
  readonly nice?: { readonly bin: string; readonly value: number } | null;
  /**
   * Start it under SCHED_IDLE through `chrt` instead (below every nice value: it runs only on
   * CPU time nothing else wants); set for a flooded agent's episodes (`idleSpawnOptions`).
   */
  readonly idle?: { readonly bin: string } | null;
  /**
   * The nice value of the episode's scheduling autogroup, written to /proc/<pid>/autogroup once it
   * is spawned; null where the kernel makes none (see `autogroupNice`).
   */
  readonly autogroup?: number | null;
  /** How often the RSS watch samples, ms. */
  readonly rssPollMs: number;
  /**
   * A memory cgroup per episode, limited to `memory_mb` (./memcg.ts: root, cgroup v1), so memory
   * no RSS shows (memfd, shared memory) counts too; null: the RSS watch alone.
   */
  readonly memcg?: MemoryCgroups | null;
  /** Where started host process groups and staging roots are noted, so the next start reaps leftovers. */
  readonly ledger?: SandboxLedger;
}

/** Isolation modes of `[fleet] sandbox`. */
export type SandboxMode = "auto" | "bwrap" | "uid" | "none";

/** The OS-level limits of one subprocess (a subset of the runner's `RunLimits`). */
export interface ProcessLimits {
  readonly timeoutMs: number;
  readonly memoryMb: number;
  readonly maxOpenFiles: number;
  readonly maxProcesses: number;
}

/**
 * Bubblewrap flags besides the file system: own pid/net/ipc/uts namespaces, and the sandbox
 * dies with the gateway (no idle bwrap left behind when the gateway is killed with -9).
 */
export const BWRAP_ARGS: readonly string[] = Object.freeze([
  "--unshare-pid",
  "--unshare-net",
  "--unshare-ipc",
  "--unshare-uts",
  "--die-with-parent",
  "--chdir",
  "/",
]);

/**
 * The file system every sandbox gets besides its binds: a fresh /dev, its own /proc, a private
 * tmpfs /tmp, of `tmpBytes` when given (`--size`: bubblewrap 0.7 and later, not in setuid mode).
 */
function fsArgs(tmpBytes: number | null = null): string[] {
  const size = tmpBytes === null ? [] : ["--size", String(tmpBytes)];
  return ["--dev", "/dev", "--proc", "/proc", ...size, "--tmpfs", "/tmp"];
}

/**
 * After every mount, bubblewrap's own root and /dev are made read-only: both are tmpfs, whose
 * files are memory that neither `memory_mb`'s RSS watch nor any rlimit counts (an episode wrote
 * 300 MB to each of /, /usr, /dev and /dev/shm with memory_mb = 128). /tmp stays writable, sized.
 */
const BWRAP_READ_ONLY: readonly string[] = Object.freeze(["--remount-ro", "/dev", "--remount-ro", "/"]);

/**
 * No user namespace can be made inside the sandbox (bubblewrap 0.8 and later; `--disable-userns`
 * needs a user namespace of the sandbox's own). In a nested user and mount namespace an agent could
 * mount a tmpfs of any size: memory neither the RSS watch, its /tmp's size nor an rlimit counts (an
 * episode held 1.5 GB that way with memory_mb = 512 where no memory cgroup ran).
 */
const BWRAP_NO_USERNS: readonly string[] = Object.freeze(["--unshare-user", "--disable-userns"]);

let noUsernsWorks: boolean | null = null;
/** Whether this bubblewrap refuses user namespaces inside (probed once, as the uid episodes run as). */
function probeNoUserns(bwrap: string, uid: number | null): boolean {
  noUsernsWorks ??= bwrapRuns(bwrap, [...fsArgs(), ...BWRAP_NO_USERNS], uid);
  return noUsernsWorks;
}

/** How big the sandbox's /tmp may grow, for the start-up log. */
function tmpSize(bwrap: string, uid: number | null): string {
  return probeTmpfsSize(bwrap, uid) ? "of memory_mb" : "NOT size-limited (this bubblewrap cannot size a tmpfs)";
}

/**
 * MB of RLIMIT_DATA granted above `memory_mb`. Bun itself maps a few hundred MB of private
 * memory at start; RLIMIT_DATA below that aborts the runtime (measured: 268 MB aborts,
 * 300 MB starts), so the hard backstop sits above the budget and the RSS watch enforces
 * the budget itself.
 */
export const RUNTIME_DATA_MB = 384;

/**
 * RLIMIT_DATA for an episode of `memoryMb`: RUNTIME_DATA_MB above it, rounded up to 256 MB. Bun
 * 1.4.5 aborts at start under some limits just past a GB (measured on 2 cores: every limit from
 * ~1030 to 1159 MB and from ~2050 to 2199 MB aborts, so memory_mb = 768 could run nothing); every
 * multiple of 256 MB measured, up to 16.5 GB, starts.
 */
export function dataLimitMb(memoryMb: number): number {
  return Math.ceil((memoryMb + RUNTIME_DATA_MB) / 256) * 256;
}

/**
 * Devices first: episode processes run at nice 19 (and, where the kernel has autogroups, in a
 * group at EPISODE_GROUP_NICE: `autogroupNice`), so when episodes saturate the cores the gateway
 * gets the CPU the moment a packet arrives, to acknowledge stimuli (durable and cheap) while
 * episode work lags. On an idle machine it changes nothing.
 */
export const EPISODE_NICE = 19;

/**
 * The nice of an episode's own scheduling group, where sessions are groups. Not 19: a group at 19
 * weighs 15 against a nice-0 group's 1024, so a little nice-0 work elsewhere on the box starved a
 * healthy agent's episode into its timeout while another agent's fork bomb ran (test/e2e.policy's
 * isolation tests failed 4 runs of 5 at 19, none of 7 at 10). Not 10 either (weight 110): while a
 * device's burst kept the gateway's thread busy, a quiet agent's episode got a tenth of a core and
 * its first pings of the flood took 40-100 ms to answer instead of 10 (bench policy's p99 under a
 * flood: 4.5x, 3.0x, 1.25x at 10; 0.99x, 1.38x at 5). At 5 (weight 335) an episode still yields three
 * to one to the gateway, and a flooded agent's group (FLOODED_GROUP_NICE) yields 22 to one to it.
 * At 0 the same p99 was 3.77x, 1.82x, 1.50x against 3.34x, 2.41x, 1.72x at 5 (alternating runs of
 * `bench-policy --flood`): no better than the spread between runs, so 5 stays.
 */
export const EPISODE_GROUP_NICE = 5;

function which(names: readonly string[]): string | null {
  return names.find((p) => Bun.file(p).size > 0) ?? null;
}

/** Whether bubblewrap runs `/bin/true` with these file-system arguments, the runtime's binds and BWRAP_ARGS. */
function bwrapRuns(bwrap: string, fs: readonly string[], uid: number | null = null): boolean {
  const binds = bindArgs(runtimeBinds(process.execPath, HOST_PATHS));
  const r = Bun.spawnSync([bwrap, ...fs, ...binds, ...BWRAP_READ_ONLY, ...BWRAP_ARGS, "--", "/bin/true"], {
    env: {},
    cwd: "/",
    stdout: "ignore",
    stderr: "ignore",
    ...(uid !== null ? { uid, gid: uid } : {}),
  });
  return r.exitCode === 0;
}

let bwrapWorks: boolean | null = null;
/** Whether bubblewrap can create the namespaces we ask for here (probed once). */
function probeBwrap(bwrap: string): boolean {
  bwrapWorks ??= bwrapRuns(bwrap, fsArgs());
  return bwrapWorks;
}

/**
 * Where the kernel schedules by session (autogroups: `/proc/sys/kernel/sched_autogroup_enabled`
 * = 1, for processes in the root cpu cgroup), an episode's own session (its `setsid`, for the
 * process-group kill) is a scheduling group of its own, and CFS shares the CPU between groups
 * by the group's nice, not its tasks': a nice 19 or SCHED_IDLE process alone in its group
 * weighs as much as the whole gateway (measured: two such spinners took a third of a nice-0
 * process's core; at group nice 19, 7%). So the group's nice is set to `value` once the
 * episode is spawned. Null where the kernel has no autogroups, or where this process may not
 * set their nice at every spawn (`sessionGroups`); in a cpu cgroup the write is harmless and
 * nice works as it is.
 */
export function autogroupNice(value: number): number | null {
  return sessionGroups() === "settable" ? value : null;
}

/**
 * Whether sessions are scheduling groups here, and whether this process can set a group's nice
 * at every spawn. Without CAP_SYS_ADMIN the kernel takes one such write per 100 ms across the
 * whole machine and refuses the rest (EBUSY, EAGAIN before Linux 6.x), so most episodes would
 * keep the default: "fixed". Probed once, by writing our own group's nice back to it twice.
 */
export function sessionGroups(): "none" | "settable" | "fixed" {
  if (sessionGroupsAre === null) {
    let on = false;
    try {
      on =
        readFileSync("/proc/sys/kernel/sched_autogroup_enabled", "utf8").trim() === "1" &&
        existsSync("/proc/self/autogroup");
    } catch {
      // no such file: a kernel without autogroups
    }
    sessionGroupsAre = on && inRootCpuGroup() ? (ownGroupNiceWritable() ? "settable" : "fixed") : "none";
  }
  return sessionGroupsAre;
}
let sessionGroupsAre: "none" | "settable" | "fixed" | null = null;

/**
 * Whether this process is in the root cpu cgroup, the only one the kernel schedules by autogroup.
 * A gateway in a cpu cgroup of its own (a systemd service with CPU accounting on, a container with
 * a CPU quota) shares that group's CPU among its tasks by their nice: its writes to
 * /proc/<pid>/autogroup still succeed but change nothing. cgroup v1: the path of the hierarchy that
 * has `cpu`; v2: whether the cpu controller is on in any cgroup from ours up (cgroup.controllers).
 */
export function inRootCpuGroup(procCgroup = "/proc/self/cgroup", mount = "/sys/fs/cgroup"): boolean {
  let lines: string[];
  try {
    lines = readFileSync(procCgroup, "utf8").trim().split("\n");
  } catch {
    return true; // no cgroups at all
  }
  const entries = lines.map((l) => /^(\d+):([^:]*):(.*)$/.exec(l)).filter((m) => m !== null);
  const v1 = entries.find((m) => m[2]!.split(",").includes("cpu"));
  if (v1) return v1[3] === "/";
  const v2 = entries.find((m) => m[1] === "0" && m[2] === "");
  if (!v2) return true;
  for (let dir = v2[3]!; dir !== "/" && dir !== ""; dir = dir.slice(0, dir.lastIndexOf("/")) || "/") {
    try {
      if (readFileSync(`${mount}${dir}/cgroup.controllers`, "utf8").split(/\s+/).includes("cpu")) return false;
    } catch {
      // a cgroup we cannot see (another namespace's path): go on up
    }
  }
  return true;
}

/** Whether two writes in a row of our own autogroup's nice (unchanged) both succeed. */
function ownGroupNiceWritable(): boolean {
  try {
    const nice = / nice (-?\d+)/.exec(readFileSync("/proc/self/autogroup", "utf8"))?.[1];
    if (nice === undefined) return false;
    writeFileSync("/proc/self/autogroup", nice);
    writeFileSync("/proc/self/autogroup", nice);
    return true;
  } catch {
    return false;
  }
}

let tmpfsSizeWorks: boolean | null = null;
/**
 * Whether this bubblewrap takes `--size` for a tmpfs (probed once, as the uid episodes run as: a
 * setuid bubblewrap refuses it to other users only).
 */
function probeTmpfsSize(bwrap: string, uid: number | null): boolean {
  tmpfsSizeWorks ??= bwrapRuns(bwrap, fsArgs(1024 * 1024), uid);
  return tmpfsSizeWorks;
}

let chrtWorks: boolean | null = null;
/** Whether this process may start a child under SCHED_IDLE (probed once: a refusal would fail every episode). */
function probeIdle(chrt: string): boolean {
  if (chrtWorks === null) {
    const r = Bun.spawnSync([chrt, "--idle", "0", "/bin/true"], { env: {}, stdout: "ignore", stderr: "ignore" });
    chrtWorks = r.exitCode === 0;
  }
  return chrtWorks;
}

/**
 * The nice of a flooded agent's scheduling groups, where episodes get their own (`autogroupNice`):
 * SCHED_IDLE ranks a process only within its group, so the group itself is what yields to other
 * episodes' (weight 15 against their 335: a quiet agent's episode sharing a core with a flood's gets
 * 96% of it, not half). A flooded agent may be starved by other work: its stimuli wait, durably.
 */
export const FLOODED_GROUP_NICE = 19;

/**
 * The nice of the scheduling group (where episodes get their own) of an episode that starts during an
 * intake burst beside another episode of an agent that is not flooded (devices first: `QuietLane`,
 * ../fleet/devices-first.ts). Weight 15 against EPISODE_GROUP_NICE's 335 and the gateway's 1024. At 15
 * (weight 36) intake beside quiet agents filling every slot kept 0.40x and 0.59x of its rate, at 19
 * 0.57x and 0.71x (bench `busy`, two runs each, not alternated: a hint, not a measurement).
 */
export const BURST_GROUP_NICE = 19;

/**
 * The nice of a warm spare's scheduling group while it starts up and waits (where episodes get
 * groups): a spare's start-up (tens of ms of CPU for the runtime) is not on anyone's path, so it
 * yields to running episodes' groups; `SparePool.claim` raises it to EPISODE_GROUP_NICE when an
 * episode takes it, ready or not.
 */
export const SPARE_GROUP_NICE = 19;

/** `o` with its episodes' scheduling groups at `nice`, where it gives them groups (`autogroup`); else `o`. */
export function inGroupAt(o: SpawnOptions, nice: number): SpawnOptions {
  return o.autogroup != null ? { ...o, autogroup: nice } : o;
}

/**
 * `o` for a flooded agent's episodes: under SCHED_IDLE, below the nice 19 of everyone
 * else's, and in a scheduling group at FLOODED_GROUP_NICE where episodes get groups, so an
 * agent with a backlog yields the CPU to agents waiting on a stimulus or two. Without a working
 * `chrt` they run at everyone else's nice (their group still yields).
 */
export function idleSpawnOptions(o: SpawnOptions): SpawnOptions {
  const chrt = which(["/usr/bin/chrt", "/bin/chrt"]);
  const grouped = inGroupAt(o, FLOODED_GROUP_NICE);
  return chrt && probeIdle(chrt) ? { ...grouped, idle: { bin: chrt } } : grouped;
}

/**
 * Spawn options for a sandbox mode on this machine. Root runs each child as a uid of its own from
 * `uids` (./uids.ts), so it cannot read the gateway's /proc/<pid>/environ, nor signal another
 * episode, and its process limit is its own; bubblewrap adds its own pid, net and ipc namespaces
 * (no network: tools go through the gateway) and a read-only root.
 */
export function defaultSpawnOptions(
  mode: SandboxMode = "auto",
  opts: { allowWeak?: boolean; uids?: UidRange } = {},
): SpawnOptions {
  const prlimit = which(["/usr/bin/prlimit", "/bin/prlimit"]);
  const niceBin = which(["/usr/bin/nice", "/bin/nice"]);
  const bwrapPath = which(["/usr/bin/bwrap", "/bin/bwrap"]);
  const available = bwrapPath !== null && probeBwrap(bwrapPath);
  const bwrap = available && (mode === "auto" || mode === "bwrap") ? bwrapPath : null;
  if (mode === "bwrap" && !bwrap)
    throw new SandboxError('sandbox = "bwrap" but bubblewrap is not installed or cannot create namespaces here');
  if ((mode === "uid" || mode === "none") && available && !opts.allowWeak)
    throw new SandboxError(
      `sandbox = "${mode}" is refused: bubblewrap works here, and without it an agent ` +
        `${weakGaps(MemoryCgroups.open() !== null)}. ` +
        'Use sandbox = "auto", or set [fleet] allow_weak_sandbox = true to accept the weaker sandbox.',
    );
  const dropUid = runsAsUids(mode);
  return {
    bun: process.execPath,
    uids: dropUid ? new UidPool(opts.uids ?? DEFAULT_SANDBOX_UIDS) : null,
    prlimit,
    bwrap,
    nprocInside: !dropUid && bwrap !== null && prlimit !== null && nprocPerNamespace(bwrap),
    nice: niceBin ? { bin: niceBin, value: EPISODE_NICE } : null,
    autogroup: autogroupNice(EPISODE_GROUP_NICE),
    rssPollMs: 50,
    memcg: MemoryCgroups.open(),
  };
}

/** Whether episodes run as a uid each from `[fleet] sandbox_uids` in this mode (the gateway is root). */
export function runsAsUids(mode: SandboxMode): boolean {
  return process.getuid?.() === 0 && mode !== "none";
}

/**
 * Whether RLIMIT_NPROC set inside a bubblewrap sandbox counts that sandbox's processes alone:
 * bubblewrap run by a user other than root makes a user namespace (a setuid bubblewrap does not),
 * and Linux 5.14 and later count the limit per user namespace (before, per uid: the gateway's
 * own threads and every other episode's processes would count against each episode's limit).
 */
export function nprocPerNamespace(bwrap: string, kernel = release()): boolean {
  const [major = 0, minor = 0] = kernel.split(".").map((n) => Number.parseInt(n, 10));
  if (major < 5 || (major === 5 && minor < 14)) return false;
  try {
    return process.getuid?.() !== 0 && (statSync(bwrap).mode & 0o4000) === 0;
  } catch {
    return false;
  }
}

/**
 * What a sandbox without namespaces does not isolate (README "What an agent subprocess can see");
 * with memory cgroups (`memcg`) an episode's detached children end with it.
 */
export function weakGaps(memcg: boolean): string {
  return (
    "can reach the network and the gateway's HTTP API and MQTT broker, " +
    (memcg ? "" : "keep detached children running after its episode, ") +
    "read the host's file system (all but the private data dir when it runs as another uid) and write host /tmp"
  );
}

/** A sandbox mode that cannot be used here, or is refused. */
export class SandboxError extends Error {
  override readonly name = "SandboxError";
}

/** The start-up warning for a sandbox without namespaces, or null when bubblewrap isolates episodes. */
export function weakSandboxWarning(o: SpawnOptions): string | null {
  if (o.bwrap) return null;
  const who = o.uids !== null ? `a uid each from ${o.uids}` : "same uid as the gateway";
  const environ = o.uids === null ? ", and read the gateway's /proc/<pid>/environ" : "";
  return (
    `agent subprocesses run WITHOUT namespaces (${who}): an agent ${weakGaps(!!o.memcg)}${environ}. ` +
    'Install bubblewrap and use sandbox = "auto".'
  );
}

/**
 * The start-up warning for a uid range smaller than the sandboxed processes that may be alive at
 * once (`processes`: episodes and warm spares), or null.
 */
export function sharedUidWarning(o: SpawnOptions, processes: number): string | null {
  if (o.uids === null || o.uids.range.count >= processes) return null;
  return (
    `[fleet] sandbox_uids holds ${o.uids.range.count} uid(s) for up to ${processes} sandboxed processes at once: ` +
    "some will share a uid, and with it their process limit (processes and threads), and can signal " +
    "each other where bubblewrap does not separate them"
  );
}

/** One line for the start-up log: what an episode is isolated by. */
export function describeSandbox(o: SpawnOptions): string {
  const script = hostScript(o.bun);
  const parts = [
    script === HOST_ENTRY
      ? "host runtime from its sources"
      : existsSync(bytecodeOf(script))
        ? "built host runtime with its bytecode"
        : "built host runtime (Bun built no bytecode: each episode parses it)",
    o.uids !== null ? `a uid of its own (${o.uids})` : "same uid as the gateway",
    o.bwrap
      ? "bubblewrap (pid/net/ipc namespaces; sees only system libraries, bun, the host runtime and its agent's " +
        `files; writes only its private /tmp, ${tmpSize(o.bwrap, o.uids?.range.first ?? null)}; ` +
        `${probeNoUserns(o.bwrap, o.uids?.range.first ?? null) ? "no" : "NOT refused (bubblewrap older than 0.8):"} ` +
        "nested user namespaces)"
      : "no namespaces",
    !o.prlimit
      ? "no rlimits"
      : o.uids !== null
        ? "rlimits (its process limit counts its uid's processes)"
        : o.nprocInside
          ? "rlimits (its process limit counts its own user namespace's processes)"
          : "rlimits (no process limit of its own: its processes count as the gateway's user's)",
    o.memcg
      ? "a memory cgroup of memory_mb (memfd and shared memory count)"
      : "no memory cgroup (the RSS watch does not see memory in a memfd or shared memory)",
    o.idle ? "SCHED_IDLE" : o.nice ? `nice ${o.nice.value}` : "same priority as the gateway",
    ...(o.autogroup != null
      ? [
          `its session's scheduling group at nice ${o.autogroup} ` +
            `(${SPARE_GROUP_NICE} for a waiting spare, ${FLOODED_GROUP_NICE} for a flooded agent's)`,
        ]
      : sessionGroups() === "fixed"
        ? ["its session's scheduling group at the default nice (setting it at every spawn needs CAP_SYS_ADMIN)"]
        : inRootCpuGroup()
          ? []
          : ["in the gateway's cpu cgroup (there the kernel shares the CPU by nice, not by session)"]),
  ];
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

/**
 * What one sandbox shows besides the runtime: a staging root (a warm spare, whose agent's
 * files are linked in later) and/or binds (a cold start's agent files).
 */
export interface SandboxView {
  readonly root?: StagingRoot;
  readonly binds?: readonly Bind[];
}

const runtimeCache = new Map<string, Bind[]>();
/**
 * The runtime binds for `bun <script>`, with the script's bytecode when it has one (cached: they
 * depend on the paths only; a built script's files are named by their content).
 */
export function runtimeFor(bun: string, script: string): Bind[] {
  const key = `${bun}\0${script}`;
  let binds = runtimeCache.get(key);
  if (!binds) {
    binds = runtimeBinds(bun, hostShows(script).paths);
    runtimeCache.set(key, binds);
  }
  return binds;
}

/** What the sandbox shows of a host runtime script, and so what an agent's own files need not hold. */
interface HostView {
  /** Bound into every sandbox. */
  readonly paths: readonly string[];
  /** Left out of an agent's files (shown already). */
  readonly skip: readonly string[];
  /** Kept in an agent's files as bare entry files, not followed: the script answers them itself. */
  readonly answered: readonly string[];
}

const hostViews = new Map<string, HostView>();
/**
 * From its sources, the host runtime needs the whole of HOST_PATHS. Built into one script (the usual
 * case), it needs only that script and its bytecode: it answers the SDK and the protocol itself
 * (agents/host/main.ts), a bundle imports them by name, and an agent that imports them by path needs
 * only their entry files there for the resolver to find (bound with its own files). So an episode
 * sees less of the install, and bubblewrap makes three mounts fewer. (Where the install's path has a
 * symlink in it, the resolver's path is not the one the script answers: there the sources are shown
 * as from the sources.)
 */
function hostShows(script: string): HostView {
  let view = hostViews.get(script);
  if (view === undefined) {
    const fromSources = HOST_PATHS.some((p) => script === p || script.startsWith(`${p}/`));
    const own = existsSync(bytecodeOf(script)) ? [script, bytecodeOf(script)] : [script];
    const entries = Object.keys(HOST_MODULES);
    const answers = entries.every((e) => existsSync(e) && realpathSync(e) === e);
    view = fromSources
      ? { paths: HOST_PATHS, skip: HOST_PATHS, answered: [] }
      : answers
        ? { paths: own, skip: [], answered: entries }
        : { paths: [...HOST_PATHS, ...own], skip: HOST_PATHS, answered: [] };
    hostViews.set(script, view);
  }
  return view;
}

/** The files of an agent's module a sandbox running the host runtime `script` must show besides that runtime. */
export function episodeFiles(modulePath: string, script: string): AgentFiles {
  const view = hostShows(script);
  return agentFiles(modulePath, view.skip, view.answered);
}

const realBuns = new Map<string, string>();
/** The real file of the Bun binary (resolved once: it does not move while we run). */
function realBun(bun: string): string {
  let real = realBuns.get(bun);
  if (real === undefined) {
    real = realpathSync(bun);
    realBuns.set(bun, real);
  }
  return real;
}

/** The prlimit/bwrap command line that runs `bun <script>` with these limits. */
export function sandboxCommand(
  script: string,
  limits: ProcessLimits,
  spawnOpts: SpawnOptions,
  view: SandboxView = {},
): string[] {
  // Inside bubblewrap only the real file of the Bun binary is bound, not a link to it.
  const cmd = [spawnOpts.bwrap ? realBun(spawnOpts.bun) : spawnOpts.bun, script];
  const selfNice = selfNiced(spawnOpts);
  if (selfNice !== null) cmd.push(`${NICE_ARG}=${selfNice}`);
  // prlimit is under /usr/bin or /bin (`defaultSpawnOptions`), which every sandbox sees.
  if (spawnOpts.bwrap && spawnOpts.prlimit && spawnOpts.nprocInside)
    cmd.unshift(spawnOpts.prlimit, `--nproc=${limits.maxProcesses}`);
  if (spawnOpts.bwrap)
    cmd.unshift(
      spawnOpts.bwrap,
      ...(view.root?.args() ?? []),
      // The private /tmp first, so a project (or an agent) that lives under /tmp is bound on top of it.
      ...fsArgs(
        probeTmpfsSize(spawnOpts.bwrap, spawnOpts.uids?.range.first ?? null) ? limits.memoryMb * 1024 * 1024 : null,
      ),
      // A staging root already holds the runtime's symlinks (it is read-only inside).
      ...bindArgs(runtimeFor(spawnOpts.bun, script).filter((b) => !view.root || b.kind !== "symlink")),
      ...bindArgs(view.binds ?? []),
      ...BWRAP_READ_ONLY,
      ...BWRAP_ARGS,
      ...(probeNoUserns(spawnOpts.bwrap, spawnOpts.uids?.range.first ?? null) ? BWRAP_NO_USERNS : []),
      "--",
    );
  if (spawnOpts.prlimit) {
    const dataBytes = dataLimitMb(limits.memoryMb) * 1024 * 1024;
    // RLIMIT_CPU backstop: an agent spinning after its gateway died would run until
    // --die-with-parent or the disconnect handler stops it; CPU time can exceed wall time only by its threads.
    const cpuSeconds = 2 * Math.ceil(limits.timeoutMs / 1000) + 2;
    cmd.unshift(
      spawnOpts.prlimit,
      `--data=${dataBytes}`,
      `--nofile=${limits.maxOpenFiles}`,
      `--cpu=${cpuSeconds}`,
      // Per uid: with a uid of its own, the episode's own limit.
      ...(spawnOpts.uids !== null ? [`--nproc=${limits.maxProcesses}`] : []),
    );
  }
  if (spawnOpts.idle) cmd.unshift(spawnOpts.idle.bin, "--idle", "0");
  else if (spawnOpts.nice && selfNice === null) cmd.unshift(spawnOpts.nice.bin, "-n", String(spawnOpts.nice.value));
  return cmd;
}

/**
 * How much the script lowers its own priority as it starts (NICE_ARG), in place of the `nice`
 * wrapper; null where the wrapper does it. Where its session is a scheduling group at a nice the
 * gateway sets (`autogroup`), that group is what yields to the gateway, from the first instruction
 * on, and holds only the episode's own processes: their nice decides nothing there, and one exec (~0.5
 * ms of CPU an episode) is saved. Elsewhere the wrapper's nice covers Bun's own start too.
 */
function selfNiced(o: SpawnOptions): number | null {
  return o.nice && o.autogroup != null && !o.idle ? o.nice.value : null;
}

/**
 * The prlimit/bwrap command line for an agents/host/main.ts process with these limits. `script`:
 * the host script, when the caller has looked it up already (`hostScript` checks its files).
 */
export function hostCommand(
  limits: ProcessLimits,
  spawnOpts: SpawnOptions,
  view: SandboxView = {},
  script = hostScript(spawnOpts.bun),
): string[] {
  const cmd = sandboxCommand(script, limits, spawnOpts, view);
  // It joins the memory cgroup the gateway passes it (./memcg.ts) before it runs anything of the agent's.
  if (spawnOpts.memcg) cmd.push(JOIN_CGROUP_ARG);
  return cmd;
}

/** The runtime binds of the host process (a staging root needs their mount points). */
export function hostRuntime(spawnOpts: SpawnOptions, script = hostScript(spawnOpts.bun)): Bind[] {
  return runtimeFor(spawnOpts.bun, script);
}
