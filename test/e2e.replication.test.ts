/**
 * Edge replication (issue 11, docs/replication.md) against a real central libSQL server: a real sqld on
 * a free port, real gateway processes with devices publishing over MQTT, and the central
 * database compared with each gateway's own, row for row.
 */
import { afterAll, describe, expect, test } from "bun:test";
import type { Client } from "@libsql/client";
import { appendFileSync, readFileSync } from "node:fs";
import { cleanupAll, publishQos1, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { SyntheticFleet } from "./helpers/ops.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import {
  caughtUp,
  expectCentralEqualsLocal,
  gatewayIdOf,
  replicationOf,
  replicationToml,
  slowProxy,
} from "./helpers/replication.ts";
import { freePort, Sqld } from "./helpers/sqld.ts";
import { CENTRAL_SCHEMA_VERSION } from "../gateway/replication/index.ts";
import { counterType, fleetHeader, throwerType } from "./helpers/toml.ts";
import { STATUS_COMMITTED } from "../gateway/store/index.ts";

const servers: Sqld[] = [];
const clients: Client[] = [];
afterAll(async () => {
  for (const c of clients) c.close();
  await cleanupAll();
  for (const s of servers) await s.dispose();
});

async function central(opts: { auth?: boolean } = {}): Promise<{ sqld: Sqld; db: Client }> {
  const sqld = await Sqld.start(opts);
  servers.push(sqld);
  const db = sqld.client();
  clients.push(db);
  return { sqld, db };
}

function fleetToml(name: string, url: string, extra = ""): string {
  return (
    fleetHeader(name) +
    counterType("counter", "sensors/+/count") +
    throwerType("poison/+") +
    replicationToml(url) +
    extra
  );
}

/** Publish `n` readings for each key (QoS 1: acked = durably recorded) and one poison message. */
async function publishReadings(f: TestFleet, keys: readonly string[], n: number, tag: string): Promise<void> {
  const mqtt = await f.mqtt();
  for (let i = 0; i < n; i++)
    for (const k of keys)
      await publishQos1(mqtt, `sensors/${k}/count`, JSON.stringify({ id: `${tag}-${k}-${i}`, value: i }));
  await publishQos1(mqtt, "poison/p1", JSON.stringify({ id: `${tag}-poison` }));
}

describe("replication to a central libSQL server", () => {
  test("the central database equals the gateway's own, row for row, and the poison stimulus is there too", async () => {
    const { sqld, db } = await central();
    const f = new TestFleet(fleetToml("plant-1", sqld.url));
    await f.start(120_000);
    await publishReadings(f, ["a", "b", "c"], 5, "r1");
    for (const k of ["a", "b", "c"]) await f.waitCommitted(`counter/${k}`, 5, 120_000);
    // The poison message's attempts run on their retry backoff, beside the readings: all of them end first.
    await waitFor(
      async () =>
        (await f.query<{ n: number }>("SELECT count(*) AS n FROM stimuli WHERE state = 'quarantined'"))[0]!.n === 1
          ? true
          : undefined,
      120_000,
      "the poison message quarantined",
    );
    // Operator actions replicate too: one that worked and one the gateway refused.
    expect((await f.fetch("/api/agents/counter/c/pause", { method: "POST" })).status).toBe(200);
    expect((await f.fetch("/api/agents/counter/c/resume", { method: "POST" })).status).toBe(200);
    expect((await f.fetch("/api/agents/counter/zz/pause", { method: "POST" })).status).toBe(404);
    await caughtUp(f);
    const counts = await expectCentralEqualsLocal(f, db, "plant-1");
    expect(counts.audit).toBe(3);
    expect(counts.spec_versions).toBe(1);
    expect(counts.episodes).toBeGreaterThanOrEqual(16);
    expect(counts.events).toBeGreaterThan(counts.episodes!);
    expect(counts.checkpoints).toBe(15);
    expect(counts.stimuli).toBe(1); // the quarantined poison message
    const gw = await db.execute("SELECT gateway, fleet, backlog_rows FROM gateways");
    expect(gw.rows.map((r) => [r.gateway, r.fleet, r.backlog_rows])).toEqual([[await gatewayIdOf(f), "plant-1", 0]]);
    const metrics = await scrape(f.httpUrl);
    expect(sampleValue(metrics, "fleet_replication_backlog_rows")).toBe(0);
    expect(sampleValue(metrics, "fleet_replication_pushed_rows_total")).toBeGreaterThan(counts.events!);
    expect(sampleValue(metrics, "fleet_replication_up")).toBe(1);

    // The CLI reads the central view.
    const atCenter = ["--central", sqld.url, "--json"];
    const agents = await runCli(["agents", ...atCenter]);
    expect(agents.code).toBe(0);
    expect(agents.json.agents.map((a: { fleet: string; id: string }) => `${a.fleet}:${a.id}`)).toEqual(
      ["counter/a", "counter/b", "counter/c", "thrower/p1"].map((id) => `plant-1:${id}`),
    );
    const eps = await runCli(["episodes", "counter/b", ...atCenter]);
    expect(eps.json.episodes).toHaveLength(5);
    const shown = await runCli(["show", eps.json.episodes[0].id, ...atCenter]);
    expect(shown.json).toMatchObject({ fleet: "plant-1", agent: "counter/b", status: "committed" });
    expect(shown.json.events.length).toBeGreaterThan(0);
    const actions = await runCli(["audit", ...atCenter, "--fleet", "plant-1"]);
    expect(actions.code).toBe(0);
    expect(
      actions.json.records.map((r: { fleet: string; action: string; target: string; result: string }) =>
        [r.fleet, r.action, r.target, r.result].join(" "),
      ),
    ).toEqual([
      "plant-1 agent.pause counter/zz refused",
      "plant-1 agent.resume counter/c ok",
      "plant-1 agent.pause counter/c ok",
    ]);
    const ok = await runCli(["verify", ...atCenter, "--fleet", "plant-1"]);
    expect(ok.code).toBe(0);
    // Every agent with history: the three with a chain, and the poison stimulus's (a failed episode, no chain).
    expect(ok.json).toMatchObject({ agents: 4, checkpoints: 15, episodes: 16, problems: [] });

    // A tampered central row is named.
    const victim = eps.json.episodes[2];
    await db.execute({
      sql: "UPDATE checkpoints SET state = json_set(state, '$.count', 999) WHERE hash = ?",
      args: [victim.checkpoint],
    });
    const broken = await runCli(["verify", "--central", sqld.url]);
    expect(broken.code).toBe(1);
    expect(broken.stdout).toContain(`BROKEN plant-1 (${await gatewayIdOf(f)}) checkpoint counter/b#3`);
    expect(broken.stdout).toContain("hash mismatch");
    await f.dispose();
  }, 300_000);

  test("two fleets with the same agents replicate into one center without collisions", async () => {
    const { sqld, db } = await central();
    const a = new TestFleet(fleetToml("site-a", sqld.url));
    const b = new TestFleet(fleetToml("site-b", sqld.url));
    await Promise.all([a.start(120_000), b.start(120_000)]);
    // Same agent ids and the same stimulus ids on both sites.
    await Promise.all([publishReadings(a, ["x", "y"], 4, "same"), publishReadings(b, ["x", "y"], 4, "same")]);
    await Promise.all(
      [a, b].flatMap((f) => ["counter/x", "counter/y"].map((agent) => f.waitCommitted(agent, 4, 120_000))),
    );
    await Promise.all([caughtUp(a), caughtUp(b)]);
    const ca = await expectCentralEqualsLocal(a, db, "site-a");
    const cb = await expectCentralEqualsLocal(b, db, "site-b");
    const total = await db.execute("SELECT count(*) AS n FROM checkpoints");
    expect(Number(total.rows[0]!.n)).toBe(ca.checkpoints! + cb.checkpoints!);
    const byFleet = await db.execute("SELECT fleet, count(*) AS n FROM agents GROUP BY fleet ORDER BY fleet");
    expect(byFleet.rows.map((r) => [r.fleet, Number(r.n)])).toEqual([
      ["site-a", ca.agents!],
      ["site-b", cb.agents!],
    ]);
    await Promise.all([a.dispose(), b.dispose()]);
  }, 300_000);

  test("gateway kill -9 mid-push: after a restart center equals local, nothing twice, verify passes", async () => {
    const { sqld, db } = await central();
    const f = new TestFleet("");
    // A history of 1,000 episodes written through the gateway's commit path, then a gateway
    // started on it with replication: it queues the history and pushes it 10 entries at a time, each
    // request held 100 ms by a proxy, so the push lasts long enough to be killed in the middle however
    // busy the machine (without the proxy, a run beside three other test files saw all 1,000 pushed first).
    const synthetic = await SyntheticFleet.create(f.dir, {
      types: [{ name: "t", keys: ["a", "b", "c"] }],
      keep: 0,
      episodesDays: 30,
      dedupDays: 30,
    });
    await synthetic.commit(1000, Date.now() - 3_600_000, 1000);
    await synthetic.close();
    const proxy = slowProxy(sqld.url, 100);
    try {
      appendFileSync(f.configPath, replicationToml(proxy.url, { batchRows: 10, interval: "50ms" }));
      await f.start(120_000);
      const gateway = await gatewayIdOf(f);
      const count = async () => {
        const rs = await db.execute({ sql: "SELECT count(*) AS n FROM episodes WHERE gateway = ?", args: [gateway] });
        return Number(rs.rows[0]!.n);
      };
      await waitFor(async () => (await count()) > 0, 60_000, "the first pushed episodes at the center", 20);
      await f.kill(); // mid-push: batches keep going back to back until the queue is empty
      const atKill = await count();
      expect(atKill).toBeLessThan(1000);
      proxy.delayMs = 0;
      await f.start(120_000);
      await caughtUp(f, 120_000);
      const counts = await expectCentralEqualsLocal(f, db, "synthetic");
      expect(counts.episodes).toBe(1000);
      const ok = await runCli(["verify", "--central", sqld.url, "--json"]);
      expect(ok.json).toMatchObject({ episodes: 1000, problems: [] });
      await f.dispose();
    } finally {
      proxy.stop();
    }
  }, 300_000);

  test("bad URL, wrong token, newer central schema: clear errors in log, status, metrics; episodes go on", async () => {
    const { sqld: secured } = await central({ auth: true });
    const { sqld: newer, db: newerDb } = await central();
    await newerDb.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)");
    await newerDb.execute("INSERT INTO meta VALUES ('schema_version', '99')");
    const cases = [
      { kind: "unreachable", url: `http://127.0.0.1:${await freePort()}`, says: "is unreachable", env: {} },
      { kind: "auth", url: secured.url, says: "refused the credentials", env: { CENTRAL_TOKEN: "not-a-valid-jwt" } },
      {
        kind: "schema",
        url: newer.url,
        says: `has schema version 99, newer than this code's ${CENTRAL_SCHEMA_VERSION}`,
        env: {},
      },
    ] as const;
    const fleets = cases.map(
      (c) =>
        new TestFleet(
          fleetHeader(`bad-${c.kind}`) +
            counterType("counter", "sensors/+/count") +
            replicationToml(c.url, c.kind === "auth" ? { tokenEnv: "CENTRAL_TOKEN" } : {}),
          { env: c.env },
        ),
    );
    await Promise.all(fleets.map((f) => f.start(120_000)));
    await Promise.all(
      fleets.map(async (f) => {
        const mqtt = await f.mqtt();
        for (let i = 0; i < 3; i++)
          await publishQos1(mqtt, "sensors/k/count", JSON.stringify({ id: `m${i}`, value: i }));
        // Episodes go on (read from the data dir: a CLI process per poll is slow on a loaded machine).
        await waitFor(
          async () => {
            const rows = await f.query<{ n: number }>(
              `SELECT count(*) AS n FROM episodes WHERE agent = 'counter/k' AND status = ${STATUS_COMMITTED}`,
            );
            return Number(rows[0]!.n) >= 3;
          },
          120_000,
          `3 committed episodes with ${f.configPath}`,
          200,
        );
      }),
    );
    for (const [i, c] of cases.entries()) {
      const f = fleets[i]!;
      const status = await waitFor(
        async () => {
          const r = await replicationOf(f);
          return r.last_error?.kind === c.kind ? r : undefined;
        },
        30_000,
        `${c.kind} in status`,
      );
      expect(status.last_error!.message).toContain(c.says);
      expect(status.state).toBe("retrying");
      expect(status.backlog.rows).toBeGreaterThan(0);
      const m = await scrape(f.httpUrl);
      expect(sampleValue(m, "fleet_replication_errors_total", { kind: c.kind })).toBeGreaterThan(0);
      expect(sampleValue(m, "fleet_replication_up")).toBe(0);
      const log = readFileSync(f.logPath, "utf8");
      expect(log).toContain(c.says);
      const st = await f.cli("status");
      expect(st.json.replication.last_error.kind).toBe(c.kind);
    }
    await Promise.all(fleets.map((f) => f.dispose()));
  }, 300_000);
});
