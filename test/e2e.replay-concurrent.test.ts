/**
 * Replay of concurrent tool calls (docs/upgrading.md, the replay gate) against a real gateway: an
 * agent makes a slow and a fast http call at once, so live the second call is answered first. Its
 * unchanged code replays as MATCH (`fleet replay`), `fleet deploy --check` of a new config passes,
 * and with `require_check` the reload that changes only the config is applied.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { writeFileSync } from "node:fs";
import { TestFleet, cleanupAll, publishQos1, runCli, waitFor } from "./helpers/gateway.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const SLOW = 180_000;

/** The race agent's host: /slow answers after 500 ms, /fast at once. */
const host = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  fetch: async (req) => {
    const slow = new URL(req.url).pathname === "/slow";
    if (slow) await Bun.sleep(500);
    return new Response(slow ? "slow" : "fast");
  },
});

const toml = (v: number) =>
  fleetHeader("e2e-replay-concurrent") +
  agentType("race", join(import.meta.dir, "fixtures/ops/race.ts"), ["race/+/go"], {
    dedup: "id",
    extra: `tools = ["http"]\nhttp_hosts = ["127.0.0.1:${host.port}"]\nconfig = { v = ${v} }\n`,
  }) +
  "\n[agents.race.rollout]\nrequire_check = true\n";

let fleet: TestFleet;
let episode = "";

beforeAll(async () => {
  fleet = new TestFleet(toml(1));
  await fleet.start();
  const client = await fleet.mqtt({ clientId: "e2e-replay-concurrent" });
  const base = `http://127.0.0.1:${host.port}`;
  await publishQos1(client, "race/r1/go", { id: "g1", slow: `${base}/slow`, fast: `${base}/fast` });
  await fleet.waitCommitted("race/r1", 1, 90_000);
  episode = (await fleet.episodes("race/r1"))[0]!.id;
}, SLOW);

afterAll(async () => {
  host.stop(true);
  await cleanupAll();
}, 60_000);

describe("concurrent tool calls answered out of call order", () => {
  test(
    "replay as MATCH, and a config-only reload of a require_check type passes the replay gate",
    async () => {
      const shown = await fleet.cli("show", episode);
      const calls = (shown.json.events as { kind: string; data: { call: number } }[])
        .filter((e) => e.kind === "tool")
        .map((e) => e.data.call);
      expect(calls).toEqual([2, 1]); // the fast second call was answered first
      const replay = await fleet.cli("replay", episode);
      expect(replay.code).toBe(0);
      expect(replay.json.verdict).toBe("MATCH");

      const next = join(fleet.dir, "next.toml");
      writeFileSync(next, toml(2));
      const check = await runCli(
        ["deploy", "--check", next, "--config", fleet.configPath, "--data-dir", fleet.dataDir, "--json"],
        { timeoutMs: SLOW },
      );
      expect(check.code).toBe(0);
      const types = (check.json as { types: { type: string; counts: Record<string, number> }[] }).types;
      expect(types.find((t) => t.type === "race")?.counts).toMatchObject({ MATCH: 1, DIVERGED: 0, FAILED: 0 });

      const health = async () =>
        (await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string; spec_error: string | null };
      const before = (await health()).spec_version;
      writeFileSync(fleet.configPath, toml(2));
      const after = await waitFor(
        async () => {
          const h = await health();
          return h.spec_version !== before || h.spec_error ? h : undefined;
        },
        90_000,
        "the reload applied or refused",
      );
      expect(after.spec_error).toBeNull();
    },
    SLOW,
  );
});
