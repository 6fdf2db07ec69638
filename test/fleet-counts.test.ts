/**
 * Fleet counts (issue 13: `/metrics`, `fleet/health`, `/api/fleet` and `/api/agents` totals with
 * 100,000 agents): `agent_counts` is kept by triggers on `agents` (store/migrate.ts, migration 15)
 * and must equal a GROUP BY over the agents table after every kind of change — creation by
 * deploy and by intake, operator and budget pauses, resume, drain, retire, failure, a redeploy,
 * deleted rows (reshard), a restart, and the migration of a data dir that already has agents.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Gateway } from "../gateway/gateway.ts";
import { MIGRATIONS, Store, migrate } from "../gateway/store/index.ts";
import { agentId, type AgentId, type StimulusId } from "../gateway/types.ts";
import { agentStatusByType, queueByType, usageByType } from "../gateway/observe/index.ts";
import { authed } from "./helpers/gateway.ts";
import { sampleValue, samplesOf, scrape } from "./helpers/prom.ts";
import { counterType, fleetHeader, throwerType } from "./helpers/toml.ts";
import { apiOf, inProcessGateway } from "./helpers/in-process.ts";

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "fleet-counts-"));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

type Counts = Record<string, { n: number; budget: number }>;

/** The truth: agents grouped by type and stored status, counted row by row. */
async function truth(store: Store): Promise<Counts> {
  const rs = await store.client.execute(
    "SELECT type, status, count(*) AS n, count(paused_until) AS budget FROM agents GROUP BY type, status",
  );
  const out: Counts = {};
  for (const r of rs.rows) out[`${r.type}/${r.status}`] = { n: Number(r.n), budget: Number(r.budget) };
  return out;
}

/** What the counts table says, in the same shape. */
async function counted(store: Store): Promise<Counts> {
  const out: Counts = {};
  for (const r of await agentStatusByType(store)) out[`${r.type}/${r.status}`] = { n: r.n, budget: r.budget };
  return out;
}

async function expectTruth(store: Store): Promise<Counts> {
  const want = await truth(store);
  expect(await counted(store)).toEqual(want);
  const byStatus: Record<string, number> = {};
  for (const c of await store.agentCounts()) byStatus[`${c.type}/${c.status}`] = c.n;
  expect(byStatus).toEqual(Object.fromEntries(Object.entries(want).map(([k, v]) => [k, v.n])));
  return want;
}

const ids = (type: string, keys: readonly string[]) => keys.map((key) => ({ id: agentId(type, key)!, type, key }));

describe("agent_counts in the store", () => {
  let store: Store;
  afterEach(() => store?.close());

  test("equals a GROUP BY over agents after creation, every status change, deletion and a restart", async () => {
    const path = join(tempDir(), "fleet.db");
    store = await Store.open(path, { synchronous: "normal" });
    await store.ensureAgents(ids("temp", ["a", "b", "c", "d", "e"]));
    await store.ensureAgents(ids("temp", ["a", "b"])); // already there: counted once
    await store.ensureAgents(ids("door", ["x", "y"]));
    // Intake creates the agents it first hears of.
    const z = { agent: agentId("door", "z")!, type: "door", key: "z", sid: "s1" as StimulusId, kind: "mqtt" as const };
    await store.intake([{ ...z, topic: "d/z", payload: new Uint8Array(), receivedAt: 1 }]);
    expect((await expectTruth(store))["door/active"]?.n).toBe(3);

    const a = agentId("temp", "a")!;
    const b = agentId("temp", "b")!;
    const c = agentId("temp", "c")!;
    await store.setAgentStatus(a, "paused", "operator");
    await store.setAgentStatus(b, "paused", "budget episodes_per_hour", Date.now() + 60_000);
    await store.setAgentStatus(c, "draining", "retire --drain");
    await expectTruth(store);
    expect((await counted(store))["temp/paused"]).toEqual({ n: 2, budget: 1 });
    // A budget pause that becomes an operator pause (paused_until cleared) moves between `timed` rows.
    await store.setAgentStatus(b, "paused", "operator");
    expect((await counted(store))["temp/paused"]).toEqual({ n: 2, budget: 0 });
    await store.setAgentStatus(a, "active", null);
    await store.setAgentStatus(c, "retired", "drained");
    await store.setAgentStatus(agentId("door", "x")!, "failed", "state corrupt");
    // The same status again, and writes that touch no counted column, change nothing.
    await store.setAgentStatus(c, "retired", "drained again");
    await store.client.execute("UPDATE agents SET head_seq = head_seq + 1, episodes = episodes + 1");
    await expectTruth(store);
    // Rows deleted (a reshard moves agents out of a data dir) leave the counts too.
    await store.client.execute("DELETE FROM agents WHERE type = 'door' AND key IN ('y', 'z')");
    expect(await expectTruth(store)).toMatchObject({ "door/failed": { n: 1 } });
    expect((await counted(store))["door/active"]).toBeUndefined();

    await store.close();
    store = await Store.open(path, { synchronous: "normal" });
    const after = await expectTruth(store);
    expect(Object.values(after).reduce((n, v) => n + v.n, 0)).toBe(6);
  });

  /** A data dir as the release before the counts table left it, with 50 agents in every status. */
  async function olderDataDir(): Promise<string> {
    const path = join(tempDir(), "fleet.db");
    const c = createClient({ url: `file:${path}` });
    const counts = MIGRATIONS.find((m) => m.name === "fleet counts")!.version;
    const before = MIGRATIONS.filter((m) => m.version < counts);
    await migrate(c, path, before);
    const now = Date.now();
    for (let i = 0; i < 50; i++) {
      const status = ["active", "paused", "retired", "failed", "draining"][i % 5];
      await c.execute({
        sql: `INSERT INTO agents (id, type, key, gateway, status, paused_until, created_at, updated_at)
          VALUES (?, ?, ?, 'gw', ?, ?, ?, ?)`,
        args: [`t${i % 2}/k${i}`, `t${i % 2}`, `k${i}`, status!, i % 10 === 1 ? now : null, now, now],
      });
    }
    c.close();
    return path;
  }

  test("a read-only handle of an older data dir (no counts table) counts the agents table", async () => {
    store = await Store.open(await olderDataDir(), { synchronous: "normal", readonly: true });
    const byKey: Record<string, number> = {};
    for (const c of await store.agentCounts()) byKey[`${c.type}/${c.status}`] = c.n;
    expect(byKey).toMatchObject({ "t0/active": 5, "t1/paused": 5, "t0/retired": 5 });
    expect(Object.values(byKey).reduce((a, b) => a + b, 0)).toBe(50);
    expect((await store.listAgents({ limit: 1 })).total).toBe(50);
    expect((await store.listAgents({ type: "t1", status: "paused", limit: 1 })).total).toBe(5);
  });

  test("the migration counts the agents a data dir already has", async () => {
    store = await Store.open(await olderDataDir(), { synchronous: "normal", upgrade: true });
    const want = await expectTruth(store);
    expect(want["t1/paused"]).toEqual({ n: 5, budget: 5 });
    expect(Object.values(want).reduce((n, v) => n + v.n, 0)).toBe(50);
  });

  test("listAgents totals come from the counts and agree with a count of the rows", async () => {
    store = await Store.open(join(tempDir(), "fleet.db"), { synchronous: "normal" });
    await store.ensureAgents([...ids("temp", ["a", "b", "c"]), ...ids("door", ["a", "b"])]);
    await store.setAgentStatus(agentId("temp", "b")!, "paused", "operator");
    const rowsOf = async (f: { type?: string; status?: string }) =>
      (await store.listAgents({ ...f, limit: 1000 })).rows.length;
    for (const f of [{}, { type: "temp" }, { status: "paused" }, { type: "temp", status: "active" }, { type: "x" }]) {
      const { total } = await store.listAgents({ ...f, limit: 1 });
      expect({ f, total }).toEqual({ f, total: await rowsOf(f) });
    }
  });

  test("a keyset page starts after the given id and walks every agent once", async () => {
    store = await Store.open(join(tempDir(), "fleet.db"), { synchronous: "normal" });
    const keys = Array.from({ length: 23 }, (_, i) => `k${String(i).padStart(2, "0")}`);
    await store.ensureAgents(ids("temp", keys));
    await store.ensureAgents(ids("door", ["a"]));
    const seen: string[] = [];
    let after = "";
    for (;;) {
      const { rows } = await store.listAgents({ type: "temp", limit: 5, after });
      seen.push(...rows.map((r) => r.key));
      if (rows.length < 5) break;
      after = rows.at(-1)!.id;
    }
    expect(seen).toEqual(keys);
  });
});

describe("usage_totals in the store", () => {
  let store: Store;
  afterEach(() => store?.close());

  /** Book `episodes` episodes for `agent` in `window` the way a commit does (upsert, incremented in place). */
  const book = (agent: string, window: string, tokens: number, cost: number) =>
    store.client.execute({
      sql: `INSERT INTO budget_usage (agent, "window", episodes, tool_calls, tokens, cost, bytes)
        VALUES (?, ?, 1, 2, ?, ?, ?)
        ON CONFLICT (agent, "window") DO UPDATE SET episodes = episodes + excluded.episodes,
        tool_calls = tool_calls + excluded.tool_calls, tokens = tokens + excluded.tokens, cost = cost + excluded.cost,
        bytes = bytes + excluded.bytes`,
      args: [agent, window, tokens, cost, 3 * tokens + 1],
    });

  /** Per window and type, from the ledger's rows themselves and from the totals the snapshot reads. */
  async function both(windows: readonly string[]) {
    const rs = await store.client.execute(
      `SELECT "window", substr(agent, 1, instr(agent, '/') - 1) AS type, count(*) AS agents, sum(episodes) AS episodes,
        max(episodes) AS maxEpisodes, sum(tool_calls) AS toolCalls, sum(tokens) AS tokens, max(tokens) AS maxTokens,
        round(sum(cost), 6) AS cost, max(cost) AS maxCost, sum(bytes) AS bytes, max(bytes) AS maxBytes
        FROM budget_usage GROUP BY 1, 2 ORDER BY 1, 2`,
    );
    const want = rs.rows
      .filter((r) => windows.includes(String(r.window)))
      .map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === "string" ? v : Number(v)])));
    const got = (await usageByType(store, windows))
      .map((u) => ({ ...u, cost: Math.round(u.cost * 1e6) / 1e6 }))
      .sort((a, b) => `${a.window}${a.type}`.localeCompare(`${b.window}${b.type}`));
    return { want, got };
  }

  test("per-type budget totals and top agent equal the ledger after bookings, retention and a restart", async () => {
    const path = join(tempDir(), "fleet.db");
    store = await Store.open(path, { synchronous: "normal" });
    const windows = ["h:10", "d:1", "h:9"];
    for (let i = 0; i < 40; i++) {
      const agent = `${["temp", "door"][i % 2]}/k${i % 7}`;
      await book(agent, windows[i % 3]!, 10 * i, 0.1 * i);
    }
    let r = await both(windows);
    expect(r.got).toEqual(r.want as never);
    expect(r.got.length).toBe(6);

    // Retention deletes an old window's rows: its totals go with the last one.
    await store.client.execute(`DELETE FROM budget_usage WHERE "window" = 'h:9' AND agent LIKE 'temp/%'`);
    r = await both(windows);
    expect(r.got).toEqual(r.want as never);
    expect(r.got.some((u) => u.window === "h:9" && u.type === "temp")).toBe(false);

    await store.close();
    store = await Store.open(path, { synchronous: "normal" });
    await book("door/k1", "h:10", 5, 0.5);
    r = await both(windows);
    expect(r.got).toEqual(r.want as never);
  });

  test("the migration totals the ledger a data dir already has", async () => {
    const path = join(tempDir(), "fleet.db");
    const c = createClient({ url: `file:${path}` });
    const totals = MIGRATIONS.find((m) => m.name === "budget use per type")!.version;
    await migrate(
      c,
      path,
      MIGRATIONS.filter((m) => m.version < totals),
    );
    for (let i = 0; i < 30; i++)
      await c.execute({
        sql: `INSERT INTO budget_usage (agent, "window", episodes, tool_calls, tokens, cost) VALUES (?, ?, ?, 0, ?, ?)`,
        args: [`t${i % 3}/k${i}`, i % 2 ? "h:5" : "d:0", i + 1, 7 * i, 0.25 * i],
      });
    c.close();
    store = await Store.open(path, { synchronous: "normal", upgrade: true });
    const r = await both(["h:5", "d:0"]);
    expect(r.got).toEqual(r.want as never);
    expect(r.got.length).toBe(6);
  });
});

describe("queued stimuli by type", () => {
  test("count and oldest receive time per type equal the queued rows", async () => {
    const store = await Store.open(join(tempDir(), "fleet.db"), { synchronous: "normal" });
    try {
      expect(await queueByType(store)).toEqual([]);
      const items = [];
      for (let i = 0; i < 30; i++) {
        const type = ["temp", "door", "relay"][i % 3]!;
        const key = `k${i % 4}`;
        const sid = `s${i}` as StimulusId;
        items.push({
          agent: agentId(type, key)!,
          type,
          key,
          sid,
          kind: "mqtt" as const,
          topic: "t",
          payload: new Uint8Array(),
          receivedAt: 5_000 - i * 10,
        });
      }
      await store.intake(items);
      // Some leave their queues: done, quarantined.
      await store.client.execute("UPDATE stimuli SET state = 'done' WHERE agent LIKE 'relay/%'");
      await store.client.execute("UPDATE stimuli SET state = 'quarantined' WHERE sid IN ('s28', 's27')");
      const rs = await store.client.execute(
        `SELECT a.type AS type, count(*) AS n, min(s.received_at) AS oldest FROM stimuli s
          JOIN agents a ON a.id = s.agent WHERE s.state = 'queued' GROUP BY a.type ORDER BY a.type`,
      );
      const want = rs.rows.map((r) => ({ type: String(r.type), n: Number(r.n), oldest: Number(r.oldest) }));
      const got = (await queueByType(store)).sort((a, b) => a.type.localeCompare(b.type));
      expect(got).toEqual(want);
      expect(want.map((w) => w.type)).toEqual(["door", "temp"]);
    } finally {
      await store.close();
    }
  });
});

describe("fleet counts on a running gateway", () => {
  const dir = tempDir();
  const config = join(dir, "fleet.toml");
  const toml = (instances: readonly string[], thrower: boolean) =>
    fleetHeader("counts-test") +
    counterType("counter", "m/+/in", { instances }) +
    (thrower ? throwerType("t/+/in") : "");
  // The DB-backed gauges are cached for a second of the gateway's clock: each check moves it on.
  let skew = 0;
  const now = () => Date.now() + skew;
  let gw: Gateway;
  let base: string;
  let token: string;

  async function start(): Promise<void> {
    gw = inProcessGateway(config, join(dir, "data"), { now });
    await gw.start();
    ({ base, token } = apiOf(gw, join(dir, "data")));
  }

  beforeAll(async () => {
    writeFileSync(config, toml(["a", "b", "c", "d"], true));
    await start();
  });
  afterAll(() => gw?.stop());

  const get = async <T>(path: string): Promise<T> => (await fetch(base + path, authed(token))).json() as Promise<T>;

  /** /metrics, /api/fleet and /api/agents all equal the agents table. */
  async function expectGatewayTruth(): Promise<Counts> {
    skew += 5_000;
    const want = await truth(gw.store);
    const shown = (s: string) => (s === "active" ? "idle" : s);
    const x = await scrape(base);
    const gauges: Record<string, number> = {};
    for (const s of samplesOf(x, "fleet_agents"))
      if (s.value > 0) gauges[`${s.labels.type}/${s.labels.status}`] = s.value;
    const wanted: Record<string, number> = {};
    for (const [k, v] of Object.entries(want)) {
      const [type, status] = k.split("/") as [string, string];
      wanted[`${type}/${shown(status)}`] = v.n;
    }
    expect(gauges).toEqual(wanted);
    for (const s of samplesOf(x, "fleet_agents_budget_paused"))
      expect(s.value).toBe(want[`${s.labels.type}/paused`]?.budget ?? 0);

    const total = Object.values(want).reduce((n, v) => n + v.n, 0);
    const fleet = await get<{ agents: Record<string, number> }>("/api/fleet");
    expect(fleet.agents.total).toBe(total);
    expect(fleet.agents).not.toHaveProperty("active");
    for (const status of ["active", "paused", "draining", "failed", "retired"]) {
      const n = Object.entries(want).reduce((m, [k, v]) => m + (k.endsWith(`/${status}`) ? v.n : 0), 0);
      // /api/fleet shows statuses as every view does: the stored `active` is `idle`.
      expect({ status, n: fleet.agents[shown(status)] ?? 0 }).toEqual({ status, n });
      const page = await get<{ total: number }>(`/api/agents?status=${status}&limit=1`);
      expect({ status, total: page.total }).toEqual({ status, total: n });
    }
    expect((await get<{ total: number }>("/api/agents?limit=1")).total).toBe(total);
    return want;
  }

  test("after pauses, resume, retire, a redeploy and a restart, /metrics and the API equal the table", async () => {
    expect(await expectGatewayTruth()).toEqual({ "counter/active": { n: 4, budget: 0 } });
    const a = agentId("counter", "a")!;
    const b = agentId("counter", "b")!;
    expect(await gw.setLifecycle(a, "pause")).toMatchObject({ status: "paused" });
    expect(await gw.setLifecycle(b, "retire")).toMatchObject({ status: "retired" });
    // A budget pause (it ends by itself) is what the budget gate writes.
    await gw.store.setAgentStatus(agentId("counter", "c")!, "paused", "budget", now() + 3_600_000);
    await gw.store.ensureAgents(ids("thrower", ["t1", "t2", "t3"]));
    expect(await expectGatewayTruth()).toMatchObject({ "counter/paused": { n: 2, budget: 1 } });
    expect(await gw.setLifecycle(a, "resume")).toMatchObject({ status: "active" });
    await expectGatewayTruth();

    // Redeploy: a new instance, and the thrower type removed (its agents retire).
    writeFileSync(config, toml(["a", "b", "c", "d", "e"], false));
    await gw.reload("test");
    const redeployed = await expectGatewayTruth();
    expect(redeployed["counter/active"]?.n).toBe(3); // a, d, e
    expect(redeployed["thrower/active"]).toBeUndefined();

    await gw.stop();
    await start();
    expect(await expectGatewayTruth()).toEqual(redeployed);
  }, 60_000);

  test("a backlog's depth and lag, by type and in all, equal the queued rows, before and after restart", async () => {
    const d = agentId("counter", "d")!;
    expect(await gw.setLifecycle(d, "pause")).toMatchObject({ status: "paused" });
    for (let i = 0; i < 5; i++) {
      const res = await fetch(`${base}/api/agents/counter/d/stimuli`, {
        ...authed(token),
        method: "POST",
        body: JSON.stringify({ i }),
      });
      expect(res.status).toBe(202);
    }
    const expectBacklog = async () => {
      const rs = await gw.store.client.execute(
        "SELECT count(*) AS n, min(received_at) AS oldest FROM stimuli WHERE state = 'queued'",
      );
      const { n, oldest } = { n: Number(rs.rows[0]!.n), oldest: Number(rs.rows[0]!.oldest) };
      expect(n).toBe(5);
      skew += 5_000; // past the snapshot's second
      const x = await scrape(base);
      expect(sampleValue(x, "fleet_queue_depth")).toBe(n);
      expect(sampleValue(x, "fleet_type_queue_depth", { type: "counter" })).toBe(n);
      const age = sampleValue(x, "fleet_queue_oldest_age_seconds")!;
      expect(Math.abs(age - (now() - oldest) / 1000)).toBeLessThan(2);
      const fleet = await get<{ queued_stimuli: number; lag_ms: number }>("/api/fleet");
      expect(fleet.queued_stimuli).toBe(n);
      expect(Math.abs(fleet.lag_ms - (now() - oldest))).toBeLessThan(2_000);
    };
    await expectBacklog();
    await gw.stop();
    await start();
    await expectBacklog();
  }, 60_000);

  test("after= pages the agents by id; with page= it is a 400", async () => {
    const first = await get<{ agents: { id: AgentId }[]; next_after: string | null; page: number | null }>(
      "/api/agents?type=counter&limit=2",
    );
    expect(first.page).toBe(1);
    expect(first.next_after).toBe(first.agents[1]!.id);
    const next = await get<{
      agents: { id: AgentId }[];
      next_after: string | null;
      page: number | null;
      total: number;
    }>(`/api/agents?type=counter&limit=2&after=${encodeURIComponent(first.next_after!)}`);
    expect(next.page).toBeNull();
    expect(next.total).toBe(5);
    expect(next.agents.map((a) => a.id)).toEqual([agentId("counter", "c")!, agentId("counter", "d")!]);
    const last = await get<{ agents: { id: AgentId }[]; next_after: string | null }>(
      `/api/agents?type=counter&limit=2&after=${encodeURIComponent(next.next_after!)}`,
    );
    expect(last).toMatchObject({ agents: [{ id: agentId("counter", "e") }], next_after: null });

    for (const bad of ["/api/agents?page=2&after=counter%2Fa", `/api/agents?after=${"x".repeat(301)}`]) {
      const res = await fetch(base + bad, authed(token));
      expect(res.status).toBe(400);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("bad_query");
    }
  });
});
