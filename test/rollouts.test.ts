/**
 * `[agents.<t>.rollout]` canary keys (docs/upgrading.md) at the edge: defaults, the errors a bad
 * value gets (with its key path), the canary choice (stable, by agent id hash, bounded by the share),
 * and the canary's counts on a real store.
 */
import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { canaryConfigRefusal, isCanary, Rollouts } from "../gateway/fleet/index.ts";
import { compileSpec, SpecError } from "../gateway/spec/index.ts";
import { Store, tables } from "../gateway/store/index.ts";
import type { AgentId, Blake3Hex } from "../gateway/types.ts";

const toml = (rollout: string) =>
  `[fleet]\nname = "r"\n\n[agents.t]\nmodule = "t.ts"\n\n[agents.t.rollout]\n${rollout}\n`;

async function specError(rollout: string): Promise<string> {
  try {
    await compileSpec(toml(rollout), "/f/fleet.toml");
  } catch (err) {
    if (err instanceof SpecError) return err.message;
    throw err;
  }
  throw new Error("expected a SpecError");
}

describe("[agents.<t>.rollout] canary keys", () => {
  test("compile with their defaults, bake as milliseconds", async () => {
    const sv = await compileSpec(toml('canary = 0.1\nbake = "90s"'), "/f/fleet.toml");
    expect(sv.spec.agents.t!.rollout).toEqual({
      require_check: false,
      canary: 0.1,
      min_episodes: 50,
      max_failure_rate: 0.05,
      bake_ms: 90_000,
    });
  });

  test.each([
    ["canary = 1.5", "agents.t.rollout.canary must be a number from 0 to 1"],
    ['canary = "10%"', "agents.t.rollout.canary must be a number from 0 to 1"],
    ["max_failure_rate = -0.1", "agents.t.rollout.max_failure_rate must be a number from 0 to 1"],
    ["min_episodes = 0", "agents.t.rollout.min_episodes must be a positive integer"],
    ['bake = "soon"', 'agents.t.rollout.bake must be a duration like "0s", "10m" or "1h"'],
    ["bake = 600", "agents.t.rollout.bake must be a string"],
    ["canaries = 0.1", "agents.t.rollout.canaries is not a known key"],
  ])("%s is refused naming the key", async (line, message) => {
    expect(await specError(line)).toContain(message);
  });
});

describe("the canary choice", () => {
  test("is stable per agent, none at 0, all at 1, and about the share in between", () => {
    const ids = Array.from({ length: 2000 }, (_, i) => `t/k${i}`);
    expect(ids.filter((a) => isCanary(a, 0))).toEqual([]);
    expect(ids.filter((a) => isCanary(a, 1)).length).toBe(2000);
    const tenth = ids.filter((a) => isCanary(a, 0.1));
    expect(tenth.length).toBeGreaterThan(120);
    expect(tenth.length).toBeLessThan(280);
    expect(ids.filter((a) => isCanary(a, 0.1))).toEqual(tenth);
    // A larger share keeps the smaller share's canaries.
    expect(tenth.every((a) => isCanary(a, 0.3))).toBe(true);
  });
});

describe("when rollouts are judged", () => {
  test("not before watch(): a rollback due at start waits until the gateway's queues are loaded", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    const now = 1_000_000;
    const woken: string[] = [];
    const rollouts = new Rollouts({
      store,
      log: pino({ level: "silent" }),
      now: () => now,
      agentsOf: async () => ["t/a", "t/b"],
      retry: async () => {},
      wake: (agents) => void woken.push(...agents),
    });
    try {
      for (const c of ["1", "2"]) await store.saveBundle({ hash: h(c), module: "/m/t.ts", code: `// ${c}`, at: 1 });
      const sv = await compileSpec(toml('canary = 0.5\nmin_episodes = 10\nbake = "1h"'), "/f/fleet.toml");
      const current = { ...sv, bundles: { t: h("1") } };
      await rollouts.start(current);
      await rollouts.deployed(current, { ...sv, bundles: { t: h("2") } });
      // Every canary episode failed: the next judgement rolls the code back.
      for (let n = 1; n <= 5; n++)
        await store.db.insert(tables.episodes).values({
          id: `ep-${n}`,
          agent: "t/a" as AgentId,
          stimulusSeq: n,
          stimulusId: `id:${n}`,
          specVersion: h("a"),
          status: "failed",
          errorKind: "exception",
          attempt: 1,
          startedAt: now,
          endedAt: now,
          eventsHash: h("e"),
          eventCount: 0,
          bundle: h("2"),
        });
      const state = async () => (await rollouts.view()).find((v) => v.type === "t")?.state;
      await Bun.sleep(1200); // two judgements' time, had start() begun them
      expect(await state()).toBe("canary");
      expect(woken).toEqual([]);
      rollouts.watch();
      for (let i = 0; i < 100 && (await state()) === "canary"; i++) await Bun.sleep(50);
      expect(await state()).toBe("rolled_back");
      expect(woken.length).toBeGreaterThan(0);
    } finally {
      rollouts.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("canary counts", () => {
  test("are the new code's episodes since the rollout began, each counted once as evaluations read on", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    let now = 1_000_000;
    const rollouts = new Rollouts({
      store,
      log: pino({ level: "silent" }),
      now: () => now,
      agentsOf: async () => ["t/a", "t/b"],
      retry: async () => {},
      wake: () => {},
    });
    try {
      for (const c of ["1", "2"]) await store.saveBundle({ hash: h(c), module: "/m/t.ts", code: `// ${c}`, at: 1 });
      let n = 0;
      const episode = (bundle: string, o: { failed?: string; agent?: string; at?: number } = {}) =>
        store.db.insert(tables.episodes).values({
          id: `ep-${++n}`,
          agent: (o.agent ?? "t/a") as AgentId,
          stimulusSeq: n,
          stimulusId: `id:${n}`,
          specVersion: h("a"),
          status: o.failed ? "failed" : "committed",
          errorKind: o.failed ?? null,
          attempt: 1,
          startedAt: o.at ?? now,
          endedAt: o.at ?? now,
          eventsHash: h("e"),
          eventCount: 0,
          bundle,
        });
      const sv = await compileSpec(toml('canary = 0.5\nmin_episodes = 1000\nbake = "1h"'), "/f/fleet.toml");
      const current = { ...sv, bundles: { t: h("1") } };
      await rollouts.start(current);
      await episode(h("2"), { at: now - 10 }); // before the rollout
      await rollouts.deployed(current, { ...sv, bundles: { t: h("2") } });
      const counts = async () => {
        const r = (await rollouts.view()).find((v) => v.type === "t");
        return r && { state: r.state, episodes: r.episodes, failures: r.failures };
      };
      expect(await counts()).toEqual({ state: "canary", episodes: 0, failures: 0 });
      now += 1;
      await episode(h("2"));
      await episode(h("2"), { failed: "exception" });
      await episode(h("1")); // the previous code
      await episode(h("2"), { agent: "u/a" }); // another type
      expect(await counts()).toEqual({ state: "canary", episodes: 2, failures: 1 });
      await episode(h("2"), { failed: "infra" }); // the machine's failure, not the code's
      await episode(h("2"), { agent: "t/b" });
      expect(await counts()).toEqual({ state: "canary", episodes: 3, failures: 1 });
      expect(await counts()).toEqual({ state: "canary", episodes: 3, failures: 1 });
    } finally {
      rollouts.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("an aborted rollout stays off through later reloads of the same code, until new code", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    const rollouts = new Rollouts({
      store,
      log: pino({ level: "silent" }),
      now: () => 1_000_000,
      agentsOf: async () => ["t/a", "t/b"],
      retry: async () => {},
      wake: () => {},
    });
    try {
      const sv = await compileSpec(toml("canary = 1"), "/f/fleet.toml");
      const v1 = { ...sv, bundles: { t: h("1") } };
      const v2 = { ...sv, bundles: { t: h("2") } };
      await rollouts.start(v1);
      await rollouts.deployed(v1, v2);
      expect((await rollouts.decide("t", "abort", "test")).ok).toBe(true);
      const state = async () => (await rollouts.view()).map((v) => [v.id, v.state, v.to_bundle]);
      const aborted = await state();
      await rollouts.deployed(v2, v2); // a comment-only edit of fleet.toml
      expect(await state()).toEqual(aborted);
      expect(rollouts.bundleFor("t/a", "t", v2)).toBe(h("1"));
      await rollouts.deployed(v2, { ...sv, bundles: { t: h("3") } }); // new code starts a new rollout from v1
      const [r] = await rollouts.view();
      expect([r!.state, r!.from_bundle, r!.to_bundle]).toEqual(["canary", h("1"), h("3")]);
    } finally {
      rollouts.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a decided rollout keeps its state across a restart on other code; one in progress is superseded", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    const rollouts = () =>
      new Rollouts({
        store,
        log: pino({ level: "silent" }),
        now: () => 1_000_000,
        agentsOf: async () => ["t/a", "t/b"],
        retry: async () => {},
        wake: () => {},
      });
    const sv = await compileSpec(toml("canary = 0.5"), "/f/fleet.toml");
    const v1 = { ...sv, bundles: { t: h("1") } };
    const v2 = { ...sv, bundles: { t: h("2") } };
    const first = rollouts();
    try {
      await first.start(v1);
      await first.deployed(v1, v2);
      // Rolled back by itself; the operator then put the good code back live, and the gateway restarts on it.
      await store.client.execute("UPDATE rollouts SET state = 'rolled_back', decided_at = 1000000");
      first.stop();
      const restarted = rollouts();
      await restarted.start(v1);
      expect((await restarted.view()).map((r) => [r.state, r.to_bundle])).toEqual([["rolled_back", h("2")]]);
      restarted.stop();
      // A rollout in progress when the code changed while the gateway was down is superseded by it.
      const again = rollouts();
      await again.start(v2);
      expect((await again.view()).map((r) => [r.state, r.to_bundle])).toEqual([["rolled_back", h("2")]]);
      await again.deployed(v2, { ...sv, bundles: { t: h("3") } });
      again.stop();
      const last = rollouts();
      await last.start(v1);
      const rows = await store.client.execute("SELECT state FROM rollouts ORDER BY id");
      expect(rows.rows.map((r) => r.state)).toEqual(["rolled_back", "superseded"]);
      last.stop();
    } finally {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a config change during a canary rollout is refused naming the commands that decide it", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    const rollouts = new Rollouts({
      store,
      log: pino({ level: "silent" }),
      now: () => 1_000_000,
      agentsOf: async () => ["t/a", "t/b"],
      retry: async () => {},
      wake: () => {},
    });
    try {
      const sv = await compileSpec(toml("canary = 0.5"), "/f/fleet.toml");
      const v1 = { ...sv, bundles: { t: h("1") } };
      const v2 = { ...sv, bundles: { t: h("2") } };
      await rollouts.start(v1);
      await rollouts.deployed(v1, v2);
      const edited = await compileSpec(
        toml("canary = 0.5").replace('module = "t.ts"', 'module = "t.ts"\nconfig = { x = 1 }'),
        "/f/fleet.toml",
      );
      expect(rollouts.configRefusal(v2, { ...edited, bundles: v2.bundles })).toContain(
        "promote or abort it first (`fleet rollout promote t` or `fleet rollout abort t`)",
      );
    } finally {
      rollouts.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a canary share that selects none of the type's agents is raised to take the lowest-hashing one", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-rollouts-"));
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    const h = (c: string) => c.repeat(64) as Blake3Hex;
    const agents = ["t/a", "t/b", "t/k0", "t/k1"];
    const rollouts = new Rollouts({
      store,
      log: pino({ level: "silent" }),
      now: () => 1_000_000,
      agentsOf: async () => agents,
      retry: async () => {},
      wake: () => {},
    });
    try {
      expect(agents.filter((a) => isCanary(a, 0.1))).toEqual([]); // the share alone picks no one
      const sv = await compileSpec(toml("canary = 0.1"), "/f/fleet.toml");
      const v1 = { ...sv, bundles: { t: h("1") } };
      const v2 = { ...sv, bundles: { t: h("2") } };
      await rollouts.start(v1);
      await rollouts.deployed(v1, v2);
      const [r] = await rollouts.view();
      expect([r!.state, r!.canary_agents]).toEqual(["canary", ["t/k0"]]);
      expect(agents.map((a) => rollouts.bundleFor(a, "t", v2))).toEqual([h("1"), h("1"), h("2"), h("1")]);
    } finally {
      rollouts.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("a reload that changes a canary type's code and config together", () => {
  const h = (c: string) => c.repeat(64) as Blake3Hex;
  const version = async (config: string, bundle: string, canary = "0.5") => ({
    ...(await compileSpec(toml(`canary = ${canary}`).replace('module = "t.ts"', `module = "t.ts"\n${config}`), "/f/x")),
    bundles: { t: h(bundle) },
  });

  test("is refused: the agents left on the previous bundle would run it with the new config", async () => {
    const v1 = await version("config = { threshold = 5 }", "1");
    const v2 = await version("config = { threshold = { value = 5 } }", "2");
    expect(canaryConfigRefusal(v1, v2)).toContain("agents.t: new code and a new config together on a canary type");
  });

  test("is applied when only one of them changes, or without a canary share", async () => {
    const v1 = await version("config = { threshold = 5 }", "1");
    expect(canaryConfigRefusal(v1, await version("config = { threshold = 6 }", "1"))).toBeNull();
    expect(canaryConfigRefusal(v1, await version("config = { threshold = 5 }", "2"))).toBeNull();
    expect(canaryConfigRefusal(v1, await version("config = { threshold = 6 }", "2", "0"))).toBeNull();
  });
});
