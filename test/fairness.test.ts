/**
 * Fairness at spawning: an agent with a backlog does not take the last warm spare, so an agent
 * waiting on one stimulus still gets a warm start (docs/sandbox.md "Warm spares and fairness").
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { Gateway } from "../gateway/gateway.ts";
import { readLocalToken } from "../gateway/auth/index.ts";
import { authed, fixture, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, counterType, fleetHeader } from "./helpers/toml.ts";
import {
  defaultSpawnOptions,
  EPISODE_GROUP_NICE,
  EPISODE_NICE,
  FLOODED_GROUP_NICE,
  idleSpawnOptions,
} from "../gateway/episode/index.ts";

let dir: string;
let gw: Gateway;
let base: string;
let token: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-fairness-"));
  writeFileSync(
    join(dir, "fleet.toml"),
    fleetHeader("fairness-test", { maxConcurrent: 1, fleet: "warm_spares = 1" }) +
      counterType("counter", "f/+/in", { instances: ["a", "b"] }) +
      agentType("nicelog", fixture("nice-log"), ["n/+/in"], { dedup: "id", instances: ["x"] }),
  );
  gw = new Gateway({
    configPath: join(dir, "fleet.toml"),
    dataDir: join(dir, "data"),
    mqttPort: 0,
    httpPort: 0,
    logger: pino({ level: "silent" }),
  });
  await gw.start();
  base = `http://127.0.0.1:${gw.http.port}`;
  token = readLocalToken(join(dir, "data"))!;
});

afterAll(async () => {
  await gw?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const post = (path: string, body?: unknown) =>
  fetch(
    `${base}${path}`,
    authed(token, { method: "POST", body: body === undefined ? undefined : JSON.stringify(body) }),
  );

async function starts(): Promise<{ warm: number; cold: number; committed: number }> {
  const x = await scrape(base);
  return {
    warm: sampleValue(x, "fleet_episode_starts_total", { type: "counter", start: "warm" }) ?? 0,
    cold: sampleValue(x, "fleet_episode_starts_total", { type: "counter", start: "cold" }) ?? 0,
    committed: sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" }) ?? 0,
  };
}

describe("warm spares under a flood", () => {
  test("an agent with a backlog leaves the last spare to others and starts cold; its last one is warm", async () => {
    // One stimulus for b: the pool is empty, so it starts cold and a spare is started behind it.
    expect((await post("/api/send", { topic: "f/b/in", payload: { id: "b1" } })).status).toBe(202);
    await waitFor(async () => ((await starts()).committed === 1 ? true : undefined), 20_000, "b's episode", 50);
    // Ten for a, queued while it is paused, then let go (a flood is 8 or more queued).
    expect((await post("/api/agents/counter/a/pause")).status).toBe(200);
    for (const id of Array.from({ length: 10 }, (_, i) => `a${i + 1}`))
      expect((await post("/api/send", { topic: "f/a/in", payload: { id } })).status).toBe(202);
    expect((await post("/api/agents/counter/a/resume")).status).toBe(200);
    const done = await waitFor(
      async () => {
        const s = await starts();
        return s.committed === 11 ? s : undefined;
      },
      30_000,
      "a's ten episodes",
      50,
    );
    // b cold (no spare yet); a1-a3 cold (10, 9, 8 queued: flooded, one spare left);
    // a4-a10 warm (fewer than 8 queued).
    expect(done).toEqual({ warm: 7, cold: 4, committed: 11 });
  }, 60_000);

  test.if(defaultSpawnOptions().nice != null)(
    "a flooded agent's episodes run under SCHED_IDLE, in groups at nice 19, until its backlog is short",
    async () => {
      expect((await post("/api/agents/nicelog/x/pause")).status).toBe(200);
      for (let i = 1; i <= 10; i++)
        expect((await post("/api/send", { topic: "n/x/in", payload: { id: `n${i}` } })).status).toBe(202);
      expect((await post("/api/agents/nicelog/x/resume")).status).toBe(200);
      const state = await waitFor(
        async () => {
          const r = await fetch(`${base}/api/agents/nicelog/x/state`, authed(token));
          const body = (await r.json()) as { state?: { nice?: (number | "idle")[]; groups?: (number | null)[] } };
          return body.state?.nice?.length === 10 ? body.state : undefined;
        },
        30_000,
        "ten episodes of nicelog/x",
        100,
      );
      // 10, 9 and 8 queued: flooded; then fewer than 8.
      // Relative to this process (the gateway runs in it), capped at 19.
      const stat = readFileSync("/proc/self/stat", "utf8");
      const own = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
      const normal = Math.min(19, own + EPISODE_NICE);
      const flood = idleSpawnOptions(defaultSpawnOptions()).idle ? "idle" : normal;
      expect(state.nice).toEqual([flood, flood, flood, normal, normal, normal, normal, normal, normal, normal]);
      // Where each episode is a scheduling group of its own, the flooded agent's groups yield too:
      // SCHED_IDLE alone ranks its processes only within their group.
      // (Where this process may not set their nice, they run at the default one: not asserted here.)
      if (defaultSpawnOptions().autogroup != null) {
        const [low, usual] = [FLOODED_GROUP_NICE, EPISODE_GROUP_NICE];
        expect(state.groups).toEqual([low, low, low, usual, usual, usual, usual, usual, usual, usual]);
      }
    },
    60_000,
  );
});
