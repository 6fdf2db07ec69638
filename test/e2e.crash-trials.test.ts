/**
 * Crash trials with every way into the fleet at once (test/helpers/trial.ts): readings fanned out to
 * two types, webhooks, sends between agents and wake-ups, a durable broker and a subscriber with a
 * session, the gateway killed with SIGKILL at seeded moments; every guarantee checked after the last
 * start. `bun scripts/crash-trials.ts` runs a campaign of many seeds; these run on every test run.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { cleanupAll, ROOT, runCommand } from "./helpers/gateway.ts";
import { crashTrial } from "./helpers/trial.ts";

afterAll(cleanupAll);

describe("crash trials", () => {
  // Seed 9: three kills, one while the gateway recovers the previous kill's backlog, a hot reload, a
  // pause, operations sent again. Seed 37: the ledger's new release deployed first (a migration per
  // agent), then a kill, a graceful stop (the drain) with episodes running, a kill, pauses. Whether a
  // trial upgrades is drawn from its seed alone. (scripts/crash-trials.ts prints what each seed does.)
  for (const { seed, upgraded } of [
    { seed: 9, upgraded: false },
    { seed: 37, upgraded: true },
  ]) {
    const name = `readings, webhooks, sends and wake-ups through SIGKILLs: each once, all summaries out (seed ${seed})`;
    test(name, async () => {
      const r = await crashTrial({ seed });
      expect({ killed: r.kills > 0, upgraded: r.upgraded }).toEqual({ killed: true, upgraded });
      expect(r.committed).toBeGreaterThan(r.ops);
      expect(r.problems).toEqual([]);
    }, 600_000);
  }

  // Seed 2010: a real Mosquitto as the external broker, the ledger's new release deployed, reloads, two
  // kills, a central server killed too, a graceful stop.
  test("through a real Mosquitto, replicating to a central server killed too: the same, central = local", async () => {
    const r = await crashTrial({ seed: 2010, broker: "mosquitto", replicate: true });
    expect({ killed: r.kills + r.stops > 0, upgraded: r.upgraded }).toEqual({ killed: true, upgraded: true });
    expect(r.problems).toEqual([]);
  }, 720_000);
});

describe("scripts/crash-trials.ts", () => {
  test("a flag it cannot use is a clear error (exit 2) before any trial, never a run of nothing", async () => {
    const cases = [
      { args: ["--trials", "abc"], says: "--trials is a whole number of at least 1" },
      { args: ["--trials", "0"], says: "--trials is a whole number of at least 1" },
      { args: ["--seed=-3"], says: "--seed is a whole number of at least 0" },
      { args: ["--broker", "nats"], says: '--broker is "embedded" or "mosquitto"' },
      { args: ["--shards", "2"], says: "--shards needs --broker mosquitto" },
    ];
    for (const { args, says } of cases) {
      const r = await runCommand([process.execPath, "scripts/crash-trials.ts", ...args], { cwd: ROOT });
      expect({ args, code: r.code, says: r.stderr.includes(says), ran: r.stdout.includes("trials (seeds") }).toEqual({
        args,
        code: 2,
        says: true,
        ran: false,
      });
    }
  });
});
