/**
 * The scripts' flags (scripts/bench/cli.ts): `--help` prints the usage and runs nothing; a flag a
 * script does not know, or a value it cannot use, is a clear error with the usage (exit 2), never a
 * stack trace and never a run (a bench that ignored `--help` used to run whole).
 */
import { describe, expect, test } from "bun:test";
import { ROOT, runCommand } from "./helpers/gateway.ts";

const SCRIPTS = [
  "bench",
  "bench-bundles",
  "bench-dashboard",
  "bench-onset",
  "bench-ops",
  "bench-policy",
  "bench-sandbox",
  "bench-timers",
  "crash-trials",
  "diff-mqtt",
  "fuzz-http",
  "fuzz-mqtt",
  "perf-summary",
  "profile-summary",
  "simulate",
  "soak",
  "store-bytes",
];

const run = (script: string, ...args: string[]) =>
  runCommand([process.execPath, `scripts/${script}.ts`, ...args], { cwd: ROOT });

/** What a run says, in the form the assertions compare. */
const outcome = (r: { code: number; stdout: string; stderr: string }) => ({
  code: r.code,
  usage: /^usage: bun scripts\//m.test(r.code === 0 ? r.stdout : r.stderr),
  trace: /\n\s+at |Bun v\d/.test(r.stderr),
});

describe("every script under scripts/", () => {
  test("--help prints its usage and exits 0 without running", async () => {
    const results = await Promise.all(SCRIPTS.map(async (s) => ({ s, ...outcome(await run(s, "--help")) })));
    expect(results).toEqual(SCRIPTS.map((s) => ({ s, code: 0, usage: true, trace: false })));
  }, 60_000);

  test("a flag it does not know is named, with the usage, exit 2, no stack trace", async () => {
    const results = await Promise.all(
      SCRIPTS.map(async (s) => {
        const r = await run(s, "--no-such-flag");
        return { s, named: r.stderr.includes("--no-such-flag"), ...outcome(r) };
      }),
    );
    expect(results).toEqual(SCRIPTS.map((s) => ({ s, named: true, code: 2, usage: true, trace: false })));
  }, 60_000);
});

describe("values a script cannot use", () => {
  const cases = [
    { script: "bench", args: ["--window", "often"], says: '--window is a whole number of at least 1, not "often"' },
    { script: "bench", args: ["intake", "fast"], says: "unknown section(s) fast" },
    { script: "bench-timers", args: ["--agents=-5"], says: "--agents is a whole number of at least 1" },
    { script: "soak", args: ["--rate", "0"], says: '--rate is a positive number, not "0"' },
    { script: "store-bytes", args: ["--keep", "1.5"], says: "--keep is a whole number of at least 0" },
    { script: "profile-summary", args: [], says: "which profile?" },
    { script: "perf-summary", args: ["--pid", "12"], says: "--jitdump DIR is needed" },
    { script: "fuzz-mqtt", args: ["--seconds", "ten"], says: "--seconds is a whole number of at least 1" },
    { script: "bench-onset", args: ["--bursts"], says: "argument missing" },
    { script: "diff-mqtt", args: ["--ops", "0"], says: "--ops is a whole number of at least 1" },
  ];
  test("each is a clear error with the usage, exit 2, before anything runs", async () => {
    const results = await Promise.all(
      cases.map(async ({ script, args, says }) => {
        const r = await run(script, ...args);
        return { script, args, says: r.stderr.includes(says) ? says : r.stderr, ...outcome(r) };
      }),
    );
    expect(results).toEqual(
      cases.map(({ script, args, says }) => ({ script, args, says, code: 2, usage: true, trace: false })),
    );
  }, 60_000);

  test("bench-replication, a section of the bench, run alone says how to run it", async () => {
    const r = await run("bench-replication");
    expect({ code: r.code, says: r.stderr.includes("bun scripts/bench.ts replication") }).toEqual({
      code: 2,
      says: true,
    });
  });
});
