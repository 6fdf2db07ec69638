/**
 * Infrastructure failures are not the agent's (issue 9, defect 4): when episode subprocesses
 * cannot be started, the stimulus waits with its retries untouched and the gateway reports
 * itself degraded (health, /readyz, a metric) until an episode starts again. In-process gateway,
 * real libSQL file, real subprocesses once the "machine" is fixed.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defaultSpawnOptions, runEpisode } from "../gateway/episode/index.ts";
import type { Gateway } from "../gateway/gateway.ts";
import { STATUS_COMMITTED } from "../gateway/store/index.ts";
import { authed, openDbFile, waitFor } from "./helpers/gateway.ts";
import { agentBlock, policyAgent } from "./helpers/policy.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { fleetHeader } from "./helpers/toml.ts";
import { apiOf, inProcessGateway } from "./helpers/in-process.ts";

let dir: string;
let gw: Gateway;
let base: string;
let token: string;
/** The Bun executable the gateway spawns: missing at first (the machine cannot start episodes). */
let bun: string;

const query = async <T>(sql: string): Promise<T[]> => {
  const db = openDbFile(join(dir, "data", "fleet.db"));
  try {
    return (await db.execute(sql)).rows.map((r) => ({ ...r }) as T);
  } finally {
    db.close();
  }
};

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-infra-"));
  chmodSync(dir, 0o755); // episodes run as other uids when root
  bun = join(dir, "bun");
  writeFileSync(
    join(dir, "fleet.toml"),
    fleetHeader("infra-test", { fleet: "warm_spares = 0" }) +
      // One attempt: were an infra failure counted, the stimulus would be quarantined at once.
      agentBlock("steady", policyAgent("steady"), { extra: "retry = { max_attempts = 1 }\n" }),
  );
  gw = inProcessGateway(join(dir, "fleet.toml"), join(dir, "data"), { spawn: { ...defaultSpawnOptions(), bun } });
  await gw.start();
  ({ base, token } = apiOf(gw, join(dir, "data")));
});

afterAll(async () => {
  await gw?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("an episode that cannot start is the machine's failure, not the agent's", () => {
  test("the runner reports a subprocess that cannot start as kind infra", async () => {
    const r = await runEpisode(
      {
        t: "start",
        episode: "0190f000-0000-7000-8000-000000000009",
        agent: { type: "steady", key: "x", id: "steady/x" },
        module: policyAgent("steady"),
        config: {},
        state: null,
        fresh: true,
        stimulus: { id: "id:x", kind: "manual", payload: {}, received_at: 0 },
        replay: null,
        limits: { max_records: 10, max_record_bytes: 1024 },
        wakes: { pending: [], max: 100 },
      },
      {
        timeoutMs: 5000,
        memoryMb: 128,
        maxRecords: 10,
        maxRecordBytes: 1024,
        maxOpenFiles: 256,
        maxProcesses: 4096,
      },
      async () => ({ ok: false, result: null }),
      { ...defaultSpawnOptions(), bun: join(dir, "no-such-bun") },
    );
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.kind).toBe("infra");
  });

  test("the stimulus waits, attempts untouched; health, /readyz and /metrics say degraded; then it runs", async () => {
    const sent = await fetch(
      `${base}/api/send`,
      authed(token, { method: "POST", body: JSON.stringify({ topic: "steady/a/in", payload: { id: "i1" } }) }),
    );
    expect(sent.status).toBeLessThan(300);

    const degraded = await waitFor(
      async () => ((gw.degraded()?.failures ?? 0) >= 2 ? gw.degraded() : undefined),
      30_000,
      "two infra failures",
    );
    expect(degraded!.reason.length).toBeGreaterThan(0);
    const health = (await (await fetch(`${base}/api/fleet`, authed(token))).json()) as { degraded: unknown };
    expect(health.degraded).toMatchObject({ failures: expect.any(Number), reason: expect.any(String) });
    const ready = await fetch(`${base}/readyz`);
    expect(ready.status).toBe(503);
    expect(((await ready.json()) as { reason: string }).reason).toContain("episodes cannot start");
    const metrics = await scrape(base);
    expect(sampleValue(metrics, "fleet_degraded", {})).toBe(1);
    expect(sampleValue(metrics, "fleet_infra_failures_total", { type: "steady" })).toBeGreaterThanOrEqual(2);

    // Nothing was held against the agent: no failed episode, no attempt used, not quarantined.
    expect(await query("SELECT id FROM episodes")).toEqual([]);
    expect(await query("SELECT state, attempts FROM stimuli")).toEqual([{ state: "queued", attempts: 0 }]);

    // The machine recovers: the stimulus runs (its first and only attempt) and the gateway is ready again.
    symlinkSync(process.execPath, bun);
    await waitFor(
      async () =>
        (await query<{ status: number }>("SELECT status FROM episodes"))[0]?.status === Number(STATUS_COMMITTED),
      40_000,
      "the waiting stimulus to commit",
    );
    expect(await query("SELECT state, attempts FROM stimuli")).toEqual([{ state: "done", attempts: 1 }]);
    expect(gw.degraded()).toBeNull();
    expect((await fetch(`${base}/readyz`)).status).toBe(200);
    expect(sampleValue(await scrape(base), "fleet_degraded", {})).toBe(0);
  }, 90_000);
});
