/**
 * Replication faults in-process against a real sqld (issue 11): the center killed with
 * kill -9 in the middle of a batch, a long outage on an injected clock with a large backlog
 * and retention running meanwhile, and the max_backlog_mb decision. The store is filled
 * through the gateway's own commit path (test/helpers/ops.ts), like test/gc.test.ts;
 * FLEET_REPL_EPISODES=100000 runs the full scale (CI default 4,000).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Client, InStatement } from "@libsql/client";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { backupDatabase, gcAll, restoreDatabase, verifyChains, verifyStore } from "../gateway/ops/index.ts";
import {
  BatchReader,
  CENTRAL_MIGRATIONS,
  CENTRAL_SCHEMA_VERSION,
  CentralReader,
  durableHead,
  enableReplication,
  HOT_BACKLOG_BATCHES,
  prepareCentral,
  REPLICATED,
  readEntries,
  redactUrl,
  Replicator,
  type ReplicatorOptions,
  type ReplicationStatus,
} from "../gateway/replication/index.ts";
import type { ReplicationSpec } from "../gateway/spec/index.ts";
import {
  appendAudit,
  idOfSql,
  migrate,
  Store,
  SUPERSEDES_META,
  supersededIds,
  wireSql,
} from "../gateway/store/index.ts";
import { DAY, SyntheticFleet } from "./helpers/ops.ts";
import { freePort, Sqld } from "./helpers/sqld.ts";
import { replicationToml } from "./helpers/replication.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";
import type { AgentId } from "../gateway/types.ts";

const EPISODES = Number(process.env.FLEET_REPL_EPISODES ?? 4_000);
const T0 = Date.UTC(2025, 0, 6);
const SLOW = 900_000;
const quiet = pino({ level: "silent" });

const dirs: string[] = [];
const servers: Sqld[] = [];
/** Replicators the tests made: stopped at the end, which ends their reader threads. */
const made: Replicator[] = [];
afterAll(async () => {
  for (const r of made) await r.stop();
  for (const s of servers) await s.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function synthetic(keep = 10): Promise<SyntheticFleet> {
  const dir = mkdtempSync(join(tmpdir(), "fleet-repl-"));
  dirs.push(dir);
  return SyntheticFleet.create(dir, {
    types: [{ name: "t", keys: ["a", "b", "c", "d"] }],
    keep,
    episodesDays: 1,
    dedupDays: 1,
  });
}

function spec(url: string, o: Partial<ReplicationSpec> = {}): ReplicationSpec {
  return { url, auth_token_env: null, interval_ms: 50, batch_rows: 500, required: true, max_backlog_mb: 1024, ...o };
}

/** A replicator on a fake clock that never runs its own loop (tests drive pushOnce / drain). */
function replicator(
  f: SyntheticFleet,
  s: ReplicationSpec,
  now: () => number,
  o: Partial<ReplicatorOptions> = {},
): Replicator {
  return track(
    new Replicator({
      store: f.store,
      spec: s,
      fleet: "synthetic",
      log: quiet,
      now,
      minBackoffMs: 10,
      maxBackoffMs: 50,
      ...o,
    }),
  );
}

function track(r: Replicator): Replicator {
  made.push(r);
  return r;
}

/** Central rows of `table` for this store's gateway. */
async function centralCount(db: Client, table: string, gateway: string): Promise<number> {
  const rs = await db.execute({ sql: `SELECT count(*) AS n FROM ${table} WHERE gateway = ?`, args: [gateway] });
  return Number(rs.rows[0]!.n);
}

/** Every replicated table: the center holds exactly the local rows (same values, each once), compared in pages. */
async function expectCenterEqualsLocal(
  f: SyntheticFleet,
  db: Client,
  tables: readonly (keyof typeof REPLICATED)[] = Object.keys(REPLICATED) as (keyof typeof REPLICATED)[],
): Promise<void> {
  const PAGE = 20_000;
  for (const t of tables.map((name) => REPLICATED[name])) {
    const cols = t.columns.join(", ");
    const order = t.key.join(", ");
    const where =
      t.name === "stimuli"
        ? "(state IN ('quarantined', 'dropped') OR (state != 'queued' AND last_error IS NOT NULL))"
        : "true";
    const width = t.columns.length;
    const local = Number((await f.store.client.execute(`SELECT count(*) FROM ${t.name} WHERE ${where}`)).rows[0]![0]);
    const center = Number(
      (
        await db.execute({
          sql: `SELECT count(*) FROM ${t.name} WHERE gateway = ? AND ${where}`,
          args: [f.store.gatewayId],
        })
      ).rows[0]![0],
    );
    expect({ table: t.name, n: center }).toEqual({ table: t.name, n: local });
    for (let offset = 0; offset < local; offset += PAGE) {
      const page = `ORDER BY ${order} LIMIT ${PAGE} OFFSET ${offset}`;
      // Locally hashes and episode ids are stored as bytes (store/hashes.ts); the center holds their text.
      const select = t.columns.map((c) => wireSql(t.name, c));
      const mine = (await f.store.client.execute(`SELECT ${select.join(", ")} FROM ${t.name} WHERE ${where} ${page}`))
        .rows;
      const theirs = (
        await db.execute({
          sql: `SELECT ${cols} FROM ${t.name} WHERE gateway = ? AND ${where} ${page}`,
          args: [f.store.gatewayId],
        })
      ).rows;
      const rows = (rs: typeof mine) => rs.map((r) => Array.from({ length: width }, (_, k) => r[k]));
      expect(rows(theirs)).toEqual(rows(mine));
    }
  }
}

async function verifyAtCenter(url: string, gateway: string) {
  const reader = await CentralReader.open(url);
  try {
    return await verifyChains(reader.chains(gateway));
  } finally {
    reader.close();
  }
}

describe("replication faults", () => {
  let sqld: Sqld;
  let db: Client;
  beforeAll(async () => {
    sqld = await Sqld.start();
    servers.push(sqld);
    db = sqld.client();
  });
  afterAll(() => db.close());

  test(
    "sqld kill -9 mid-batch, then restarted: the center ends equal to local, nothing twice, chains verify",
    async () => {
      const f = await synthetic();
      let now = T0;
      const r = replicator(f, spec(sqld.url, { batch_rows: 500 }), () => now);
      await enableReplication(f.store, sqld.url); // the queue is on; this test drives the pushes itself
      await f.commit(1500, T0, 1000);
      now = T0 + 1500 * 1000;
      await r.pushOnce(); // the center has some of it
      const push = r.pushOnce(); // in flight: read locally, then sent
      await sqld.kill(); // mid-batch: the transaction never commits at the center
      await expect(push).rejects.toMatchObject({ kind: "unreachable" });
      const before = await f.store.client.execute("SELECT count(*) AS n FROM repl_pending");
      expect(Number(before.rows[0]!.n)).toBeGreaterThan(0); // nothing unconfirmed left the queue
      await sqld.restart();
      await r.drain();
      expect(r.status().backlog.rows).toBe(0);
      await expectCenterEqualsLocal(f, db);
      expect(await centralCount(db, "episodes", f.store.gatewayId)).toBe(1500);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      // Re-sending everything (a new center URL queues the whole history again) changes nothing.
      await f.store.setMeta("replication.url", "http://elsewhere");
      expect(await enableReplication(f.store, sqld.url)).toBeGreaterThan(1500);
      const again = replicator(f, spec(sqld.url, { batch_rows: 500 }), () => now);
      await again.drain();
      await expectCenterEqualsLocal(f, db);
      await f.close();
    },
    SLOW,
  );

  test(
    "a batch larger than one statement holds is sent in several: the center ends equal to local and verifies",
    async () => {
      const f = await synthetic();
      await enableReplication(f.store, sqld.url);
      await f.commit(2100, T0, 1000);
      // One batch of every entry: 2,100 episodes are more than a statement's 2,000 rows, their logs
      // more than its 500 logs, so each goes in chunks.
      const batch = await readEntries(f.store.client, 5000, await durableHead(f.store));
      const chunks = (name: "episodes" | "events" | "checkpoints") => {
        const rows = batch.rows[name];
        return rows && "chunks" in rows ? rows.chunks.length : 0;
      };
      expect({ episodes: chunks("episodes"), events: chunks("events"), checkpoints: chunks("checkpoints") }).toEqual({
        episodes: 2,
        events: 5,
        checkpoints: 2,
      });
      const r = replicator(f, spec(sqld.url, { batch_rows: 5000 }), () => T0 + 2100 * 1000);
      await r.drain();
      expect(r.status().pushed_batches).toBe(1);
      await expectCenterEqualsLocal(f, db);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      await f.close();
    },
    SLOW,
  );

  test(
    "a row changed again while its batch is in flight stays queued and goes again with its newest value",
    async () => {
      const f = await synthetic();
      // Its reads on the store's connection, where the test can step in between them.
      const r = replicator(f, spec(sqld.url), () => T0, { readOnThread: false });
      await enableReplication(f.store, sqld.url);
      await f.commit(4, T0, 1000);
      await r.drain();
      await f.store.setAgentStatus("t/a" as AgentId, "paused", "first"); // queues the agent's entry
      // The batch reads its entries, then the agent changes again before the center confirms.
      const client = f.store.client;
      const execute = client.execute.bind(client);
      let changed = false;
      client.execute = (async (stmt: InStatement) => {
        const rs = await execute(stmt);
        const sql = typeof stmt === "string" ? stmt : stmt.sql;
        if (!changed && sql.startsWith("SELECT seq, tbl, key, ver, at FROM repl_pending")) {
          changed = true;
          await f.store.setAgentStatus("t/a" as AgentId, "active", null);
        }
        return rs;
      }) as typeof execute;
      try {
        expect(await r.pushOnce()).toBe(1);
      } finally {
        client.execute = execute;
      }
      expect(changed).toBe(true);
      const left = await client.execute("SELECT tbl, key, ver FROM repl_pending");
      expect(left.rows.map((row) => [row[0], row[1], row[2]])).toEqual([["agent", "t/a", 2]]);
      await r.drain();
      expect(r.status().backlog.rows).toBe(0);
      await expectCenterEqualsLocal(f, db, ["agents"]);
      await f.close();
    },
    SLOW,
  );

  test(
    "verify at the center reads the event logs of an agent with episodes but no checkpoint",
    async () => {
      const f = await synthetic();
      const r = replicator(f, spec(sqld.url), () => T0 + 10_000);
      await enableReplication(f.store, sqld.url);
      await f.commit(8, T0, 1000);
      await r.drain();
      const [g, agent] = [f.store.gatewayId, "t/b"];
      // At the center, t/b's stimuli all failed (episodes, no chain); then one of its logs is edited.
      await db.batch([
        { sql: "DELETE FROM checkpoints WHERE gateway = ? AND agent = ?", args: [g, agent] },
        {
          sql: "UPDATE agents SET head_seq = 0, head_hash = NULL, episodes = 0 WHERE gateway = ? AND id = ?",
          args: [g, agent],
        },
        {
          sql: "UPDATE episodes SET status = 'failed', checkpoint = NULL WHERE gateway = ? AND agent = ?",
          args: [g, agent],
        },
        {
          sql: `UPDATE events SET data = replace(data, 'reading', 'edited') WHERE gateway = ? AND kind = 'decide'
            AND episode = (SELECT min(id) FROM episodes WHERE gateway = ? AND agent = ?)`,
          args: [g, g, agent],
        },
      ]);
      const report = await verifyAtCenter(sqld.url, g);
      expect(report.problems).toEqual([
        {
          agent,
          record: expect.stringMatching(/^episode /),
          problem: expect.stringMatching(/^event log hash mismatch/),
        },
      ]);
      await f.close();
    },
    SLOW,
  );

  test("the reader thread reads what the store's connection reads, and nothing past the durable head", async () => {
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(10, T0, 1000);
    const head = await durableHead(f.store);
    await f.commit(5, T0 + 20_000, 1000); // queued after the head was taken: not to be read
    const reader = await BatchReader.open(f.store.path);
    try {
      const onThread = await reader.read(500, head);
      const here = await readEntries(f.store.client, 500, head);
      expect(onThread).toEqual(here);
      expect(onThread.entries.length).toBeGreaterThan(10);
      expect(onThread.entries.every((e) => e.seq <= head)).toBe(true);
      expect(onThread.entries.filter((e) => e.tbl === "episode")).toHaveLength(10);
      // The whole queue once the head moves.
      const all = await reader.read(500, await durableHead(f.store));
      expect(all.entries.filter((e) => e.tbl === "episode")).toHaveLength(15);
    } finally {
      await reader.close();
    }
    await expect(reader.read(500, head)).rejects.toThrow("closed");
    await f.close();
  });

  test("a process whose only work left is waiting for the reader thread waits for its answer", async () => {
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(3, T0, 1000);
    const dir = mkdtempSync(join(tmpdir(), "fleet-repl-reader-"));
    dirs.push(dir);
    // No top-level await (Bun holds the process for one): only the thread's answer is awaited,
    // as in a failed start's clean-up. Before the fix the process exited 0 with nothing printed.
    const script = join(dir, "read.ts");
    writeFileSync(
      script,
      `import { BatchReader } from ${JSON.stringify(join(import.meta.dir, "../gateway/replication/index.ts"))};
      void (async () => {
        const r = await BatchReader.open(${JSON.stringify(f.store.path)});
        const b = await r.read(100, ${await durableHead(f.store)});
        await r.close();
        console.log("read", b.entries.length);
      })().catch((err) => { console.error(err); process.exit(1); });\n`,
    );
    const p = Bun.spawnSync([process.execPath, script], { stderr: "pipe" });
    expect(p.stdout.toString().trim()).toMatch(/^read \d+$/);
    expect(p.exitCode).toBe(0);
    await f.close();
  });

  test("pushes never overlap: three at once send three different batches, each once", async () => {
    const f = await synthetic();
    const r = replicator(f, spec(sqld.url, { batch_rows: 20 }), () => T0);
    await enableReplication(f.store, sqld.url);
    await f.commit(60, T0, 1000); // 65 entries: the spec version, 4 agents, 60 episodes
    expect(await Promise.all([r.pushOnce(), r.pushOnce(), r.pushOnce()])).toEqual([20, 20, 20]);
    expect(Number((await f.store.client.execute("SELECT count(*) FROM repl_pending")).rows[0]![0])).toBe(5);
    expect(r.status().pushed_batches).toBe(3);
    await r.drain();
    await expectCenterEqualsLocal(f, db);
    await f.close();
  });

  test(
    "an episode's commit queues one entry; its agent's row and budget windows reach the center with it",
    async () => {
      const f = await synthetic();
      let now = T0;
      const r = replicator(f, spec(sqld.url), () => now);
      await enableReplication(f.store, sqld.url);
      const byKind = async () =>
        Object.fromEntries(
          (await f.store.client.execute("SELECT tbl, count(*) FROM repl_pending GROUP BY tbl")).rows.map((row) => [
            String(row[0]),
            Number(row[1]),
          ]),
        );
      await f.commit(40, T0, 60_000);
      // Four agents created on first sight, the spec version, and one entry per episode: no head or usage entries.
      expect(await byKind()).toEqual({ spec: 1, agent: 4, episode: 40 });
      await r.drain();
      await expectCenterEqualsLocal(f, db);
      // The bytes the episodes stored (bytes_per_day) reach the center with the other budget use.
      const stored = await db.execute({
        sql: "SELECT sum(bytes) FROM budget_usage WHERE gateway = ?",
        args: [f.store.gatewayId],
      });
      expect(Number(stored.rows[0]![0])).toBeGreaterThan(0);
      // An operator pause is no episode: it queues the agent itself; the next episodes queue only themselves.
      await f.store.setAgentStatus("t/a" as AgentId, "paused", "by test");
      await f.commit(8, T0 + 3_600_000, 60_000);
      expect(await byKind()).toEqual({ agent: 1, episode: 8 });
      // Retention days later keeps the budget windows of agents whose episodes the center has not confirmed.
      now = T0 + 10 * DAY;
      const kept = await gcAll(f.store, f.spec.spec, { now, keepUnconfirmed: true });
      expect(kept.usageRowsDeleted).toBe(0);
      await r.drain();
      // The first 40 episodes were confirmed, so retention collected them here; the center keeps them.
      await expectCenterEqualsLocal(f, db, ["agents", "budget_usage"]);
      expect(await centralCount(db, "episodes", f.store.gatewayId)).toBe(48);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      expect((await gcAll(f.store, f.spec.spec, { now, keepUnconfirmed: true })).usageRowsDeleted).toBeGreaterThan(0);
      await f.close();
    },
    SLOW,
  );

  test(
    `a ${EPISODES}-episode backlog over days offline: retention keeps unconfirmed rows; it drains oldest first`,
    async () => {
      const f = await synthetic();
      const dead = `http://127.0.0.1:${await freePort()}`;
      let now = T0;
      const offline = replicator(f, spec(dead), () => now);
      await enableReplication(f.store, dead);
      await f.commit(EPISODES, T0, (3 * DAY) / EPISODES);
      now = T0 + 3 * DAY;
      await expect(offline.pushOnce()).rejects.toMatchObject({ kind: "unreachable" });
      await offline.refresh();
      const s: ReplicationStatus = offline.status();
      expect(s.backlog.rows).toBeGreaterThanOrEqual(EPISODES);
      expect(s.backlog.lag_s).toBeGreaterThan(2.9 * 86_400); // the oldest entry is three days old
      expect(s.backlog.bytes).toBeGreaterThan(0);
      // Days later, retention runs: with `required` it keeps every row the center has not confirmed.
      const counts = await f.counts();
      now = T0 + 10 * DAY;
      const kept = await gcAll(f.store, f.spec.spec, { now, keepUnconfirmed: offline.keepUnconfirmed() });
      expect(offline.keepUnconfirmed()).toBe(true);
      expect(kept.episodesDeleted + kept.eventsDeleted + kept.tombstoned + kept.checkpointsDeleted).toBe(0);
      expect((await f.counts()).episodes).toBe(counts.episodes);
      // The center comes back on another address: point at it and drain, oldest first.
      const r = replicator(f, spec(sqld.url), () => now);
      const first = await f.store.client.execute(
        "SELECT key FROM repl_pending WHERE tbl = 'episode' ORDER BY seq LIMIT 1",
      );
      const oldest = await f.store.client.execute(
        `SELECT ${idOfSql("id")} AS id FROM episodes ORDER BY ended_at, id LIMIT 1`,
      );
      expect(first.rows[0]!.key).toBe(oldest.rows[0]!.id);
      const started = performance.now();
      await r.drain();
      const ms = performance.now() - started;
      console.log(`drained ${EPISODES} episodes (${r.status().pushed_rows} rows) in ${Math.round(ms)} ms`);
      await expectCenterEqualsLocal(f, db);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      // Confirmed: now retention collects, and both sides still verify.
      const collected = await gcAll(f.store, f.spec.spec, { now, keepUnconfirmed: r.keepUnconfirmed() });
      expect(collected.episodesDeleted).toBe(EPISODES);
      expect((await verifyStore(f.store)).problems).toEqual([]);
      expect(await centralCount(db, "episodes", f.store.gatewayId)).toBe(EPISODES);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      await f.close();
    },
    SLOW,
  );

  test(
    "past max_backlog_mb retention stops waiting: rows collected unpushed are counted as lost; the center verifies",
    async () => {
      const f = await synthetic(2);
      const dead = `http://127.0.0.1:${await freePort()}`;
      let now = T0;
      const offline = replicator(f, spec(dead, { max_backlog_mb: 1 }), () => now);
      await enableReplication(f.store, dead);
      await f.commit(2000, T0, 90_000); // ~2 days
      now = T0 + 10 * DAY;
      await offline.refresh();
      expect(offline.status().backlog.bytes).toBeGreaterThan(1024 * 1024);
      expect(offline.status().over_backlog).toBe(true);
      expect(offline.keepUnconfirmed()).toBe(false);
      expect(await f.store.getMeta("replication.over_backlog_at")).toBe(String(now));
      const gc = await gcAll(f.store, f.spec.spec, { now, keepUnconfirmed: offline.keepUnconfirmed() });
      expect(gc.episodesDeleted).toBe(2000);
      const r = replicator(f, spec(sqld.url, { max_backlog_mb: 1 }), () => now);
      await r.drain();
      const s = r.status();
      // Each collected queue entry counted once: the episodes (an episode's entry stands for its log,
      // checkpoint, agent row and budget windows, so the windows collected with it are not counted again).
      expect(gc.usageRowsDeleted).toBeGreaterThan(0);
      const lost = gc.episodesDeleted;
      expect(s.lost_rows).toBe(lost);
      expect(await f.store.getMeta("replication.lost_rows")).toBe(String(lost));
      const gw = await db.execute({
        sql: "SELECT lost_rows FROM gateways WHERE gateway = ?",
        args: [f.store.gatewayId],
      });
      expect(Number(gw.rows[0]!.lost_rows)).toBe(lost);
      expect(s.over_backlog).toBe(false); // drained: retention waits for the center again
      await expectCenterEqualsLocal(f, db);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      await f.close();
    },
    SLOW,
  );
});

describe("a center that hangs (kill -STOP)", () => {
  let sqld: Sqld;
  beforeAll(async () => {
    sqld = await Sqld.start();
    servers.push(sqld);
  });
  afterAll(() => sqld.thaw());

  /** The queue as it is in the data dir: its entries and its newest seq. */
  async function queue(f: SyntheticFleet): Promise<{ rows: number; head: number }> {
    const rs = await f.store.client.execute("SELECT count(*), coalesce(max(seq), 0) FROM repl_pending");
    return { rows: Number(rs.rows[0]![0]), head: Number(rs.rows[0]![1]) };
  }

  async function until(what: string, ok: () => Promise<boolean> | boolean, ms = 15_000): Promise<void> {
    const end = Date.now() + ms;
    while (!(await ok())) {
      if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
      await Bun.sleep(50);
    }
  }

  /** A replicator running its own loop on the real clock, pushing to this test's sqld. */
  async function running(f: SyntheticFleet, o: Partial<ReplicatorOptions> = {}): Promise<Replicator> {
    const r = track(
      new Replicator({
        store: f.store,
        spec: spec(sqld.url, { batch_rows: 20 }),
        fleet: "synthetic",
        log: quiet,
        minBackoffMs: 10,
        maxBackoffMs: 100,
        ...o,
      }),
    );
    await r.start();
    await f.commit(5, Date.now() - 60_000, 1000);
    await until(
      "the first rows are pushed",
      async () => (await queue(f)).rows === 0 && r.status().state === "streaming",
    );
    return r;
  }

  test(
    "a push it does not answer fails as unreachable and backs off; the status counts the queue as it is; " +
      "once it answers again the backlog is pushed",
    async () => {
      const f = await synthetic();
      const r = await running(f, { pushTimeoutMs: 400 });
      sqld.freeze();
      try {
        await f.commit(30, Date.now() - 30_000, 1000);
        await until("the push fails", () => r.status().last_error?.kind === "unreachable");
        const s = r.status();
        expect(s.state).toBe("retrying");
        expect(s.last_error!.message).toContain("did not answer within 0.4 s");
        const q = await queue(f);
        expect(q.rows).toBeGreaterThan(0);
        expect(s.backlog.rows).toBe(q.rows);
        expect(s.cursor.queued_seq).toBe(q.head);
      } finally {
        sqld.thaw();
      }
      await until("the backlog is pushed", async () => (await queue(f)).rows === 0 && r.status().backlog.rows === 0);
      expect(r.status().state).toBe("streaming");
      const db = sqld.client();
      expect(await centralCount(db, "episodes", f.store.gatewayId)).toBe(35);
      db.close();
      await r.stop();
      await f.close();
    },
    SLOW,
  );

  test("stop gives up on a push in flight after its grace; the batch stays queued for the next start", async () => {
    const f = await synthetic();
    const r = await running(f, { pushTimeoutMs: 120_000 });
    sqld.freeze();
    try {
      await f.commit(10, Date.now() - 30_000, 1000);
      await Bun.sleep(500); // the loop counts the queue and sends a batch, which hangs
      const t0 = performance.now();
      await r.stop(300);
      expect(performance.now() - t0).toBeLessThan(3000);
      expect(r.status().state).toBe("stopped");
      expect((await queue(f)).rows).toBeGreaterThan(0);
    } finally {
      sqld.thaw();
    }
    await f.close();
  });
});

describe("restoring a backup", () => {
  test(
    "a restored data dir replicates under a new gateway id; the old one is superseded at the center, " +
      "each history verifies and nothing done after the restore is dropped",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      const db = sqld.client();
      const f = await synthetic();
      const old = f.store.gatewayId;
      const audit = (store: Store, action: string) =>
        appendAudit(store, { at: T0, actor: "ops", action, target: null, status: 200, detail: null });
      await enableReplication(f.store, sqld.url);
      await f.commit(8, T0, 1000);
      await audit(f.store, "before-backup");
      const r = replicator(f, spec(sqld.url), () => T0);
      await r.drain();
      const file = join(f.dir, "backup.db");
      await backupDatabase(f.dbPath, file);
      // The copy that is lost goes on: its rows reach the center under the old id (audit seqs 2 and 3).
      await f.commit(8, T0 + 60_000, 1000);
      await audit(f.store, "lost-1");
      await audit(f.store, "lost-2");
      await r.drain();
      const restoredDir = join(f.dir, "restored");
      await restoreDatabase(file, restoredDir, false);
      const s = await Store.open(join(restoredDir, "fleet.db"), { synchronous: "normal" });
      try {
        expect(s.gatewayId).not.toBe(old);
        expect(await enableReplication(s, sqld.url)).toBeGreaterThan(8); // the whole restored history
        await audit(s, "after-restore"); // seq 2 again, locally
        const r2 = track(new Replicator({ store: s, spec: spec(sqld.url), fleet: "synthetic", log: quiet }));
        await r2.start();
        await r2.drain();
        await r2.stop();
        const actions = async (gw: string) =>
          (await db.execute({ sql: "SELECT action FROM audit WHERE gateway = ? ORDER BY seq", args: [gw] })).rows.map(
            (row) => String(row[0]),
          );
        expect(await actions(old)).toEqual(["before-backup", "lost-1", "lost-2"]);
        expect(await actions(s.gatewayId)).toEqual(["before-backup", "after-restore"]);
        expect(await centralCount(db, "episodes", s.gatewayId)).toBe(8);
        expect((await verifyAtCenter(sqld.url, old)).problems).toEqual([]);
        expect((await verifyAtCenter(sqld.url, s.gatewayId)).problems).toEqual([]);
        const reader = await CentralReader.open(sqld.url);
        try {
          const gws = await reader.gateways();
          expect(gws.map((g) => [g.gateway, g.superseded]).sort()).toEqual(
            [
              [old, true],
              [s.gatewayId, false],
            ].sort(),
          );
          expect((await reader.gateways("synthetic")).map((g) => g.gateway)).toEqual([s.gatewayId]);
        } finally {
          reader.close();
        }
      } finally {
        await s.close();
        db.close();
        await f.close();
      }
    },
    SLOW,
  );
});

describe("restoring a backup of a restored data dir that never pushed", () => {
  test(
    "every id of the chain is superseded at the center by the last one's first push: no old id stays current",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      const db = sqld.client();
      const f = await synthetic();
      const first = f.store.gatewayId;
      await enableReplication(f.store, sqld.url);
      await f.commit(8, T0, 1000);
      await replicator(f, spec(sqld.url), () => T0).drain();
      // Restored once (never started), backed up again, restored again: only the last copy runs.
      await backupDatabase(f.dbPath, join(f.dir, "one.db"));
      const middleDir = join(f.dir, "middle");
      await restoreDatabase(join(f.dir, "one.db"), middleDir, false);
      await backupDatabase(join(middleDir, "fleet.db"), join(f.dir, "two.db"));
      const lastDir = join(f.dir, "last");
      await restoreDatabase(join(f.dir, "two.db"), lastDir, false);
      const s = await Store.open(join(lastDir, "fleet.db"), { synchronous: "normal" });
      const middle = await Store.open(join(middleDir, "fleet.db"), { synchronous: "normal" });
      const between = middle.gatewayId;
      await middle.close();
      try {
        expect(new Set([first, between, s.gatewayId]).size).toBe(3);
        expect(supersededIds(await s.getMeta(SUPERSEDES_META))).toEqual([first, between]);
        await enableReplication(s, sqld.url);
        const r = track(new Replicator({ store: s, spec: spec(sqld.url), fleet: "synthetic", log: quiet }));
        await r.start();
        await r.drain();
        await r.stop();
        const marks = await db.execute("SELECT key, value FROM meta WHERE key LIKE 'superseded:%' ORDER BY key");
        expect(marks.rows.map((m) => [String(m[0]), String(m[1])]).sort()).toEqual(
          [
            [`superseded:${first}`, s.gatewayId],
            [`superseded:${between}`, s.gatewayId],
          ].sort(),
        );
        const reader = await CentralReader.open(sqld.url);
        try {
          expect((await reader.gateways("synthetic")).map((g) => g.gateway)).toEqual([s.gatewayId]);
          // Each agent once: the first id's copies are left out of the fleet's reads.
          const { rows } = await reader.agents({ fleet: "synthetic" });
          expect(rows.map((a) => [a.id, a.gateway])).toEqual(["t/a", "t/b", "t/c", "t/d"].map((a) => [a, s.gatewayId]));
        } finally {
          reader.close();
        }
      } finally {
        await s.close();
        db.close();
        await f.close();
      }
    },
    SLOW,
  );

  test("a data dir restored by an earlier release, which kept one bare id, still supersedes it", () => {
    const id = "0192f3a4-5b6c-7d8e-9f00-112233445566";
    expect(supersededIds(id)).toEqual([id]);
    expect(supersededIds(JSON.stringify([id, "b"]))).toEqual([id, "b"]);
    expect(supersededIds(null)).toEqual([]);
  });
});

describe("a [replication] url the libSQL client refuses", () => {
  test(
    "a push fails as `config` (the center was never asked), not `rejected`; status and logs show no query or " +
      "userinfo of the URL",
    async () => {
      const f = await synthetic();
      const lines: string[] = [];
      const log = pino({ level: "info" }, { write: (line: string) => lines.push(line) });
      // Past spec validation (which refuses both): a token and a parameter the client does not take.
      const base = `http://127.0.0.1:${await freePort()}`;
      const url = `${base}/?authToken=SECRET-JWT&x=1`;
      await f.commit(3, T0, 1000);
      // The loop's first wait never ends: one push, one failure, then stop.
      const r = replicator(f, spec(url), () => T0, { log, sleep: () => new Promise<void>(() => {}) });
      await r.start();
      for (let i = 0; i < 400 && r.status().last_error === null; i++) await Bun.sleep(25);
      await r.stop();
      const status = r.status();
      expect(status.last_error?.kind).toBe("config");
      expect(status.last_error?.message).toContain("is not a URL the libSQL client takes");
      expect(status.errors).toMatchObject({ config: 1, rejected: 0 });
      expect(status.url).toBe(base);
      expect(JSON.stringify(status)).not.toContain("SECRET");
      expect(lines.join("\n")).toContain(`"url":"${base}"`);
      expect(lines.join("\n")).not.toContain("SECRET");
      await f.close();
    },
    SLOW,
  );

  test("every display of a central URL drops userinfo, query and fragment", () => {
    expect(redactUrl("https://alice:pw@central:8080/db?authToken=eyJ.x.y&tls=1#frag")).toBe("https://central:8080/db");
    expect(redactUrl("libsql://central.example?tls=0")).toBe("libsql://central.example");
    expect(redactUrl("not a url")).toBe("(invalid URL)");
  });
});

describe("what the center and fleet status are told after a push", () => {
  test(
    "caught up: the center's gateways row says 0 rows behind and lag 0, however old the rows pushed were",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      const db = sqld.client();
      const f = await synthetic();
      await enableReplication(f.store, sqld.url);
      await f.commit(30, T0, 1000);
      let now = T0 + 3_600_000; // the rows are an hour old when they go
      const r = replicator(f, spec(sqld.url, { batch_rows: 20 }), () => now);
      await r.refresh();
      const row = async () =>
        (
          await db.execute({
            sql: "SELECT backlog_rows, lag_s FROM gateways WHERE gateway = ?",
            args: [f.store.gatewayId],
          })
        ).rows[0]!;
      // A partial push: what is left is the rest of the queue, as old as its oldest entry.
      expect(await r.pushOnce()).toBe(20);
      const part = await row();
      const [rest] = (await f.store.client.execute("SELECT min(at) AS at FROM repl_pending")).rows;
      expect(Number(part.backlog_rows)).toBeGreaterThan(0);
      expect(Number(part.lag_s)).toBeCloseTo((now - Number(rest!.at)) / 1000, 1);
      expect(r.status().backlog.lag_s).toBeCloseTo((now - Number(rest!.at)) / 1000, 1);
      // The last batch: nothing is left, so nothing lags (an idle gateway keeps this row until its next push).
      now += 5000;
      await r.drain();
      expect([Number((await row()).backlog_rows), Number((await row()).lag_s)]).toEqual([0, 0]);
      expect(r.status().backlog).toMatchObject({ rows: 0, lag_s: 0 });
      db.close();
      await f.close();
    },
    SLOW,
  );

  test("the last push survives a restart, kept in meta with the confirmed cursor", async () => {
    const sqld = await Sqld.start();
    servers.push(sqld);
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(8, T0, 1000);
    const pushedAt = T0 + 60_000;
    const first = replicator(f, spec(sqld.url), () => pushedAt, { sleep: () => new Promise(() => undefined) });
    await first.drain();
    expect(first.status().last_push_at).toBe(pushedAt);
    expect(await f.store.getMeta("replication.last_push_at")).toBe(String(pushedAt));
    // A restart: a new replicator on the same data dir, nothing pushed yet.
    const again = replicator(f, spec(sqld.url), () => pushedAt + 3_600_000, {
      sleep: () => new Promise(() => undefined),
    });
    await again.start();
    expect(again.status().last_push_at).toBe(pushedAt);
    expect(again.status().cursor.confirmed_seq).toBe(first.status().cursor.confirmed_seq);
    await again.stop();
    await f.close();
  });
});

describe("what is the center's doing and what is the gateway's own", () => {
  test("pointed at another center, the last one's cursor, last push and lost rows are not shown as its", async () => {
    const sqld = await Sqld.start();
    servers.push(sqld);
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(8, T0, 1000);
    await f.store.setMeta("replication.lost_rows", "3");
    const first = replicator(f, spec(sqld.url), () => T0 + 60_000, { sleep: () => new Promise(() => undefined) });
    await first.drain();
    expect(first.status().cursor.confirmed_seq).toBeGreaterThan(0);
    const elsewhere = `http://127.0.0.1:${await freePort()}`;
    const moved = replicator(f, spec(elsewhere), () => T0 + 120_000, { sleep: () => new Promise(() => undefined) });
    await moved.start();
    const s = moved.status();
    expect([s.cursor.confirmed_seq, s.last_push_at, s.lost_rows]).toEqual([0, null, 0]);
    expect(s.backlog.rows).toBeGreaterThan(0); // the whole history goes to the new center
    await moved.stop();
    // The same center again keeps its figures.
    const back = replicator(f, spec(elsewhere), () => T0 + 180_000, { sleep: () => new Promise(() => undefined) });
    await f.store.setMeta("replication.confirmed_seq", "5");
    await back.start();
    expect(back.status().cursor.confirmed_seq).toBe(5);
    await back.stop();
    await f.close();
  });

  test("a confirm that fails on the gateway's own disk is kind local, and the batch goes again", async () => {
    const sqld = await Sqld.start();
    servers.push(sqld);
    const db = sqld.client();
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(20, T0, 1000);
    const r = replicator(f, spec(sqld.url), () => T0 + 60_000);
    const write = f.store.writer.write.bind(f.store.writer);
    let fail = true;
    f.store.writer.write = ((stmts: Parameters<typeof write>[0]) => {
      if (fail && JSON.stringify(stmts).includes("DELETE FROM repl_pending")) {
        fail = false;
        return Promise.reject(new Error("SQLITE_FULL: database or disk is full"));
      }
      return write(stmts);
    }) as typeof f.store.writer.write;
    const err = await r.pushOnce().catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: "local" });
    expect(String((err as Error).message)).toBe(
      "the gateway's own database failed confirming a batch the center committed (it goes again): " +
        "SQLITE_FULL: database or disk is full",
    );
    const left = await f.store.client.execute("SELECT count(*) AS n FROM repl_pending");
    expect(Number(left.rows[0]!.n)).toBeGreaterThan(0);
    await r.drain();
    await expectCenterEqualsLocal(f, db);
    db.close();
    await f.close();
  });

  test("a confirm that committed though its WAL sync failed does not make lost rows go backwards", async () => {
    const sqld = await Sqld.start();
    servers.push(sqld);
    const f = await synthetic();
    await enableReplication(f.store, sqld.url);
    await f.commit(10, T0, 1000);
    // Two episodes collected before their push: their entries are lost.
    await f.store.client.execute("DELETE FROM episodes WHERE rowid IN (SELECT rowid FROM episodes LIMIT 2)");
    const r = replicator(f, spec(sqld.url), () => T0 + 60_000);
    const write = f.store.writer.write.bind(f.store.writer);
    let fail = true;
    f.store.writer.write = (async (stmts: Parameters<typeof write>[0]) => {
      const done = await write(stmts);
      if (fail && JSON.stringify(stmts).includes("DELETE FROM repl_pending")) {
        fail = false;
        throw new Error("SQLITE_IOERR: syncing the WAL failed"); // committed, not known to be on the disk
      }
      return done;
    }) as typeof f.store.writer.write;
    await expect(r.pushOnce()).rejects.toMatchObject({ kind: "local" });
    expect(await f.store.getMeta("replication.lost_rows")).toBe("2");
    await f.commit(5, T0 + 20_000, 1000);
    await r.drain();
    expect(r.status().lost_rows).toBe(2);
    expect(await f.store.getMeta("replication.lost_rows")).toBe("2");
    await f.close();
  });

  test("a push asked of a stopped replicator starts no reader thread and no client", async () => {
    const f = await synthetic();
    const r = replicator(f, spec("http://127.0.0.1:9"), () => T0);
    await r.start();
    await r.stop();
    await expect(r.pushOnce()).rejects.toThrow("the replicator is stopped");
    const internals = r as unknown as { reader: unknown; client: unknown };
    expect([internals.reader, internals.client]).toEqual([null, null]);
    await f.close();
  });
});

describe("operator actions", () => {
  test(
    "replicate row for row and once, those recorded before replication too; a v1 center is upgraded for them",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      const db = sqld.client();
      // A center written before operator actions replicated (central schema v1).
      await migrate(db, "central", CENTRAL_MIGRATIONS.slice(0, 1));
      const old = await CentralReader.open(sqld.url);
      expect(old.version).toBe(1);
      expect(await old.audit()).toEqual([]);
      old.close();
      const f = await synthetic();
      const act = (at: number, action: string, target: string | null, status: number, detail: string | null) =>
        appendAudit(f.store, { at, actor: "ops-alice", action, target, status, detail });
      await act(T0, "agent.pause", "t/a", 200, null); // before replication was on: queued by enableReplication
      await enableReplication(f.store, sqld.url);
      await act(T0 + 1, "agent.resume", "t/a", 200, null);
      await act(T0 + 2, "agent.retire", "t/zz", 404, "no agent t/zz");
      await act(T0 + 3, "gc", null, 200, '{"episodes":0}');
      await f.commit(10, T0, 1000);
      const r = replicator(f, spec(sqld.url), () => T0 + 60_000);
      await r.drain();
      expect(await centralCount(db, "audit", f.store.gatewayId)).toBe(4);
      await expectCenterEqualsLocal(f, db);
      // Re-sending the whole history changes nothing.
      await f.store.setMeta("replication.url", "http://elsewhere");
      await enableReplication(f.store, sqld.url);
      await replicator(f, spec(sqld.url), () => T0 + 60_000).drain();
      expect(await centralCount(db, "audit", f.store.gatewayId)).toBe(4);
      await expectCenterEqualsLocal(f, db);
      const reader = await CentralReader.open(sqld.url);
      expect(reader.version).toBe(CENTRAL_SCHEMA_VERSION);
      const rows = await reader.audit({ fleet: "synthetic" });
      expect(rows.map((a) => [a.fleet, a.gateway, a.seq, a.action, a.target, a.status])).toEqual([
        ["synthetic", f.store.gatewayId, 4, "gc", null, 200],
        ["synthetic", f.store.gatewayId, 3, "agent.retire", "t/zz", 404],
        ["synthetic", f.store.gatewayId, 2, "agent.resume", "t/a", 200],
        ["synthetic", f.store.gatewayId, 1, "agent.pause", "t/a", 200],
      ]);
      expect((await reader.audit({ fleet: f.store.gatewayId, before: 3, limit: 1 })).map((a) => a.seq)).toEqual([2]);
      expect(await reader.audit({ fleet: "no-such-fleet" })).toEqual([]);
      reader.close();
      db.close();
      await f.close();
    },
    SLOW,
  );
});

describe("fleet central", () => {
  test(
    "serves every fleet side by side with drill-down to an agent's episodes and an episode's log, read-only",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      for (const name of ["north", "south"]) {
        const f = await synthetic();
        const r = track(new Replicator({ store: f.store, spec: spec(sqld.url), fleet: name, log: quiet }));
        await enableReplication(f.store, sqld.url);
        await f.commit(20, Date.now() - 60_000, 1000);
        await appendAudit(f.store, {
          at: Date.now(),
          actor: "ops",
          action: "agent.pause",
          target: "t/a",
          status: 200,
          detail: name,
        });
        await r.drain();
        await f.close();
      }
      const proc = Bun.spawn(
        [
          process.execPath,
          join(import.meta.dir, "../gateway/cli/main.ts"),
          "central",
          "--url",
          sqld.url,
          "--port",
          "0",
        ],
        { stdout: "pipe", stderr: "pipe", env: { PATH: process.env.PATH ?? "" } },
      );
      try {
        const reader = proc.stdout.getReader();
        const { value } = await reader.read();
        const line = new TextDecoder().decode(value);
        const base = line.match(/on (http:\/\/127\.0\.0\.1:\d+)/)?.[1];
        expect(base).toBeString();
        const fleets = (await (await fetch(`${base}/api/fleets`)).json()) as {
          fleets: { fleet: string; gateway: string; agents: Record<string, number>; episodesLastHour: number }[];
        };
        expect(fleets.fleets.map((f) => [f.fleet, f.agents.idle, f.episodesLastHour])).toEqual([
          ["north", 4, 20],
          ["south", 4, 20],
        ]);
        const gw = fleets.fleets[0]!.gateway;
        const agents = (await (await fetch(`${base}/api/fleets/${gw}/agents`)).json()) as { total: number };
        expect(agents.total).toBe(4);
        const eps = (await (await fetch(`${base}/api/fleets/${gw}/agents/t/a/episodes`)).json()) as {
          episodes: { id: string; fleet: string }[];
        };
        expect(eps.episodes).toHaveLength(5);
        expect(eps.episodes.every((e) => e.fleet === "north")).toBe(true);
        const one = (await (await fetch(`${base}/api/episodes/${eps.episodes[0]!.id}`)).json()) as {
          events: unknown[];
        };
        expect(one.events).toHaveLength(5);
        const acts = (await (await fetch(`${base}/api/fleets/${gw}/audit`)).json()) as {
          records: { fleet: string; action: string; detail: string; result: string }[];
        };
        expect(acts.records.map((a) => [a.fleet, a.action, a.detail, a.result])).toEqual([
          ["north", "agent.pause", "north", "ok"],
        ]);
        const all = (await (await fetch(`${base}/api/audit`)).json()) as { records: { fleet: string }[] };
        expect(all.records.map((a) => a.fleet).sort()).toEqual(["north", "south"]);
        expect((await fetch(`${base}/api/fleets/${gw}/audit?before=x`)).status).toBe(400);
        expect((await fetch(`${base}/api/audit?before=5`)).status).toBe(400);
        const page = await fetch(`${base}/`);
        expect(await page.text()).toContain("central view");
        expect((await fetch(`${base}/api/fleets`, { method: "POST" })).status).toBe(405);
      } finally {
        proc.kill();
        await proc.exited;
      }
      const open = Bun.spawnSync(
        [
          process.execPath,
          join(import.meta.dir, "../gateway/cli/main.ts"),
          "central",
          "--url",
          sqld.url,
          "--host",
          "0.0.0.0",
        ],
        { env: { PATH: process.env.PATH ?? "" } },
      );
      expect(open.exitCode).toBe(1);
      expect(open.stderr.toString()).toContain("FLEET_CENTRAL_API_TOKEN");
    },
    SLOW,
  );
});

describe("the central token for fleet --central and fleet central", () => {
  test(
    "comes from --token-env or [replication] auth_token_env; a missing or wrong one is one clear error",
    async () => {
      const sqld = await Sqld.start({ auth: true });
      servers.push(sqld);
      const admin = sqld.client();
      await prepareCentral(admin, sqld.url);
      admin.close();
      const dir = mkdtempSync(join(tmpdir(), "fleet-central-token-"));
      dirs.push(dir);
      const config = join(dir, "fleet.toml");
      writeFileSync(
        config,
        fleetHeader("tok") + counterType("counter", "s/+/c") + replicationToml(sqld.url, { tokenEnv: "CENTRAL_TOKEN" }),
      );
      const none = join(dir, "absent.toml");
      const cli = (args: string[], env: Record<string, string> = {}) => {
        const r = Bun.spawnSync([process.execPath, join(import.meta.dir, "../gateway/cli/main.ts"), ...args], {
          env: { PATH: process.env.PATH ?? "", ...env },
          cwd: dir,
        });
        return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
      };
      const agents = (config_: string, extra: string[] = []) => [
        "agents",
        "--central",
        sqld.url,
        "--config",
        config_,
        ...extra,
      ];
      // The gateway's own env var, named in fleet.toml.
      expect(cli(agents(config), { CENTRAL_TOKEN: sqld.token() })).toMatchObject({ code: 0 });
      const unset = cli(agents(config));
      expect(unset.code).toBe(1);
      expect(unset.err).toContain(`[replication] auth_token_env in ${config} names CENTRAL_TOKEN, which is not set`);
      const wrong = cli(agents(config), { CENTRAL_TOKEN: "not-a-jwt" });
      expect(wrong.code).toBe(1);
      expect(wrong.err).toContain("refused the credentials");
      expect(wrong.err).toContain("the token in CENTRAL_TOKEN was refused");
      // --token-env names another variable, and wins over fleet.toml.
      expect(
        cli(agents(config, ["--token-env", "OTHER"]), { OTHER: sqld.token(), CENTRAL_TOKEN: "not-a-jwt" }),
      ).toMatchObject({ code: 0 });
      const missing = cli(agents(none, ["--token-env", "OTHER"]));
      expect(missing.code).toBe(1);
      expect(missing.err).toContain("--token-env OTHER: OTHER is not set");
      expect(cli(agents(none, ["--token-env", "1-bad"])).code).toBe(2);
      const anonymous = cli(agents(none));
      expect(anonymous.code).toBe(1);
      expect(anonymous.err).toContain("no token was sent");
      // No fleet.toml names a variable here: the hint says where a token does go.
      expect(anonymous.err).toContain("FLEET_CENTRAL_TOKEN");
      expect(anonymous.err).toContain("--token-env NAME");
      expect(anonymous.err).not.toContain("refused the credentials");
      expect(anonymous.err).not.toContain("auth_token_env names");
      // A gateway without auth_token_env sends no token: its error says so, and how to configure one.
      const f = await synthetic();
      await enableReplication(f.store, sqld.url);
      const gw = replicator(f, spec(sqld.url), () => T0);
      const e = (await gw.pushOnce().catch((err: unknown) => err)) as { kind: string; message: string };
      expect(e.kind).toBe("auth");
      expect(e.message).toContain("wants a token and none was sent");
      expect(e.message).toContain("set [replication] auth_token_env");
      expect(e.message).not.toContain("refused the credentials");
      await f.close();
      // fleet central takes it the same way.
      const proc = Bun.spawn(
        [
          process.execPath,
          join(import.meta.dir, "../gateway/cli/main.ts"),
          "central",
          "--url",
          sqld.url,
          "--port",
          "0",
          "--config",
          config,
        ],
        { stdout: "pipe", stderr: "pipe", env: { PATH: process.env.PATH ?? "", CENTRAL_TOKEN: sqld.token() } },
      );
      try {
        const { value } = await proc.stdout.getReader().read();
        const base = new TextDecoder().decode(value).match(/on (http:\/\/127\.0\.0\.1:\d+)/)?.[1];
        expect(base).toBeString();
        expect((await fetch(`${base}/api/fleets`)).status).toBe(200);
      } finally {
        proc.kill();
        await proc.exited;
      }
      const refused = cli(["central", "--url", sqld.url, "--port", "0", "--config", config], {
        CENTRAL_TOKEN: "not-a-jwt",
      });
      expect(refused.code).toBe(1);
      expect(refused.err).toContain("the token in CENTRAL_TOKEN was refused");
    },
    SLOW,
  );
});

describe("pushing beside episodes", () => {
  let sqld: Sqld;
  let db: Client;
  beforeAll(async () => {
    sqld = await Sqld.start();
    servers.push(sqld);
    db = sqld.client();
  });
  afterAll(() => db.close());

  test(
    "while episodes commit the push waits for full batches, one round per interval; idle, it drains everything",
    async () => {
      const f = await synthetic();
      const batch = 20;
      const interval = 1000;
      let now = T0;
      // The loop's waits park here until the test steps it: commits land while it waits, then the
      // clock moves on and it takes its next step (a push or not), until it waits again.
      let parked: (() => void) | null = null;
      let onPark: (() => void) | null = null;
      const sleep = () =>
        new Promise<void>((release) => {
          parked = release;
          onPark?.();
        });
      const nextPark = () =>
        new Promise<void>((r) => {
          onPark = () => {
            onPark = null;
            r();
          };
        });
      const step = async (ms: number) => {
        now += ms;
        const release = parked!;
        parked = null;
        const next = nextPark();
        release();
        await next;
      };
      const pending = async () =>
        Number((await f.store.client.execute("SELECT count(*) FROM repl_pending")).rows[0]![0]);
      const r = track(
        new Replicator({
          store: f.store,
          spec: spec(sqld.url, { interval_ms: interval, batch_rows: batch }),
          fleet: "synthetic",
          log: quiet,
          now: () => now,
          sleep,
        }),
      );
      await f.commit(4, T0 - 10_000, 1000); // history from before replication: queued at start
      const first = nextPark();
      await r.start();
      await first; // idle at start: it pushed everything at once, then waits for new rows
      expect(await pending()).toBe(0);

      // Commits flow: 5 episodes per 100 ms (50 per interval), each commit queueing one entry.
      let at = T0;
      const commit = async (n: number) => {
        await f.commit(n, at, 10);
        at += n * 10;
      };
      const steps: { t: number; pushed: number; pending: number }[] = [];
      for (let i = 0; i < 40; i++) {
        const before = await pending();
        await commit(5);
        await step(100);
        const left = await pending();
        steps.push({ t: now, pushed: before + 5 - left, pending: left });
      }
      // It waited with rows queued (no batch chasing each commit) ...
      expect(steps.filter((s) => s.pushed === 0 && s.pending > 0).length).toBeGreaterThan(20);
      // ... and what it pushed went in full batches, in rounds at least an interval apart.
      expect(steps.every((s) => s.pushed === 0 || s.pushed === batch)).toBe(true);
      const rounds = steps.filter((s, i) => s.pushed > 0 && (i === 0 || steps[i - 1]!.pushed === 0)).map((s) => s.t);
      expect(rounds.length).toBeGreaterThanOrEqual(3);
      for (let i = 1; i < rounds.length; i++) expect(rounds[i]! - rounds[i - 1]!).toBeGreaterThanOrEqual(interval);
      // The lag stays bounded: about one interval's commits plus a batch are ever waiting.
      expect(Math.max(...steps.map((s) => s.pending))).toBeLessThanOrEqual(50 + batch);
      expect(r.status().backlog.rows).toBe(await pending()); // visible as it is

      // Slow commits (fewer than a batch per interval) still go within about an interval, in a partial batch.
      for (let i = 0; i < 30 && (await pending()) >= batch; i++) {
        await commit(1);
        await step(100);
      }
      const slow: number[] = [];
      for (let i = 0; i < 25; i++) {
        const before = await pending();
        await commit(1);
        await step(100);
        if (before + 1 - (await pending()) > 0) slow.push(now);
      }
      expect(slow.length).toBeGreaterThanOrEqual(1);
      for (let i = 1; i < slow.length; i++) expect(slow[i]! - slow[i - 1]!).toBeGreaterThanOrEqual(interval);

      // A burst past HOT_BACKLOG_BATCHES full batches is pushed without waiting for the next round.
      await commit(HOT_BACKLOG_BATCHES * batch);
      const burst = await pending();
      await step(1);
      expect(await pending()).toBe(burst - batch);

      // The gateway goes idle: one step drains everything, batch after batch, without waiting.
      await step(1);
      expect(await pending()).toBe(0);
      await r.stop();
      await expectCenterEqualsLocal(f, db);
      expect((await verifyAtCenter(sqld.url, f.store.gatewayId)).problems).toEqual([]);
      await f.close();
    },
    SLOW,
  );
});

describe("fleet verify --central while a gateway pushes", () => {
  test(
    "an episode that reached the center in part is verified again once the next push lands; " +
      "what no push is coming for is reported at once",
    async () => {
      const sqld = await Sqld.start();
      servers.push(sqld);
      const f = await synthetic();
      // Batches of one queue entry: an episode's rows (its checkpoint, its agent's head, itself) span pushes.
      const r = replicator(f, spec(sqld.url, { batch_rows: 1 }), Date.now);
      await enableReplication(f.store, sqld.url);
      await f.commit(4, Date.now() - 60_000, 1000);
      await r.drain();
      const center = await CentralReader.open(sqld.url);
      try {
        const gw = f.store.gatewayId;
        const verify = (settle?: () => Promise<boolean>) => verifyChains(center.chains(gw), undefined, { settle });
        expect((await verify()).problems).toEqual([]);

        // Two more episodes per agent, pushed one at a time until the center is torn: an episode brings its
        // agent's row as it is now, so the head names a checkpoint whose episode is still to come.
        await f.commit(8, Date.now(), 1);
        await f.store.writer.drain();
        let torn: Awaited<ReturnType<typeof verify>> | null = null;
        while ((await r.pushOnce()) > 0) {
          const seen = await verify();
          if (seen.problems.length > 0) {
            torn = seen;
            break;
          }
        }
        expect(torn?.problems.length).toBeGreaterThan(0);
        expect((await center.pushState(gw))!.backlogRows).toBeGreaterThan(0);

        // Nothing pushes: after the wait, what the center holds is reported.
        expect((await verify(center.settling(gw, 300, 50))).problems).toEqual(torn!.problems);
        // The gateway pushes the rest while verify waits: nothing is reported.
        const settle = center.settling(gw, 10_000, 50);
        const pushing = Bun.sleep(200).then(() => r.drain());
        const settled = await verify(settle);
        await pushing;
        expect(settled.problems).toEqual([]);
        expect(await verify()).toMatchObject({ checkpoints: 4 + 8, problems: [] });

        // A center nothing is pushing to, and nothing left to come: a broken record is named without a wait.
        await sqld.client().execute({
          sql: "UPDATE agents SET head_seq = head_seq - 1 WHERE gateway = ? AND id = 't/a'",
          args: [gw],
        });
        const began = performance.now();
        const broken = await verify(center.settling(gw, 10_000, 50));
        expect(performance.now() - began).toBeLessThan(5_000);
        expect(broken.problems.map((p) => p.agent)).toContain("t/a");
      } finally {
        center.close();
        await f.close();
      }
    },
    SLOW,
  );
});
