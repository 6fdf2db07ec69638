/**
 * The replay gate (docs/upgrading.md, `fleet deploy --check`, `POST /api/deploy/check`,
 * `[agents.<t>.rollout] require_check`) against a real gateway with history: three temp-monitor
 * agents that alerted and cleared, and a counter type the candidates leave alone. A candidate
 * module that decides differently is DIVERGED (exit 1), one that throws is FAILED, a refactor is
 * MATCH (exit 0); the same with the gateway stopped; a hot reload of a type that requires the
 * check is refused while the check fails and applied once it passes.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { TestFleet, cleanupAll, fixture, publishQos1, runCli, shippedAgent, waitFor } from "./helpers/gateway.ts";
import { counterType, fleetHeader, q, tempMonitorType } from "./helpers/toml.ts";

const SLOW = 180_000;
const ops = (name: string) => join(import.meta.dir, "fixtures/ops", `${name}.ts`);
/**
 * A fixture's text for a copy in the fleet's folder: a module may bundle only files of its fleet's and
 * its own folder and of the install's agents/ (docs/sandbox.md), so its imports name this checkout's agents/.
 */
const opsCopy = (name: string) =>
  readFileSync(ops(name), "utf8").replaceAll('"../../../agents/', `"${join(import.meta.dir, "../agents")}/`);
const SHIPPED = q(shippedAgent("temp-monitor"));
const TOML = fleetHeader("e2e-deploy-check") + tempMonitorType("temp-monitor") + counterType("counter", "count/+/tick");
const KEYS = ["boiler-1", "boiler-2", "boiler-3"];
/** Per boiler: quiet, quiet, alert, still high, clear. */
const READINGS = [70, 72, 85, 86, 74];

let fleet: TestFleet;

/** A candidate fleet.toml in the fleet's folder: the fleet's own text with `edit` applied. */
function candidate(name: string, edit: (toml: string) => string): string {
  const path = join(fleet.dir, `${name}.toml`);
  writeFileSync(path, edit(TOML));
  return path;
}

const withModule = (module: string) => (t: string) => t.replace(SHIPPED, q(module));

interface Report {
  ok: boolean;
  running: string | null;
  candidate: { path: string; hash: string };
  types: {
    type: string;
    changed: string[];
    agents: string[];
    episodes: number;
    counts: Record<"MATCH" | "DIVERGED" | "FAILED" | "UNREPLAYABLE", number>;
    first: { episode: string; agent: string; verdict: string; divergence: { at: string } } | null;
  }[];
  added: string[];
  unchanged: string[];
  refusals: string[];
}

async function check(...args: string[]): Promise<{ code: number; report: Report; stderr: string }> {
  const r = await runCli(
    ["deploy", "--check", ...args, "--config", fleet.configPath, "--data-dir", fleet.dataDir, "--json"],
    {
      timeoutMs: SLOW,
    },
  );
  return { code: r.code, report: r.json as Report, stderr: r.stderr };
}

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  const client = await fleet.mqtt({ clientId: "e2e-deploy-check" });
  for (const key of KEYS)
    for (const [i, value] of READINGS.entries())
      await publishQos1(client, `sensors/${key}/temperature`, { id: `${key}-${i}`, value });
  await publishQos1(client, "count/c1/tick", { id: "t1" });
  for (const key of KEYS) await fleet.waitCommitted(`temp-monitor/${key}`, READINGS.length, 90_000);
  await fleet.waitCommitted("counter/c1", 1, 60_000);
}, SLOW);

afterAll(() => cleanupAll(), 60_000);

describe("fleet deploy --check with the gateway running", () => {
  test(
    "a candidate module that decides differently is DIVERGED at its first decision and exits 1",
    async () => {
      const { code, report } = await check(candidate("renamed", withModule(ops("temp-monitor-renamed"))));
      expect(code).toBe(1);
      expect(report.ok).toBe(false);
      expect(report.unchanged).toEqual(["counter"]);
      expect(report.types).toHaveLength(1);
      const tm = report.types[0]!;
      expect(tm.type).toBe("temp-monitor");
      expect(tm.changed[0]).toStartWith("module ");
      expect(tm.agents.toSorted()).toEqual(KEYS.map((k) => `temp-monitor/${k}`));
      expect(tm.episodes).toBe(KEYS.length * READINGS.length);
      // Each agent's alert episode diverges (the decision is renamed); the others do the same as before.
      expect(tm.counts).toEqual({
        MATCH: tm.episodes - KEYS.length,
        DIVERGED: KEYS.length,
        FAILED: 0,
        UNREPLAYABLE: 0,
      });
      expect(tm.first?.verdict).toBe("DIVERGED");
      expect(tm.first?.divergence.at).toBe("decision #1");
    },
    SLOW,
  );

  test(
    "a candidate that behaves the same MATCHes every replayed episode and exits 0",
    async () => {
      const path = candidate("same", withModule(ops("temp-monitor-same")));
      const { code, report } = await check(path);
      expect(code).toBe(0);
      expect(report.ok).toBe(true);
      const tm = report.types[0]!;
      expect(tm.counts).toEqual({ MATCH: KEYS.length * READINGS.length, DIVERGED: 0, FAILED: 0, UNREPLAYABLE: 0 });
      expect(tm.first).toBeNull();
      const human = await runCli(
        ["deploy", "--check", path, "--config", fleet.configPath, "--data-dir", fleet.dataDir],
        {
          timeoutMs: SLOW,
        },
      );
      expect(human.code).toBe(0);
      expect(human.stdout).toContain(`temp-monitor (module`);
      expect(human.stdout).toContain(`15 MATCH, 0 DIVERGED, 0 FAILED, 0 UNREPLAYABLE`);
      expect(human.stdout).toContain("unchanged: counter");
      expect(human.stdout.trimEnd()).toEndWith("OK");
    },
    SLOW,
  );

  test(
    "a config change is replayed too: under a higher threshold the alert and clear episodes diverge",
    async () => {
      const path = candidate("config", (t) => t.replace("threshold = 80.0", "threshold = 90.0"));
      const { code, report } = await check(path);
      expect(code).toBe(1);
      const tm = report.types[0]!;
      expect(tm.changed).toEqual(["config"]);
      // 85 no longer alerts; 86 clears an alarm the history raised (a tool call the recording cannot
      // answer is a divergence, not a failure); 74's clear names the new threshold. 70 and 72 match.
      expect(tm.counts).toEqual({ MATCH: 2 * KEYS.length, DIVERGED: 3 * KEYS.length, FAILED: 0, UNREPLAYABLE: 0 });
    },
    SLOW,
  );

  test(
    "a candidate that throws on history is FAILED, named in the text with its first failure",
    async () => {
      const path = candidate("throws", withModule(fixture("throws")));
      const { code, report } = await check(path);
      expect(code).toBe(1);
      const tm = report.types[0]!;
      expect(tm.counts.FAILED).toBe(KEYS.length * READINGS.length);
      expect(tm.first?.verdict).toBe("FAILED");
      expect(tm.first?.divergence.at).toBe("outcome");
      const human = await runCli(
        ["deploy", "--check", path, "--config", fleet.configPath, "--data-dir", fleet.dataDir],
        {
          timeoutMs: SLOW,
        },
      );
      expect(human.code).toBe(1);
      expect(human.stdout).toContain("first FAILED: temp-monitor/");
      expect(human.stdout).toContain("NOT OK: 15 episode(s) DIVERGED or FAILED");
    },
    SLOW,
  );

  test(
    "a candidate slower than its type's episode_timeout_ms is FAILED as the timeout it would be live",
    async () => {
      // The same outputs, 1.5 s late, under a 1 s timeout: a replay's own 10 s allowance does not pass it.
      const budget = "\n[agents.counter.budget]\nepisode_timeout_ms = 1000\n";
      const slow = (t: string) => t.replace(q(fixture("counter")), q(ops("counter-slow"))) + budget;
      const { code, report } = await check(candidate("slow", slow));
      expect(code).toBe(1);
      const counter = report.types.find((t) => t.type === "counter")!;
      expect(counter.counts).toEqual({ MATCH: 0, DIVERGED: 0, FAILED: 1, UNREPLAYABLE: 0 });
      expect(counter.first?.divergence).toMatchObject({
        at: "outcome",
        expected: "committed",
        actual: { kind: "timeout", message: expect.stringContaining("episode exceeded 1000 ms") },
      });
    },
    SLOW,
  );

  test(
    "--episodes and --agents bound the sample, and the agents chosen are the same on every run",
    async () => {
      const path = candidate("renamed", withModule(ops("temp-monitor-renamed")));
      const a = await check(path, "--episodes", "2", "--agents", "2");
      const b = await check(path, "--episodes", "2", "--agents", "2");
      const tm = a.report.types[0]!;
      expect(tm.agents).toHaveLength(2);
      expect(tm.episodes).toBe(4);
      expect(b.report.types[0]!.agents).toEqual(tm.agents);
      // The last two episodes of each boiler are "still high" and "clear": the same under the rename.
      expect(tm.counts.MATCH).toBe(4);
      expect(a.code).toBe(0);
    },
    SLOW,
  );

  test(
    "the fleet's own fleet.toml, unchanged, is the running version, with nothing to replay; --type forces a type",
    async () => {
      const plain = await check();
      expect(plain.code).toBe(0);
      expect(plain.report.types).toEqual([]);
      expect(plain.report.unchanged.toSorted()).toEqual(["counter", "temp-monitor"]);
      // Its hash is the one the gateway stored for it (the text's hash with the bundles), not the text's alone.
      const live = (await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string };
      expect(plain.report.running).toBe(live.spec_version);
      expect(plain.report.candidate.hash).toBe(live.spec_version);
      const human = await runCli(["deploy", "--check", "--config", fleet.configPath, "--data-dir", fleet.dataDir], {
        timeoutMs: SLOW,
      });
      expect(human.stdout.split("\n")[0]).toEndWith("against the running spec, the same version");
      // `fleet validate` names the same version.
      const validated = await runCli(["validate", fleet.configPath, "--json"], { timeoutMs: SLOW });
      expect(validated.json).toMatchObject({ ok: true, hash: live.spec_version, unbundled: [] });
      const edited = await check(candidate("edited", (t) => `${t}\n# a comment changes the text, not the types\n`));
      expect(edited.report.types).toEqual([]);
      expect(edited.report.candidate.hash).not.toBe(live.spec_version);
      const forced = await check("--type", "counter", "--episodes", "1");
      expect(forced.code).toBe(0);
      expect(forced.report.types.map((t) => [t.type, t.changed, t.counts.MATCH])).toEqual([["counter", ["forced"], 1]]);
    },
    SLOW,
  );

  test(
    "a key the running gateway reads only at start is NOT OK while it runs: its reload would be refused",
    async () => {
      const restart = candidate("restart", (t) =>
        t.replace('[http]\nhost = "127.0.0.1"', '[http]\nhost = "127.0.0.2"'),
      );
      const r = await check(restart);
      expect(r.code).toBe(1);
      expect(r.report.types).toEqual([]);
      expect(r.report.refusals).toEqual(['needs restart: http.host ("127.0.0.1" -> "127.0.0.2")']);
    },
    SLOW,
  );

  test(
    "bad inputs: no --check, a bad sample size, an unknown type, an invalid or missing candidate",
    async () => {
      const base = ["--config", fleet.configPath, "--data-dir", fleet.dataDir];
      const noCheck = await runCli(["deploy", ...base]);
      expect(noCheck.code).toBe(2);
      expect(noCheck.stderr).toContain("deploy needs --check");
      for (const [flag, value] of [
        ["--episodes", "0"],
        ["--agents", "x"],
        ["--episodes", "10001"],
      ] as const) {
        const r = await runCli(["deploy", "--check", flag, value, ...base]);
        expect(r.code).toBe(2);
        expect(r.stderr).toContain(flag);
      }
      const unknown = await runCli(["deploy", "--check", "--type", "nope", ...base]);
      expect(unknown.code).toBe(2);
      expect(unknown.stderr).toContain("--type nope: no such agent type");
      const broken = candidate("broken", (t) => `${t}\n[agents.temp-monitor.rollout]\nrequire_check = "yes"\n`);
      const bad = await runCli(["deploy", "--check", broken, ...base]);
      expect(bad.code).toBe(1);
      expect(bad.stderr).toContain("agents.temp-monitor.rollout.require_check must be true or false");
      const missing = await runCli(["deploy", "--check", join(fleet.dir, "nope.toml"), ...base]);
      expect(missing.code).toBe(1);
      expect(missing.stderr).toContain("file not found");
    },
    SLOW,
  );
});

describe("POST /api/deploy/check", () => {
  const post = (body: unknown, init: RequestInit = {}) =>
    fleet.fetch("/api/deploy/check", { method: "POST", body: JSON.stringify(body), ...init });
  /** The HTTP check bundles new modules only from the fleet.toml folder tree: a module there that wraps `ops(name)`. */
  const inFleet = (name: string) => {
    const path = join(fleet.dir, `${name}.ts`);
    writeFileSync(path, opsCopy(name));
    return path;
  };

  test(
    "checks a candidate's text against the running spec and audits the verdict",
    async () => {
      const toml = withModule(inFleet("temp-monitor-renamed"))(TOML);
      const res = await post({ toml, episodes: 5, agents: 1 });
      expect(res.status).toBe(200);
      const report = (await res.json()) as Report;
      expect(report.ok).toBe(false);
      expect(report.types[0]?.counts.DIVERGED).toBe(1);
      const same = (await (await post({ toml: withModule(inFleet("temp-monitor-same"))(TOML) })).json()) as Report;
      expect(same.ok).toBe(true);
      const { records } = (await (await fleet.fetch("/api/audit?limit=10")).json()) as {
        records: { action: string; status: number; detail: string | null }[];
      };
      const checks = records.filter((r) => r.action === "deploy.check");
      expect(checks.map((r) => r.detail)).toEqual(["OK", "1 DIVERGED or FAILED"]);
    },
    SLOW,
  );

  test("a candidate module outside the fleet.toml folder, or not code, is refused before it is bundled", async () => {
    const secret = join(fleet.dir, "..", `creds-${process.pid}.json`);
    writeFileSync(secret, '{"password":"hunter2"}', { mode: 0o600 });
    const data = join(fleet.dir, "creds.json");
    writeFileSync(data, '{"password":"hunter2"}', { mode: 0o600 });
    try {
      for (const module of [secret, data, ops("temp-monitor-same")]) {
        const res = await post({ toml: withModule(module)(TOML) });
        expect(res.status).toBe(400);
        const body = (await res.json()) as { error: { code: string; message: string }; key_path: string };
        expect(body.error.code).toBe("bad_spec");
        expect(body.key_path).toBe("agents.temp-monitor.module");
        expect(body.error.message).toContain("is not a source file inside");
      }
    } finally {
      rmSync(secret, { force: true });
    }
  });

  test("bad bodies, an invalid candidate, a read token, a non-JSON or cross-origin post are refused", async () => {
    expect((await post({ episodes: 0 })).status).toBe(400);
    expect((await post({ colour: "red" })).status).toBe(400);
    const bad = await post({ toml: "[agents.x]\nsubscribe = 3\n" });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe("bad_spec");
    const form = await fleet.fetch("/api/deploy/check", {
      method: "POST",
      body: "x",
      headers: { "content-type": "text/plain" },
    });
    expect(form.status).toBe(415);
    const foreign = await post({}, { headers: { origin: "http://evil.example" } });
    expect(foreign.status).toBe(403);
    const added = await fleet.cli("token", "add", "deploy-reader", "--scope", "read");
    const token = (added.json as { token: string }).token;
    await waitFor(
      async () => (await fetch(`${fleet.httpUrl}/api/fleet`, { headers: { authorization: `Bearer ${token}` } })).ok,
      10_000,
      "the new token accepted",
    );
    const res = await fetch(`${fleet.httpUrl}/api/deploy/check`, {
      method: "POST",
      body: "{}",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    });
    expect(res.status).toBe(403);
  });
});

describe("[agents.<t>.rollout] require_check", () => {
  const health = async () =>
    (await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string; spec_error: string | null };
  const gated = (module: string) =>
    withModule(module)(TOML).replace(
      "[agents.counter]",
      "[agents.temp-monitor.rollout]\nrequire_check = true\n\n[agents.counter]",
    );

  test(
    "a hot reload whose check fails is refused as a reload error; one that passes is applied",
    async () => {
      const before = (await health()).spec_version;
      writeFileSync(fleet.configPath, gated(ops("temp-monitor-renamed")));
      const refused = await waitFor(
        async () => {
          const h = await health();
          return h.spec_error ? h : undefined;
        },
        90_000,
        "the reload error",
      );
      expect(refused.spec_error).toContain("deploy check failed for temp-monitor: 3 DIVERGED, 0 FAILED");
      expect(refused.spec_version).toBe(before);
      const status = await runCli(["status", "--data-dir", fleet.dataDir]);
      expect(status.stdout).toContain("deploy check failed for temp-monitor");
      // A restart with the refused file in place runs the version that ran before, and says why.
      expect(await fleet.stop()).toBe(0);
      await fleet.start(SLOW);
      const restarted = await health();
      expect(restarted.spec_version).toBe(before);
      expect(restarted.spec_error).toContain("not applied at start: deploy check failed for temp-monitor");
      // The unchanged file is not reloaded after the start (once the watcher has settled): the error stays.
      const reloads = () => readFileSync(fleet.logPath, "utf8").split("file changed").length;
      const reloadsAtStart = reloads();
      await Bun.sleep(3000);
      expect((await health()).spec_error).toBe(restarted.spec_error);
      expect(reloads()).toBe(reloadsAtStart);

      writeFileSync(fleet.configPath, gated(ops("temp-monitor-same")));
      const applied = await waitFor(
        async () => {
          const h = await health();
          return h.spec_version !== before ? h : undefined;
        },
        90_000,
        "the reload applied",
      );
      expect(applied.spec_error).toBeNull();
    },
    SLOW,
  );

  test(
    "a module file edited in place is new code: deploy --check sees it, and the gate refuses it",
    async () => {
      const tm = join(fleet.dir, "tm.ts");
      const reexport = (module: string) => writeFileSync(tm, `export { default } from ${q(module)};\n`);
      reexport(shippedAgent("temp-monitor"));
      const before = (await health()).spec_version;
      writeFileSync(fleet.configPath, gated(tm));
      const applied = await waitFor(
        async () => {
          const h = await health();
          return h.spec_version !== before && h.spec_error === null ? h : undefined;
        },
        90_000,
        "the new module applied",
      );
      expect((await check()).report.types).toEqual([]);

      writeFileSync(tm, opsCopy("temp-monitor-renamed"));
      const refused = await waitFor(
        async () => {
          const h = await health();
          return h.spec_error ? h : undefined;
        },
        90_000,
        "the edit refused",
      );
      expect(refused.spec_error).toContain("deploy check failed for temp-monitor: 3 DIVERGED");
      expect(refused.spec_version).toBe(applied.spec_version);
      const { code, report } = await check();
      expect(code).toBe(1);
      expect(report.types[0]?.changed[0]).toMatch(/^code [0-9a-f]{12} -> [0-9a-f]{12}$/);
      expect(report.types[0]?.counts.DIVERGED).toBe(KEYS.length);

      // Put back: the same code as the running bundle, so nothing to apply and no error left.
      reexport(shippedAgent("temp-monitor"));
      await waitFor(async () => (await health()).spec_error === null || undefined, 90_000, "the error cleared");
      expect((await health()).spec_version).toBe(applied.spec_version);
    },
    SLOW,
  );
});

describe("fleet deploy --check with the gateway stopped", () => {
  test(
    "reads the data dir: the spec it last ran, its history",
    async () => {
      expect(await fleet.stop()).toBe(0);
      // The fleet last ran tm.ts (the reloads above): the shipped module is a module change.
      const diverged = await check(candidate("renamed", withModule(ops("temp-monitor-renamed"))));
      expect(diverged.code).toBe(1);
      expect(diverged.report.types[0]?.counts.DIVERGED).toBe(KEYS.length);
      const same = await check(candidate("shipped", (t) => t));
      expect(same.code).toBe(0);
      expect(same.report.types[0]?.changed[0]).toStartWith("module ");
      expect(same.report.refusals).toEqual([]);
    },
    SLOW,
  );

  test(
    "a candidate whose module does not bundle is NOT OK: a reload would refuse it",
    async () => {
      const broken = join(fleet.dir, "broken.ts");
      writeFileSync(broken, 'import { gone } from "./no-such-file.ts";\nexport default gone;\n');
      const r = await check(candidate("broken", withModule(broken)));
      expect(r.code).toBe(1);
      expect(r.report.ok).toBe(false);
      // Why, as validate says it: the file, line and column.
      expect(r.report.refusals).toEqual([
        expect.stringMatching(/^agents\.temp-monitor\.module \S+ does not bundle: \S+broken\.ts:1:\d+: .*no-such-file/),
      ]);
      expect(r.report.refusals[0]).toStartWith(`agents.temp-monitor.module ${broken} does not bundle: `);
    },
    SLOW,
  );
});
