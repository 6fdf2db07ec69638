#!/usr/bin/env bun
/**
 * Where a Bun process's CPU goes, by JavaScript function: `perf record` samples (the kernel's CPU
 * clock: time on a CPU only) with their call stacks, named through the JIT dump JavaScriptCore
 * writes (BUN_JSC_useJITDump=1, BUN_JSC_jitDumpDirectory=DIR). Written by the benches with
 * BENCH_PERF_DIR=DIR (DIR/<section>.perf.txt), or by hand:
 *
 *   BUN_JSC_useJITDump=1 BUN_JSC_jitDumpDirectory=/tmp/jd bun gateway/cli/main.ts start ...
 *   bun scripts/perf-summary.ts --pid PID --seconds 15 --jitdump /tmp/jd [--top 40]
 *   bun scripts/perf-summary.ts --data FILE.perf --pid PID --jitdump /tmp/jd   (a recording made before)
 *   ... --callers NAME: the JS stacks NAME is on (who calls it, what it calls)
 *
 * Why beside `--cpu-prof` (scripts/profile-summary.ts): JavaScriptCore's sampler stops the JS
 * thread wherever it is, also blocked in a system call, so it counts time, not CPU. In the episodes
 * section it put 43% of the gateway's samples in `spawn` (the thread waits there while the child
 * execs); perf, counting CPU, put 13% there. A sample is charged to the innermost JS function on its
 * stack, with the native code below it (a Bun API, libSQL, the kernel); samples with no JS frame on
 * the stack (the event loop, libSQL's own frames, which have no frame pointers) are shown by system
 * call or library.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { scriptArgs, usageError, wholeFlag } from "./bench/cli.ts";

/** A compiled JS function's code: [start, end) in the process, and JSC's name for it ("JSC-DFG: name#hash"). */
interface Code {
  readonly start: bigint;
  readonly end: bigint;
  readonly name: string;
  /** When it was loaded (CLOCK_MONOTONIC, ns), as the dump says. */
  readonly time: bigint;
}

/**
 * Code by address and time. JSC reuses the memory of code it threw away, so records overlap: a
 * sample's address is the code's that held it then, the newest loaded before the sample (perf
 * records with `-k mono`, the clock of the dump's timestamps); a sample without a time, the newest.
 */
export class CodeMap {
  private readonly codes: (Code & { readonly seq: number })[];
  private readonly longest: bigint;

  constructor(codes: readonly Code[]) {
    this.codes = codes
      .map((c, seq) => ({ ...c, seq }))
      .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
    let longest = 0n; // bigints: no Math.max
    for (const c of this.codes) if (c.end - c.start > longest) longest = c.end - c.start;
    this.longest = longest;
  }

  get size(): number {
    return this.codes.length;
  }

  /** The code `addr` was in at `time` (ns, CLOCK_MONOTONIC; null: now), or null. */
  at(addr: bigint, time: bigint | null = null): Code | null {
    let lo = 0;
    let hi = this.codes.length - 1;
    let last = -1; // the last record starting at or below addr
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.codes[mid]!.start <= addr) {
        last = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    let best: (Code & { readonly seq: number }) | null = null;
    for (let i = last; i >= 0 && this.codes[i]!.start + this.longest > addr; i--) {
      const c = this.codes[i]!;
      if (addr < c.end && (time === null || c.time <= time) && (best === null || c.seq > best.seq)) best = c;
    }
    return best;
  }
}

/** JSC's JIT dump files of `pid` in `dir` (jit-<pid>.dump, or jit-<tid>-<pid>.dump as Bun names them). */
export function jitDumps(dir: string, pid: number): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f === `jit-${pid}.dump` || f.endsWith(`-${pid}.dump`))
    .map((f) => join(dir, f));
}

/** The code records (JIT_CODE_LOAD) of a jitdump file (the Linux perf jitdump format), in the order loaded. */
export function readJitDump(file: string): Code[] {
  const b = readFileSync(file);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (b.length < 40 || v.getUint32(0, true) !== 0x4a695444) throw new Error(`${file} is not a jitdump file`);
  const codes: Code[] = [];
  let at = v.getUint32(8, true); // the header's size
  while (at + 16 <= b.length) {
    const id = v.getUint32(at, true);
    const size = v.getUint32(at + 4, true);
    if (size < 16 || at + size > b.length) break;
    if (id === 0 && size >= 56) {
      // After the record's id, size and timestamp: pid u32, tid u32, vma u64, code_addr u64, code_size u64,
      // code_index u64, then the name (NUL-terminated).
      const start = v.getBigUint64(at + 32, true);
      const length = v.getBigUint64(at + 40, true);
      const nameEnd = b.indexOf(0, at + 56);
      const name = b.toString("utf8", at + 56, nameEnd < 0 ? at + size : Math.min(nameEnd, at + size));
      codes.push({ start, end: start + length, name, time: v.getBigUint64(at + 8, true) });
    }
    at += size;
  }
  return codes;
}

/** One sample: its thread, and its stack from the leaf out (address and what perf names there). */
interface Sample {
  readonly tid: number;
  readonly comm: string;
  /** When it was taken (ns, the recording's clock), or null when perf script did not print it. */
  readonly time: bigint | null;
  readonly frames: { readonly addr: bigint; readonly where: string }[];
}

/** `perf script -F comm,tid,time,ip,sym,dso` output (time optional), one sample per blank-line-separated block. */
export function parsePerfScript(text: string): Sample[] {
  const samples: Sample[] = [];
  let current: Sample | null = null;
  for (const line of text.split("\n")) {
    if (line.trim() === "") {
      current = null;
      continue;
    }
    if (!/^\s/.test(line)) {
      // The header: "<comm> <tid> [<seconds>.<micros>:]" (comm may hold spaces).
      const m = /^(.*\S)\s+(\d+)(?:\s+(\d+)\.(\d{1,9}):)?\s*$/.exec(line);
      if (!m) continue;
      const time = m[3] === undefined ? null : BigInt(m[3]) * 1_000_000_000n + BigInt(m[4]!.padEnd(9, "0"));
      current = { comm: m[1]!, tid: Number(m[2]), time, frames: [] };
      samples.push(current);
      continue;
    }
    const m = /^\s+([0-9a-f]+)\s+(.*)$/.exec(line);
    if (m && current) current.frames.push({ addr: BigInt(`0x${m[1]}`), where: m[2]! });
  }
  return samples;
}

/** JSC's code name without the hash and tier: "JSC-DFG: runEpisode#Cx1" -> "runEpisode [DFG]". */
function jsName(code: Code): string {
  const m = /^JSC-([A-Za-z]+):\s*([^#]*)/.exec(code.name);
  if (!m) return code.name;
  return `${m[2]!.trim() || "(anonymous)"} [${m[1]}]`;
}

/** What a sample with no JS frame was doing: its system call, a page fault, or the library it was in. */
function nativeKind(frames: Sample["frames"]): string {
  for (let i = frames.length - 1; i >= 0; i--) {
    const sys = /(?:__x64_sys|__do_sys|__se_sys)_(\w+)/.exec(frames[i]!.where);
    if (sys) return `syscall ${sys[1]}`;
  }
  if (frames.some((f) => /page_fault/.test(f.where))) return "page fault";
  const leaf = frames[0]?.where ?? "";
  const lib = /\(([^)]+)\)\s*$/.exec(leaf)?.[1] ?? "?";
  return lib.includes("kernel") ? "kernel (other)" : `user ${lib.split("/").at(-1)}`;
}

function table(title: string, counts: Map<string, number>, total: number, top: number): string {
  const rows = [...counts].sort((a, b) => b[1] - a[1]).slice(0, top);
  const pct = (n: number) => `${((100 * n) / Math.max(1, total)).toFixed(1).padStart(5)}%`;
  return [`## ${title}`, "", ...rows.map(([k, n]) => `${pct(n)} ${String(n).padStart(6)}  ${k}`), ""].join("\n");
}

const bump = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);

/** The summary of `samples` of process `pid`, its JS named by `codes`. */
export function summarize(samples: readonly Sample[], pid: number, codes: CodeMap, top = 40): string {
  const threads = new Map<string, number>();
  for (const s of samples) bump(threads, s.tid === pid ? `${s.comm} (main: the JS thread)` : s.comm);
  const main = samples.filter((s) => s.tid === pid);
  const inner = new Map<string, number>();
  const inclusive = new Map<string, number>();
  const native = new Map<string, number>();
  for (const s of main) {
    const names = s.frames.map((f) => codes.at(f.addr, s.time)).filter((c): c is Code => c !== null);
    if (names.length === 0) {
      bump(inner, "(no JS frame on the stack)");
      bump(native, nativeKind(s.frames));
      continue;
    }
    bump(inner, jsName(names[0]!));
    for (const n of new Set(names.map(jsName))) bump(inclusive, n);
  }
  return [
    `${samples.length} samples (perf cpu-clock) of pid ${pid}, ${main.length} on its JS thread; ` +
      `${codes.size} JIT code records`,
    "",
    table("CPU by thread (share of all samples)", threads, samples.length, 20),
    table("JS thread: innermost JS function (its own code and the native code it called)", inner, main.length, top),
    table("JS thread: JS functions on the stack (inclusive)", inclusive, main.length, top),
    table("JS thread, no JS frame on the stack: by system call or library", native, main.length, 20),
  ].join("\n");
}

/** The JS stacks (a function and the four JS frames around it, innermost first) in which `name` is on the JS thread. */
export function callers(samples: readonly Sample[], pid: number, codes: CodeMap, name: string, top = 20): string {
  const stacks = new Map<string, number>();
  let n = 0;
  for (const s of samples) {
    if (s.tid !== pid) continue;
    const names = s.frames
      .map((f) => codes.at(f.addr, s.time))
      .filter((c): c is Code => c !== null)
      .map(jsName);
    const i = names.findIndex((x) => x.startsWith(`${name} [`));
    if (i < 0) continue;
    n++;
    bump(stacks, names.slice(Math.max(0, i - 1), i + 4).join(" < "));
  }
  return table(
    `JS stacks around ${name} (${n} samples; the frame it called first, then it, then its callers)`,
    stacks,
    n,
    top,
  );
}

function perfScript(data: string): Sample[] {
  const r = Bun.spawnSync(["perf", "script", "-i", data, "-F", "comm,tid,time,ip,sym,dso"], {
    stdout: "pipe",
    stderr: "pipe",
    maxBuffer: 1 << 30,
  });
  if (r.exitCode !== 0) throw new Error(`perf script failed: ${r.stderr.toString().trim().slice(0, 300)}`);
  return parsePerfScript(r.stdout.toString());
}

/** Summarise a recording (`perf record -g` of `pid`) with the JIT dumps in `jitDir`. */
export function summarizeRecording(data: string, pid: number, jitDir: string, top = 40): string {
  return summarize(perfScript(data), pid, new CodeMap(jitDumps(jitDir, pid).flatMap(readJitDump)), top);
}

/** `perf record` of `pid`'s threads (not its children) into `data`, until `stop()`. */
export function recordPerf(pid: number, data: string, hz = 2000): { stop: () => Promise<void> } {
  // -k mono: samples on the clock of JSC's dump timestamps, so each is matched to the code it ran.
  const args = ["record", "-q", "-k", "mono", "-e", "cpu-clock", "-F", String(hz), "-g", "--no-inherit"];
  const proc = Bun.spawn(["perf", ...args, "-p", String(pid), "-o", data], { stdout: "ignore", stderr: "pipe" });
  return {
    stop: async () => {
      proc.kill("SIGINT");
      await proc.exited;
      if (!existsSync(data)) throw new Error(`perf record wrote nothing: ${await new Response(proc.stderr).text()}`);
    },
  };
}

if (import.meta.main) {
  const usage =
    "usage: bun scripts/perf-summary.ts --pid PID --jitdump DIR [--seconds 15 | --data FILE] [--top 40] " +
    "[--callers NAME]\n  where a process's CPU went, by thread and function, from perf record (JIT frames named)";
  const { values } = scriptArgs(usage, {
    options: {
      pid: { type: "string" },
      seconds: { type: "string", default: "15" },
      jitdump: { type: "string" },
      data: { type: "string" },
      top: { type: "string", default: "40" },
      callers: { type: "string" },
    },
  });
  const pid = wholeFlag(usage, "pid", values.pid);
  if (!values.jitdump) usageError(usage, "--jitdump DIR is needed (where perf's JIT dumps are)");
  wholeFlag(usage, "seconds", values.seconds);
  let data = values.data;
  if (!data) {
    data = join(values.jitdump, `perf-${pid}-${Date.now()}.data`);
    const rec = recordPerf(pid, data);
    await Bun.sleep(Number(values.seconds) * 1000);
    await rec.stop();
  }
  if (values.callers) {
    const codes = new CodeMap(jitDumps(values.jitdump, pid).flatMap(readJitDump));
    console.log(callers(perfScript(data), pid, codes, values.callers, wholeFlag(usage, "top", values.top)));
  } else console.log(summarizeRecording(data, pid, values.jitdump, wholeFlag(usage, "top", values.top)));
}
