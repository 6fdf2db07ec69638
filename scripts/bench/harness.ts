/**
 * Bench plumbing: a cleanup registry (every process and temp dir the bench starts is
 * undone on exit), /proc readers, percentiles, and the result row every section returns.
 */
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** Repository root (scripts/bench/.. /..). */
export const ROOT = fileURLToPath(new URL("../../", import.meta.url));

/** One line of a section table and of the summary. */
export interface Row {
  readonly section: string;
  readonly metric: string;
  readonly unit: string;
  readonly gateway: number;
  readonly baseline: number | null;
  /** gateway / baseline for throughputs ("x"), gateway - baseline in `unit` for costs ("+"). */
  readonly ratio: number | null;
  readonly ratioKind: "x" | "+";
  readonly target: string;
  readonly ok: boolean | null;
  readonly note?: string;
}

/** Counts each section may scale by `--quick`. */
export interface BenchOptions {
  readonly quick: boolean;
  readonly window: number;
  readonly log: (line: string) => void;
}

type Undo = () => void | Promise<void>;
const undos: Undo[] = [];
let shuttingDown = false;

/** After this, anything registered with `defer` is undone at once (an interrupted run). */
export function beginShutdown(): void {
  shuttingDown = true;
}

/** Remember something to undo at exit (LIFO); returns a function that undoes it now. */
export function defer(undo: Undo): () => Promise<void> {
  let done = false;
  const run = async () => {
    if (done) return;
    done = true;
    const i = undos.indexOf(wrapped);
    if (i >= 0) undos.splice(i, 1);
    await undo();
  };
  const wrapped: Undo = run;
  undos.push(wrapped);
  if (shuttingDown) void run().catch(() => undefined);
  return run;
}

/** Undo everything still registered, newest first. Safe to call more than once. */
export async function cleanupAll(): Promise<void> {
  while (undos.length > 0) {
    const undo = undos.pop()!;
    try {
      await undo();
    } catch {
      // best effort: the rest must still run
    }
  }
}

/** A temp dir (mode 0700, root's only) removed at exit. Agent modules live in the repo, not here. */
export function tempDir(tag: string): string {
  const dir = mkdtempSync(join(tmpdir(), `fleet-bench-${tag}-`));
  defer(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A field of /proc/<pid>/status in kB, or null when the process is gone. */
export function procStatusKb(pid: number, field: "VmRSS" | "VmHWM"): number | null {
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/**
 * utime, stime, cutime and cstime of a /proc `stat` file (a process's or one thread's), ms, 10 ms
 * resolution; NaN when it is gone.
 */
function statCpuMs(file: string): { self: number; children: number } {
  try {
    const stat = readFileSync(file, "utf8");
    // Fields after the command name: state(3) ... utime(14) stime(15) cutime(16) cstime(17).
    const f = stat
      .slice(stat.lastIndexOf(")") + 2)
      .split(" ")
      .map(Number);
    const tick = 10; // USER_HZ is 100 on Linux: one tick = 10 ms
    return { self: (f[11]! + f[12]!) * tick, children: (f[13]! + f[14]!) * tick };
  } catch {
    return { self: NaN, children: NaN };
  }
}

/**
 * CPU time of a process (`self`: utime+stime) and of its reaped descendants (`children`: cutime+cstime), ms, 10 ms
 * resolution.
 */
export function cpuMs(pid: number | "self"): { self: number; children: number } {
  return statCpuMs(`/proc/${pid}/stat`);
}

/** CPU time the whole machine has spent busy (all CPUs, every state but idle and iowait), in ms. */
export function machineBusyMs(): number {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal
  const busy = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
  return busy * 10; // USER_HZ = 100
}

/** CPU ms of a process's main thread alone (its thread id is its pid). */
export function mainThreadMs(pid: number): number {
  return statCpuMs(`/proc/${pid}/task/${pid}/stat`).self;
}

/** CPU ms of a process's threads whose name starts with `prefix` (e.g. "JITWorker": JavaScriptCore's compilers). */
export function threadsMs(pid: number, prefix: string): number {
  let ms = 0;
  let tasks: string[] = [];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return NaN;
  }
  for (const task of tasks) {
    try {
      if (!readFileSync(`/proc/${pid}/task/${task}/comm`, "utf8").startsWith(prefix)) continue;
    } catch {
      continue; // exited while we looked
    }
    const self = statCpuMs(`/proc/${pid}/task/${task}/stat`).self;
    if (Number.isFinite(self)) ms += self;
  }
  return ms;
}

/** Pids whose parent is `pid`, read from /proc/<n>/stat. */
export function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // Field 4 (ppid) comes after the ")" that closes the command name.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(name));
    } catch {
      // exited while we looked
    }
  }
  return out;
}

/** Every descendant of `pid` (children, their children, ...). */
export function descendantPids(pid: number): number[] {
  const out: number[] = [];
  const frontier = [pid];
  while (frontier.length > 0) {
    for (const c of childPids(frontier.pop()!)) {
      out.push(c);
      frontier.push(c);
    }
  }
  return out;
}

/** Kill a process we started (by pid), ignoring "already gone". */
export function killPid(pid: number, signal: NodeJS.Signals = "SIGKILL"): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/** The q-quantile (0..1) of samples, nearest-rank. */
export function quantile(samples: readonly number[], q: number): number {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

/** Poll `check` every `everyMs` until it returns a value, or throw after `timeoutMs`. */
export async function until<T>(
  what: string,
  check: () => T | null | undefined | Promise<T | null | undefined>,
  timeoutMs: number,
  everyMs = 20,
): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== null && v !== undefined) return v;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(everyMs);
  }
}

/** Throughput row: higher is better, ok when gateway/baseline reaches `min` (null: informational). */
export function rateRow(
  section: string,
  metric: string,
  unit: string,
  gateway: number,
  baseline: number,
  min: number | null,
  note?: string,
): Row {
  const ratio = gateway / baseline;
  return {
    section,
    metric,
    unit,
    gateway,
    baseline,
    ratio,
    ratioKind: "x",
    target: min === null ? "-" : `>= ${min}x`,
    ok: min === null ? null : ratio >= min,
    ...(note ? { note } : {}),
  };
}

/** Lower-is-better row: ok when gateway - baseline stays within `maxExtra` `unit`s (null: informational). */
export function deltaRow(
  section: string,
  metric: string,
  unit: string,
  gateway: number,
  baseline: number,
  maxExtra: number | null,
  note?: string,
): Row {
  const extra = gateway - baseline;
  return {
    section,
    metric,
    unit,
    gateway,
    baseline,
    ratio: extra,
    ratioKind: "+",
    target: maxExtra === null ? "-" : `<= +${fmt(maxExtra)} ${unit}`,
    ok: maxExtra === null ? null : extra <= maxExtra,
    ...(note ? { note } : {}),
  };
}

/** Format a number for a table cell. */
export function fmt(n: number | null): string {
  if (n === null || Number.isNaN(n)) return "-";
  if (Math.abs(n) >= 1000) return Math.round(n).toLocaleString("en-US");
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

/** Render rows as an aligned text table. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join("  ")
      .trimEnd();
  return [line(headers), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** The cells of a row for the summary table. */
export function rowCells(r: Row): string[] {
  const ratio =
    r.ratio === null
      ? "-"
      : r.ratioKind === "x"
        ? `${r.ratio.toFixed(2)}x`
        : `${r.ratio >= 0 ? "+" : ""}${fmt(r.ratio)} ${r.unit}`;
  const unit = r.unit ? ` ${r.unit}` : "";
  return [
    r.metric,
    `${fmt(r.gateway)}${unit}`,
    r.baseline === null ? "-" : `${fmt(r.baseline)}${unit}`,
    ratio,
    r.target,
    r.ok === null ? "-" : r.ok ? "yes" : "NO",
  ];
}
