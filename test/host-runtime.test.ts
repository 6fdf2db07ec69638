/**
 * The episode host runtime built into one script (gateway/episode/host-runtime.ts): where it is
 * written, who may write there, and that a built host runs an agent that imports the SDK.
 */
import { afterAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  buildHostRuntime,
  bytecodeOf,
  CHILD_ENV,
  defaultSpawnOptions,
  describeSandbox,
  hostBuildProblem,
  hostScript,
  runtimeDir,
  runtimeFor,
} from "../gateway/episode/index.ts";
import { HOST_ENTRY, SDK_ENTRY } from "../agents/host/index.ts";
import { JOIN_CGROUP_ARG } from "../agents/protocol.ts";

const base = mkdtempSync(join(tmpdir(), "host-runtime-test-"));
afterAll(() => rmSync(base, { recursive: true, force: true }));

describe("the built host runtime", () => {
  test("is written once by content into the uid's own directory, readable by all and writable by none but us", () => {
    const dir = runtimeDir(base);
    expect(statSync(dir).mode & 0o022).toBe(0);
    const first = buildHostRuntime(process.execPath, dir);
    const again = buildHostRuntime(process.execPath, dir);
    expect(again).toBe(first);
    expect(first.startsWith(`${dir}/host-`)).toBe(true);
    expect(statSync(first).mode & 0o777).toBe(0o644);
    // The SDK is inlined and its path is answered by the script itself, so agents meet the host's classes.
    const code = readFileSync(first, "utf8");
    expect(code).toContain(JSON.stringify(SDK_ENTRY));
    expect(code).toContain("class ToolDenied");
  });

  test("carries its bytecode beside it, readable by all, and a sandbox shows the episode both files", () => {
    const script = buildHostRuntime(process.execPath, runtimeDir(base));
    // The pragma makes Bun load `<script>.jsc` instead of parsing and compiling the script.
    expect(readFileSync(script, "utf8").split("\n", 1)[0]).toContain("@bytecode");
    expect(statSync(bytecodeOf(script)).mode & 0o777).toBe(0o644);
    expect(statSync(bytecodeOf(script)).size).toBeGreaterThan(0);
    const files = runtimeFor(process.execPath, script)
      .filter((b) => b.kind === "file")
      .map((b) => b.path);
    expect(files).toContain(script);
    expect(files).toContain(bytecodeOf(script));
  });

  test("a script whose bytecode went away is built again: the sandbox's bind of it would fail every episode", () => {
    const script = hostScript(process.execPath);
    rmSync(bytecodeOf(script));
    expect(hostScript(process.execPath)).toBe(script);
    expect(statSync(bytecodeOf(script)).isFile()).toBe(true);
  });

  test("bytecode not the script's own (random, damaged, another script's) is ignored: the child parses", async () => {
    const script = buildHostRuntime(process.execPath, runtimeDir(base));
    const dir = mkdtempSync(join(base, "stale-"));
    const copy = join(dir, "host.js");
    copyFileSync(script, copy);
    const ready = async () => {
      // stdin at EOF: the host says "ready" on fd 3, then exits as it does when its gateway is gone.
      const child = Bun.spawn([process.execPath, copy], { stdio: ["ignore", "ignore", "pipe", "pipe"] });
      const said = await new Response(Bun.file(child.stdio[3] as unknown as number).stream()).text();
      await child.exited;
      return said;
    };
    writeFileSync(bytecodeOf(copy), crypto.getRandomValues(new Uint8Array(4096)));
    expect(await ready()).toContain('"t":"ready"');
    const damaged = readFileSync(bytecodeOf(script));
    damaged[0]! ^= 0xff;
    writeFileSync(bytecodeOf(copy), damaged);
    expect(await ready()).toContain('"t":"ready"');
    // Sound bytecode of another script: were it run, the child would print "other", never "ready".
    writeFileSync(join(dir, "other.js"), 'console.log("other");\n');
    const built = Bun.spawnSync([
      process.execPath,
      "build",
      join(dir, "other.js"),
      "--bytecode",
      "--format=cjs",
      "--target=bun",
      `--outdir=${join(dir, "out")}`,
    ]);
    expect(built.exitCode).toBe(0);
    copyFileSync(join(dir, "out", "other.js.jsc"), bytecodeOf(copy));
    expect(await ready()).toContain('"t":"ready"');
  });

  test("a built script that went away is built again, not left for every episode to fail on", () => {
    const script = hostScript(process.execPath);
    rmSync(script);
    const again = hostScript(process.execPath);
    expect(again).toBe(script);
    expect(statSync(again).isFile()).toBe(true);
  });

  test("a directory others can write (planted in a shared temp dir) is refused, not used", () => {
    const planted = join(base, "planted");
    mkdirSync(planted);
    const uid = process.getuid?.() ?? 0;
    mkdirSync(join(planted, `fleet-host-${uid}`));
    chmodSync(join(planted, `fleet-host-${uid}`), 0o777);
    expect(() => runtimeDir(planted)).toThrow(/only it can write/);
  });

  test("episodes here run the built script (so runner.test.ts's ToolDenied test crosses it), not the sources", () => {
    const script = hostScript(process.execPath);
    // Were it the sources, the build's problem is what this reports.
    expect(script === HOST_ENTRY ? `runs the sources: ${hostBuildProblem()}` : null).toBeNull();
    expect(script.startsWith(runtimeDir("/var/tmp")) || script.startsWith(runtimeDir("/tmp"))).toBe(true);
    // The start-up log says whether episodes get the bytecode (a Bun that cannot build it still runs them).
    expect(describeSandbox(defaultSpawnOptions())).toContain("built host runtime with its bytecode");
  });

  test("told to join a memory cgroup it was not given, the host says why and exits before it is ready", async () => {
    const child = Bun.spawn([process.execPath, hostScript(process.execPath), JOIN_CGROUP_ARG], {
      env: { ...CHILD_ENV },
      stdio: ["pipe", "ignore", "pipe", "pipe"],
    });
    const [said, err, code] = await Promise.all([
      new Response(Bun.file(child.stdio[3] as unknown as number).stream()).text(),
      new Response(child.stderr as ReadableStream).text(),
      child.exited,
    ]);
    expect(code).toBe(70);
    expect(err).toContain("the episode could not join its memory cgroup");
    expect(said).not.toContain('"ready"');
  });
});
