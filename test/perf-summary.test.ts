/**
 * scripts/perf-summary.ts: CPU by JS function from `perf script` samples named through a JIT dump.
 * Synthetic inputs in the two formats (Linux perf's jitdump, `perf script -F comm,tid,ip,sym,dso`).
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CodeMap, jitDumps, parsePerfScript, readJitDump, summarize } from "../scripts/perf-summary.ts";

const dir = mkdtempSync(join(tmpdir(), "fleet-perf-summary-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A jitdump file: its 40-byte header, then one JIT_CODE_LOAD record per code. */
function jitdump(codes: { addr: bigint; size: bigint; name: string }[]): Buffer {
  const header = Buffer.alloc(40);
  header.writeUInt32LE(0x4a695444, 0); // "JiTD"
  header.writeUInt32LE(1, 4);
  header.writeUInt32LE(40, 8);
  const records = codes.map((c, i) => {
    const name = Buffer.from(`${c.name}\0`);
    const r = Buffer.alloc(56 + name.length + 4); // + 4 bytes of "code"
    r.writeUInt32LE(0, 0); // JIT_CODE_LOAD
    r.writeUInt32LE(r.length, 4);
    r.writeBigUInt64LE(1_000n + BigInt(i), 8); // timestamp
    r.writeUInt32LE(100, 16);
    r.writeUInt32LE(101, 20);
    r.writeBigUInt64LE(0xdeadn, 24); // vma (not where the code is)
    r.writeBigUInt64LE(c.addr, 32); // code_addr
    r.writeBigUInt64LE(c.size, 40);
    r.writeBigUInt64LE(BigInt(i), 48);
    name.copy(r, 56);
    return r;
  });
  // A record of another kind (JIT_CODE_CLOSE) is skipped.
  const close = Buffer.alloc(16);
  close.writeUInt32LE(3, 0);
  close.writeUInt32LE(16, 4);
  return Buffer.concat([header, ...records, close]);
}

const CODES = [
  { addr: 0x7000n, size: 0x100n, name: "JSC-DFG: runEpisode#AbC123" },
  { addr: 0x8000n, size: 0x100n, name: "JSC-FTL: commit#Zz9" },
  { addr: 0x9000n, size: 0x10n, name: "JSC-DFG: #Anon1" },
];

test("reads the code records of a jitdump file in the order loaded, and finds Bun's per-thread file names", () => {
  const file = join(dir, "jit-101-100.dump");
  writeFileSync(file, jitdump([CODES[1]!, CODES[0]!, CODES[2]!]));
  writeFileSync(join(dir, "jit-5-99.dump"), jitdump([]));
  expect(jitDumps(dir, 100)).toEqual([file]);
  expect(readJitDump(file)).toEqual(
    [CODES[1]!, CODES[0]!, CODES[2]!].map((c, i) => ({
      start: c.addr,
      end: c.addr + c.size,
      name: c.name,
      time: 1_000n + BigInt(i),
    })),
  );
  writeFileSync(join(dir, "not-a-dump"), "hello, this is not a jitdump file at all, no header here");
  expect(() => readJitDump(join(dir, "not-a-dump"))).toThrow("is not a jitdump file");
});

test("charges each sample to its innermost JS function, inclusive to every JS function on its stack", () => {
  const script = [
    // In commit's own code, called from runEpisode.
    "bun.exe 100",
    "\t    8010 [unknown] ([JIT] tid 100)",
    "\t    7010 [unknown] ([JIT] tid 100)",
    "",
    // In the kernel (a pwrite) below commit, below runEpisode: charged to commit.
    "bun.exe 100",
    "\tffffffff81000010 __x64_sys_pwrite64 ([kernel.kallsyms])",
    "\t    1234 __libc_pwrite (/usr/lib/x86_64-linux-gnu/libc.so.6)",
    "\t    8020 [unknown] ([JIT] tid 100)",
    "\t    7020 [unknown] ([JIT] tid 100)",
    "",
    // The event loop: no JS frame, a system call.
    "bun.exe 100",
    "\tffffffff81000020 __x64_sys_epoll_pwait2 ([kernel.kallsyms])",
    "\t    1f00 epoll_pwait2 (/usr/lib/x86_64-linux-gnu/libc.so.6)",
    "",
    // An anonymous function, then libSQL's own code with no JS frame.
    "bun.exe 100",
    "\t    9004 [unknown] ([JIT] tid 100)",
    "",
    "bun.exe 100",
    "\t    5555 [unknown] (/work/node_modules/@libsql/linux-x64-gnu/index.node)",
    "",
    // An address between two codes (code that was freed, or a thunk not in the dump): no JS frame.
    "bun.exe 100",
    "\t    7900 [unknown] ([JIT] tid 100)",
    "",
    // Another thread: counted by thread only.
    "JIT Worker 102",
    "\t    7010 [unknown] ([JIT] tid 100)",
    "",
  ].join("\n");
  const samples = parsePerfScript(script);
  expect(samples[0]!.time).toBe(null);
  expect(samples.map((s) => [s.comm, s.tid, s.frames.length])).toEqual([
    ["bun.exe", 100, 2],
    ["bun.exe", 100, 4],
    ["bun.exe", 100, 2],
    ["bun.exe", 100, 1],
    ["bun.exe", 100, 1],
    ["bun.exe", 100, 1],
    ["JIT Worker", 102, 1],
  ]);
  const codes = new CodeMap(CODES.map((c) => ({ start: c.addr, end: c.addr + c.size, name: c.name, time: 0n })));
  const text = summarize(samples, 100, codes);
  const section = (title: string) => text.split("## ").find((s) => s.startsWith(title))!;
  expect(text).toStartWith("7 samples (perf cpu-clock) of pid 100, 6 on its JS thread; 3 JIT code records");
  expect(section("CPU by thread")).toContain(" 85.7%      6  bun.exe (main: the JS thread)");
  expect(section("CPU by thread")).toContain(" 14.3%      1  JIT Worker");
  const inner = section("JS thread: innermost");
  expect(inner).toContain(" 33.3%      2  commit [FTL]");
  expect(inner).toContain(" 50.0%      3  (no JS frame on the stack)");
  expect(inner).toContain(" 16.7%      1  (anonymous) [DFG]");
  expect(inner).not.toContain("runEpisode");
  const inclusive = section("JS thread: JS functions on the stack");
  expect(inclusive).toContain(" 33.3%      2  runEpisode [DFG]");
  expect(inclusive).toContain(" 33.3%      2  commit [FTL]");
  const native = section("JS thread, no JS frame");
  expect(native).toContain(" 16.7%      1  syscall epoll_pwait2");
  expect(native).toContain(" 16.7%      1  user index.node");
  expect(native).toContain(" 16.7%      1  user [JIT] tid 100");
});

test("an address in code JSC reused is the code's that held it when the sample was taken", () => {
  const codes = new CodeMap([
    { start: 0x1000n, end: 0x2000n, name: "JSC-DFG: old#1", time: 100n }, // thrown away; its memory reused below
    { start: 0x1000n, end: 0x1800n, name: "JSC-FTL: big#2", time: 200n },
    { start: 0x1400n, end: 0x1410n, name: "JSC-Thunk: trampoline#3", time: 300n },
  ]);
  // Now (no time): the newest record that holds the address, not the one starting nearest below it.
  expect(codes.at(0x1404n)?.name).toBe("JSC-Thunk: trampoline#3");
  expect(codes.at(0x1500n)?.name).toBe("JSC-FTL: big#2");
  expect(codes.at(0x1900n)?.name).toBe("JSC-DFG: old#1"); // only the old record reaches here
  // At a time: the newest loaded by then.
  expect(codes.at(0x1404n, 150n)?.name).toBe("JSC-DFG: old#1");
  expect(codes.at(0x1404n, 250n)?.name).toBe("JSC-FTL: big#2");
  expect(codes.at(0x1404n, 50n)).toBeNull(); // before any code was there
  expect(codes.at(0x2000n)).toBeNull();
  expect(codes.at(0x0fffn)).toBeNull();
  // perf script's time field: seconds and microseconds, to ns.
  const [s] = parsePerfScript("bun.exe 7 12.000345:\n\t 1404 [unknown] ([JIT] tid 7)\n");
  expect(s!.time).toBe(12_000_345_000n);
  expect(s!.frames).toEqual([{ addr: 0x1404n, where: "[unknown] ([JIT] tid 7)" }]);
});
