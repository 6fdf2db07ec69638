/**
 * An episode's process limit where bubblewrap is not run as root: the gateway's user has no uid
 * per episode to give, so RLIMIT_NPROC is set inside the sandbox, in its own user namespace, where
 * the kernel (5.14 and later) counts that sandbox's processes alone (gateway/episode/sandbox.ts).
 */
import { describe, expect, test } from "bun:test";
import { fileURLToPath } from "node:url";
import { nprocPerNamespace, sandboxCommand, type SpawnOptions } from "../gateway/episode/index.ts";
import { runCommand } from "./helpers/gateway.ts";

const BWRAP = Bun.which("bwrap");
const PRLIMIT = Bun.which("prlimit", { PATH: "/usr/bin:/bin" });
const FIXTURE = fileURLToPath(new URL("./fixtures/sandbox/proc-count.ts", import.meta.url));
const ROOT = process.getuid?.() === 0;
// As root, run as nobody: root's own bubblewrap makes no user namespace, and root's forks pass any limit.
const AS = ROOT ? { uid: 65534, gid: 65534 } : {};
const LIMIT = 40;

/**
 * Whether a gateway run as this test's user sets the limit inside its sandboxes: bubblewrap works
 * for that user and makes a user namespace the kernel counts the limit in (`nprocInside`).
 */
function countedPerNamespace(): boolean {
  if (!BWRAP || !PRLIMIT) return false;
  const probe = `console.log((await import(${JSON.stringify(
    fileURLToPath(new URL("../gateway/episode/sandbox.ts", import.meta.url)),
  )})).defaultSpawnOptions("auto", { allowWeak: true }).nprocInside === true)`;
  const r = Bun.spawnSync([process.execPath, "-e", probe], {
    ...AS,
    env: { PATH: "/usr/bin:/bin", HOME: "/tmp", BUN_RUNTIME_TRANSPILER_CACHE_PATH: "0" },
    cwd: "/",
  });
  return r.stdout.toString().trim() === "true";
}

/** Run the fixture in a non-root bubblewrap sandbox with this process limit set inside (or not). */
async function countIn(nprocInside: boolean): Promise<{ spawned: number; error: string | null }> {
  const options: SpawnOptions = {
    bun: process.execPath,
    uids: null,
    prlimit: PRLIMIT,
    bwrap: BWRAP,
    nprocInside,
    rssPollMs: 50,
  };
  const limits = { timeoutMs: 10_000, memoryMb: 256, maxOpenFiles: 256, maxProcesses: LIMIT };
  const cmd = sandboxCommand(FIXTURE, limits, options, { binds: [{ kind: "file", path: FIXTURE }] });
  const { code, stdout, stderr } = await runCommand(cmd, {
    ...AS,
    env: { PATH: "/usr/bin:/bin", HOME: "/tmp", CAP: "100", BUN_RUNTIME_TRANSPILER_CACHE_PATH: "0" },
    cwd: "/",
  });
  if (code !== 0) throw new Error(`the sandbox exited ${code}: ${stderr}`);
  return JSON.parse(stdout) as { spawned: number; error: string | null };
}

describe("nprocPerNamespace", () => {
  test("holds from Linux 5.14 (RLIMIT_NPROC in ucounts), never for root or a setuid bubblewrap", () => {
    expect(nprocPerNamespace("/nonexistent/bwrap", "5.13.19")).toBe(false);
    expect(nprocPerNamespace("/nonexistent/bwrap", "4.19.0-27-amd64")).toBe(false);
    // A bubblewrap that cannot be looked at is not taken to make a namespace.
    expect(nprocPerNamespace("/nonexistent/bwrap", "6.1.0")).toBe(false);
    if (BWRAP) expect(nprocPerNamespace(BWRAP, "6.1.0")).toBe(!ROOT);
  });
});

describe.if(countedPerNamespace())("an episode's process limit where bubblewrap is not run as root", () => {
  test("counts the sandbox's own processes: its user's others neither use it up nor escape it", async () => {
    // More processes of the same user outside than the limit: counted per uid, the sandbox could start none.
    const outside = Array.from({ length: LIMIT + 10 }, () =>
      Bun.spawn(["/bin/sleep", "60"], { ...AS, stdin: "ignore", stdout: "ignore", stderr: "ignore" }),
    );
    try {
      const limited = await countIn(true);
      expect(limited.error).toMatch(/cannot fork|resource temporarily unavailable/i);
      expect(limited.spawned).toBeGreaterThan(0);
      // Its own threads (Bun's) count too: fewer sleepers than the limit.
      expect(limited.spawned).toBeLessThan(LIMIT);
      // The same sandbox without the limit inside starts them all.
      expect(await countIn(false)).toEqual({ spawned: 100, error: null });
    } finally {
      for (const p of outside) p.kill("SIGKILL");
    }
  }, 30_000);
});
