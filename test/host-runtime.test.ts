/**
 * The episode host runtime built into one script (gateway/episode/host-runtime.ts): where it is
 * written, who may write there, and that a built host runs an agent that imports the SDK.
 */
import { afterAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  copyFileSync,
  existsSync,
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
  HostRuntime,
  buildHostRuntime,
  bytecodeOf,
  CHILD_ENV,
  defaultSpawnOptions,
  describeSandbox,
  hostBuildProblem,
  hostScript,
  mkdirReadable,
  runtimeDir,
  runtimeFor,
} from "../gateway/episode/index.ts";
import { HOST_ENTRY, PROTOCOL_SPECIFIER, SDK_ENTRY, SDK_SPECIFIER } from "../agents/host/index.ts";
import {
  EPISODE_OOM_SCORE_ADJ,
  JOIN_CGROUP_ARG,
  MAX_LOG_CHARS,
  NICE_ARG,
  niceArg,
  type ParentMessage,
} from "../agents/protocol.ts";

const base = mkdtempSync(join(tmpdir(), "host-runtime-test-"));
afterAll(() => rmSync(base, { recursive: true, force: true }));

/**
 * A host runtime of this file's own, in its temp dir: the tests that remove its files to see them built
 * again must not remove the one every gateway and test of this uid shares in /var/tmp (they did, and an
 * episode of another test file running then failed: its script "(deleted)").
 */
const runtime = new HostRuntime([base]);
/** The shared runtime's files as this file found them (inode numbers): none of its tests may replace them. */
const sharedScript = hostScript(process.execPath);
const sharedInodes = [sharedScript, bytecodeOf(sharedScript)].filter(existsSync).map((f) => statSync(f).ino);

/**
 * The built runtime these tests remove to see it built again. Where the build fails, the runtime falls
 * back to the sources (HOST_ENTRY): that is refused here, or the test would delete agents/host/main.ts.
 */
function builtScript(): string {
  const script = runtime.script(process.execPath);
  if (script === HOST_ENTRY) throw new Error(`the host runtime was not built: ${runtime.problem()}`);
  return script;
}

describe("the built host runtime", () => {
  test("is written once by content into the uid's own directory, readable by all and writable by none but us", () => {
    const dir = runtimeDir(base);
    expect(statSync(dir).mode & 0o022).toBe(0);
    const first = buildHostRuntime(process.execPath, dir);
    const again = buildHostRuntime(process.execPath, dir);
    expect(again).toBe(first);
    expect(first.startsWith(`${dir}/host-`)).toBe(true);
    expect(statSync(first).mode & 0o777).toBe(0o644);
    // The SDK is inlined and its specifier is answered by the script itself, so agents meet the host's classes.
    const code = readFileSync(first, "utf8");
    expect(code).toContain(JSON.stringify(SDK_SPECIFIER));
    expect(code).toContain("class ToolDenied");
  });

  test("its directory is made 0755 whatever the umask: episodes read it as uids of their own", () => {
    const fresh = join(base, "umask");
    mkdirSync(fresh, { mode: 0o755 });
    const umask = process.umask(0o077);
    try {
      expect(statSync(runtimeDir(fresh)).mode & 0o777).toBe(0o755);
      const deep = join(fresh, "a/b/c");
      mkdirReadable(deep);
      for (const d of [join(fresh, "a"), join(fresh, "a/b"), deep]) expect(statSync(d).mode & 0o777).toBe(0o755);
    } finally {
      process.umask(umask);
    }
  });

  test("built again, files there with the same bytes stay: a sandbox that bound them must not see them deleted", () => {
    const dir = runtimeDir(base);
    const script = buildHostRuntime(process.execPath, dir);
    const inodes = () => [script, bytecodeOf(script)].filter(existsSync).map((f) => statSync(f).ino);
    const before = inodes();
    expect(buildHostRuntime(process.execPath, dir)).toBe(script);
    expect(inodes()).toEqual(before);
    // Bytes that are not the build's (damaged in place) are replaced.
    chmodSync(script, 0o644);
    writeFileSync(script, "damaged");
    expect(buildHostRuntime(process.execPath, dir)).toBe(script);
    expect(readFileSync(script, "utf8")).not.toBe("damaged");
    expect(statSync(script).mode & 0o777).toBe(0o644);
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
    const script = builtScript();
    expect(script.startsWith(`${base}/`)).toBe(true);
    rmSync(bytecodeOf(script));
    expect(runtime.script(process.execPath)).toBe(script);
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
    const script = builtScript();
    expect(script.startsWith(`${base}/`)).toBe(true);
    rmSync(script);
    const again = runtime.script(process.execPath);
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

  test("its tests leave the runtime this uid's gateways share as they found it", () => {
    const now = [sharedScript, bytecodeOf(sharedScript)].filter(existsSync).map((f) => statSync(f).ino);
    expect(sharedInodes.length).toBeGreaterThan(0);
    expect(now).toEqual(sharedInodes);
  });
});

describe("the host's own priority (NICE_ARG)", () => {
  test("--nice=N is read as N from 0 to 39 (nice's own range of steps); anything else is no request", () => {
    expect(niceArg(["/bun", "/host.js", `${NICE_ARG}=19`, JOIN_CGROUP_ARG])).toBe(19);
    expect(niceArg([`${NICE_ARG}=0`])).toBe(0);
    for (const bad of ["x", "-1", "40", "1.5", ""]) expect(niceArg([`${NICE_ARG}=${bad}`])).toBeNull();
    expect(niceArg([NICE_ARG, "19"])).toBeNull();
    expect(niceArg(["/bun", "/host.js"])).toBeNull();
  });

  test("given --nice=N, the host lowers its priority by N (capped at 19) before it says ready", async () => {
    const child = Bun.spawn([process.execPath, hostScript(process.execPath), `${NICE_ARG}=7`], {
      env: { ...CHILD_ENV },
      stdio: ["pipe", "ignore", "pipe", "pipe"],
    });
    const reader = Bun.file(child.stdio[3] as unknown as number)
      .stream()
      .getReader();
    const first = new TextDecoder().decode((await reader.read()).value);
    expect(first).toContain('"ready"');
    // Waiting for its start now: its nice is already the lowered one, and it is the OOM killer's first choice.
    expect(niceOf(child.pid)).toBe(Math.min(19, niceOf(process.pid) + 7));
    expect(readFileSync(`/proc/${child.pid}/oom_score_adj`, "utf8").trim()).toBe(String(EPISODE_OOM_SCORE_ADJ));
    child.kill("SIGKILL");
    await child.exited;
  });
});

/** The nice value of a process (field 19 of /proc/<pid>/stat). */
function niceOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
}

/** A host child of the built runtime, its stdin ours, and the messages it sends on fd 3 as they come. */
function hostChild(script = hostScript(process.execPath)) {
  const child = Bun.spawn([process.execPath, script], {
    env: { ...CHILD_ENV },
    cwd: "/",
    stdio: ["pipe", "ignore", "pipe", "pipe"],
  });
  const said: { t: string; [k: string]: unknown }[] = [];
  const reading = (async () => {
    let pending = "";
    const decoder = new TextDecoder();
    for await (const chunk of Bun.file(child.stdio[3] as unknown as number).stream()) {
      pending += decoder.decode(chunk, { stream: true });
      for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
        said.push(JSON.parse(pending.slice(0, nl)));
        pending = pending.slice(nl + 1);
      }
    }
  })();
  const stdin = child.stdin as import("bun").FileSink;
  return {
    child,
    said,
    write: async (text: string) => {
      stdin.write(text);
      await stdin.flush();
    },
    end: () => stdin.end(),
    /** Resolves with the first message of type `t`, or of any of them (throws if the child ends without one). */
    until: async (t: string | string[]) => {
      const wanted = (x: { t: string }) => (Array.isArray(t) ? t.includes(x.t) : x.t === t);
      for (;;) {
        const m = said.find(wanted);
        if (m) return m;
        if (child.exitCode !== null || child.signalCode !== null) {
          await reading;
          const late = said.find(wanted);
          if (late) return late;
          throw new Error(`the host ended without "${t}": ${JSON.stringify(said).slice(0, 500)}`);
        }
        await Bun.sleep(5);
      }
    },
  };
}

function startFor(module: string): Extract<ParentMessage, { t: "start" }> {
  return {
    t: "start",
    episode: "0190f000-0000-7000-8000-000000000001",
    agent: { type: "unit", key: "k1", id: "unit/k1" },
    module,
    config: {},
    state: null,
    fresh: true,
    stimulus: { id: "id:1", kind: "manual", payload: { v: 1 }, received_at: 1_700_000_000_000 },
    replay: null,
    limits: { max_records: 1000, max_record_bytes: 1024 * 1024 },
    wakes: { pending: [], max: 100 },
  };
}

/** An agent module in the test's folder that imports the SDK as bundles do (by the host's path). */
function agentModule(name: string, body: string): string {
  const dir = mkdtempSync(join(base, "agent-"));
  const file = join(dir, name);
  writeFileSync(file, `import { defineAgent } from ${JSON.stringify(SDK_ENTRY)};\n${body}`);
  return file;
}

describe("the SDK and protocol agent bundles import", () => {
  const gone = `/gone-${process.pid}/agents`;
  test.each([
    ["built", "their fixed names", SDK_SPECIFIER, PROTOCOL_SPECIFIER],
    ["built", "an install's paths that are gone (older releases)", `${gone}/sdk/index.ts`, `${gone}/protocol.ts`],
    ["from its sources", "their fixed names", SDK_SPECIFIER, PROTOCOL_SPECIFIER],
    ["from its sources", "an install's paths that are gone", `${gone}/sdk/index.ts`, `${gone}/protocol.ts`],
  ])(
    "the host %s answers imports by %s with its own copy (a denied tool is its ToolDenied)",
    async (how, _, sdk, proto) => {
      const file = join(mkdtempSync(join(base, "bundle-")), "bundle.js");
      writeFileSync(
        file,
        `import { defineAgent, ToolDenied } from ${JSON.stringify(sdk)};
import { MAX_LOG_CHARS } from ${JSON.stringify(proto)};
export default defineAgent({
  init: () => ({}),
  async onStimulus(s, ctx) {
    ctx.state.max = MAX_LOG_CHARS;
    try { await ctx.tools.publish("t/x", 1); } catch (err) { ctx.state.denied = err instanceof ToolDenied; }
  },
});
`,
      );
      const h = hostChild(how === "built" ? builtScript() : HOST_ENTRY);
      await h.until("ready");
      await h.write(`${JSON.stringify(startFor(file))}\n`);
      const call = await h.until(["tool", "error"]);
      expect(call).toMatchObject({ t: "tool" });
      const denial = { t: "tool_result", call: call.call, ok: false, result: { error: "denied", reason: "test" } };
      await h.write(`${JSON.stringify(denial)}\n`);
      const done = await h.until("done");
      h.child.kill("SIGKILL");
      await h.child.exited;
      expect(done.state).toEqual({ max: MAX_LOG_CHARS, denied: true });
    },
  );
});

describe("the host's start and its stdin", () => {
  const emitter = () =>
    agentModule(
      "emit.ts",
      "export default defineAgent({ init: () => ({}), onStimulus(s, ctx) { ctx.emit({ got: s.payload }); } });",
    );

  test("waiting for its start, it exits (code 70) when stdin ends, having run nothing", async () => {
    const h = hostChild();
    await h.until("ready");
    h.end();
    expect(await h.child.exited).toBe(70);
    expect(h.said.map((m) => m.t)).toEqual(["ready"]);
  });

  test("lines before the start that are not one are skipped, and a start in the same write still runs", async () => {
    const h = hostChild();
    await h.until("ready");
    await h.write(`not json\n{"t":"bogus"}\n${JSON.stringify(startFor(emitter()))}\n`);
    const done = await h.until("done");
    h.child.kill("SIGKILL");
    await h.child.exited;
    expect(done.state).toEqual({});
    expect(h.said.find((m) => m.t === "records")?.records).toEqual([{ k: "emit", data: { got: { v: 1 } } }]);
  });

  const caller = () =>
    agentModule(
      "call.ts",
      `export default defineAgent({
        init: () => ({}),
        async onStimulus(s, ctx) { ctx.state.answer = await ctx.tools.publish("t/x", 1); },
      });`,
    );

  test("a tool result sent after the start reaches the agent, which finishes with it", async () => {
    const h = hostChild();
    await h.until("ready");
    await h.write(`${JSON.stringify(startFor(caller()))}\n`);
    const call = await h.until("tool");
    await h.write(`${JSON.stringify({ t: "tool_result", call: call.call, ok: true, result: { sent: 7 } })}\n`);
    const done = await h.until("done");
    h.child.kill("SIGKILL");
    await h.child.exited;
    expect(done.state).toEqual({ answer: { sent: 7 } });
  });

  test("stdin that ends while the agent waits on a tool call ends the host: its gateway is gone", async () => {
    const h = hostChild();
    await h.until("ready");
    await h.write(`${JSON.stringify(startFor(caller()))}\n`);
    await h.until("tool");
    h.end();
    expect(await h.child.exited).toBe(70);
    expect(h.said.some((m) => m.t === "done")).toBe(false);
  });

  test("an agent module with a pending top-level await is loaded once and runs its turn", async () => {
    const file = agentModule(
      "tla.ts",
      `const g = globalThis as { loads?: number };
      g.loads = (g.loads ?? 0) + 1;
      await Bun.sleep(20);
      export default defineAgent({ init: () => ({}), onStimulus(s, ctx) { ctx.emit({ loads: g.loads }); } });`,
    );
    const h = hostChild();
    await h.until("ready");
    await h.write(`${JSON.stringify(startFor(file))}\n`);
    await h.until("done");
    h.child.kill("SIGKILL");
    await h.child.exited;
    expect(h.said.find((m) => m.t === "records")?.records).toEqual([{ k: "emit", data: { loads: 1 } }]);
  });

  test("after its last message the host runs nothing more (no stray timer of the agent) until killed", async () => {
    const mark = join(mkdtempSync(join(base, "stray-")), "ran");
    const file = agentModule(
      "stray.ts",
      `import { writeFileSync } from "node:fs";
      export default defineAgent({
        init: () => ({}),
        onStimulus(s, ctx) {
          setTimeout(() => writeFileSync(${JSON.stringify(mark)}, "ran"), 10);
          ctx.emit(1);
        },
      });`,
    );
    const h = hostChild();
    await h.until("ready");
    await h.write(`${JSON.stringify(startFor(file))}\n`);
    await h.until("done");
    await Bun.sleep(300);
    expect(existsSync(mark)).toBe(false);
    expect(h.child.exitCode).toBeNull();
    // Its gateway gone (stdin ends), it leaves by itself.
    h.end();
    expect(await h.child.exited).toBe(70);
    expect(existsSync(mark)).toBe(false);
  });

  test("an agent module that throws as it loads fails the episode with its error, once", async () => {
    const file = agentModule("throws.ts", 'throw new Error("broken at load");\nexport default defineAgent;');
    const h = hostChild();
    await h.until("ready");
    await h.write(`${JSON.stringify(startFor(file))}\n`);
    const err = await h.until("error");
    h.child.kill("SIGKILL");
    await h.child.exited;
    expect(err.kind).toBe("threw");
    expect(err.message).toBe("broken at load");
    expect(h.said.filter((m) => m.t === "error")).toHaveLength(1);
  });
});
