#!/usr/bin/env bun
/**
 * The whole test suite, several files at a time: `bun test` runs its files one after another,
 * and most of the suite's time is spent waiting (on gateways, brokers, episodes, Paho's fixed
 * sleeps), so several files at once (DEFAULT_JOBS) take a fraction of the time. Each file runs in a
 * `bun test` process of its own, longest first (test/durations.json, seconds and CPU seconds per
 * file from an earlier run; a file not listed counts as long), on `--jobs` workers. A file that
 * mostly waits (its CPU under a fifth of its seconds, and at least WAITING_MIN_SECONDS long: Paho's
 * fixed sleeps, the runner's sandbox probes) runs beside them on `--waiting-jobs` workers of its own
 * (default 1), which take no other file: it does not hold a core's worker for minutes while the core
 * idles. The `--jobs` workers take waiting files too once nothing else is left.
 *
 *   bun scripts/test.ts [--jobs N] [--waiting-jobs N] [--update-durations] [bun test options, e.g. --timeout 60000]
 *                       [FILE ...]
 *
 * FILEs (paths that match `--glob`) run only those files. Options it does not know go to every `bun test`.
 * `--glob` and `--durations` pick other files (the runner's own test runs it on fixtures); `--file-timeout`
 * (seconds, default 1200) kills a file's process that never exits. Each file's `bun test` leads a process
 * group of its own: at the timeout the whole group is killed, and processes a file leaves running when it
 * ends (a gateway a test did not stop) are killed then, and named in its output. Every `--progress` seconds (default
 * 120) the runner names the files that have been running longer than that.
 *
 * A file's output is printed whole when it ends, so the log reads as bun's own does, followed by a
 * line with its seconds and the CPU seconds its process tree spent (what to cut to shorten a run
 * whose cores are busy: episodes' processes, mostly). The last
 * lines are the totals in bun's form (" N pass", " N fail") and the exit code is non-zero when
 * a file failed, or its process ended without bun's summary (a crash).
 */
import { readdirSync, readFileSync } from "node:fs";
import { availableParallelism, constants } from "node:os";
import { join, relative, resolve } from "node:path";

const ROOT = join(import.meta.dir, "..");
/** Seconds assumed for a file test/durations.json does not list yet: new files run early. */
const UNKNOWN_SECONDS = 60;
/** A file whose recorded CPU seconds are under this share of its seconds mostly waits. */
const WAITING_CPU_SHARE = 0.2;
/** Shorter files are not worth a lane of their own, whatever they wait on. */
const WAITING_MIN_SECONDS = 5;

/** The runner's own options; everything else on the command line goes to every `bun test`. */
const OWN = {
  jobs: "string",
  "waiting-jobs": "string",
  glob: "string",
  durations: "string",
  "file-timeout": "string",
  progress: "string",
  "update-durations": "flag",
};
const values: Record<string, string | boolean> = {
  glob: "test/**/*.test.ts",
  durations: "test/durations.json",
  "file-timeout": "1200",
  progress: "120",
  "update-durations": false,
};
/** Options passed through to every `bun test`, in their order (e.g. --timeout 60000). */
const bunTestArgs: string[] = [];
for (const args = Bun.argv.slice(2); args.length > 0; ) {
  const arg = args.shift()!;
  const [name, inline] = arg.startsWith("--") ? (arg.slice(2).split(/=(.*)/s) as [string, string?]) : [""];
  const kind = OWN[name as keyof typeof OWN];
  if (arg === "--") continue;
  if (kind === "flag") values[name] = true;
  else if (kind === "string") {
    const value = inline ?? args.shift();
    if (value === undefined) usage(`--${name} needs a value`);
    values[name] = value;
  } else bunTestArgs.push(arg);
}

/** A command line the runner cannot use: why, and exit code 2. */
function usage(message: string): never {
  console.error(message);
  process.exit(2);
}

/**
 * One worker more than there are cores, at most 4: a file's process waits between its bursts of CPU (on
 * episodes, brokers, a gateway starting), so on two cores three at once kept both busier (the whole suite
 * 636 s with 3, 757 s with 2; every file passing with 3, and with 2 beside a CPU hog at nice 0).
 */
const DEFAULT_JOBS = Math.min(availableParallelism() + 1, 4);
const jobs = Number(values.jobs ?? process.env.FLEET_TEST_JOBS ?? DEFAULT_JOBS);
if (!Number.isInteger(jobs) || jobs < 1)
  usage(`--jobs must be a whole number of at least 1, not ${values.jobs ?? process.env.FLEET_TEST_JOBS}`);
const waitingJobs = Number(values["waiting-jobs"] ?? 1);
if (!Number.isInteger(waitingJobs) || waitingJobs < 0)
  usage(`--waiting-jobs must be a whole number of at least 0, not ${values["waiting-jobs"]}`);
const fileLimitMs = Number(values["file-timeout"]) * 1000;
if (!(fileLimitMs > 0)) usage(`--file-timeout must be a number of seconds above 0, not ${values["file-timeout"]}`);
const progressMs = Number(values.progress) * 1000;
if (!(progressMs > 0)) usage(`--progress must be a number of seconds above 0, not ${values.progress}`);
const glob = String(values.glob);
/**
 * The files named on the command line: arguments that are paths matching the glob. (Without this they went to
 * every `bun test` beside its own file: each worker ran them all.)
 */
const chosen = new Set<string>();
const testFile = new Bun.Glob(glob);
for (let i = bunTestArgs.length - 1; i >= 0; i--) {
  const arg = bunTestArgs[i]!;
  const path = relative(ROOT, resolve(arg));
  if (arg.startsWith("-") || !testFile.match(path)) continue;
  chosen.add(path);
  bunTestArgs.splice(i, 1);
}
const DURATIONS = resolve(ROOT, String(values.durations));

/** What one file's `bun test` reported. */
interface FileRun {
  readonly file: string;
  readonly pass: number;
  readonly skip: number;
  readonly fail: number;
  readonly seconds: number;
  /** CPU seconds (user + system) of the file's process and of every descendant reaped in its tree. */
  readonly cpuSeconds: number;
  readonly code: number;
  /** bun printed its closing summary (a process that crashed or was killed did not). */
  readonly summarised: boolean;
  readonly output: string;
}

/** A count from bun's closing lines (" 12 pass"; the last such line: a test may print one), 0 when absent. */
function count(output: string, word: "pass" | "skip" | "fail"): number {
  const m = [...output.matchAll(new RegExp(`^\\s*(\\d+) ${word}$`, "gm"))].at(-1);
  return m ? Number(m[1]) : 0;
}

/** The files running now, by process group: what an interrupted run must not leave behind. */
const running = new Map<number, { readonly file: string; readonly began: number }>();

/** Kill every process of group `pgid` (none left: nothing to do). */
function killGroup(pgid: number): void {
  try {
    process.kill(-pgid, "SIGKILL");
  } catch {
    // the group is gone
  }
}

/** Pids of group `pgid` still running (zombies waiting for init to reap them are not). */
function groupMembers(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(pgrp) === pgid && state !== "Z") pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

async function runFile(file: string): Promise<FileRun> {
  const began = performance.now();
  // A process group of its own (setsid): what the file's tests start and leave running (a gateway,
  // a broker) is found and killed with it, and cannot hold the output pipes open past its end.
  const proc = Bun.spawn([process.execPath, "test", ...bunTestArgs, `./${file}`], {
    cwd: ROOT,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    detached: true,
  });
  running.set(proc.pid, { file, began });
  // bun test's own per-test timeout ends a hung test; this ends a file whose process never exits.
  let overran = false;
  const limit = setTimeout(() => {
    overran = true;
    killGroup(proc.pid);
  }, fileLimitMs);
  // bun test writes its report to stderr and the tests' console output to stdout: keep both, in that order.
  const reading = Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  const code = await proc.exited;
  clearTimeout(limit);
  const usage = proc.resourceUsage();
  const left = groupMembers(proc.pid);
  if (left.length > 0) killGroup(proc.pid);
  running.delete(proc.pid);
  const [out, err] = await reading;
  const notes = [
    overran ? `killed after ${fileLimitMs / 1000} s (--file-timeout)` : "",
    left.length > 0 && !overran ? `left ${left.length} process(es) running (pid ${left.join(", ")}): killed` : "",
  ].filter(Boolean);
  const output = `${out}${err}${notes.map((n) => `\n${n}\n`).join("")}`;
  return {
    file,
    pass: count(output, "pass"),
    skip: count(output, "skip"),
    fail: count(output, "fail"),
    seconds: (performance.now() - began) / 1000,
    cpuSeconds: usage ? Number(usage.cpuTime.user + usage.cpuTime.system) / 1e6 : 0,
    code,
    summarised: /^Ran \d+ tests? across/m.test(output),
    output,
  };
}

// Files run in groups of their own, which a ^C to the runner does not reach: end them with it.
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(signal, () => {
    for (const pgid of running.keys()) killGroup(pgid);
    process.exit(128 + constants.signals[signal]);
  });
}

/** What an earlier run recorded of a file: seconds, and CPU seconds (a bare number: seconds only). */
type Recorded = number | { readonly seconds: number; readonly cpu: number };

/** Whether a file mostly waits, by what an earlier run recorded of it (a file not recorded does not). */
function waits(r: Recorded | undefined): boolean {
  if (r === undefined || typeof r === "number") return false;
  return r.seconds >= WAITING_MIN_SECONDS && r.cpu < WAITING_CPU_SHARE * r.seconds;
}

/** Every test file, longest first by the durations an earlier run recorded. */
async function testFiles(known: Record<string, Recorded>): Promise<string[]> {
  const all = [...testFile.scanSync({ cwd: ROOT })].sort();
  const missing = [...chosen].filter((f) => !all.includes(f));
  if (missing.length > 0) usage(`no such test file: ${missing.join(", ")}`);
  const files = chosen.size > 0 ? all.filter((f) => chosen.has(f)) : all;
  const seconds = (f: string) => {
    const r = known[f];
    return r === undefined ? UNKNOWN_SECONDS : typeof r === "number" ? r : r.seconds;
  };
  return files.sort((a, b) => seconds(b) - seconds(a));
}

const known: Record<string, Recorded> = await Bun.file(DURATIONS)
  .json()
  .catch(() => ({}));
const queue = await testFiles(known);
const total = queue.length;
if (total === 0) {
  console.error(`no test files match ${glob}`);
  process.exit(1);
}
// With no worker of their own, waiting files run on the --jobs workers like any other.
const waiting = new Set(waitingJobs > 0 ? queue.filter((f) => waits(known[f])) : []);
const runs: FileRun[] = [];
const began = performance.now();
console.log(
  `${total} test files, ${jobs} at a time` +
    (waiting.size > 0
      ? `, and ${Math.min(waitingJobs, waiting.size)} more for the ${waiting.size} that mostly wait: ` +
        [...waiting].join(", ")
      : ""),
);

/**
 * The next file a worker runs, the longest left that it takes: a waiting worker takes waiting files only;
 * the others take the rest first, then waiting files (nothing left for them otherwise).
 */
function next(waitingOnly: boolean): string | undefined {
  const other = queue.findIndex((f) => !waiting.has(f));
  const at = waitingOnly ? queue.findIndex((f) => waiting.has(f)) : Math.max(other, 0);
  return queue.splice(at, at >= 0 ? 1 : 0)[0];
}

async function worker(waitingOnly: boolean): Promise<void> {
  for (let file = next(waitingOnly); file !== undefined; file = next(waitingOnly)) {
    const run = await runFile(file);
    runs.push(run);
    const ok = run.code === 0 && run.summarised;
    process.stdout.write(`\n${run.output.trimEnd()}\n`);
    if (!ok) console.log(`!! ${file}: exit code ${run.code}${run.summarised ? "" : ", no summary from bun test"}`);
    console.log(`-- ${runs.length}/${total} ${file}: ${run.seconds.toFixed(1)} s, ${run.cpuSeconds.toFixed(1)} s CPU`);
  }
}
// A file's output waits for its end: say which files have been running long, so a slow or hung
// file shows in the log before its timeout.
const progress = setInterval(() => {
  const now = performance.now();
  const long = [...running.values()].filter((r) => now - r.began >= progressMs);
  const list = long.map((r) => `${r.file} (${((now - r.began) / 1000).toFixed(0)} s)`).join(", ");
  if (long.length > 0) console.log(`.. still running: ${list}`);
}, progressMs);
await Promise.all([
  ...Array.from({ length: Math.min(jobs, total) }, () => worker(false)),
  ...Array.from({ length: Math.min(waitingJobs, waiting.size) }, () => worker(true)),
]);
clearInterval(progress);

const hundredths = (x: number) => Math.round(x * 100) / 100;
const broken = runs.filter((r) => r.code !== 0 || !r.summarised);
const sum = (k: "pass" | "skip" | "fail") => runs.reduce((n, r) => n + r[k], 0);
// A file whose process failed without a failing test (it crashed, or failed to load) is one failure more.
const fail = sum("fail") + broken.filter((r) => r.fail === 0).length;

if (values["update-durations"]) {
  // One line per file, as the formatter leaves it.
  const lines = runs
    .map(
      (r) => `  ${JSON.stringify(r.file)}: { "seconds": ${hundredths(r.seconds)}, "cpu": ${hundredths(r.cpuSeconds)} }`,
    )
    .sort();
  await Bun.write(DURATIONS, `{\n${lines.join(",\n")}\n}\n`);
  console.log(`wrote ${relative(ROOT, DURATIONS)}`);
}

if (broken.length > 0) {
  console.log("\nfailed:");
  for (const r of broken) {
    const failures = r.output.split("\n").filter((l) => l.startsWith("(fail)"));
    console.log(`  ${r.file} (exit code ${r.code})${failures.length > 0 ? "" : ": no failing test reported"}`);
    for (const l of failures) console.log(`    ${l}`);
  }
}
const seconds = ((performance.now() - began) / 1000).toFixed(1);
const files = `${runs.length} file${runs.length === 1 ? "" : "s"}`;
console.log(`\nRan ${sum("pass") + sum("skip") + sum("fail")} tests across ${files} in ${seconds} s.`);
console.log(` ${sum("pass")} pass`);
console.log(` ${sum("skip")} skip`);
console.log(` ${fail} fail`);
process.exit(broken.length > 0 || fail > 0 ? 1 : 0);
