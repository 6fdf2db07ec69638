/**
 * `[agents.<t>.rollout]` canary keys (docs/upgrading.md) at the edge: defaults, the errors a bad
 * value gets (with its key path), and the canary choice (stable, by agent id hash, bounded by the share).
 */
import { describe, expect, test } from "bun:test";
import { isCanary } from "../gateway/fleet/index.ts";
import { compileSpec, SpecError } from "../gateway/spec/index.ts";

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
