/**
 * Code pinned by content (docs/upgrading.md) against a real gateway: each type's module is
 * bundled with its local imports at start and at every redeploy, stored by BLAKE3, named by the
 * spec version and by every episode, and episodes run from the stored bundle. Editing a file the
 * module imports deploys new code; `fleet replay` of an older episode still runs the code that
 * ran it (MATCH), `--module` runs the edited file. A broken edit is refused and the fleet keeps
 * running the last good bundle.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import {
  appendFileSync,
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { withBundles } from "../gateway/code/index.ts";
import { blake3Hex } from "../gateway/hash.ts";
import { loadSpec } from "../gateway/spec/index.ts";
import { bundleOfSql, episodeStatus, idOfSql, Store, specOfSql } from "../gateway/store/index.ts";
import { cleanupAll, publishQos1, ROOT, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const SDK = join(ROOT, "agents/sdk/index.ts");
const IS_ROOT = process.getuid?.() === 0;
/**
 * Where the gateway materialised a bundle (gateway/code/files.ts `bundleDir`): in the data dir, beside
 * it when agents run as other uids (root), or in a folder of the gateway's in /var/tmp (else the temp
 * dir) when the data dir is under /tmp or others cannot reach beside it.
 */
function bundleFile(fleet: TestFleet, hash: string): string {
  const dirs = [join(fleet.dataDir, "bundles"), `${fleet.dataDir}.bundles`];
  for (const base of ["/var/tmp", tmpdir()])
    for (const d of existsSync(base) ? readdirSync(base) : [])
      if (d.startsWith("fleet-bundles-")) dirs.push(join(base, d));
  const found = dirs.map((d) => join(d, `${hash}.js`)).find((f) => existsSync(f));
  if (!found) throw new Error(`bundle ${hash} is in none of ${dirs.join(", ")}`);
  return found;
}

/** The agent: counts, and labels what it emits with what its local helper module says. */
const AGENT = `import { defineAgent } from ${JSON.stringify(SDK)};
import { label } from "./label.ts";
export default defineAgent<{ count: number }>({
  init: () => ({ count: 0 }),
  onStimulus(stimulus, ctx) {
    ctx.state.count += 1;
    ctx.decide("label", { label: label(), n: ctx.state.count });
    ctx.emit({ label: label(), count: ctx.state.count, id: stimulus.id });
  },
});
`;
const label = (text: string) => `export const label = (): string => ${JSON.stringify(text)};\n`;

interface Row {
  [k: string]: unknown;
}

afterAll(cleanupAll);

/** A fleet whose `tagger` type runs `<fleet dir>/agent.ts` (which imports `./label.ts`). */
function taggerFleet(name: string, fleetLines = ""): { fleet: TestFleet; agent: string; labelFile: string } {
  const fleet = new TestFleet("");
  const agent = join(fleet.dir, "agent.ts");
  const labelFile = join(fleet.dir, "label.ts");
  // As root, agents run as other uids: the bundles beside the data dir must be reachable (mkdtemp made it 0700).
  if (IS_ROOT) chmodSync(fleet.dir, 0o755);
  writeFileSync(agent, AGENT);
  writeFileSync(labelFile, label("v1"));
  writeFileSync(
    fleet.configPath,
    fleetHeader(name, { fleet: fleetLines }) + agentType("tagger", agent, ["tags/+/in"], { dedup: "id" }),
  );
  return { fleet, agent, labelFile };
}

/** The gateway's spec error (/api/fleet), null when fleet.toml and its modules are applied. */
async function specError(fleet: TestFleet): Promise<string | null> {
  return ((await (await fleet.fetch("/api/fleet")).json()) as { spec_error?: string | null }).spec_error ?? null;
}

async function episodeRows(fleet: TestFleet, agent: string): Promise<Row[]> {
  return fleet.query<Row>(
    `SELECT ${idOfSql("id")} AS id, ${bundleOfSql("bundle")} AS bundle, ${specOfSql("spec_version")} AS spec_version,
      ${episodeStatus.ofSql("status")} AS status FROM episodes WHERE agent = ?
      ORDER BY started_at, id`,
    [agent],
  );
}

describe("code pinned by content", () => {
  test("episodes run a stored bundle; an edited import is new code; old episodes replay on their code", async () => {
    const { fleet, agent, labelFile } = taggerFleet("e2e-bundles");
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "tags/a/in", { id: "r1" });
      await publishQos1(c, "tags/a/in", { id: "r2" });
      await fleet.waitCommitted("tagger/a", 2);
      const first = await episodeRows(fleet, "tagger/a");
      const v1 = first[0]!.bundle as string;
      expect(v1).toMatch(/^[0-9a-f]{64}$/);
      expect(first.map((e) => e.bundle)).toEqual([v1, v1]);

      // Stored by content, named by the spec version, materialised read-only for the sandbox.
      const [stored] = await fleet.query<Row>("SELECT hash, module, code, bytes FROM bundles WHERE hash = ?", [v1]);
      expect(stored?.module).toBe(agent);
      expect(String(stored?.code)).toContain('"v1"');
      expect(String(stored?.code)).not.toContain("import { label }");
      const [spec] = await fleet.query<Row>("SELECT bundles FROM spec_versions WHERE hash = ?", [
        first[0]!.spec_version as string,
      ]);
      expect(JSON.parse(String(spec?.bundles))).toEqual({ tagger: v1 });
      expect(statSync(bundleFile(fleet, v1)).mode & 0o777).toBe(0o444);

      // `fleet show` names the bundle.
      const shown = await fleet.cli("show", first[0]!.id as string);
      expect(shown.json.bundle).toBe(v1);
      const human = await runCli(["show", first[0]!.id as string, "--data-dir", fleet.dataDir]);
      expect(human.stdout).toContain(`code       bundle ${v1}`);

      // Editing a file the module imports is new code: a new spec version, the next episode runs it.
      writeFileSync(labelFile, label("v2"));
      await waitFor(
        async () => (await fleet.query("SELECT hash FROM spec_versions")).length === 2,
        20_000,
        "a spec version for the new code",
      );
      await publishQos1(c, "tags/a/in", { id: "r3" });
      await fleet.waitCommitted("tagger/a", 3);
      const after = await episodeRows(fleet, "tagger/a");
      const v2 = after[2]!.bundle as string;
      expect(v2).toMatch(/^[0-9a-f]{64}$/);
      expect(v2).not.toBe(v1);
      expect(after[2]!.spec_version).not.toBe(first[0]!.spec_version);
      const [out] = await fleet.decisions(after[2]!.id as string);
      expect(out?.data).toMatchObject({ label: "v2" });

      // Replay of the first episode runs the v1 bundle it names, though the file now says v2.
      const replay = await fleet.cli("replay", first[0]!.id as string);
      expect(replay.json.verdict).toBe("MATCH");
      expect(replay.code).toBe(0);
      // --module runs the file as it is now: new code against old history.
      const tried = await fleet.cli("replay", first[0]!.id as string, "--module", agent);
      expect(tried.json.verdict).toBe("DIVERGED");
      expect(JSON.stringify(tried.json.divergence)).toContain("v2");

      // A broken edit is refused with the key path and the bundler's reason; the last good code keeps running.
      writeFileSync(labelFile, "export const label = (: string => ;\n");
      const error = await waitFor(
        async () => {
          const body = (await (await fleet.fetch("/api/fleet")).json()) as { spec_error?: string | null };
          return body.spec_error ?? undefined;
        },
        20_000,
        "a reload error for the broken module",
      );
      expect(error).toContain("agents.tagger.module cannot be bundled");
      await publishQos1(c, "tags/a/in", { id: "r4" });
      await fleet.waitCommitted("tagger/a", 4);
      expect((await episodeRows(fleet, "tagger/a"))[3]!.bundle).toBe(v2);

      // Restarting on the same code reuses the same bundle and spec version.
      writeFileSync(labelFile, label("v2"));
      await fleet.stop();
      await fleet.start();
      await publishQos1(await fleet.mqtt(), "tags/a/in", { id: "r5" });
      await fleet.waitCommitted("tagger/a", 5);
      const last = (await episodeRows(fleet, "tagger/a"))[4]!;
      expect(last.bundle).toBe(v2);
      expect(last.spec_version).toBe(after[2]!.spec_version);
      expect((await fleet.cli("verify")).code).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 180_000);

  test("a module importing a file the gateway may not give away is refused at validate and at hot reload", async () => {
    const { fleet, agent } = taggerFleet("e2e-bundles-scope");
    const outside = join(tmpdir(), `fleet-scope-${process.pid}.txt`);
    writeFileSync(outside, "OUTSIDE-SECRET\n");
    symlinkSync(outside, join(fleet.dir, "looks-local.txt"));
    const hostile = (spec: string) =>
      `import { defineAgent } from ${JSON.stringify(SDK)};\n` +
      `import leak from ${JSON.stringify(spec)} with { type: "text" };\n` +
      "export default defineAgent({ init: () => ({}), onStimulus(_s, ctx) { ctx.emit({ leak: String(leak) }); } });\n";
    const cases = [
      ["/proc/self/environ", "agent code may not import the gateway's files, /proc, /sys or /dev"],
      ["./data/local-admin.token", `inside the gateway's data dir (${fleet.dataDir})`],
      ["./looks-local.txt", "is outside the folders agent code may import from"],
    ] as const;
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "tags/a/in", { id: "r1" });
      await fleet.waitCommitted("tagger/a", 1);
      const [good] = await episodeRows(fleet, "tagger/a");
      for (const [spec, rule] of cases) {
        writeFileSync(agent, hostile(spec));
        const checked = await runCli(["validate", fleet.configPath, "--data-dir", fleet.dataDir]);
        expect(checked.code).toBe(1);
        expect(checked.stdout).toContain("agents.tagger.module cannot be bundled");
        expect(checked.stdout).toContain(`import ${JSON.stringify(spec)}`);
        expect(checked.stdout).toContain(rule);
        const refused = await waitFor(
          async () => ((await specError(fleet))?.includes(JSON.stringify(spec)) ? specError(fleet) : undefined),
          20_000,
          `the reload refusing ${spec}`,
        );
        expect(refused).toContain("agents.tagger.module cannot be bundled");
        expect(refused).toContain(rule);
      }
      writeFileSync(agent, AGENT);
      await waitFor(async () => (await specError(fleet)) === null, 20_000, "the refusal cleared");
      // Nothing of the refused code ran: the next episode runs the code deployed before, and nothing leaked.
      await publishQos1(c, "tags/a/in", { id: "r2" });
      await fleet.waitCommitted("tagger/a", 2);
      const rows = await episodeRows(fleet, "tagger/a");
      expect(rows.map((e) => e.bundle)).toEqual([good!.bundle, good!.bundle]);
      // No refused code was stored either (a stored bundle would carry what it inlined).
      for (const { code } of await fleet.query<Row>("SELECT code FROM bundles")) {
        expect(String(code)).not.toContain("leak");
        expect(String(code)).not.toContain("OUTSIDE-SECRET");
        expect(String(code)).not.toContain(fleet.token);
      }
    } finally {
      rmSync(outside, { force: true });
      await fleet.dispose();
    }
  }, 180_000);

  test("a failed episode's error names the source files and lines, not the bundle", async () => {
    const { fleet, labelFile } = taggerFleet("e2e-bundles-stack");
    // The throw is on line 4 of label.ts; agent.ts calls label() on line 7.
    writeFileSync(
      labelFile,
      '// labels\n\nexport const label = (): string => {\n  throw new Error("no label yet");\n};\n',
    );
    try {
      await fleet.start();
      await publishQos1(await fleet.mqtt(), "tags/a/in", { id: "r1" });
      const [failed] = await fleet.waitEpisodes(
        "tagger/a",
        (list) => (list.length > 0 ? list : undefined),
        30_000,
        "the failed episode",
      );
      const shown = await fleet.cli("show", failed!.id);
      expect(shown.json).toMatchObject({ status: "failed", error_kind: "threw" });
      const failure = shown.json.events.at(-1) as { kind: string; data: { message: string } };
      expect(failure.kind).toBe("failure");
      expect(failure.data.message).toContain("no label yet");
      expect(failure.data.message).toMatch(/at label \(label\.ts:4:\d+\)/);
      expect(failure.data.message).toMatch(/\(agent\.ts:7:\d+\)/);
      // The bundle (<hash>.js) is named nowhere; frames below the agent's are the host runtime's.
      expect(failure.data.message).not.toMatch(/[0-9a-f]{64}\.js/);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a module moved away and back is watched again: its next edit is deployed", async () => {
    const { fleet, agent, labelFile } = taggerFleet("e2e-bundles-vanish");
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "tags/a/in", { id: "r1" });
      await fleet.waitCommitted("tagger/a", 1);
      // mv away (a deploy script's rm, a git stash): refused, the running code stays.
      renameSync(agent, `${agent}.away`);
      await waitFor(async () => (await specError(fleet))?.includes("cannot be bundled"), 20_000, "the refusal");
      // Back: the same code again, the refusal is gone.
      renameSync(`${agent}.away`, agent);
      await waitFor(async () => (await specError(fleet)) === null, 20_000, "the refusal cleared");
      // And its next edit is deployed, as any edit.
      writeFileSync(labelFile, label("v2"));
      await waitFor(
        async () => (await fleet.query("SELECT hash FROM spec_versions")).length === 2,
        20_000,
        "a spec version for the edit after the module came back",
      );
      await publishQos1(c, "tags/a/in", { id: "r2" });
      await fleet.waitCommitted("tagger/a", 2);
      const [out] = await fleet.decisions((await episodeRows(fleet, "tagger/a"))[1]!.id as string);
      expect(out?.data).toMatchObject({ label: "v2" });
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a new version of an npm package the module imports is new code, deployed", async () => {
    const { fleet, agent } = taggerFleet("e2e-bundles-package");
    const pkg = join(fleet.dir, "node_modules/m-helper");
    const release = (version: string) => {
      mkdirSync(pkg, { recursive: true });
      writeFileSync(join(pkg, "package.json"), JSON.stringify({ name: "m-helper", version, main: "index.js" }));
      writeFileSync(join(pkg, "index.js"), `exports.label = () => ${JSON.stringify(`helper ${version}`)};\n`);
    };
    release("1.0.0");
    writeFileSync(agent, AGENT.replace('"./label.ts"', '"m-helper"'));
    if (IS_ROOT) execFileSync("chmod", ["-R", "a+rX", fleet.dir]);
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "tags/a/in", { id: "r1" });
      await fleet.waitCommitted("tagger/a", 1);
      // What npm update does: the package's files, package.json with them, are written anew.
      release("1.0.1");
      await waitFor(
        async () => (await fleet.query("SELECT hash FROM spec_versions")).length === 2,
        20_000,
        "a spec version for the package's new version",
      );
      await publishQos1(c, "tags/a/in", { id: "r2" });
      await fleet.waitCommitted("tagger/a", 2);
      const [out] = await fleet.decisions((await episodeRows(fleet, "tagger/a"))[1]!.id as string);
      expect(out?.data).toMatchObject({ label: "helper 1.0.1" });
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a type added before its module exists is applied when the module is written", async () => {
    const { fleet } = taggerFleet("e2e-bundles-late");
    const late = join(fleet.dir, "late.ts");
    try {
      await fleet.start();
      appendFileSync(fleet.configPath, agentType("late", late, ["late/+/in"], { dedup: "id" }));
      await waitFor(
        async () => (await specError(fleet))?.includes("agents.late.module cannot be bundled"),
        20_000,
        "the refusal of a type whose module is missing",
      );
      // Written afterwards (no edit of fleet.toml, no SIGHUP): the type is deployed.
      writeFileSync(late, AGENT);
      await waitFor(
        async () => (await fleet.query("SELECT hash FROM spec_versions")).length === 2,
        20_000,
        "a spec version with the late type",
      );
      await publishQos1(await fleet.mqtt(), "late/x/in", { id: "l1" });
      await fleet.waitCommitted("late/x", 1);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("an older release's bundle, importing the SDK from a gone install, runs, replays and is kept", async () => {
    const { fleet } = taggerFleet("e2e-bundles-legacy");
    try {
      await fleet.start();
      await publishQos1(await fleet.mqtt(), "tags/a/in", { id: "r1" });
      await fleet.waitCommitted("tagger/a", 1);
      const [first] = await episodeRows(fleet, "tagger/a");
      const [built] = await fleet.query<Row>("SELECT code FROM bundles WHERE hash = ?", [first!.bundle as string]);
      expect(String(built?.code)).toContain('from "agent-fleets"');
      expect(String(built?.code)).not.toContain(ROOT);
      await fleet.stop();

      // What a release before 2026-12-04 stored for the same code: the SDK by its install's path (gone since).
      const gone = `/gone-${process.pid}/agents/sdk/index.ts`;
      expect(existsSync(gone)).toBe(false);
      const code = String(built?.code).replace('from "agent-fleets"', `from ${JSON.stringify(gone)}`);
      const legacy = await blake3Hex(code);
      const sv = await withBundles(await loadSpec(fleet.configPath), { tagger: legacy });
      const store = await Store.open(join(fleet.dataDir, "fleet.db"), { synchronous: "normal" });
      try {
        await store.saveBundle({ hash: legacy, module: "agent.ts", code, at: Date.now() });
        await store.saveSpecVersion({ ...sv, summary: "older release", at: Date.now() + 1000 });
      } finally {
        await store.close();
      }

      // This release builds the same code to another text; it keeps the stored bundle (and spec version) and runs it.
      await fleet.start();
      await publishQos1(await fleet.mqtt(), "tags/a/in", { id: "r2" });
      await fleet.waitCommitted("tagger/a", 2);
      const second = (await episodeRows(fleet, "tagger/a"))[1]!;
      expect(second.status).toBe("committed");
      expect(second.bundle).toBe(legacy);
      expect(second.spec_version).toBe(sv.hash);
      const replay = await fleet.cli("replay", second.id as string);
      expect(replay.json.verdict).toBe("MATCH");
      expect((await fleet.cli("verify")).code).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test.if(IS_ROOT)(
    'a bundle runs under sandbox = "uid" (agents as uids of their own, files out of the private data dir and /tmp)',
    async () => {
      const { fleet } = taggerFleet("e2e-bundles-uid", 'sandbox = "uid"\nallow_weak_sandbox = true');
      try {
        await fleet.start();
        await publishQos1(await fleet.mqtt(), "tags/u/in", { id: "u1" });
        await fleet.waitCommitted("tagger/u", 1);
        const [ep] = await episodeRows(fleet, "tagger/u");
        expect(ep?.bundle).toMatch(/^[0-9a-f]{64}$/);
        const file = bundleFile(fleet, ep!.bundle as string);
        // Beside the data dir, unless that is under /tmp (the sandbox's private /tmp would hide it from spares).
        const under = fleet.dataDir.startsWith("/tmp/");
        expect(file.startsWith(`${fleet.dataDir}.bundles/`)).toBe(!under);
        expect(file.startsWith("/tmp/")).toBe(false);
        // So later episodes start warm: a spare's root shows the bundle.
        const c = await fleet.mqtt();
        for (const id of ["u2", "u3", "u4"]) {
          await publishQos1(c, "tags/u/in", { id });
          await fleet.waitCommitted("tagger/u", Number(id.slice(1)));
        }
        const warm = sampleValue(await scrape(fleet.httpUrl), "fleet_episode_starts_total", {
          type: "tagger",
          start: "warm",
        });
        expect(warm ?? 0).toBeGreaterThan(0);
        expect(readFileSync(file, "utf8")).toContain('"v1"');
        expect(statSync(fleet.dataDir).mode & 0o777).toBe(0o700);
      } finally {
        await fleet.dispose();
      }
    },
    90_000,
  );
});
