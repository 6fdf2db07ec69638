/**
 * Agent config schemas (agents/README.md "Config schema"): `defineAgent({ config: z.object(...) })`
 * is checked in the episode sandbox at `fleet validate`, gateway start and every hot redeploy
 * (a mismatch refuses the deploy with the key path), and `ctx.config` is the schema's output.
 * Fixture: test/fixtures/config/typed.ts.
 */
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { execFileSync } from "node:child_process";
import {
  chmodSync,
  cpSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { stimuli, testAgent } from "agent-fleets/testing";
import typed from "./fixtures/config/typed.ts";
import { checkConfigs, defaultSpawnOptions, runEpisode } from "../gateway/episode/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { cleanupAll, fixture, publishQos1, ROOT, runCli, runCommand, TestFleet, waitFor } from "./helpers/gateway.ts";
import { counterType, fleetHeader, q } from "./helpers/toml.ts";

setDefaultTimeout(120_000);
afterAll(cleanupAll);

const TYPED = fileURLToPath(new URL("./fixtures/config/typed.ts", import.meta.url));
const SPAWN = defaultSpawnOptions();
const SDK = join(ROOT, "agents/sdk/index.ts");

const typeToml = (config: string, module = TYPED) =>
  `[agents.t]\nmodule = ${q(module)}\nsubscribe = ["t/+/in"]\nkey = "{1}"\nconfig = ${config}\n`;

async function problemsOf(config: string, module = TYPED) {
  const sv = await compileSpec(typeToml(config, module), "/srv/fleet.toml");
  return checkConfigs(Object.values(sv.spec.agents), SPAWN);
}

describe("config checked against the module's schema, in the sandbox", () => {
  test("a config the schema accepts has no problems", async () => {
    expect(await problemsOf("{ threshold = 80 }")).toEqual([]);
  });

  test("each mismatch is named by its fleet.toml key path and the schema's message", async () => {
    expect(await problemsOf('{ threshold = "high", limits = { max = -1 } }')).toEqual([
      {
        type: "t",
        keyPath: "agents.t.config.limits.max",
        path: ["agents", "t", "config", "limits", "max"],
        message: "Too small: expected number to be >0 (the agent's config schema)",
      },
      {
        type: "t",
        keyPath: "agents.t.config.threshold",
        path: ["agents", "t", "config", "threshold"],
        message: "Invalid input: expected number, received string (the agent's config schema)",
      },
    ]);
  });

  test("a module whose top level forges the check's answer out of the host's shape cannot run", async () => {
    const problems = await problemsOf("{}", fileURLToPath(new URL("./fixtures/unit/forged-check.ts", import.meta.url)));
    expect(problems).toHaveLength(1);
    expect(problems[0]!.keyPath).toBe("agents.t.module");
    expect(problems[0]!.message).toEndWith("cannot run: its config check answered out of shape");
  });

  test("a module without a schema takes any config", async () => {
    expect(await problemsOf('{ anything = "goes" }', fixture("counter"))).toEqual([]);
  });

  test("a module remembered as schema-less is checked again once its file changes", async () => {
    const dir = mkdtempSync(join(ROOT, "test/fixtures/config/.tmp-"));
    chmodSync(dir, 0o755); // the sandbox's uid must read it
    try {
      const mod = join(dir, "agent.ts");
      const sdk = JSON.stringify(join(ROOT, "agents/sdk/index.ts"));
      const agent = (schema: string) => `defineAgent({ ${schema}init: () => ({}), onStimulus() {} })`;
      writeFileSync(mod, `import { defineAgent } from ${sdk};\nexport default ${agent("")};\n`);
      expect(await problemsOf("{ threshold = 1 }", mod)).toEqual([]);
      expect(await problemsOf("{ threshold = 1 }", mod)).toEqual([]); // remembered: no subprocess
      await Bun.sleep(20); // a new mtime
      writeFileSync(
        mod,
        `import { z } from "zod";\nimport { defineAgent } from ${sdk};\n` +
          `export default ${agent("config: z.object({ threshold: z.string() }), ")};\n`,
      );
      const problems = await problemsOf("{ threshold = 1 }", mod);
      expect(problems.map((p) => p.keyPath)).toEqual(["agents.t.config.threshold"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a module whose packages are symlinks (pnpm, npm link, workspaces) is checked all the same", async () => {
    // An app outside the install, zod in pnpm's layout: node_modules/zod -> .pnpm/zod@x/node_modules/zod.
    const app = mkdtempSync(join(tmpdir(), "fleet-pnpm-"));
    try {
      const real = join(app, "node_modules/.pnpm/zod@x/node_modules/zod");
      mkdirSync(dirname(real), { recursive: true });
      cpSync(realpathSync(join(ROOT, "node_modules/zod")), real, { recursive: true, dereference: true });
      symlinkSync(".pnpm/zod@x/node_modules/zod", join(app, "node_modules/zod"));
      const mod = join(app, "agent.ts");
      writeFileSync(mod, readFileSync(TYPED, "utf8").replace("../../../agents/sdk/index.ts", SDK));
      execFileSync("chmod", ["-R", "a+rX", app]); // the sandbox's uid must read it
      const problems = await problemsOf('{ threshold = "high" }', mod);
      expect(problems.map((p) => p.keyPath)).toEqual(["agents.t.config.threshold"]);
    } finally {
      rmSync(app, { recursive: true, force: true });
    }
  });

  test("an episode sees the schema's output: defaults filled in", async () => {
    const r = await runEpisode(
      {
        t: "start",
        episode: "0190f000-0000-7000-8000-0000000000c1",
        agent: { type: "t", key: "k", id: "t/k" },
        module: TYPED,
        config: { threshold: 80 },
        state: null,
        fresh: true,
        stimulus: { id: "m:1", kind: "manual", payload: null, received_at: 0 },
        replay: null,
        limits: { max_records: 100, max_record_bytes: 100_000 },
        wakes: { pending: [], max: 10 },
      },
      {
        timeoutMs: 20_000,
        memoryMb: 256,
        maxRecords: 100,
        maxRecordBytes: 100_000,
        maxOpenFiles: 256,
        maxProcesses: 4096,
      },
      async () => ({ ok: false, result: null }),
      SPAWN,
    );
    expect(r.ok).toBe(true);
    expect(r.records.filter((x) => x.k === "emit")).toEqual([
      { k: "emit", data: { threshold: 80, unit: "C", max: 3 } },
    ]);
  });

  test("agent-fleets/testing applies the schema too: defaults in, a bad config rejected by name", async () => {
    const ok = testAgent(typed, { config: { threshold: 5 } as never });
    expect((await ok.run(stimuli.manual(null))).emits).toEqual([{ threshold: 5, unit: "C", max: 3 }]);
    const bad = testAgent(typed, { config: { threshold: "x" } as never });
    await expect(bad.run(stimuli.manual(null))).rejects.toThrow(
      "config threshold Invalid input: expected number, received string (the agent's config schema)",
    );
  });
});

describe("a bad config refuses the deploy", () => {
  test("`fleet validate` exits 1 naming the key path", async () => {
    const fleet = new TestFleet(`${fleetHeader("cfg-validate")}\n${typeToml('{ threshold = "high" }')}`);
    const r = await runCli(["validate", fleet.configPath, "--json"]);
    expect(r.code).toBe(1);
    const line =
      readFileSync(fleet.configPath, "utf8")
        .split("\n")
        .findIndex((l) => l.includes('threshold = "high"')) + 1;
    expect(r.json).toMatchObject({ ok: false, key_path: "agents.t.config.threshold", line });
    expect(r.json.error).toContain("expected number, received string");
  });

  test("`fleet validate` exits 1 naming a module that is missing or does not bundle", async () => {
    const dir = mkdtempSync(join(ROOT, ".tmp-validate-"));
    try {
      writeFileSync(join(dir, "broken.ts"), "export default (;\n");
      for (const module of [join(dir, "missing.ts"), join(dir, "broken.ts")]) {
        const fleet = new TestFleet(`${fleetHeader("cfg-module")}\n${typeToml("{ threshold = 1 }", module)}`);
        const r = await runCli(["validate", fleet.configPath, "--json"]);
        expect(r.code).toBe(1);
        expect(r.json).toMatchObject({ ok: false, unbundled: [{ type: "t" }] });
        const human = await runCli(["validate", fleet.configPath]);
        expect(human.code).toBe(1);
        expect(human.stdout).toContain("agents.t.module cannot be bundled");
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("`fleet validate` places a syntax error in a module at file:line:column, as a module not bundled", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-validate-"));
    try {
      chmodSync(dir, 0o755); // the module is loaded as another uid when root
      mkdirSync(join(dir, "agents"));
      writeFileSync(join(dir, "agents", "broken.ts"), "// an edit half done\nexport const x = ;\n");
      const config = join(dir, "fleet.toml");
      writeFileSync(config, `${fleetHeader("cfg-syntax")}\n${typeToml("{ threshold = 1 }", "agents/broken.ts")}`);
      const r = await runCli(["validate", config, "--json"]);
      expect(r.code).toBe(1);
      expect(r.json).toMatchObject({ ok: false, file: config, unbundled: [{ type: "t" }] });
      expect(r.json.unbundled[0].error).toContain(`${join(dir, "agents", "broken.ts")}:2:18: Unexpected ;`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the gateway does not start on it, and says why", async () => {
    const fleet = new TestFleet(`${fleetHeader("cfg-start")}\n${typeToml("{ unit = 5 }")}`);
    const err = await fleet.start(60_000).then(
      () => null,
      (e: Error) => e,
    );
    expect(err?.message).toContain("gateway did not start");
    expect(fleet.logTail(200)).toContain("agents.t.config.threshold");
  });

  test("a restart with a fleet.toml it cannot read runs the version that ran before and says why", async () => {
    const fleet = new TestFleet(fleetHeader("cfg-restart") + counterType("counter", "restart/+/c"));
    try {
      await fleet.start();
      const view = async () =>
        (await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string; spec_error: string | null };
      const ran = (await view()).spec_version;
      const c = await fleet.mqtt();
      await publishQos1(c, "restart/a/c", { id: "1" });
      await fleet.waitCommitted("counter/a", 1);
      expect(await fleet.stop()).toBe(0);

      // An edit with a typo, then a power cut: the fleet comes back on what it ran, not down.
      const good = readFileSync(fleet.configPath, "utf8");
      const typo = `${good}\n[fleet\n`;
      const line = typo.split("\n").length - 1;
      writeFileSync(fleet.configPath, typo);
      await fleet.start();
      const restarted = await view();
      expect(restarted.spec_version).toBe(ran);
      expect(restarted.spec_error).toStartWith(`not applied at start: ${fleet.configPath}:${line}:`);
      expect(restarted.spec_error).toContain(`running spec ${ran.slice(0, 12)}, the one that ran before`);
      expect(fleet.logTail(400)).toContain("fleet.toml not applied at start");
      expect(fleet.logTail(400)).toContain("WARNING: fleet.toml not applied at start: ");
      const c2 = await fleet.mqtt();
      await publishQos1(c2, "restart/a/c", { id: "2" });
      await fleet.waitCommitted("counter/a", 2);

      // Fixed, the file is applied as any edit is.
      writeFileSync(fleet.configPath, good);
      await waitFor(async () => (await view()).spec_error === null, 30_000, "the fixed file applied");
      expect(await fleet.stop()).toBe(0);

      // Without a data dir given, the start fails as before: a file that cannot be read cannot say where its
      // data dir is, and the default one (here the same fleet's) is not taken on trust.
      writeFileSync(fleet.configPath, typo);
      symlinkSync(fleet.dataDir, join(fleet.dir, ".fleet"));
      const env: Record<string, string> = { ...(process.env as Record<string, string>), FLEET_LOG_FORMAT: "json" };
      delete env.FLEET_DATA_DIR;
      const r = await runCommand(
        [process.execPath, join(ROOT, "gateway/cli/main.ts"), "start", "--config", fleet.configPath],
        {
          cwd: fleet.dir,
          env,
        },
      );
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`${fleet.configPath}:${line}:`);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a reload under its config check shows spec_pending with the version it checks, then applies it", async () => {
    const fleet = new TestFleet(`${fleetHeader("cfg-pending")}\n${typeToml("{ threshold = 80 }")}`);
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    const slow = join(fleet.dir, "slow.ts"); // its config check takes 5 s
    // A module may bundle only files of its fleet's folder (docs/sandbox.md): the typed agent is copied
    // there, with this checkout's packages (zod) linked in as the fleet's own node_modules.
    const sdk = JSON.stringify(join(ROOT, "agents/sdk/index.ts"));
    writeFileSync(
      join(fleet.dir, "typed.ts"),
      readFileSync(TYPED, "utf8").replace('"../../../agents/sdk/index.ts"', sdk),
    );
    symlinkSync(realpathSync(join(ROOT, "node_modules")), join(fleet.dir, "node_modules"));
    writeFileSync(slow, 'await Bun.sleep(5000);\nexport { default } from "./typed.ts";\n');
    await fleet.start();
    type View = {
      spec_version: string;
      spec_error: string | null;
      spec_pending: { spec_version: string; step: string; since: number } | null;
    };
    const view = async () => (await (await fleet.fetch("/api/fleet")).json()) as View;
    const before = await view();
    expect(before.spec_pending).toBeNull();
    writeFileSync(fleet.configPath, `${fleetHeader("cfg-pending")}\n${typeToml("{ threshold = 90 }", slow)}`);
    const pending = await waitFor(async () => (await view()).spec_pending ?? undefined, 30_000, "the pending reload");
    expect(pending.step).toBe("config check");
    expect(pending.spec_version).not.toBe(before.spec_version);
    const status = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(status.stdout).toContain(`config check of ${pending.spec_version.slice(0, 12)} running for`);
    expect((await view()).spec_version).toBe(before.spec_version);
    const applied = await waitFor(
      async () =>
        ((v) => (v.spec_pending === null && v.spec_version !== before.spec_version ? v : undefined))(await view()),
      60_000,
      "the reload applied",
    );
    expect(applied.spec_version).toBe(pending.spec_version);
    expect(applied.spec_error).toBeNull();
    await fleet.stop();
  });

  test("a hot redeploy with it is not applied; the running version keeps its config", async () => {
    const fleet = new TestFleet(`${fleetHeader("cfg-reload")}\n${typeToml("{ threshold = 80 }")}`);
    await fleet.start();
    const client = await fleet.mqtt();
    await publishQos1(client, "t/k1/in", "{}");
    await fleet.waitCommitted("t/k1", 1);
    writeFileSync(fleet.configPath, `${fleetHeader("cfg-reload")}\n${typeToml('{ threshold = 90, unit = "K" }')}`);
    const info = await waitFor(
      async () => {
        const body = (await (await fleet.fetch("/api/fleet")).json()) as { spec_error: string | null };
        return body.spec_error ? body : undefined;
      },
      30_000,
      "the reload error",
    );
    // Named at the line and column of the key in the file.
    const text = `${fleetHeader("cfg-reload")}\n${typeToml('{ threshold = 90, unit = "K" }')}`;
    const lines = text.split("\n");
    const line = lines.findIndex((l) => l.includes('unit = "K"')) + 1;
    const column = lines[line - 1]!.indexOf("unit") + 1;
    expect(info.spec_error).toContain(`not applied: ${fleet.configPath}:${line}:${column}: agents.t.config.unit`);
    await publishQos1(client, "t/k1/in", "{}");
    await fleet.waitCommitted("t/k1", 2);
    const emits = await fleet.query<{ data: string }>(
      "SELECT data FROM events WHERE kind = 'emit' ORDER BY episode DESC LIMIT 1",
    );
    expect(JSON.parse(emits[0]!.data).data).toEqual({ threshold: 80, unit: "C", max: 3 });
    await fleet.stop();
  });
});
