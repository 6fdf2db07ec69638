/**
 * The tests whose paths differ for a gateway that is not root (the sandbox, the host runtime,
 * process limits, bundles), run again as nobody (65534) when the suite runs as root. CI runs
 * as root: five failures of `npm test` as a normal user went unseen for many sessions before
 * they were found by hand. Where nobody cannot read the checkout, the test is skipped.
 */
import { describe, expect, test } from "bun:test";
import { fileURLToPath } from "node:url";
import { NOBODY, NOBODY_ENV, nobodyCanRun, runCommand } from "./helpers/gateway.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const FILES = [
  "test/runner.test.ts",
  "test/host-runtime.test.ts",
  "test/process-limit.test.ts",
  "test/e2e.sandbox.test.ts",
  "test/e2e.bundles.test.ts",
];
// As root, where nobody can read the checkout (else the test shows as skipped).
describe.if(process.getuid?.() === 0 && nobodyCanRun(ROOT))("the sandbox's tests as a user other than root", () => {
  test("pass as nobody: runner, host runtime, process limit, sandbox and bundles end to end", async () => {
    const { code, stdout, stderr } = await runCommand([process.execPath, "test", ...FILES], {
      ...NOBODY,
      env: NOBODY_ENV,
      cwd: ROOT,
      timeoutMs: 290_000,
    });
    const report = stdout + stderr;
    const failed = [...new Set(report.split("\n").filter((l) => l.startsWith("(fail)")))];
    const passed = Number(/^\s*(\d+) pass$/m.exec(report)?.[1] ?? 0);
    expect({ code, failed }).toEqual({ code: 0, failed: [] });
    // The files ran: most of their tests do not depend on being root.
    expect(passed).toBeGreaterThan(100);
  }, 300_000);
});
