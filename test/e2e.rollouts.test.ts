/**
 * Canary rollouts (docs/upgrading.md `[agents.<t>.rollout]`) on a real gateway: new code first
 * runs on the canary share of a type's agents (chosen by agent id hash). A failing one is rolled
 * back without operator action (the canaries return to the previous bundle, their quarantined
 * stimuli are retried there) while the other agents never run it; a passing one is promoted after
 * min_episodes and bake, also across a kill -9 of the gateway in the middle of the rollout. Every
 * step is a row; /api/fleet shows the rollout; `fleet rollout` decides by hand.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { isCanary } from "../gateway/fleet/index.ts";
import { bundleOfSql, episodeStatus } from "../gateway/store/index.ts";
import { cleanupAll, publishQos1, ROOT, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { fleetHeader, q } from "./helpers/toml.ts";

const SDK = join(ROOT, "agents/sdk/index.ts");
const SHARE = 0.3;
const code = (body: string) =>
  `import { defineAgent } from ${JSON.stringify(SDK)};\n` +
  `export default defineAgent({ init: () => ({ n: 0 }), onStimulus(s, ctx) { ${body} } });\n`;
const V1 = code("ctx.state.n += 1; ctx.emit({ v: 1 });");
const BROKEN = code('throw new Error("v2 is broken");');
const V3 = code("ctx.state.n += 1; ctx.emit({ v: 3 });");

/** Three keys in the canary share and three outside it. */
function pickKeys(): { canary: string[]; stable: string[] } {
  const canary: string[] = [];
  const stable: string[] = [];
  for (let i = 0; canary.length < 3 || stable.length < 3; i++) {
    const key = `k${i}`;
    const list = isCanary(`relay/${key}`, SHARE) ? canary : stable;
    if (list.length < 3) list.push(key);
  }
  return { canary, stable };
}

interface Rollout {
  id: number;
  type: string;
  state: string;
  from_bundle: string | null;
  to_bundle: string;
  canary_agents: string[];
  episodes: number;
  failures: number;
}

afterAll(cleanupAll);

describe("canary rollouts", () => {
  test("a failing canary rolls back by itself; a passing one is promoted, across a kill -9 mid-rollout", async () => {
    const { canary, stable } = pickKeys();
    const all = [...canary, ...stable];
    const fleet = new TestFleet("");
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    const module = join(fleet.dir, "relay.ts");
    writeFileSync(module, V1);
    writeFileSync(
      fleet.configPath,
      `${fleetHeader("e2e-rollouts")}
[agents.relay]
module = ${q(module)}
subscribe = ["relay/+/in"]
key = "{1}"
dedup = "id"
instances = [${all.map(q).join(", ")}]

[agents.relay.retry]
max_attempts = 1
backoff_ms = 10

[agents.relay.rollout]
canary = ${SHARE}
min_episodes = 4
max_failure_rate = 0.25
bake = "2s"
`,
    );
    const rollouts = async (): Promise<Rollout[]> =>
      ((await (await fleet.fetch("/api/fleet")).json()) as { rollouts: Rollout[] }).rollouts;
    const rolloutIn = (state: string, notId?: number) =>
      waitFor(
        async () => (await rollouts()).find((r) => r.state === state && r.id !== notId),
        60_000,
        `a rollout in state ${state}`,
      );
    const bundles = (keys: readonly string[]) =>
      fleet.query<{ agent: string; bundle: string; status: string }>(
        `SELECT agent, ${bundleOfSql("bundle")} AS bundle, ${episodeStatus.ofSql("status")} AS status FROM episodes
            WHERE agent IN (${keys.map(() => "?").join(",")})
            ORDER BY started_at, id`,
        keys.map((k) => `relay/${k}`),
      );
    let n = 0;
    const sendAll = async (keys: readonly string[]) => {
      const c = await fleet.mqtt();
      for (const k of keys) await publishQos1(c, `relay/${k}/in`, { id: `m${n++}` });
    };
    try {
      await fleet.start();
      await sendAll(all);
      for (const k of all) await fleet.waitCommitted(`relay/${k}`, 1);
      const v1 = (await bundles(all))[0]!.bundle;

      // 1. Broken code: the canaries fail, the rollout rolls back by itself.
      writeFileSync(module, BROKEN);
      const started = await rolloutIn("canary");
      expect(started.from_bundle).toBe(v1);
      expect(started.canary_agents.sort()).toEqual(canary.map((k) => `relay/${k}`).sort());
      await sendAll(all);
      const back = await rolloutIn("rolled_back");
      expect(back.id).toBe(started.id);
      expect(back.failures).toBeGreaterThanOrEqual(2);
      // The other agents never ran the new code.
      for (const k of stable) await fleet.waitCommitted(`relay/${k}`, 2);
      expect((await bundles(stable)).every((e) => e.bundle === v1)).toBe(true);
      // The canaries' quarantined stimuli are retried on the previous bundle and commit there.
      for (const k of canary) {
        const eps = await waitFor(
          async () => {
            const rows = (await bundles([k])).filter((e) => e.status === "committed");
            return rows.length >= 2 ? rows : undefined;
          },
          60_000,
          `relay/${k} retried on v1`,
        );
        expect(eps.at(-1)!.bundle).toBe(v1);
      }
      const steps = await fleet.query<{ step: string; detail: string }>(
        "SELECT step, detail FROM rollout_steps WHERE rollout = ? ORDER BY seq",
        [started.id],
      );
      // A canary episode still in flight at the rollback fails afterwards and is retried in a step of its own.
      expect(steps.slice(0, 3).map((s) => s.step)).toEqual(["started", "rolled_back", "retried"]);
      expect(steps.slice(3).every((s) => s.step === "retried")).toBe(true);
      const retried = steps
        .filter((s) => s.step === "retried")
        .flatMap((s) => JSON.parse(s.detail).stimuli as number[]);
      expect(new Set(retried).size).toBe(retried.length);

      // 2. Good code: a new rollout from v1; a kill -9 in the middle keeps it; it is promoted.
      writeFileSync(module, V3);
      const second = await rolloutIn("canary", started.id);
      expect(second.from_bundle).toBe(v1);
      const v3 = second.to_bundle;
      await sendAll(canary);
      for (const k of canary) await fleet.waitCommitted(`relay/${k}`, 3);
      expect((await rollouts())[0]).toMatchObject({ id: second.id, state: "canary", episodes: 3 });
      await fleet.kill();
      await fleet.start();
      expect((await rollouts())[0]).toMatchObject({ id: second.id, state: "canary", to_bundle: v3 });
      // Still only the canaries run v3 until it is promoted.
      await sendAll(stable);
      for (const k of stable) await fleet.waitCommitted(`relay/${k}`, 3);
      expect((await bundles(stable)).every((e) => e.bundle === v1)).toBe(true);
      await sendAll(canary);
      const promoted = await rolloutIn("promoted");
      expect(promoted.id).toBe(second.id);
      await sendAll(stable);
      for (const k of stable) await fleet.waitCommitted(`relay/${k}`, 4);
      for (const k of stable) expect((await bundles([k])).at(-1)!.bundle).toBe(v3);
      const health = (await (await fleet.fetch("/api/fleet")).json()) as { rollouts: Rollout[] };
      expect(health.rollouts[0]!.state).toBe("promoted");

      // By hand: nothing to decide now (exit 1), a bad action is a usage error (exit 2).
      const none = await runCli(["rollout", "abort", "relay", "--data-dir", fleet.dataDir]);
      expect(none.code).toBe(1);
      expect(none.stderr).toContain("no rollout in progress");
      const bad = await runCli(["rollout", "undo", "relay", "--data-dir", fleet.dataDir]);
      expect(bad.code).toBe(2);
      expect((await fleet.cli("verify")).code).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 300_000);

  test("a reload that changes a canary type's code and config together is refused, and starts no rollout", async () => {
    const fleet = new TestFleet("");
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    const module = join(fleet.dir, "relay.ts");
    writeFileSync(module, V1);
    const toml = (threshold: string) => `${fleetHeader("e2e-rollouts-config")}
[agents.relay]
module = ${q(module)}
instances = ["a", "b"]
config = { threshold = ${threshold} }

[agents.relay.rollout]
canary = 0.5
`;
    writeFileSync(fleet.configPath, toml("5"));
    try {
      await fleet.start();
      const fleetView = async () =>
        (await (await fleet.fetch("/api/fleet")).json()) as { spec_error: string | null; rollouts: Rollout[] };
      const v1 = (await fleetView()).spec_error;
      expect(v1).toBeNull();
      writeFileSync(module, V3);
      writeFileSync(fleet.configPath, toml("{ value = 5 }"));
      const refused = await waitFor(async () => (await fleetView()).spec_error ?? undefined, 60_000, "a spec error");
      expect(refused).toContain("agents.relay: new code and a new config together on a canary type");
      expect((await fleetView()).rollouts).toEqual([]);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a config-only reload while agents run the previous bundle is refused: in a rollout, after abort", async () => {
    const fleet = new TestFleet("");
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    const module = join(fleet.dir, "relay.ts");
    writeFileSync(module, V1);
    const toml = (threshold: number, canary = 0.5) => `${fleetHeader("e2e-rollouts-config-only")}
[agents.relay]
module = ${q(module)}
instances = ["a", "b", "c", "d"]
config = { threshold = ${threshold} }

[agents.relay.rollout]
canary = ${canary}
min_episodes = 1000
`;
    writeFileSync(fleet.configPath, toml(5));
    try {
      await fleet.start();
      const view = async () =>
        (await (await fleet.fetch("/api/fleet")).json()) as {
          spec_version: string;
          spec_error: string | null;
          rollouts: Rollout[];
        };
      const settled = async (what: string, ok: (v: Awaited<ReturnType<typeof view>>) => boolean) =>
        waitFor(async () => ((v) => (ok(v) ? v : undefined))(await view()), 60_000, what);
      const before = (await view()).spec_version;
      writeFileSync(module, V3); // new code, same config: a rollout starts
      // The rollout is recorded a moment before the version it belongs to runs: wait for both.
      const canary = await settled(
        "the canary rollout",
        (v) => v.rollouts[0]?.state === "canary" && v.spec_version !== before,
      );
      writeFileSync(fleet.configPath, toml(6)); // config only
      const refused = await settled("a spec error", (v) => v.spec_error !== null);
      expect(refused.spec_error).toContain("agents.relay.config: a canary rollout of new code");
      expect(refused.spec_error).toContain("promote or abort it first");
      expect(refused.spec_version).toBe(canary.spec_version);

      expect((await runCli(["rollout", "abort", "relay", "--data-dir", fleet.dataDir])).code).toBe(0);
      writeFileSync(fleet.configPath, toml(7));
      const aborted = await settled("the refusal after the abort", (v) => !!v.spec_error?.includes("was aborted"));
      expect(aborted.spec_version).toBe(canary.spec_version);
      expect(aborted.rollouts[0]?.state).toBe("aborted");

      // New code and the config with rollout.canary = 0: both reach every agent at once.
      writeFileSync(module, V1.replace("v: 1", "v: 4"));
      writeFileSync(fleet.configPath, toml(7, 0));
      const applied = await settled(
        "the deploy",
        (v) => v.spec_error === null && v.spec_version !== canary.spec_version,
      );
      expect(applied.spec_error).toBeNull();
    } finally {
      await fleet.dispose();
    }
  }, 180_000);
});
