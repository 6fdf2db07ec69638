/**
 * The store against real libSQL files: the drizzle schema and the hand-written DDL agree,
 * intake is idempotent per (agent, sid) across restarts, the group committer folds writes
 * without letting one bad job sink the rest, an episode commits exactly once and whole,
 * and a failure leaves the checkpoint chain alone.
 */
import { afterAll, afterEach, beforeEach, describe, expect, test } from "bun:test";
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@libsql/client";
import { eq, getTableColumns, is } from "drizzle-orm";
import { getTableConfig, SQLiteTable } from "drizzle-orm/sqlite-core";
import { checkpointHashIs, GroupCommitter, openDb, specOfSql, STATUS_COMMITTED } from "../gateway/store/index.ts";
import { QUEUED_TIMERS_AMONG, WAL_SIZE_LIMIT } from "../gateway/store/index.ts";
import { hashEvents, Store, tables, WalFile, type EpisodeCommit, type EpisodeFailure } from "../gateway/store/index.ts";
import type { AgentId, NewStimulus, StimulusId } from "../gateway/types.ts";
import { findEpisode } from "../gateway/ops/index.ts";
import { readInAnotherProcess } from "./helpers/gateway.ts";

/** A test agent id (valid by construction). */
const aid = (s: string) => s as AgentId;

const root = mkdtempSync(join(tmpdir(), "fleet-store-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
/** A fresh database file path. */
const freshPath = () => join(root, `t${++n}`, "fleet.db");
const open = (path: string) => Store.open(path, { synchronous: "normal" });

const T0 = 1_700_000_000_000;
const HASH = (c: string) => c.repeat(64);

/** A stimulus for `temp/<key>` with dedup id `sid`. */
function stim(sid: string, key = "boiler-1", payload: unknown = { t: 80 }): NewStimulus {
  return {
    agent: `temp/${key}` as AgentId,
    type: "temp",
    key,
    sid: sid as StimulusId,
    kind: "mqtt",
    topic: `sensors/${key}/temperature`,
    payload: new TextEncoder().encode(JSON.stringify(payload)),
    receivedAt: T0,
  };
}

/** Record one new stimulus and return its queue seq. */
async function intakeOne(store: Store, s: NewStimulus): Promise<number> {
  const [outcome] = await store.intake([s]);
  if (!outcome || outcome.seq === null) throw new Error(`stimulus ${s.sid} was not recorded`);
  return outcome.seq;
}

/** The cause chain of an error as one string (drizzle wraps libSQL errors). */
function describeError(err: unknown): string {
  const parts: string[] = [];
  for (let e: unknown = err, i = 0; e && i < 5; e = (e as { cause?: unknown }).cause, i++)
    parts.push(String((e as Error).message ?? e));
  return parts.join(" <- ");
}

/** What `fn` rejected with (fails the test if it resolved). */
async function rejection(fn: () => Promise<unknown>): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  throw new Error("expected a rejection");
}

// ---- schema.ts and migrate.ts agree ---------------------------------------------------

/** One full row per table: every column set, and set away from its default. */
const FULL_ROWS: [SQLiteTable, Record<string, unknown>][] = [
  [tables.meta, { key: "k", value: "v" }],
  [tables.replPending, { seq: 12, tbl: "episode", key: "0190-ep", ver: 3, at: T0 }],
  [
    tables.rejectedMessages,
    {
      seq: 1,
      gateway: "gw",
      kind: "mqtt",
      topic: "dev/bad key!/c",
      payload: Buffer.from("{}"),
      client: "dev-1",
      reason: "no valid key",
      receivedAt: T0,
    },
  ],
  [
    tables.specVersions,
    {
      hash: HASH("1"),
      gateway: "gw",
      path: "/srv/fleet.toml",
      text: "[fleet]\n",
      summary: "+temp",
      createdAt: T0,
      bundles: `{"temp":"${HASH("5")}"}`,
    },
  ],
  [
    tables.rollouts,
    {
      id: 3,
      gateway: "gw",
      type: "temp",
      fromBundle: HASH("5"),
      toBundle: HASH("6"),
      canary: 0.1,
      minEpisodes: 50,
      maxFailureRate: 0.05,
      bakeMs: 600_000,
      state: "rolled_back",
      reason: "failure rate 0.5 > 0.05",
      startedAt: T0,
      decidedAt: T0 + 1,
    },
  ],
  [tables.rolloutSteps, { seq: 4, rollout: 3, at: T0, step: "rolled_back", detail: '{"failures":5}' }],
  [
    tables.bundles,
    {
      hash: HASH("5"),
      gateway: "gw",
      module: "/srv/agents/temp.ts",
      code: "export default 1;",
      bytes: 17,
      createdAt: T0,
      map: '{"version":3,"sources":["temp.ts"],"mappings":"AAAA"}',
    },
  ],
  [
    tables.agents,
    {
      id: aid("temp/boiler-1"),
      type: "temp",
      key: "boiler-1",
      gateway: "gw",
      status: "paused",
      reason: "budget episodes_per_hour (1) reached",
      pausedUntil: T0 + 3_600_000,
      anchorSeq: 2,
      anchorHash: HASH("9"),
      headSeq: 4,
      headHash: HASH("2"),
      episodes: 9,
      failures: 2,
      lastEpisodeAt: T0 + 5,
      createdAt: T0,
      updatedAt: T0 + 6,
    },
  ],
  [
    tables.stimuli,
    {
      seq: 77,
      agent: aid("temp/boiler-1"),
      sid: "id:m-1",
      kind: "webhook",
      topic: "hooks/x",
      payload: Buffer.from([0, 1, 2, 255]),
      receivedAt: T0,
      state: "quarantined",
      attempts: 3,
      notBefore: T0 + 1000,
      lastError: "threw",
      episode: "ep-1",
      doneAt: T0 + 2000,
      expiresAt: T0 + 60_000,
      traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      hops: 3,
    },
  ],
  [
    tables.episodes,
    {
      id: "ep-1",
      agent: aid("temp/boiler-1"),
      stimulusSeq: 77,
      stimulusId: "id:m-1",
      stimulusKind: "mqtt",
      specVersion: HASH("1"),
      status: "failed",
      errorKind: "timeout",
      error: "episode exceeded 500 ms",
      attempt: 2,
      startedAt: T0,
      endedAt: T0 + 500,
      checkpoint: HASH("3"),
      parent: HASH("2"),
      eventsHash: HASH("4"),
      eventCount: 3,
      bundle: HASH("5"),
    },
  ],
  [
    tables.checkpoints,
    {
      hash: HASH("3"),
      agent: aid("temp/boiler-1"),
      seq: 5,
      parent: HASH("2"),
      episode: "ep-1",
      specVersion: HASH("1"),
      state: '{"n":1}',
      createdAt: T0,
      stateVersion: 2,
      migratedFrom: 1,
    },
  ],
  [tables.agentCounts, { type: "temp", status: "paused", timed: 1, n: 3 }],
  [tables.bundleUses, { bundle: "b".repeat(64), episodes: 2 }],
  [
    tables.usageTotals,
    {
      window: "h:472200",
      type: "temp",
      agents: 2,
      episodes: 9,
      toolCalls: 4,
      tokens: 900,
      cost: 1.25,
      maxEpisodes: 5,
      maxTokens: 600,
      maxCost: 1,
      bytes: 70_000,
      maxBytes: 50_000,
    },
  ],
  [
    tables.outbox,
    { id: 12, episode: "ep-1", seq: 0, topic: "alerts/x", payload: '{"t":90}', qos: 0, retain: true, createdAt: T0 },
  ],
  [
    tables.budgetUsage,
    {
      agent: aid("temp/boiler-1"),
      window: "d:19675",
      episodes: 3,
      toolCalls: 7,
      tokens: 1234,
      cost: 1.5,
      bytes: 65_536,
    },
  ],
  [
    tables.audit,
    {
      seq: 4,
      gateway: "gw-1",
      at: T0,
      actor: "ops-alice",
      action: "agent.pause",
      target: "temp/boiler-1",
      status: 200,
      detail: null,
    },
  ],
  [
    tables.wakeups,
    {
      id: "ep-1.w1",
      gateway: "gw-1",
      agent: aid("temp/boiler-1"),
      dueAt: T0 + 5000,
      payload: '{"door":"d1"}',
      setBy: "ep-1",
      createdAt: T0,
      state: "cancelled",
      doneAt: T0 + 100,
      doneBy: "ep-2",
    },
  ],
];

/** Columns only raw SQL names, kept out of the drizzle tables on purpose (see schema.ts): the event
 * log, and retention's tombstone frontier. */
const RAW_COLUMNS = ["episodes.log", "agents.tombstoned_seq"];

/** How a drizzle default appears in `PRAGMA table_info(...).dflt_value`. */
function sqlDefault(value: unknown): string | null {
  if (value === undefined) return null;
  if (typeof value === "string") return `'${value.replaceAll("'", "''")}'`;
  if (typeof value === "boolean") return value ? "1" : "0";
  return String(value);
}

describe("schema.ts and migrate.ts agree", () => {
  let store: Store;
  beforeEach(async () => (store = await open(freshPath())));
  afterEach(() => store.close());

  test("the DDL creates exactly the tables the drizzle schema declares", async () => {
    const rows = await store.client.execute(
      "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE " +
        "'sqlite_%' AND name NOT LIKE 'libsql_%' AND name NOT LIKE '_litestream%'",
    );
    const inDb = rows.rows.map((r) => String(r.name)).sort();
    const inSchema = FULL_ROWS.map(([table]) => getTableConfig(table).name).sort();
    expect(inDb).toEqual(inSchema);
    // Every table of schema.ts has a full row below.
    expect(Object.values(tables).filter((v) => is(v, SQLiteTable)).length).toBe(FULL_ROWS.length);
  });

  test.each(FULL_ROWS.map(([table, row]) => [getTableConfig(table).name, table, row] as const))(
    "%s: a full row round-trips through drizzle",
    async (_name, table, row) => {
      // The row names every column of the drizzle table, so nothing is left to a default.
      expect(Object.keys(row).sort()).toEqual(Object.keys(getTableColumns(table)).sort());
      await store.db.delete(table); // meta already holds the gateway id and schema version
      await store.db.insert(table).values(row as never);
      const back = await store.db.select().from(table).all();
      expect(back).toEqual([row]);
    },
  );

  test.each(FULL_ROWS.map(([table]) => [getTableConfig(table).name, table] as const))(
    "%s: column names, types, NOT NULL, defaults and primary key match the DDL",
    async (name, table) => {
      const cfg = getTableConfig(table);
      const info = (await store.client.execute(`PRAGMA table_info(${name})`)).rows;
      const pkCols = new Set([
        ...cfg.columns.filter((c) => c.primary).map((c) => c.name),
        ...cfg.primaryKeys.flatMap((pk) => pk.columns.map((c) => c.name)),
      ]);
      const fromDrizzle = cfg.columns
        .map((c) => ({
          name: c.name,
          type: c.getSQLType().toLowerCase(),
          notnull: c.notNull && !pkCols.has(c.name),
          dflt: sqlDefault(c.default),
          pk: pkCols.has(c.name),
        }))
        .sort((a, b) => a.name.localeCompare(b.name));
      const fromDdl = info
        .filter((r) => !RAW_COLUMNS.includes(`${name}.${String(r.name)}`))
        .map((r) => ({
          name: String(r.name),
          type: String(r.type).toLowerCase(),
          // SQLite reports NOT NULL = 0 for INTEGER PRIMARY KEY even though it can never be null.
          notnull: Number(r.notnull) === 1 && Number(r.pk) === 0,
          dflt: r.dflt_value === null ? null : String(r.dflt_value),
          pk: Number(r.pk) > 0,
        }))
        .sort((a, b) => a.name.localeCompare(b.name));
      expect(fromDdl).toEqual(fromDrizzle);
    },
  );

  test.each(FULL_ROWS.map(([table]) => [getTableConfig(table).name, table] as const))(
    "%s: indexes match the DDL",
    async (name, table) => {
      const cfg = getTableConfig(table);
      const fromDrizzle = cfg.indexes
        .map((i) => ({
          name: i.config.name,
          unique: i.config.unique === true,
          partial: i.config.where !== undefined,
          // An expression (checkpoints_hash) has no column name on either side.
          columns: i.config.columns.map((c) => (c as { name?: string }).name ?? null),
        }))
        .sort((a, b) => a.name.localeCompare(b.name));
      const list = (await store.client.execute(`PRAGMA index_list(${name})`)).rows.filter((r) => r.origin === "c");
      const fromDdl = [];
      for (const r of list) {
        const cols = (await store.client.execute(`PRAGMA index_info(${String(r.name)})`)).rows.map((c) =>
          c.name === null ? null : String(c.name),
        );
        fromDdl.push({
          name: String(r.name),
          unique: Number(r.unique) === 1,
          partial: Number(r.partial) === 1,
          columns: cols,
        });
      }
      fromDdl.sort((a, b) => a.name.localeCompare(b.name));
      expect(fromDdl).toEqual(fromDrizzle);
    },
  );

  test("the partial exactly-once index covers committed episodes only", async () => {
    const rs = await store.client.execute("SELECT sql FROM sqlite_master WHERE name = 'episodes_once'");
    expect(String(rs.rows[0]?.sql)).toEndWith(`WHERE status = ${STATUS_COMMITTED}`);
  });

  test("migrating an existing file again is harmless and keeps the gateway id", async () => {
    const id = store.gatewayId;
    const path = store.path;
    await store.close();
    store = await open(path);
    expect(store.gatewayId).toBe(id);
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
  });
});

// ---- intake --------------------------------------------------------------------------

describe("intake", () => {
  test("records a stimulus once per (agent, sid); a duplicate returns seq null", async () => {
    const store = await open(freshPath());
    try {
      const [first] = await store.intake([stim("id:1")]);
      expect(first).toEqual({
        agent: aid("temp/boiler-1") as AgentId,
        sid: "id:1",
        seq: expect.any(Number),
        receivedAt: expect.any(Number),
      });
      const [again] = await store.intake([stim("id:1", "boiler-1", { t: 99 })]);
      expect(again!.seq).toBeNull();
      // The same sid for another agent is a different stimulus.
      const [other] = await store.intake([stim("id:1", "boiler-2")]);
      expect(other!.seq).not.toBeNull();
      const row = await store.findStimulus(aid("temp/boiler-1"), "id:1");
      expect(JSON.parse(Buffer.from(row!.payload!).toString())).toEqual({ t: 80 }); // the first one wins
      expect(row!.state).toBe("queued");
      expect((await store.getAgent(aid("temp/boiler-1")))?.status).toBe("active");
    } finally {
      await store.close();
    }
  });

  test("a duplicate inside one intake call is recorded once", async () => {
    const store = await open(freshPath());
    try {
      const out = await store.intake([stim("id:1"), stim("id:1"), stim("id:2")]);
      expect(out.map((o) => o.seq === null)).toEqual([false, true, false]);
    } finally {
      await store.close();
    }
  });

  test("a large intake gets seqs in its order across multi-row inserts; duplicates anywhere are null", async () => {
    const store = await open(freshPath());
    try {
      const [old] = await store.intake([stim("id:old", "boiler-2")]);
      // 90 rows go in as runs of 64, 16, 4, 4, 1 and 1: the duplicates sit in different runs, one
      // last in its run, and one run is nothing but duplicates.
      const batch = Array.from({ length: 90 }, (_, i) => stim(`id:${i}`, `boiler-${i % 3}`));
      batch[63] = stim("id:0", "boiler-0"); // the first item again, last of the first run
      batch[70] = stim("id:5", "boiler-2"); // id:5 of boiler-2, earlier in this very call
      for (let i = 84; i < 88; i++) batch[i] = batch[i - 74]!; // a run of four repeats
      batch[88] = stim("id:old", "boiler-2"); // recorded before
      batch[89] = stim("id:old", "boiler-1"); // another agent's: not a duplicate
      const out = await store.intake(batch);
      expect(out.map((o, i) => (o.seq === null ? i : -1)).filter((i) => i >= 0)).toEqual([63, 70, 84, 85, 86, 87, 88]);
      const seqs = out.filter((o) => o.seq !== null).map((o) => o.seq!);
      expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
      expect(seqs[0]).toBeGreaterThan(old!.seq!);
      expect(out.map((o) => [o.agent, o.sid])).toEqual(batch.map((s) => [s.agent, s.sid]));
      // Every seq names the row of its own stimulus.
      const rows = await store.client.execute({
        sql: "SELECT seq, agent, sid FROM stimuli WHERE seq > ?",
        args: [old!.seq],
      });
      const bySeq = new Map(rows.rows.map((r) => [Number(r.seq), `${r.agent} ${r.sid}`]));
      expect(bySeq.size).toBe(83);
      for (const o of out) if (o.seq !== null) expect(bySeq.get(o.seq)).toBe(`${o.agent} ${o.sid}`);
    } finally {
      await store.close();
    }
  });

  test("integers read on the store's path stay numbers after the client's own path ran the same SQL", async () => {
    const store = await open(freshPath());
    try {
      await store.setMeta("k", "v");
      const sql = "SELECT count(*) AS n FROM meta WHERE key = 'k'";
      // The client's transactions prepare with safeIntegers(true) (integers as BigInt).
      const tx = await store.client.transaction("read");
      expect((await tx.execute(sql)).rows[0]!.n).toBe(1);
      tx.close();
      expect((await store.client.execute(sql)).rows[0]!.n).toBe(1);
    } finally {
      await store.close();
    }
  });

  test("a duplicate stimulus after a restart is not recorded again", async () => {
    const path = freshPath();
    const before = await open(path);
    const [first] = await before.intake([stim("id:restart")]);
    await before.close();
    const after = await open(path);
    try {
      const [again] = await after.intake([stim("id:restart")]);
      expect(first!.seq).not.toBeNull();
      expect(again!.seq).toBeNull();
      expect((await after.queuedSummary()).find((q) => q.agent === aid("temp/boiler-1"))?.n).toBe(1);
    } finally {
      await after.close();
    }
  });

  test("the queue is FIFO by seq per agent", async () => {
    const store = await open(freshPath());
    try {
      await store.intake([stim("id:a"), stim("id:b"), stim("id:c", "boiler-2")]);
      expect((await store.headOfQueue(aid("temp/boiler-1")))?.sid).toBe("id:a");
      expect((await store.headOfQueue(aid("temp/boiler-2")))?.sid).toBe("id:c");
      expect(await store.headOfQueue(aid("temp/nobody"))).toBeUndefined();
    } finally {
      await store.close();
    }
  });

  test("a finished stimulus stays dedup memory and leaves the queue; the head moves on", async () => {
    const store = await open(freshPath());
    try {
      const [a] = await store.intake([stim("id:a"), stim("id:b")]);
      await store.commitEpisode(episodeCommit("ep-1", a!.seq!, "id:a", 1, HASH("a"), null));
      expect((await store.headOfQueue(aid("temp/boiler-1")))?.sid).toBe("id:b");
      expect((await store.intake([stim("id:a")]))[0]!.seq).toBeNull();
    } finally {
      await store.close();
    }
  });

  test("a turn reads its head by the seq it is given, and only while it is queued for that agent", async () => {
    const store = await open(freshPath());
    try {
      const [a, b] = await store.intake([stim("id:a"), stim("id:b")]);
      const [c] = await store.intake([stim("id:c", "boiler-2")]);
      const boiler = aid("temp/boiler-1");
      expect((await store.turnInputs(boiler, [], a!.seq)).head?.sid).toBe("id:a");
      expect((await store.turnInputs(boiler, [], null)).head).toBeUndefined();
      // Another agent's stimulus is not this agent's head.
      expect((await store.turnInputs(boiler, [], c!.seq)).head).toBeUndefined();
      await store.commitEpisode(episodeCommit("ep-1", a!.seq!, "id:a", 1, HASH("a"), null));
      // Done: a stale seq reads nothing; left out, the head is looked for.
      expect((await store.turnInputs(boiler, [], a!.seq)).head).toBeUndefined();
      expect((await store.turnInputs(boiler, [])).head?.sid).toBe("id:b");
      expect(await store.queuedOf(boiler)).toEqual([{ seq: b!.seq!, receivedAt: b!.receivedAt }]);
      // (The episode's commit also queued a send for other/x.)
      expect((await store.queuedSeqs()).filter((q) => q.agent.startsWith("temp/"))).toEqual([
        { agent: boiler, seq: b!.seq!, receivedAt: b!.receivedAt },
        { agent: aid("temp/boiler-2"), seq: c!.seq!, receivedAt: c!.receivedAt },
      ]);
      // By rowid, not by an index of the agent's queue.
      const plan = await store.client.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM stimuli WHERE seq = 2 AND state = 'queued' AND agent = 'temp/boiler-1'",
      );
      expect(plan.rows.map((r) => String(r.detail)).join("\n")).toContain("INTEGER PRIMARY KEY");
    } finally {
      await store.close();
    }
  });

  test("superseded timer fires are found by rowid, not by walking every queued stimulus", async () => {
    const store = await open(freshPath());
    try {
      const plan = await store.client.execute({
        sql: `EXPLAIN QUERY PLAN ${QUEUED_TIMERS_AMONG}`,
        args: ["[1, 2]", "temp/boiler-1"],
      });
      const detail = plan.rows.map((r) => String(r.detail)).join("\n");
      expect(detail).toContain("SEARCH s USING INTEGER PRIMARY KEY");
      expect(detail).not.toContain("stimuli_state");
    } finally {
      await store.close();
    }
  });

  test("no index of stimuli starts with the agent: intake would write a scattered leaf per agent", async () => {
    const store = await open(freshPath());
    try {
      const indexes = (await store.client.execute("PRAGMA index_list(stimuli)")).rows.map((r) => String(r.name));
      expect(indexes).toContain("stimuli_dedup");
      for (const name of indexes) {
        const first = (await store.client.execute(`PRAGMA index_info(${name})`)).rows[0];
        expect(String(first?.name)).not.toBe("agent");
      }
    } finally {
      await store.close();
    }
  });
});

// ---- group committer -----------------------------------------------------------------

describe("group committer", () => {
  test("folds 200 concurrent intakes into fewer commits, each durably recorded", async () => {
    const store = await open(freshPath());
    try {
      const before = { ...store.writer.stats };
      const pending = Array.from({ length: 200 }, (_, i) => store.intake([stim(`id:${i}`, `k${i % 10}`)]));
      const outcomes = (await Promise.all(pending)).flat();
      const commits = store.writer.stats.commits - before.commits;
      expect(commits).toBeGreaterThanOrEqual(1);
      expect(commits).toBeLessThan(200);
      // Intakes of one event-loop turn share one job.
      expect(store.writer.stats.jobs - before.jobs).toBeLessThan(200);
      const seqs = outcomes.map((o) => o.seq);
      expect(seqs.every((s) => typeof s === "number")).toBe(true);
      expect(new Set(seqs).size).toBe(200);
      const total = (await store.queuedSummary()).reduce((a, q) => a + q.n, 0);
      expect(total).toBe(200);
    } finally {
      await store.close();
    }
  });

  test("the same stimulus twice in one batched insert is recorded once; the second sees a duplicate", async () => {
    const store = await open(freshPath());
    try {
      const [a, b] = await Promise.all([store.intake([stim("id:twin")]), store.intake([stim("id:twin")])]);
      expect(a[0]!.seq).not.toBeNull();
      expect(b[0]!.seq).toBeNull();
      expect((await store.queuedSummary()).reduce((n, q) => n + q.n, 0)).toBe(1);
    } finally {
      await store.close();
    }
  });

  test("a failing job does not sink the other jobs of its batch", async () => {
    const store = await open(freshPath());
    try {
      await store.db.insert(tables.meta).values({ key: "taken", value: "1" });
      const before = { ...store.writer.stats };
      const good1 = store.writer.write([store.db.insert(tables.meta).values({ key: "g1", value: "1" })]);
      // Primary-key violation, queued in the same turn as the good jobs.
      const bad = store.writer.write([store.db.insert(tables.meta).values({ key: "taken", value: "2" })]);
      const good2 = store.writer.write([store.db.insert(tables.meta).values({ key: "g2", value: "2" })]);
      const good3 = store.writer.write([store.db.insert(tables.meta).values({ key: "fresh", value: "3" })]);
      const badErr = await rejection(() => bad);
      expect(describeError(badErr)).toMatch(/UNIQUE constraint failed: meta\.key/);
      expect((await good1)[0]!.rowsAffected).toBe(1);
      expect((await good2)[0]!.rowsAffected).toBe(1);
      await good3;
      // They really were one batch.
      expect(store.writer.stats.commits - before.commits).toBe(1);
      expect(store.writer.stats.jobs - before.jobs).toBe(4);
      expect((await store.db.select().from(tables.meta).where(eq(tables.meta.key, "taken")).get())?.value).toBe("1");
      expect((await store.db.select().from(tables.meta).where(eq(tables.meta.key, "fresh")).get())?.value).toBe("3");
      expect(await store.getMeta("g1")).toBe("1");
      expect(await store.getMeta("g2")).toBe("2");
    } finally {
      await store.close();
    }
  });

  test("a job's statements commit together or not at all", async () => {
    const store = await open(freshPath());
    try {
      await store.db.insert(tables.meta).values({ key: "taken", value: "1" });
      const err = await rejection(() =>
        store.writer.write([
          store.db.insert(tables.meta).values({ key: "first", value: "x" }),
          store.db.insert(tables.meta).values({ key: "taken", value: "y" }),
        ]),
      );
      expect(describeError(err)).toMatch(/UNIQUE/);
      expect(await store.db.select().from(tables.meta).where(eq(tables.meta.key, "first")).get()).toBeUndefined();
    } finally {
      await store.close();
    }
  });

  test("jobs that may gather share one transaction, committed when the first one's wait ends", async () => {
    const store = await open(freshPath());
    try {
      const before = { ...store.writer.stats };
      const put = (key: string, gatherMs: number) =>
        store.writer.write([store.db.insert(tables.meta).values({ key, value: "1" })], undefined, gatherMs);
      const settled: string[] = [];
      const started = performance.now();
      // A wait long beside the test's own 40 ms of sleeps, which a loaded box stretches (100 ms was not: both
      // jobs had committed before the checks below when three test files ran on two cores).
      const a = put("a", 1000).then(() => settled.push("a"));
      await new Promise((r) => setTimeout(r, 20));
      // Queued while the first one waits: its own (longer) wait does not extend the first one's.
      const b = put("b", 10_000).then(() => settled.push("b"));
      await new Promise((r) => setTimeout(r, 20));
      expect(settled).toEqual([]);
      expect(await store.getMeta("a")).toBeNull();
      await Promise.all([a, b]);
      const took = performance.now() - started;
      expect(took).toBeGreaterThanOrEqual(995);
      expect(took).toBeLessThan(5000); // not b's 10 s
      expect(settled.sort()).toEqual(["a", "b"]);
      expect(store.writer.stats.commits - before.commits).toBe(1);
      expect(store.writer.stats.jobs - before.jobs).toBe(2);
      expect(await store.getMeta("b")).toBe("1");
    } finally {
      await store.close();
    }
  });

  test("a job that does not wait commits at once and takes the waiting jobs into its transaction", async () => {
    const store = await open(freshPath());
    try {
      const before = { ...store.writer.stats };
      const waiting = store.writer.write(
        [store.db.insert(tables.meta).values({ key: "w", value: "1" })],
        undefined,
        60_000,
      );
      await new Promise((r) => setTimeout(r, 10));
      const started = performance.now();
      await Promise.all([
        waiting,
        store.writer.write([store.db.insert(tables.meta).values({ key: "now", value: "1" })]),
      ]);
      // Nowhere near the minute the first job could have waited.
      expect(performance.now() - started).toBeLessThan(30_000);
      expect(store.writer.stats.commits - before.commits).toBe(1);
      expect(store.writer.stats.jobs - before.jobs).toBe(2);
      expect(await store.getMeta("w")).toBe("1");
    } finally {
      await store.close();
    }
  });

  test("closing the store commits a job that may still wait, without waiting", async () => {
    const path = freshPath();
    const store = await open(path);
    const waiting = store.writer.write(
      [store.db.insert(tables.meta).values({ key: "late", value: "1" })],
      undefined,
      60_000,
    );
    const started = performance.now();
    await store.close();
    await waiting;
    expect(performance.now() - started).toBeLessThan(30_000);
    const again = await open(path);
    try {
      expect(await again.getMeta("late")).toBe("1");
    } finally {
      await again.close();
    }
  });

  test("a flood in one turn does not hold back another agent: past the flush limit it waits", async () => {
    const store = await open(freshPath());
    try {
      const limit = Store.INTAKE_ROWS_PER_FLUSH;
      const before = store.writer.stats.commits;
      const flood = Array.from({ length: limit + 500 }, (_, i) => store.intake([stim(`id:f${i}`, "flood")]));
      const quiet = store.intake([stim("id:q", "quiet")]);
      const floodSeqs = (await Promise.all(flood)).map((o) => o[0]!.seq!);
      const [q] = await quiet;
      // The quiet agent's stimulus went in with the first `limit` of the flood, ahead of the rest.
      expect(q!.seq!).toBeLessThan(floodSeqs[limit]!);
      expect(q!.seq!).toBeGreaterThan(floodSeqs[limit - 1]!);
      // The flood's own order is kept, and nothing was lost or doubled.
      expect(floodSeqs).toEqual([...floodSeqs].sort((a, b) => a - b));
      expect(new Set(floodSeqs).size).toBe(limit + 500);
      expect(store.writer.stats.commits - before).toBeGreaterThanOrEqual(2);
    } finally {
      await store.close();
    }
  });

  test("close() records stimuli still waiting for a later flush", async () => {
    const path = freshPath();
    const store = await open(path);
    const pending = Array.from({ length: Store.INTAKE_ROWS_PER_FLUSH + 10 }, (_, i) =>
      store.intake([stim(`id:c${i}`, "late")]),
    );
    await store.close();
    expect((await Promise.all(pending)).every(([o]) => o!.seq !== null)).toBe(true);
    const again = await open(path);
    try {
      expect(await again.findStimulus(aid("temp/late"), `id:c${Store.INTAKE_ROWS_PER_FLUSH + 9}`)).toBeDefined();
    } finally {
      await again.close();
    }
  });

  test("a job's results read like libSQL's: rows by column name and index, blobs as bytes, rows affected", async () => {
    const store = await open(freshPath());
    try {
      const [insert, returning, update] = await store.writer.write([
        { sql: "INSERT INTO meta (key, value) VALUES (?, ?), (?, ?)", args: ["a", "1", "b", "2"] },
        { sql: "SELECT ? AS n, ? AS bytes, ? AS yes", args: [7, new Uint8Array([1, 2, 3]), true] },
        { sql: "UPDATE meta SET value = 'x' WHERE key IN ('a', 'b', 'none')", args: [] },
      ]);
      expect(insert!.rowsAffected).toBe(2);
      expect(returning!.columns).toEqual(["n", "bytes", "yes"]);
      const row = returning!.rows[0]!;
      expect([row.n, row[0], row.yes, row.length]).toEqual([7, 7, 1, 3]);
      expect(new Uint8Array(row.bytes as ArrayBuffer)).toEqual(new Uint8Array([1, 2, 3]));
      expect(update!.rowsAffected).toBe(2);
      expect(await store.getMeta("b")).toBe("x");
    } finally {
      await store.close();
    }
  });

  test("a statement with `when` runs only if the result before it says so; skipped, its result is empty", async () => {
    const store = await open(freshPath());
    try {
      const inserted = (previous: { rowsAffected: number }) => previous.rowsAffected > 0;
      const results = await store.writer.write([
        { sql: "INSERT INTO meta (key, value) VALUES ('a', '1') ON CONFLICT DO NOTHING", args: [] },
        { sql: "INSERT INTO meta (key, value) VALUES ('ran', '1')", args: [], when: inserted },
        { sql: "INSERT INTO meta (key, value) VALUES ('a', '2') ON CONFLICT DO NOTHING", args: [] },
        { sql: "INSERT INTO meta (key, value) VALUES ('skipped', '1')", args: [], when: inserted },
        { sql: "SELECT count(*) AS n FROM meta WHERE key IN ('a', 'ran', 'skipped')", args: [] },
      ]);
      expect(results.map((r) => r.rowsAffected)).toEqual([1, 1, 0, 0, 0]);
      expect(results[3]!.rows).toEqual([]);
      expect(results[4]!.rows[0]!.n).toBe(2);
      expect(await store.getMeta("ran")).toBe("1");
      expect(await store.getMeta("skipped")).toBeNull();
    } finally {
      await store.close();
    }
  });

  test("reads through the store's client take named arguments and give drizzle rows it can map", async () => {
    const store = await open(freshPath());
    try {
      const rs = await store.client.execute({
        sql: "SELECT :a AS a, @b AS b, $c AS c",
        args: { a: 1, "@b": "two", c: null },
      });
      expect(Object.keys(rs.rows[0]!)).toEqual(["a", "b", "c"]);
      expect(Array.prototype.slice.call(rs.rows[0])).toEqual([1, "two", null]);
      await store.setMeta("k", "v");
      expect(await store.db.select().from(tables.meta).where(eq(tables.meta.key, "k")).all()).toEqual([
        { key: "k", value: "v" },
      ]);
    } finally {
      await store.close();
    }
  });

  test("a statement libSQL cannot bind fails its job with a clear error and commits nothing of it", async () => {
    const store = await open(freshPath());
    try {
      const err = await rejection(() =>
        store.writer.write([
          { sql: "INSERT INTO meta (key, value) VALUES (?, ?)", args: ["half", "1"] },
          { sql: "INSERT INTO meta (key, value) VALUES (?, ?)", args: ["nan", Number.NaN] },
        ]),
      );
      expect(describeError(err)).toMatch(/finite/);
      expect(await store.getMeta("half")).toBeNull();
      // The connection is usable afterwards (the transaction was rolled back, not left open).
      await store.writer.write([{ sql: "INSERT INTO meta (key, value) VALUES ('after', '1')", args: [] }]);
      expect(await store.getMeta("after")).toBe("1");
    } finally {
      await store.close();
    }
  });

  test("close() waits for queued writes", async () => {
    const path = freshPath();
    const store = await open(path);
    const pending = store.intake([stim("id:late")]);
    await store.close();
    expect((await pending)[0]!.seq).not.toBeNull();
    const again = await open(path);
    try {
      expect(await again.findStimulus(aid("temp/boiler-1"), "id:late")).toBeDefined();
    } finally {
      await again.close();
    }
  });
});

// ---- episodes ------------------------------------------------------------------------

const USAGE = { hourWindow: "h:1", dayWindow: "d:1", toolCalls: 2, tokens: 30, cost: 0.5 };

/** A full episode commit for stimulus `seq`, sealing checkpoint `cpSeq` of temp/boiler-1. */
function episodeCommit(
  episode: string,
  seq: number,
  sid: string,
  cpSeq: number,
  cpHash: string,
  parent: string | null,
): EpisodeCommit {
  return {
    episode: {
      id: episode,
      gateway: "gw",
      agent: aid("temp/boiler-1"),
      stimulusSeq: seq,
      stimulusId: sid,
      specVersion: HASH("5"),
      status: "committed",
      attempt: 1,
      startedAt: T0 + cpSeq * 10,
      endedAt: T0 + cpSeq * 10 + 5,
      checkpoint: cpHash,
      parent,
      eventsHash: HASH("6"),
      eventCount: 2,
    },
    events: [
      { episode, seq: 0, kind: "stimulus", data: "{}" },
      { episode, seq: 1, kind: "end", data: '{"ok":true}' },
    ],
    checkpoint: {
      hash: cpHash,
      gateway: "gw",
      agent: aid("temp/boiler-1"),
      seq: cpSeq,
      parent,
      episode,
      specVersion: HASH("5"),
      state: `{"n":${cpSeq}}`,
      createdAt: T0,
    },
    outbox: [
      { episode, seq: 0, topic: "fleet/agents/temp/boiler-1/out", payload: "{}", qos: 1, retain: false, createdAt: T0 },
    ],
    inbox: [
      {
        agent: aid("other/x") as AgentId,
        type: "other",
        key: "x",
        sid: `inbox:${episode}:0` as StimulusId,
        kind: "inbox",
        topic: "fleet/agents/other/x/inbox",
        payload: new TextEncoder().encode('{"hi":1}'),
        receivedAt: T0,
      },
    ],
    usage: USAGE,
  };
}

/** Row counts that an episode commit touches, for "nothing partial" checks. */
async function footprint(store: Store, episode: string) {
  return {
    episodes: (await store.db.select().from(tables.episodes).where(eq(tables.episodes.id, episode)).all()).length,
    events: (await store.listEvents(episode)).length,
    checkpoints: (await store.db.select().from(tables.checkpoints).where(eq(tables.checkpoints.episode, episode)).all())
      .length,
    outbox: (await store.db.select().from(tables.outbox).where(eq(tables.outbox.episode, episode)).all()).length,
    inbox: (await store.findStimulus(aid("other/x"), `inbox:${episode}:0`)) ? 1 : 0,
  };
}

describe("commitEpisode", () => {
  test("the outbox drain reads each row with its episode's agent (an episode id stored as 16 bytes)", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      const episode = "01a240b5-0260-70d5-9744-cb21174350c9"; // a UUIDv7, stored as its bytes (migration 26)
      await store.commitEpisode(episodeCommit(episode, seq, "id:1", 1, HASH("a"), null));
      const rows = await store.pendingOutbox();
      expect(rows.map((r) => [r.episode, r.agent])).toEqual([[episode, aid("temp/boiler-1")]]);
    } finally {
      await store.close();
    }
  });

  test("a send another shard forwarded counts the hops it carried; a forward from here carries one more", async () => {
    const store = await open(freshPath());
    try {
      // Sent by an episode of the other shard (not in this store), 3 sends from where its rally began.
      const there = "01a240b5-0260-70d5-9744-cb21174350c9";
      const forwarded = { ...stim(`inbox:${there}:0`), kind: "inbox" as const, hops: 3 };
      const seq = await intakeOne(store, forwarded);
      expect(await store.sendHops(forwarded.sid, 20)).toBe(3);
      // The same forward again (outputs go at least once) keeps the count it came with.
      await store.intake([{ ...forwarded, hops: 9 }]);
      expect(await store.sendHops(forwarded.sid, 20)).toBe(3);
      // One that carried no count (MQTT 3.1.1, an older release) is one send, as before.
      const bare = stim(`inbox:${there}:1`);
      await intakeOne(store, bare);
      expect(await store.sendHops(bare.sid, 20)).toBe(1);
      // An episode here that ran the forwarded message: its sends are 4 hops out, here or forwarded on.
      const here = "01a240b5-0261-70d5-9744-cb21174350c9";
      await store.commitEpisode(episodeCommit(here, seq, forwarded.sid, 1, HASH("a"), null));
      expect(await store.sendHops(`inbox:${here}:0`, 20)).toBe(4);
      expect(await store.forwardHops(here, 20)).toBe(4);
      expect(await store.forwardHops("01a240b5-0262-70d5-9744-cb21174350c9", 20)).toBeNull();
    } finally {
      await store.close();
    }
  });

  test("commits the whole episode: log, checkpoint, outbox, inbox, usage, dedup mark, agent head", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      await store.commitEpisode(episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null));
      expect(await footprint(store, "ep-1")).toEqual({ episodes: 1, events: 2, checkpoints: 1, outbox: 1, inbox: 1 });
      const agent = await store.getAgent(aid("temp/boiler-1"));
      expect(agent).toMatchObject({ headSeq: 1, headHash: HASH("a"), episodes: 1 });
      expect(await store.getStimulus(seq)).toMatchObject({ state: "done", episode: "ep-1", attempts: 1 });
      expect(await store.getAgent(aid("other/x"))).toMatchObject({ type: "other", key: "x", status: "active" });
      const usage = await store.usage(aid("temp/boiler-1"), ["h:1", "d:1"]);
      expect(usage.map((u) => [u.window, u.episodes, u.toolCalls, u.tokens, u.cost]).sort()).toEqual([
        ["d:1", 1, 2, 30, 0.5],
        ["h:1", 1, 2, 30, 0.5],
      ]);
    } finally {
      await store.close();
    }
  });

  test("books the bytes it stores: event log JSON, checkpoint state, outputs and sends (bytes_per_day)", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      await store.commitEpisode({
        ...episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null),
        wakes: [
          {
            id: "ep-1.w0",
            gateway: "gw",
            agent: aid("temp/boiler-1"),
            dueAt: T0 + 1,
            payload: `{"w":"é"}`,
            setBy: "ep-1",
            createdAt: T0,
          },
        ],
      });
      // The log as stored, checkpoint {"n":1}, outbox {}, inbox {"hi":1}, wake-up {"w":"é"} (é is 2 bytes).
      const log = `[["stimulus",{}],["end",{"ok":true}]]`;
      const stored = log.length + 7 + 2 + 8 + 10;
      const rows = await store.usage(aid("temp/boiler-1"), ["h:1", "d:1"]);
      expect(rows.map((u) => [u.window, u.bytes]).sort()).toEqual([
        ["d:1", stored],
        ["h:1", stored],
      ]);
      const totals = await store.db.select().from(tables.usageTotals).all();
      expect(totals.map((u) => [u.window, u.bytes, u.maxBytes]).sort()).toEqual([
        ["d:1", stored, stored],
        ["h:1", stored, stored],
      ]);
      // A failed attempt books the log it stored.
      const s2 = await intakeOne(store, stim("id:2"));
      await store.recordFailure(episodeFailure("ep-f1", s2, "id:2", 1, T0 + 5000));
      const failed = `[["stimulus",{}],["failure",{"kind":"threw"}]]`.length;
      expect((await store.usage(aid("temp/boiler-1"), ["d:1"]))[0]!.bytes).toBe(stored + failed);
    } finally {
      await store.close();
    }
  });

  test("an episode's event log reads back as rows with the exact data text it was written with", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      // What JSON.stringify can produce that a re-encoding could alter: escapes, lone surrogates,
      // exponents, -0, integer-like keys first, non-objects.
      const values: unknown[] = [
        { a: 'x"y\\z\n\t\u0001', "1": [1.5, -0, 1e21, 1e-7, 0.1 + 0.2, 5e-324], big: 2 ** 53 + 2 },
        { s: "é€😀\u2028", lone: "\ud800x", nul: "\u0000", html: "<b>'&'</b>" },
        "text",
        42,
        null,
        [],
        {},
      ];
      const events = values.map((v, i) => ({
        episode: "ep-1",
        seq: i,
        kind: i === 0 ? "stimulus" : `k${i}`,
        data: JSON.stringify(v),
      }));
      const c = episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null);
      await store.commitEpisode({ ...c, events, episode: { ...c.episode, eventCount: events.length } });
      expect(await store.listEvents("ep-1")).toEqual(events);
      expect(await hashEvents(await store.listEvents("ep-1"))).toBe(await hashEvents(events));
    } finally {
      await store.close();
    }
  });

  test("an episode's hashes are stored as their 32 bytes and read back as the hex they were", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      await store.commitEpisode(episodeCommit("ep-1", seq, "id:1", 2, HASH("a"), HASH("b")));
      const raw = await store.client.execute(
        "SELECT typeof(checkpoint) AS t, length(checkpoint) AS n, length(parent) AS p, length(events_hash) AS e, " +
          "length(spec_version) AS s FROM episodes WHERE id = 'ep-1'",
      );
      expect({ ...raw.rows[0] }).toMatchObject({ t: "blob", n: 32, p: 32, e: 32, s: 32 });
      const cp = await store.client.execute(
        "SELECT length(parent) AS p, length(spec_version) AS s, length(hash) AS h FROM checkpoints",
      );
      expect({ ...cp.rows[0] }).toMatchObject({ p: 32, s: 32, h: 32 });
      const agent = await store.client.execute("SELECT length(head_hash) AS n FROM agents WHERE id = 'temp/boiler-1'");
      expect(Number(agent.rows[0]!.n)).toBe(32);
      expect(await store.getAgent(aid("temp/boiler-1"))).toMatchObject({ headHash: HASH("a") });
      expect((await store.turnInputs(aid("temp/boiler-1"), [])).checkpoint).toMatchObject({ hash: HASH("a") });
      expect(await store.getEpisode("ep-1")).toMatchObject({
        checkpoint: HASH("a"),
        parent: HASH("b"),
        eventsHash: HASH("6"),
        specVersion: HASH("5"),
      });
      expect((await store.scanEpisodes(aid("temp/boiler-1"), ""))[0]).toMatchObject({ checkpoint: HASH("a") });
      expect(await store.getCheckpoint(HASH("a"))).toMatchObject({ parent: HASH("b"), specVersion: HASH("5") });
      expect(await store.listCheckpoints(aid("temp/boiler-1"))).toMatchObject([{ hash: HASH("a"), parent: HASH("b") }]);
    } finally {
      await store.close();
    }
  });

  test("an episode id is stored as its 16 bytes and read back as its text everywhere", async () => {
    const store = await open(freshPath());
    try {
      const id = "0199aaaa-bbbb-7ccc-8ddd-0123456789ab";
      const seq = await intakeOne(store, stim("id:1"));
      await store.commitEpisode(episodeCommit(id, seq, "id:1", 1, HASH("a"), null));
      const raw = await store.client.execute(
        `SELECT (SELECT length(id) FROM episodes) AS e, (SELECT length(episode) FROM checkpoints) AS c,
          (SELECT length(episode) FROM stimuli WHERE seq = ${seq}) AS s, (SELECT typeof(id) FROM episodes) AS t`,
      );
      expect({ ...raw.rows[0] }).toMatchObject({ e: 16, c: 16, s: 16, t: "blob" });
      expect((await store.getEpisode(id))?.id).toBe(id);
      expect((await store.listEpisodes(aid("temp/boiler-1")))[0]?.id).toBe(id);
      expect((await store.scanEpisodes(aid("temp/boiler-1"), ""))[0]?.id).toBe(id);
      expect((await store.listEvents(id)).map((e) => e.episode)).toEqual([id, id]);
      expect(await store.getCheckpoint(HASH("a"))).toMatchObject({ episode: id });
      expect((await store.getStimulus(seq))?.episode).toBe(id);
      // By a prefix of its text, as `fleet trace` and the API take it; a prefix that is no UUID's finds none.
      for (const prefix of ["0199", "0199aaaa-b", "0199aaaa-bbbb-7ccc-8ddd-0123"]) {
        expect(await findEpisode(store, prefix)).toMatchObject({ id });
      }
      expect(await findEpisode(store, "0199aaab")).toMatchObject({ code: "not_found" });
    } finally {
      await store.close();
    }
  });

  test("a recorded spec version is named by its hash's first 6 bytes and read back whole", async () => {
    const path = freshPath();
    const store = await open(path);
    const spec = (c: string) => `5e${c}${"0".repeat(60)}`;
    const [a, b] = [spec("c0"), spec("c1")];
    // Another spec with the same 6-byte prefix as `a` (recorded after it) is stored whole.
    const twin = `${a.slice(0, 12)}${"f".repeat(52)}`;
    try {
      for (const [i, hash] of [a, twin].entries())
        await store.saveSpecVersion({ hash, path: "fleet.toml", text: "", summary: "", at: T0 + i });
      const runs = [a, twin, b, HASH("5")]; // b and HASH("5") were never recorded
      for (const [i, specVersion] of runs.entries()) {
        const seq = await intakeOne(store, stim(`id:${i}`));
        const c = episodeCommit(
          `ep-${i}`,
          seq,
          `id:${i}`,
          i + 1,
          HASH(String(i)),
          i === 0 ? null : HASH(String(i - 1)),
        );
        await store.commitEpisode({
          ...c,
          episode: { ...c.episode, specVersion },
          checkpoint: { ...c.checkpoint, specVersion },
        });
      }
      const raw = await store.client.execute(
        "SELECT e.id, length(e.spec_version) AS e, length(c.spec_version) AS c FROM episodes e " +
          "JOIN checkpoints c ON c.episode = e.id ORDER BY e.id",
      );
      expect(raw.rows.map((r) => [r.id, r.e, r.c])).toEqual([
        ["ep-0", 6, 6],
        ["ep-1", 32, 32],
        ["ep-2", 32, 32],
        ["ep-3", 32, 32],
      ]);
      for (const [i, specVersion] of runs.entries()) {
        expect((await store.getEpisode(`ep-${i}`))?.specVersion).toBe(specVersion);
        expect((await store.getCheckpoint(HASH(String(i))))?.specVersion).toBe(specVersion);
      }
      // SQL reads the same (replication sends it so).
      const sql = await store.client.execute(`SELECT ${specOfSql("spec_version")} AS s FROM episodes ORDER BY id`);
      expect(sql.rows.map((r) => r.s)).toEqual(runs);
    } finally {
      await store.close();
    }
    // Opened again (read-only), the data dir reads the same.
    const again = await Store.open(path, { synchronous: "normal", readonly: true });
    try {
      expect((await again.getEpisode("ep-0"))?.specVersion).toBe(a);
    } finally {
      await again.close();
    }
  });

  test("a checkpoint is found by its hash through an index of its first 8 bytes, compared whole", async () => {
    const store = await open(freshPath());
    try {
      // Two checkpoints whose hashes share their first 8 bytes.
      const [h1, h2] = [`${"ab".repeat(8)}${"1".repeat(48)}`, `${"ab".repeat(8)}${"2".repeat(48)}`];
      for (const [i, hash] of [h1, h2].entries()) {
        const seq = await intakeOne(store, stim(`id:${i}`));
        await store.commitEpisode(episodeCommit(`ep-${i}`, seq, `id:${i}`, i + 1, hash, i === 0 ? null : h1));
      }
      expect(await store.getCheckpoint(h1)).toMatchObject({ hash: h1, seq: 1 });
      expect(await store.getCheckpoint(h2)).toMatchObject({ hash: h2, seq: 2, parent: h1 });
      expect(await store.getCheckpoint(`${"ab".repeat(8)}${"3".repeat(48)}`)).toBeUndefined();
      expect((await store.turnInputs(aid("temp/boiler-1"), [])).checkpoint).toMatchObject({ hash: h2 });
      const plan = await store.client.execute({
        sql: `EXPLAIN QUERY PLAN SELECT * FROM checkpoints WHERE ${checkpointHashIs("hash", "?1")}`,
        args: [h1],
      });
      expect(plan.rows.map((r) => String(r.detail)).join("\n")).toContain("USING INDEX checkpoints_hash");
      // A chain position is still taken once.
      const again = episodeCommit("ep-x", 99, "id:x", 2, HASH("c"), h1);
      await expect(store.commitEpisode(again)).rejects.toThrow(/UNIQUE/);
    } finally {
      await store.close();
    }
  });

  test("a hash that is not 64 lowercase hex characters is kept as the text it is", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      const odd = ["A".repeat(64), "abc", "g".repeat(64)];
      const c = episodeCommit("ep-1", seq, "id:1", 1, odd[0]!, odd[1]!);
      await store.commitEpisode({ ...c, episode: { ...c.episode, eventsHash: odd[2]! } });
      const ep = await store.getEpisode("ep-1");
      expect([ep?.checkpoint, ep?.parent, ep?.eventsHash]).toEqual(odd);
      const raw = await store.client.execute("SELECT typeof(checkpoint) AS t FROM episodes WHERE id = 'ep-1'");
      expect(raw.rows[0]!.t).toBe("text");
    } finally {
      await store.close();
    }
  });

  test("a record's kind is read from its data; look-alikes keep their own kind and data", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      const pairs: [string, string][] = [
        ["stimulus", '{"id":"id:1"}'],
        ["now", '{"k":"now","v":1}'],
        ["decide", '{"k":"decide"}'],
        ["emit", '{"k":"emitx","data":1}'], // a longer kind in the data
        ["emit", '{"k":"decide","data":2}'], // another kind in the data
        ['we"ird\\', JSON.stringify({ k: 'we"ird\\', v: "é" })], // escapes in the kind
        ["tool", '{"x":1,"k":"tool"}'], // k not first
        ["end", '"text"'],
      ];
      const events = pairs.map(([kind, data], i) => ({ episode: "ep-1", seq: i, kind, data }));
      const c = episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null);
      await store.commitEpisode({ ...c, events, episode: { ...c.episode, eventCount: events.length } });
      expect(await store.listEvents("ep-1")).toEqual(events);
      const emits = await store.client.execute("SELECT seq FROM events WHERE episode = 'ep-1' AND kind = 'emit'");
      expect(emits.rows.map((r) => Number(r.seq))).toEqual([3, 4]);
      // Only the three records whose data begins with their own kind are stored without it.
      const forms = await store.client.execute("SELECT j.type AS t FROM episodes, json_each(log) j ORDER BY j.key");
      expect(forms.rows.map((r) => r.t)).toEqual([
        "array",
        "object",
        "object",
        "array",
        "array",
        "object",
        "array",
        "array",
      ]);
    } finally {
      await store.close();
    }
  });

  test("an event log that does not number its events 0, 1, 2, ... is refused before anything is written", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      const c = episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null);
      const events = [{ episode: "ep-1", seq: 1, kind: "end", data: "{}" }];
      expect(String(await rejection(() => store.commitEpisode({ ...c, events })))).toContain("seq 1 at position 0");
      expect(await footprint(store, "ep-1")).toEqual({ episodes: 0, events: 0, checkpoints: 0, outbox: 0, inbox: 0 });
    } finally {
      await store.close();
    }
  });

  test("an event whose data is not JSON aborts the whole commit", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      const c = episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null);
      const events = [{ episode: "ep-1", seq: 0, kind: "stimulus", data: "{not json" }];
      await rejection(() => store.commitEpisode({ ...c, events }));
      expect(await footprint(store, "ep-1")).toEqual({ episodes: 0, events: 0, checkpoints: 0, outbox: 0, inbox: 0 });
      expect(await store.getStimulus(seq)).toMatchObject({ state: "queued" });
    } finally {
      await store.close();
    }
  });

  test("a second commit for the same stimulus is rejected by episodes_once and leaves no partial rows", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      await store.commitEpisode(episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null));
      // A different episode id, checkpoint hash and chain position: only episodes_once can object.
      const err = await rejection(() =>
        store.commitEpisode(episodeCommit("ep-2", seq, "id:1", 2, HASH("b"), HASH("a"))),
      );
      expect(describeError(err)).toMatch(/UNIQUE constraint failed: episodes\.stimulus_seq/);
      expect(await footprint(store, "ep-2")).toEqual({ episodes: 0, events: 0, checkpoints: 0, outbox: 0, inbox: 0 });
      expect(await store.getAgent(aid("temp/boiler-1"))).toMatchObject({
        headSeq: 1,
        headHash: HASH("a"),
        episodes: 1,
      });
      expect(await store.getStimulus(seq)).toMatchObject({ state: "done", episode: "ep-1" });
      const usage = await store.usage(aid("temp/boiler-1"), ["h:1"]);
      expect(usage[0]).toMatchObject({ episodes: 1, toolCalls: 2, tokens: 30 });
    } finally {
      await store.close();
    }
  });

  test("the exactly-once rule holds across a restart", async () => {
    const path = freshPath();
    const first = await open(path);
    const seq = await intakeOne(first, stim("id:1"));
    await first.commitEpisode(episodeCommit("ep-1", seq, "id:1", 1, HASH("a"), null));
    await first.close();
    const second = await open(path);
    try {
      await rejection(() => second.commitEpisode(episodeCommit("ep-2", seq, "id:1", 2, HASH("b"), HASH("a"))));
      expect(await footprint(second, "ep-2")).toEqual({ episodes: 0, events: 0, checkpoints: 0, outbox: 0, inbox: 0 });
    } finally {
      await second.close();
    }
  });

  test("failed attempts do not block the commit of the same stimulus", async () => {
    const store = await open(freshPath());
    try {
      const seq = await intakeOne(store, stim("id:1"));
      await store.recordFailure(episodeFailure("ep-f", seq, "id:1", 1, T0 + 1000));
      await store.commitEpisode(episodeCommit("ep-ok", seq, "id:1", 1, HASH("a"), null));
      expect((await store.listEpisodes(aid("temp/boiler-1"))).map((e) => e.status).sort()).toEqual([
        "committed",
        "failed",
      ]);
    } finally {
      await store.close();
    }
  });
});

/** A failed attempt `attempt` for stimulus `seq`. */
function episodeFailure(
  episode: string,
  seq: number,
  sid: string,
  attempt: number,
  retryAt: number | null,
): EpisodeFailure {
  return {
    episode: {
      id: episode,
      gateway: "gw",
      agent: aid("temp/boiler-1"),
      stimulusSeq: seq,
      stimulusId: sid,
      specVersion: HASH("5"),
      status: "failed",
      errorKind: "threw",
      error: `boom ${attempt}`,
      attempt,
      startedAt: T0 + attempt * 100,
      endedAt: T0 + attempt * 100 + 7,
      checkpoint: null,
      parent: HASH("a"),
      eventsHash: HASH("7"),
      eventCount: 2,
    },
    events: [
      { episode, seq: 0, kind: "stimulus", data: "{}" },
      { episode, seq: 1, kind: "failure", data: '{"kind":"threw"}' },
    ],
    retryAt,
    usage: { hourWindow: "h:1", dayWindow: "d:1", toolCalls: 1, tokens: 0, cost: 0 },
  };
}

describe("recordFailure", () => {
  /** A store where temp/boiler-1 has one committed checkpoint and stimulus `id:2` queued. */
  async function withHistory() {
    const store = await open(freshPath());
    const s1 = await intakeOne(store, stim("id:1"));
    await store.commitEpisode(episodeCommit("ep-1", s1, "id:1", 1, HASH("a"), null));
    const s2 = await intakeOne(store, stim("id:2"));
    const checkpoints = await store.listCheckpoints(aid("temp/boiler-1"));
    return { store, s2, checkpoints };
  }

  test("schedules a retry: the stimulus stays queued with not_before, the checkpoints are untouched", async () => {
    const { store, s2, checkpoints } = await withHistory();
    try {
      await store.recordFailure(episodeFailure("ep-f1", s2, "id:2", 1, T0 + 5000));
      expect(await store.listCheckpoints(aid("temp/boiler-1"))).toEqual(checkpoints);
      expect(await store.getAgent(aid("temp/boiler-1"))).toMatchObject({
        headSeq: 1,
        headHash: HASH("a"),
        episodes: 1,
        failures: 1,
      });
      expect(await store.getStimulus(s2)).toMatchObject({
        state: "queued",
        attempts: 1,
        notBefore: T0 + 5000,
        lastError: "boom 1",
        episode: null,
        doneAt: null,
      });
      expect((await store.headOfQueue(aid("temp/boiler-1")))?.seq).toBe(s2);
      expect(await store.getEpisode("ep-f1")).toMatchObject({ status: "failed", errorKind: "threw", checkpoint: null });
      expect((await store.listEvents("ep-f1")).map((e) => e.kind)).toEqual(["stimulus", "failure"]);
      // Failed attempts count against the budget too.
      expect((await store.usage(aid("temp/boiler-1"), ["h:1"]))[0]).toMatchObject({ episodes: 2, toolCalls: 3 });
    } finally {
      await store.close();
    }
  });

  test("quarantines on the last attempt: the stimulus leaves the queue, the checkpoints are untouched", async () => {
    const { store, s2, checkpoints } = await withHistory();
    try {
      await store.recordFailure(episodeFailure("ep-f1", s2, "id:2", 1, T0 + 5000));
      await store.recordFailure(episodeFailure("ep-f2", s2, "id:2", 2, T0 + 9000));
      await store.recordFailure(episodeFailure("ep-f3", s2, "id:2", 3, null));
      expect(await store.listCheckpoints(aid("temp/boiler-1"))).toEqual(checkpoints);
      expect(await store.getAgent(aid("temp/boiler-1"))).toMatchObject({
        headSeq: 1,
        headHash: HASH("a"),
        failures: 3,
      });
      expect(await store.getStimulus(s2)).toMatchObject({
        state: "quarantined",
        attempts: 3,
        lastError: "boom 3",
        episode: "ep-f3",
        doneAt: T0 + 307,
      });
      expect(await store.headOfQueue(aid("temp/boiler-1"))).toBeUndefined();
      expect((await store.listStimuli("quarantined")).map((s) => s.seq)).toEqual([s2]);
      // A duplicate of a quarantined stimulus is still a duplicate.
      expect((await store.intake([stim("id:2")]))[0]!.seq).toBeNull();
    } finally {
      await store.close();
    }
  });

  test("a quarantined stimulus can be put back in its queue", async () => {
    const { store, s2 } = await withHistory();
    try {
      await store.recordFailure(episodeFailure("ep-f3", s2, "id:2", 3, null));
      expect(await store.resolveQuarantine(s2, "queued", Date.now())).toBe(true);
      expect(await store.getStimulus(s2)).toMatchObject({ state: "queued", attempts: 0, notBefore: 0 });
      expect((await store.headOfQueue(aid("temp/boiler-1")))?.seq).toBe(s2);
    } finally {
      await store.close();
    }
  });
});

describe("agent search", () => {
  test("search is a plain substring match: _ and % match only themselves", async () => {
    const store = await open(freshPath());
    try {
      await store.ensureAgents([
        { id: aid("temp/a_b") as never, type: "temp", key: "a_b" },
        { id: aid("temp/axb") as never, type: "temp", key: "axb" },
        { id: "temp/100%" as never, type: "temp", key: "100%" },
      ]);
      expect((await store.listAgents({ q: "a_b" })).rows.map((r) => r.id)).toEqual([aid("temp/a_b")]);
      expect((await store.listAgents({ q: "0%" })).rows.map((r) => r.id)).toEqual([aid("temp/100%")]);
      expect((await store.listAgents({ q: "temp/" })).total).toBe(3);
    } finally {
      await store.close();
    }
  });
});

describe("group committer with synchronous = full", () => {
  /** A committer over a real file whose WAL syncs the test releases by hand. */
  async function manualSync() {
    const path = freshPath();
    const { client, native } = await openDb(path, { synchronous: "full" });
    const syncs: { path: string; release: (err?: Error) => void }[] = [];
    const writer = new GroupCommitter(native, null, Date.now, {
      path: `${path}-wal`,
      sync: (p) =>
        new Promise<void>((resolve, reject) =>
          syncs.push({ path: p, release: (err) => (err ? reject(err) : resolve()) }),
        ),
    });
    const put = (key: string) =>
      writer.write([{ sql: "INSERT INTO meta (key, value) VALUES (?, ?)", args: [key, "1"] }]);
    const flushed = () => new Promise((r) => setImmediate(r));
    return { path, client, writer, syncs, put, flushed };
  }

  test("a job resolves only after a sync of the WAL that started after its commit", async () => {
    const { path, client, writer, syncs, put, flushed } = await manualSync();
    try {
      let first = false;
      const a = put("a").then(() => (first = true));
      await flushed();
      // Committed (visible), not yet acknowledged.
      expect((await client.execute("SELECT count(*) AS n FROM meta WHERE key = 'a'")).rows[0]!.n).toBe(1);
      expect(syncs.map((s) => s.path)).toEqual([`${path}-wal`]);
      expect(first).toBe(false);
      // Two commits while the first sync runs: neither may ride on it; they share the next one.
      let later = 0;
      const b = put("b").then(() => later++);
      await flushed();
      const c = put("c").then(() => later++);
      await flushed();
      expect(syncs).toHaveLength(1);
      syncs[0]!.release();
      await a;
      expect(first).toBe(true);
      await flushed();
      expect(later).toBe(0);
      expect(syncs).toHaveLength(2);
      syncs[1]!.release();
      await Promise.all([b, c]);
      expect(later).toBe(2);
      await writer.drain();
    } finally {
      client.close();
    }
  });

  test("a job hears of its commit before the WAL sync; its promise still waits for the sync", async () => {
    const { client, writer, syncs, flushed } = await manualSync();
    try {
      const heard: number[] = [];
      let resolved = false;
      const job = writer
        .write([{ sql: "INSERT INTO meta (key, value) VALUES (?, ?)", args: ["a", "1"] }], (results) =>
          heard.push(results[0]!.rowsAffected),
        )
        .then(() => (resolved = true));
      await flushed();
      expect(heard).toEqual([1]);
      expect(syncs).toHaveLength(1);
      expect(resolved).toBe(false);
      syncs[0]!.release();
      await job;
      expect(heard).toEqual([1]); // told once
    } finally {
      client.close();
    }
  });

  test("a job whose transaction fails is never told it committed; the others in its batch are", async () => {
    const { client, writer, syncs, flushed } = await manualSync();
    try {
      const heard: string[] = [];
      const insert = (key: string) => ({ sql: "INSERT INTO meta (key, value) VALUES (?, ?)", args: [key, "1"] });
      const good = writer.write([insert("g")], () => heard.push("g"));
      const bad = writer.write([insert("b"), insert("b")], () => heard.push("b")); // a primary key conflict
      await flushed();
      expect(heard).toEqual(["g"]);
      expect(describeError(await rejection(() => bad))).toMatch(/constraint/i);
      syncs[0]!.release();
      await good;
    } finally {
      client.close();
    }
  });

  test("a failed WAL sync fails the jobs it covered as an I/O error, and the next commit recovers", async () => {
    const { client, writer, syncs, put, flushed } = await manualSync();
    try {
      const a = put("a");
      await flushed();
      syncs[0]!.release(Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" }));
      expect(describeError(await rejection(() => a))).toMatch(/SQLITE_IOERR: syncing the WAL failed/);
      expect(writer.health).toMatchObject({ failing: true, kind: "io" });
      const b = put("b");
      await flushed();
      syncs[1]!.release();
      await b;
      expect(writer.health.failing).toBe(false);
    } finally {
      client.close();
    }
  });

  test("durable() waits for a sync covering every commit so far, and is immediate once one has", async () => {
    const { client, writer, syncs, put, flushed } = await manualSync();
    try {
      await writer.durable(); // nothing committed yet
      expect(syncs).toHaveLength(0);
      const a = put("a");
      await flushed();
      let durable = false;
      const d = writer.durable().then(() => (durable = true));
      await flushed();
      expect(durable).toBe(false);
      syncs[0]!.release();
      await Promise.all([a, d]);
      expect(durable).toBe(true);
      await writer.durable();
      expect(syncs).toHaveLength(1);
    } finally {
      client.close();
    }
  });

  test("a store opened with synchronous = full syncs its real WAL and commits", async () => {
    const path = freshPath();
    const store = await Store.open(path, { synchronous: "full" });
    try {
      const [done] = await store.intake([stim("id:durable")]);
      expect(done!.seq).not.toBeNull();
      expect(existsSync(`${path}-wal`)).toBe(true);
      const pragma = await store.client.execute("PRAGMA synchronous");
      // The connection is back at FULL between the committer's transactions (2 = FULL).
      expect(pragma.rows[0]![0]).toBe(2);
    } finally {
      await store.close();
    }
  });

  test("the WAL is synced through one descriptor, opened again only when the path names another file", async () => {
    const dir = mkdtempSync(join(root, "wal-"));
    const wal = new WalFile(join(dir, "fleet.db-wal"));
    try {
      writeFileSync(wal.path, "frames");
      await wal.sync();
      await wal.sync();
      await wal.sync();
      expect(wal.opens).toBe(1);
      // A new file at the path (SQLite made a new WAL): the next sync goes to it, not the old one.
      writeFileSync(join(dir, "new"), "other frames");
      renameSync(join(dir, "new"), wal.path);
      await wal.sync();
      expect(wal.opens).toBe(2);
      await wal.sync();
      expect(wal.opens).toBe(2);
      // No file at all: the sync fails (the committer reports an I/O error), it never pretends.
      rmSync(wal.path);
      expect(String(await rejection(() => wal.sync()))).toMatch(/ENOENT/);
    } finally {
      await wal.close();
    }
  });

  test("closing the store lets go of the WAL's descriptor", async () => {
    const path = freshPath();
    const openWal = () =>
      readdirSync("/proc/self/fd").filter((fd) => {
        try {
          return readlinkSync(`/proc/self/fd/${fd}`) === `${path}-wal`;
        } catch {
          return false; // the directory's own descriptor, gone by now
        }
      }).length;
    const store = await Store.open(path, { synchronous: "full" });
    const sqlites = openWal();
    await store.intake([stim("id:a")]);
    await store.intake([stim("id:b")]);
    await store.intake([stim("id:c")]);
    // SQLite's own descriptors and one of the committer's, however many commits synced.
    expect(openWal()).toBe(sqlites + 1);
    await store.close();
    expect(openWal()).toBe(sqlites);
  });
});

describe("the WAL file", () => {
  test("is cut back to WAL_SIZE_LIMIT by the first checkpoint after a reader that held it back lets go", async () => {
    const path = freshPath();
    const store = await open(path);
    await store.setMeta("before", "1");
    // A long read on another connection (`fleet backup`, `fleet verify`) keeps checkpoints from resetting the WAL.
    const reader = createClient({ url: `file:${path}` });
    const read = await reader.transaction("read");
    try {
      await read.execute("SELECT count(*) FROM meta");
      const blob = "x".repeat(512 * 1024);
      for (let i = 0; i < (2 * WAL_SIZE_LIMIT) / blob.length; i++) await store.setMeta(`big-${i}`, blob);
      expect(statSync(`${path}-wal`).size).toBeGreaterThan(2 * WAL_SIZE_LIMIT);
    } finally {
      read.close();
      reader.close();
    }
    // The checkpoint the gateway's connection runs then (its autocheckpoint, here by hand), and the write after
    // it, which starts the WAL over: the file is cut back instead of keeping the space for good.
    await store.client.execute("PRAGMA wal_checkpoint(PASSIVE)");
    await store.setMeta("after", "1");
    expect(statSync(`${path}-wal`).size).toBeLessThanOrEqual(WAL_SIZE_LIMIT);
    await store.close();
  });

  test("stays under a store beside another connection of its process as another process's last closes", async () => {
    // The CLI's schema check (openDb's first client) and a test's own client are such connections. Opening
    // the store must not drop this process's POSIX locks on fleet.db (any close of a descriptor of the file
    // does): another process's closing connection would then take them, checkpoint, and delete the WAL the
    // store still writes, whose next sync failed with ENOENT (`fleet gc` in CI), or worse, went unseen.
    const path = freshPath();
    (await open(path)).close();
    const other = createClient({ url: `file:${path}` });
    await other.execute("SELECT count(*) FROM meta");
    const store = await Store.open(path, { synchronous: "full" });
    try {
      await store.setMeta("before", "1");
      await readInAnotherProcess(path, "meta");
      expect(existsSync(`${path}-wal`)).toBe(true);
      await store.setMeta("after", "1");
      expect(await store.getMeta("after")).toBe("1");
    } finally {
      await store.close().catch(() => undefined);
      other.close();
    }
  });

  test("stays under the gateway's store when a CLI's connection to the live data dir closes", async () => {
    // No other connection of the test's: openDb's own schema check of an existing file is one.
    const path = freshPath();
    (await open(path)).close();
    const store = await Store.open(path, { synchronous: "full" });
    try {
      for (let i = 0; i < 3; i++) {
        await readInAnotherProcess(path, "meta");
        expect(existsSync(`${path}-wal`)).toBe(true);
        await store.setMeta(`after-${i}`, "1");
      }
    } finally {
      await store.close().catch(() => undefined);
    }
  });
});
