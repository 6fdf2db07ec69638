/**
 * scripts/test.ts, the runner `npm test` (and so CI) uses: it must count every file's tests,
 * fail when any file fails or its process dies without bun's summary, and say which.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { ROOT } from "./helpers/gateway.ts";

const RUNNER = join(ROOT, "scripts/test.ts");
const FIXTURES = "test/fixtures/test-runner";
const dir = mkdtempSync(join(tmpdir(), "fleet-test-runner-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Run the runner on fixture files; its exit code and what it printed. */
async function runner(
  glob: string,
  more: string[] = [],
  env: Record<string, string> = {},
): Promise<{ code: number; out: string }> {
  const durations = relative(ROOT, join(dir, "durations.json"));
  const proc = Bun.spawn([process.execPath, RUNNER, "--glob", glob, "--durations", durations, ...more], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  return { code: await proc.exited, out: out + err };
}

/** Whether `pid` is a running process (a zombie is not). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** Whether `pid` has ended within `ms` (a SIGKILL takes effect soon, not at once). */
async function endsWithin(pid: number, ms = 5000): Promise<boolean> {
  for (const until = performance.now() + ms; alive(pid) && performance.now() < until; ) await Bun.sleep(20);
  return !alive(pid);
}

/** The totals the runner prints last, in bun's form. */
function totals(out: string): { pass: number; skip: number; fail: number } {
  const tail = out.slice(out.lastIndexOf("\nRan "));
  const n = (word: string) => Number(new RegExp(`^ (\\d+) ${word}$`, "m").exec(tail)?.[1]);
  return { pass: n("pass"), skip: n("skip"), fail: n("fail") };
}

describe("the test runner (scripts/test.ts)", () => {
  test("adds up every file's tests and exits 0 when all pass", async () => {
    const { code, out } = await runner(`${FIXTURES}/passes.check.ts`);
    expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 0 });
    expect(code).toBe(0);
    expect(out).toContain("(pass) one");
    // Each file's line gives its seconds and its CPU seconds, to a tenth (this fixture takes less than that).
    expect(out).toMatch(new RegExp(`^-- 1/1 ${FIXTURES}/passes\\.check\\.ts: \\d+\\.\\d s, \\d+\\.\\d s CPU$`, "m"));
  }, 30_000);

  test("a failing test fails the run, and the summary names its file and test", async () => {
    const { code, out } = await runner(`${FIXTURES}/{passes,fails}.check.ts`, ["--jobs", "2"]);
    expect(totals(out)).toEqual({ pass: 3, skip: 1, fail: 1 });
    expect(code).toBe(1);
    const failed = out.slice(out.indexOf("\nfailed:"));
    expect(failed).toContain(`${FIXTURES}/fails.check.ts (exit code 1)`);
    expect(failed).toContain("(fail) fails on purpose");
    expect(failed).not.toContain("passes.check.ts");
  }, 30_000);

  test("files named on the command line run alone, once each; a name the glob does not find is refused", async () => {
    const glob = `${FIXTURES}/{passes,fails}.check.ts`;
    const { code, out } = await runner(glob, ["--jobs", "2", `./${FIXTURES}/passes.check.ts`]);
    expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 0 });
    expect(code).toBe(0);
    expect(out).toContain("1 test files");
    expect(out).not.toContain("fails.check.ts");
    // A path the glob's pattern takes (a typo of a test file) but no file has: refused, nothing run.
    const missing = await runner(`${FIXTURES}/*.check.ts`, [`${FIXTURES}/nowhere.check.ts`]);
    expect(missing.code).toBe(2);
    expect(missing.out).toContain(`no such test file: ${FIXTURES}/nowhere.check.ts`);
  }, 30_000);

  test("a file whose process ends without bun's summary counts as a failure, said so", async () => {
    const { code, out } = await runner(`${FIXTURES}/{passes,crashes}.check.ts`);
    expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 1 });
    expect(code).toBe(1);
    expect(out).toContain(`${FIXTURES}/crashes.check.ts (exit code 3): no failing test reported`);
  }, 30_000);

  test("--update-durations records each file's seconds and CPU seconds", async () => {
    const { code } = await runner(`${FIXTURES}/{passes,fails}.check.ts`, ["--update-durations"]);
    expect(code).toBe(1);
    const text = readFileSync(join(dir, "durations.json"), "utf8");
    const recorded = JSON.parse(text) as Record<string, { seconds: number; cpu: number }>;
    expect(Object.keys(recorded).sort()).toEqual([`${FIXTURES}/fails.check.ts`, `${FIXTURES}/passes.check.ts`]);
    for (const r of Object.values(recorded)) {
      expect(r.seconds).toBeGreaterThan(0);
      // A bun process spends tens of milliseconds of CPU on its own start.
      expect(r.cpu).toBeGreaterThan(0);
    }
    // One line per file, as the formatter leaves it (test/durations.json is committed).
    expect(text.trimEnd().split("\n")).toHaveLength(4);
  }, 30_000);

  describe("files that mostly wait", () => {
    const [a, b] = [`${FIXTURES}/meet-a.check.ts`, `${FIXTURES}/meet-b.check.ts`];
    const meet = async (recorded: Record<string, unknown>, more: string[], waitMs = 15_000) => {
      writeFileSync(join(dir, "durations.json"), JSON.stringify(recorded));
      const folder = mkdtempSync(join(dir, "meet-"));
      const env = { FLEET_RUNNER_MEET: folder, FLEET_RUNNER_MEET_MS: String(waitMs) };
      return runner(`${FIXTURES}/meet-{a,b}.check.ts`, more, env);
    };

    test("run beside the --jobs workers, on a worker of their own", async () => {
      const recorded = { [a]: { seconds: 60, cpu: 1 }, [b]: { seconds: 60, cpu: 55 } };
      const { code, out } = await meet(recorded, ["--jobs", "1"]);
      expect(out).toContain(`2 test files, 1 at a time, and 1 more for the 1 that mostly wait: ${a}\n`);
      expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 0 });
      expect(code).toBe(0);
    }, 60_000);

    test("with --waiting-jobs 0 they queue for the --jobs workers like any other file", async () => {
      const recorded = { [a]: { seconds: 60, cpu: 1 }, [b]: { seconds: 60, cpu: 55 } };
      const { code, out } = await meet(recorded, ["--jobs", "1", "--waiting-jobs", "0"], 1000);
      expect(out).toContain("2 test files, 1 at a time\n");
      // One after the other: the first waited for the second in vain.
      expect(totals(out)).toEqual({ pass: 1, skip: 0, fail: 1 });
      expect(code).toBe(1);
    }, 60_000);

    test("are taken by a --jobs worker once no other file is left", async () => {
      const recorded = { [a]: { seconds: 60, cpu: 1 }, [b]: { seconds: 50, cpu: 1 } };
      const { code, out } = await meet(recorded, ["--jobs", "1"]);
      expect(out).toContain(`and 1 more for the 2 that mostly wait: ${a}, ${b}\n`);
      expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 0 });
      expect(code).toBe(0);
    }, 60_000);

    test("a short file, or one recorded by seconds alone, does not count as waiting", async () => {
      for (const recorded of [{ [a]: { seconds: 2, cpu: 0.1 } }, { [a]: 60 }]) {
        const { code, out } = await meet(recorded, ["--jobs", "1"], 1000);
        expect(out).toContain("2 test files, 1 at a time\n");
        expect(code).toBe(1);
      }
    }, 60_000);
  });

  test("files run longest first by the recorded durations, and a file not recorded counts as long", async () => {
    const order = async (seconds: Record<string, number>) => {
      writeFileSync(join(dir, "durations.json"), JSON.stringify(seconds));
      const { out } = await runner(`${FIXTURES}/{passes,fails}.check.ts`, ["--jobs", "1"]);
      return [...out.matchAll(/^-- \d+\/2 (\S+):/gm)].map((m) => m[1]);
    };
    const [passes, fails] = [`${FIXTURES}/passes.check.ts`, `${FIXTURES}/fails.check.ts`];
    expect(await order({ [passes]: 100, [fails]: 1 })).toEqual([passes, fails]);
    expect(await order({ [passes]: 1, [fails]: 100 })).toEqual([fails, passes]);
    expect(await order({ [fails]: 1 })).toEqual([passes, fails]);
  }, 30_000);

  test("a file whose process never exits is killed at --file-timeout and counts as a failure", async () => {
    const { code, out } = await runner(`${FIXTURES}/{passes,hangs}.check.ts`, ["--file-timeout", "2"]);
    expect(totals(out)).toEqual({ pass: 2, skip: 0, fail: 1 });
    expect(code).toBe(1);
    expect(out).toContain("killed after 2 s (--file-timeout)");
    expect(out).toContain(`${FIXTURES}/hangs.check.ts (exit code 137): no failing test reported`);
  }, 30_000);

  test("a process a file leaves running is killed when the file ends, and the run says so", async () => {
    const pidFile = join(dir, "left.pid");
    const { code, out } = await runner(`${FIXTURES}/leaves.check.ts`, [], { FLEET_RUNNER_CHILD_PID: pidFile });
    const pid = Number(readFileSync(pidFile, "utf8"));
    expect(totals(out)).toEqual({ pass: 1, skip: 0, fail: 0 });
    expect(code).toBe(0);
    expect(out).toContain(`left 1 process(es) running (pid ${pid}): killed`);
    expect(await endsWithin(pid)).toBe(true);
  }, 30_000);

  test("a file that runs long is named while it runs, every --progress seconds", async () => {
    const { code, out } = await runner(`${FIXTURES}/hangs.check.ts`, ["--progress", "1", "--file-timeout", "3"]);
    expect(code).toBe(1);
    const named = out.indexOf(`.. still running: ${FIXTURES}/hangs.check.ts (`);
    expect(named).toBeGreaterThanOrEqual(0);
    expect(named).toBeLessThan(out.indexOf("killed after 3 s (--file-timeout)"));
  }, 30_000);

  test("at --file-timeout, what the file started dies with it", async () => {
    const pidFile = join(dir, "hung.pid");
    const { code, out } = await runner(`${FIXTURES}/leaves.check.ts`, ["--file-timeout", "2"], {
      FLEET_RUNNER_CHILD_PID: pidFile,
      FLEET_RUNNER_HANG: "1",
    });
    expect(code).toBe(1);
    expect(out).toContain("killed after 2 s (--file-timeout)");
    expect(await endsWithin(Number(readFileSync(pidFile, "utf8")))).toBe(true);
  }, 30_000);

  test("a ^C to the runner ends the files it runs and what they started", async () => {
    const pidFile = join(dir, "interrupted.pid");
    const durations = relative(ROOT, join(dir, "durations.json"));
    const glob = `${FIXTURES}/leaves.check.ts`;
    const proc = Bun.spawn([process.execPath, RUNNER, "--glob", glob, "--durations", durations], {
      cwd: ROOT,
      env: { ...process.env, FLEET_RUNNER_CHILD_PID: pidFile, FLEET_RUNNER_HANG: "1" },
      stdin: "ignore",
      stdout: "ignore",
      stderr: "ignore",
    });
    const started = performance.now();
    while (!existsSync(pidFile) && performance.now() - started < 20_000) await Bun.sleep(50);
    const pid = Number(readFileSync(pidFile, "utf8"));
    expect(alive(pid)).toBe(true);
    proc.kill("SIGINT");
    expect(await proc.exited).toBe(130);
    expect(await endsWithin(pid)).toBe(true);
  }, 30_000);

  test("a glob that matches no file fails the run instead of passing on no tests", async () => {
    const { code, out } = await runner(`${FIXTURES}/none-*.check.ts`);
    expect(code).toBe(1);
    expect(out).toContain(`no test files match ${FIXTURES}/none-*.check.ts`);
  }, 30_000);

  test("options it does not know go to every bun test, with or without a -- before them", async () => {
    for (const more of [
      ["-t", "one"],
      ["--", "-t", "one"],
    ]) {
      const { code, out } = await runner(`${FIXTURES}/passes.check.ts`, more);
      expect(totals(out)).toEqual({ pass: 1, skip: 0, fail: 0 });
      expect(code).toBe(0);
      expect(out).toContain("(pass) one");
      expect(out).not.toContain("(pass) two");
    }
  }, 30_000);

  test("--jobs must be a whole number of at least 1", async () => {
    const { code, out } = await runner(`${FIXTURES}/passes.check.ts`, ["--jobs", "0"]);
    expect(code).toBe(2);
    expect(out).toContain("--jobs must be a whole number of at least 1, not 0");
  }, 30_000);

  test("--waiting-jobs must be a whole number of at least 0", async () => {
    const { code, out } = await runner(`${FIXTURES}/passes.check.ts`, ["--waiting-jobs", "-1"]);
    expect(code).toBe(2);
    expect(out).toContain("--waiting-jobs must be a whole number of at least 0, not -1");
  }, 30_000);

  test("--progress must be a number of seconds above 0", async () => {
    const { code, out } = await runner(`${FIXTURES}/passes.check.ts`, ["--progress", "soon"]);
    expect(code).toBe(2);
    expect(out).toContain("--progress must be a number of seconds above 0, not soon");
  }, 30_000);
});
