/**
 * A module that can never run (no default export made by `defineAgent()`, a plain object, one that
 * throws when loaded, `version: 0`) is refused where the deploy is checked: `fleet validate` exits 1
 * naming `agents.<type>.module`, a hot reload keeps the last good code, and `agent-fleets/testing`
 * refuses a plain object as the gateway does.
 */
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { testAgent } from "agent-fleets/testing";
import { checkConfigs, defaultSpawnOptions } from "../gateway/episode/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { cleanupAll, publishQos1, ROOT, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { agentType, fleetHeader, q } from "./helpers/toml.ts";

setDefaultTimeout(120_000);

const SDK = JSON.stringify(join(ROOT, "agents/sdk/index.ts"));
const dir = mkdtempSync(join(ROOT, ".tmp-module-check-"));
if (process.getuid?.() === 0) chmodSync(dir, 0o755);
afterAll(async () => {
  await cleanupAll();
  rmSync(dir, { recursive: true, force: true });
});

const body = 'init: () => ({ n: 0 }), onStimulus(_s, ctx) { ctx.decide("code", CODE); }';
/** Each module that can never run, and what the refusal says about it. */
const NEVER_RUNS: Record<string, [string, string]> = {
  "no-default": [
    `import { defineAgent } from ${SDK};\nexport const agent = defineAgent({ ${body} });\n`,
    "has no default export",
  ],
  plain: [`const CODE = 1;\nexport default { ${body} };\n`, "has no default export made by defineAgent()"],
  "import-throws": [
    `import { defineAgent } from ${SDK};\nthrow new Error("lookup table missing at load");\n` +
      `export default defineAgent({ ${body} });\n`,
    "throws when loaded: lookup table missing at load",
  ],
  "version-0": [
    `import { defineAgent } from ${SDK};\nexport default defineAgent({ version: 0, ${body} });\n`,
    "throws when loaded: defineAgent: version must be a positive integer; got 0",
  ],
};
const good = (code: string) =>
  `import { defineAgent } from ${SDK};\nconst CODE = ${q(code)};\nexport default defineAgent({ ${body} });\n`;

function moduleFile(name: string, text: string): string {
  const file = join(dir, `${name}.ts`);
  writeFileSync(file, text);
  return file;
}

describe("a module that can never run is refused by the config check", () => {
  for (const [name, [text, why]] of Object.entries(NEVER_RUNS))
    test(`${name}: a problem at agents.t.module saying why`, async () => {
      const module = moduleFile(name, text);
      const sv = await compileSpec(`[agents.t]\nmodule = ${q(module)}\nsubscribe = ["t/+/in"]\n`, "/srv/fleet.toml");
      const problems = await checkConfigs(Object.values(sv.spec.agents), defaultSpawnOptions());
      expect(problems).toEqual([
        { type: "t", keyPath: "agents.t.module", path: ["agents", "t", "module"], message: expect.any(String) },
      ]);
      expect(problems[0]!.message).toContain(`${module} cannot run: it `);
      expect(problems[0]!.message).toContain(why);
      // At a start the modules are not refused here (a version that ran before may be running).
      expect(
        await checkConfigs(Object.values(sv.spec.agents), defaultSpawnOptions(), undefined, { modules: false }),
      ).toEqual([]);
    });

  test("a module that runs has no problem", async () => {
    const module = moduleFile("good", good("a"));
    const sv = await compileSpec(`[agents.t]\nmodule = ${q(module)}\nsubscribe = ["t/+/in"]\n`, "/srv/fleet.toml");
    expect(await checkConfigs(Object.values(sv.spec.agents), defaultSpawnOptions())).toEqual([]);
  });

  test("`fleet validate` exits 1 naming the module and why", async () => {
    const module = moduleFile("validate-plain", NEVER_RUNS.plain![0]);
    const fleet = new TestFleet(`${fleetHeader("module-validate")}\n${agentType("t", module, ["t/+/in"])}`);
    const r = await runCli(["validate", fleet.configPath, "--json"]);
    expect(r.code).toBe(1);
    expect(r.json).toMatchObject({ ok: false, key_path: "agents.t.module" });
    expect(r.json.error).toContain("has no default export made by defineAgent()");
  });
});

describe("a hot reload to a module that can never run", () => {
  test("is refused with the reason in spec_error; the last good code keeps running, after a restart too", async () => {
    const fleet = new TestFleet("");
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    const module = join(fleet.dir, "lab.ts");
    writeFileSync(module, good("A"));
    writeFileSync(fleet.configPath, fleetHeader("module-reload") + agentType("lab", module, ["lab/+/in"]));
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "lab/k1/in", "1");
      await fleet.waitCommitted("lab/k1", 1);
      for (const [name, [text, why]] of Object.entries(NEVER_RUNS)) {
        writeFileSync(module, text);
        const error = await waitFor(
          async () => {
            const view = (await (await fleet.fetch("/api/fleet")).json()) as { spec_error?: string | null };
            return view.spec_error?.includes(why) ? view.spec_error : undefined;
          },
          30_000,
          `the reload of ${name} refused`,
        );
        expect(error).toContain("agents.lab.module");
      }
      await publishQos1(c, "lab/k1/in", "2");
      const [latest] = await fleet.waitCommitted("lab/k1", 2);
      expect(await fleet.decisions(latest!.id)).toMatchObject([{ name: "code", data: "A" }]);
      await c.endAsync();
      // A restart with the last of them in place starts on the version that ran before, and says why.
      expect(await fleet.stop()).toBe(0);
      await fleet.start();
      const view = (await (await fleet.fetch("/api/fleet")).json()) as { spec_error: string | null };
      expect(view.spec_error).toContain("not applied at start: agents.lab.module");
      const c2 = await fleet.mqtt();
      await publishQos1(c2, "lab/k1/in", "3");
      const [third] = await fleet.waitCommitted("lab/k1", 3);
      expect(await fleet.decisions(third!.id)).toMatchObject([{ name: "code", data: "A" }]);
      await c2.endAsync();
    } finally {
      await fleet.dispose();
    }
  });
});

describe("agent-fleets/testing", () => {
  test("refuses a plain object as the gateway refuses its module", () => {
    const plain = { init: () => ({}), onStimulus: () => {} };
    expect(() => testAgent(plain as never)).toThrow("testAgent: the agent is not made by defineAgent()");
  });
});
