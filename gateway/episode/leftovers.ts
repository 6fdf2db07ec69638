/**
 * What a gateway killed with -9 can leave behind: sandboxes started while it died (a warm
 * spare's bwrap still setting up is not yet tied to its parent's death) and staging roots.
 * Every host process group and staging folder is noted in `<data dir>/sandboxes` as it is
 * started; the next start of the same data dir kills the groups still alive (same pid AND a
 * start time within the seconds its entry names: a reused pid is left alone) and removes the
 * folders. A group that ended is not noted (its pid no longer has such a start time): the ledger
 * is compacted from memory now and then instead, so an episode costs one write to it. The ledger
 * names the boot it was written in: after a reboot (a power cut) none of its processes can be
 * alive, whatever has their pids now, at much the same times after boot.
 */
import {
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { basename, dirname, join } from "node:path";
import { bootId, isZombie, sameBoot, startTicks } from "../pids.ts";
import { PRIVATE_FILE_MODE } from "../store/index.ts";

export { startTicks };

/**
 * `mkdir -p` of folders episodes read as uids of their own (staging roots, code bundles): 0755 whatever
 * the umask, which mkdir's mode is cut by (the unit of `fleet install-service` sets 0077).
 */
export function mkdirReadable(path: string): void {
  const first = mkdirSync(path, { recursive: true, mode: 0o755 });
  if (first === undefined) return;
  for (let d = path; ; d = dirname(d)) {
    chmodSync(d, 0o755);
    if (d === first || dirname(d) === d) return;
  }
}

/**
 * A temp folder named by this process, `<prefix><pid>.<start time>-XXXXXX`, made after removing
 * those in `base` of processes that are gone: a process removes its own at exit, but not when it
 * is killed with -9 (a test suite's gateways had left hundreds).
 */
export function processTempDir(base: string, prefix: string): string {
  sweepProcessDirs(base, prefix);
  return mkdtempSync(join(base, `${prefix}${process.pid}.${startTicks(process.pid) ?? 0}-`));
}

/** Remove the folders `processTempDir` made in `base` with `prefix` whose process is gone; another user's stay. */
export function sweepProcessDirs(base: string, prefix: string): void {
  let names: string[] = [];
  try {
    names = readdirSync(base);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const owner = /^(\d+)\.(\d+)-/.exec(name.slice(prefix.length));
    if (!owner || startTicks(Number(owner[1])) === owner[2]) continue;
    try {
      rmSync(join(base, name), { recursive: true, force: true });
    } catch {
      // another user's (a sticky temp dir)
    }
  }
}

/**
 * Clock ticks since boot now: /proc/uptime counts the boot-time clock that a process's start time
 * is counted on, in hundredths of a second (Linux's clock tick as /proc shows it). A host process
 * group's entry names the window its start falls in by this reading taken after the spawn, rather
 * than by its own /proc/<pid>/stat: read while the new process is still being exec'd, that cost
 * ~75 us of CPU and ~140 us of the gateway's thread on every spawn, against ~10 us here.
 */
export function ticksNow(): number | null {
  try {
    // Kept open and read from offset 0, where the kernel writes the text anew: one system call a spawn, not four.
    uptimeFd ??= openSync("/proc/uptime", "r");
    const n = readSync(uptimeFd, uptimeText, 0, uptimeText.length, 0);
    const m = /^(\d+)\.(\d\d)/.exec(uptimeText.toString("latin1", 0, n));
    return m ? Number(m[1]) * 100 + Number(m[2]) : null;
  } catch {
    return null;
  }
}

let uptimeFd: number | null = null;
const uptimeText = Buffer.alloc(128);

/**
 * How far before the reading after its spawn a group's start may lie, in ticks: the spawn's own time,
 * with room for a loaded box. A pid reused within seconds would need the whole pid space to wrap.
 */
const START_SLACK_TICKS = 500;

/** What `sweep` found of a previous run. */
export interface Swept {
  /** Process groups killed. */
  readonly killed: number[];
  /** Staging folders removed. */
  readonly roots: number;
  /** The previous gateway of this data dir still runs: nothing was touched. */
  readonly ownerAlive: boolean;
}

/** The on-disk ledger of one gateway's sandboxes (append-only, compacted now and then). */
export class SandboxLedger {
  private readonly live = new Map<number, string>();
  private readonly roots = new Set<string>();
  private lines = 0;
  /** The ledger file, open for appending (kept open: one write per entry). */
  private fd: number | null = null;

  constructor(readonly file: string) {}

  /** Reap what a previous run of this data dir left behind, then start this run's ledger. */
  sweep(): Swept {
    const text = existsSync(this.file) ? readFileSync(this.file, "utf8") : "";
    let owner: [number, string] | null = null;
    // pid -> the window its start time falls in (an older ledger names the start time itself).
    const groups = new Map<number, [number, number]>();
    const roots = new Set<string>();
    let boot: string | null = null;
    for (const line of text.split("\n")) {
      const [op, a, b, c] = line.split(" ");
      if (op === "boot" && a) boot = a;
      else if (op === "gateway" && a && b) owner = [Number(a), b];
      else if (op === "+" && a && b) groups.set(Number(a), [Number(b), Number(c ?? b)]);
      else if (op === "-" && a) groups.delete(Number(a));
      else if (op === "root" && a) roots.add(a);
    }
    // Written before a reboot: its pids are other processes' now, started at much the same times after boot.
    if (!sameBoot(boot)) {
      owner = null;
      groups.clear();
    }
    // A zombie owner (killed, not reaped yet) is gone: its start time still reads, its gateway does not run.
    if (owner && owner[0] !== process.pid && startTicks(owner[0]) === owner[1] && !isZombie(owner[0]))
      return { killed: [], roots: 0, ownerAlive: true };
    const killed: number[] = [];
    for (const [pid, [from, to]] of groups) {
      const started = Number(startTicks(pid) ?? Number.NaN);
      if (!(started >= from && started <= to)) continue;
      killed.push(pid);
      for (const target of [-pid, pid])
        try {
          process.kill(target, "SIGKILL");
        } catch {
          // gone meanwhile, or not a group leader
        }
    }
    let removed = 0;
    for (const dir of roots)
      if (/^fleet-roots-/.test(basename(dir)) && existsSync(dir) && statSync(dir).isDirectory()) {
        rmSync(dir, { recursive: true, force: true });
        removed++;
      }
    this.rewrite();
    return { killed, roots: removed, ownerAlive: false };
  }

  /** A host process group was started (just now: call it right after the spawn). */
  add(pid: number): void {
    const now = ticksNow();
    if (now === null) return;
    const window = `${now - START_SLACK_TICKS} ${now + 1}`;
    this.live.set(pid, window);
    this.append(`+ ${pid} ${window}`);
  }

  /** A host process group ended (killed and reaped): forgotten at the next compaction. */
  remove(pid: number): void {
    if (!this.live.delete(pid)) return;
    if (this.lines > 4 * this.live.size + 1000) this.rewrite();
  }

  /** A folder of staging roots this run uses. */
  addRoot(dir: string): void {
    if (this.roots.has(dir)) return;
    this.roots.add(dir);
    this.append(`root ${dir}`);
  }

  /** Close the ledger's file (the gateway stopped); a later entry opens it again. */
  close(): void {
    if (this.fd === null) return;
    try {
      closeSync(this.fd);
    } catch {
      // already closed
    }
    this.fd = null;
  }

  private append(line: string): void {
    try {
      this.fd ??= openSync(this.file, "a", PRIVATE_FILE_MODE);
      writeSync(this.fd, `${line}\n`);
      this.lines++;
    } catch {
      // a full disk must not stop episodes; the sweep then misses this entry
    }
  }

  /**
   * Give the data dir up while this process lives on (`fleet restore` holds it only while it writes): the
   * ledger names no owner, so a gateway may start on it.
   */
  release(): void {
    this.rewrite(false);
  }

  private rewrite(owned = true): void {
    const boot = bootId();
    const lines = [
      ...(boot === null ? [] : [`boot ${boot}`]),
      ...(owned ? [`gateway ${process.pid} ${startTicks(process.pid) ?? "?"}`] : []),
      ...[...this.roots].map((r) => `root ${r}`),
      ...[...this.live].map(([pid, t]) => `+ ${pid} ${t}`),
    ];
    // Whole or not at all: a crash while compacting must not lose the entries.
    const tmp = `${this.file}.tmp`;
    try {
      writeFileSync(tmp, `${lines.join("\n")}\n`, { mode: PRIVATE_FILE_MODE });
      renameSync(tmp, this.file);
      this.close(); // appends go to the new file
      this.lines = lines.length;
    } catch {
      // keep appending to the old file
    }
  }
}
