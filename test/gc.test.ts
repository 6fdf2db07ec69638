/**
 * Retention / GC (docs/fleet-toml.md `checkpoint.keep`, `[retention]`): run a large
 * number of episodes on a few agents with `keep = 10` and 1-day retention, advance the
 * clock, collect, and check that row counts and the DB file stay bounded and that
 * `fleet verify` still passes.
 *
 * Running the episodes as real subprocesses would take hours, so the store is filled
 * in-process through the gateway's own commit path (test/helpers/ops.ts: `Store.intake`,
 * `buildEvents` + `hashEvents`, `sealCheckpoint`, `Store.commitEpisode`, each agent's chain
 * linked exactly as EpisodeExecutor links it) with an injected clock spreading the
 * episodes over several days. That path costs ~0.5–1 ms of CPU per episode (drizzle SQL
 * building and libSQL statement preparation), so CI runs two cycles of FLEET_GC_EPISODES
 * episodes each (default 8,000); `FLEET_GC_EPISODES=100000 bun test test/gc.test.ts` runs
 * a 100,000-episode scale (and `bun scripts/bench-ops.ts` measures GC throughput on it).
 */
import { createClient } from "@libsql/client";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gcAll, gcPass, gcTick, gcTotal, type GcReport } from "../gateway/ops/index.ts";
import { verifyStore } from "../gateway/ops/index.ts";
import { runCli } from "./helpers/gateway.ts";
import { DAY, HOUR, SyntheticFleet } from "./helpers/ops.ts";
import type { AgentId } from "../gateway/types.ts";

const EPISODES = Number(process.env.FLEET_GC_EPISODES ?? 8_000);
const KEEP = 10;
const RUN_DAYS = 4;
const T0 = Date.UTC(2025, 0, 6);
const SPACING = (RUN_DAYS * DAY) / EPISODES;
/** stimulus, now, decide, emit, end */
const EVENTS_PER_EPISODE = 5;
const BATCH = 1000;
/** Generous per-test timeout: filling the store is CPU-bound and the CI machine is shared. */
const SLOW = 600_000;

let fleet: SyntheticFleet;
let dir: string;
let last = 0;
let sizeAfterFirstCycle = 0;

async function scalar(q: string, args: (string | number)[] = []): Promise<number> {
  return Number((await fleet.store.client.execute({ sql: q, args })).rows[0]![0]);
}

async function verifiesClean(): Promise<void> {
  const report = await verifyStore(fleet.store);
  expect(report.problems).toEqual([]);
  expect(report.agents).toBe(fleet.agents.length);
}

function expectBounded(r: GcReport, batch: number): void {
  expect(r.tombstoned).toBeLessThanOrEqual(batch);
  expect(r.checkpointsDeleted).toBeLessThanOrEqual(batch);
  expect(r.episodesDeleted).toBeLessThanOrEqual(batch);
  expect(r.eventsDeleted).toBeLessThanOrEqual(batch * EVENTS_PER_EPISODE);
  expect(r.stimuliForgotten).toBeLessThanOrEqual(batch);
  expect(r.usageRowsDeleted).toBeLessThanOrEqual(batch);
}

/** What retention must leave once `now` is past every record's retention. */
async function expectOnlyKeptCheckpoints(): Promise<void> {
  const counts = await fleet.counts();
  expect(counts).toMatchObject({
    checkpoints: KEEP * fleet.agents.length,
    live: KEEP * fleet.agents.length,
    tombstones: 0,
    episodes: 0,
    events: 0,
    stimuli: 0,
  });
  const rows = (
    await fleet.store.client.execute("SELECT id, head_seq, anchor_seq, anchor_hash FROM agents ORDER BY id")
  ).rows;
  for (const a of rows) {
    expect(Number(a.anchor_seq)).toBe(Number(a.head_seq) - KEEP);
    // The anchor is the hash of the newest deleted checkpoint, read back as hex (stored as bytes).
    expect((await fleet.store.getAgent(String(a.id) as AgentId))?.anchorHash).toMatch(/^[0-9a-f]{64}$/);
  }
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-gc-"));
  fleet = await SyntheticFleet.create(dir, {
    types: [
      { name: "meter", keys: ["m1", "m2"] },
      { name: "valve", keys: ["v1", "v2"] },
    ],
    keep: KEEP,
    episodesDays: 1,
    dedupDays: 1,
  });
  last = (await fleet.commit(EPISODES, T0, SPACING)).last;
}, SLOW);

afterAll(async () => {
  await fleet?.close();
  if (dir && !process.env.FLEET_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
});

describe(`retention over ${EPISODES} episodes x 2 on 4 agents (keep = ${KEEP}, 1-day retention)`, () => {
  test(
    "the filled store verifies and every episode is on record",
    async () => {
      const c = await fleet.counts();
      expect(c).toMatchObject({
        checkpoints: EPISODES,
        live: EPISODES,
        tombstones: 0,
        episodes: EPISODES,
        events: EPISODES * EVENTS_PER_EPISODE,
        stimuli: EPISODES,
      });
      // A budget row per agent per hour and per day of the run.
      expect(c.usage).toBeGreaterThanOrEqual(4 * RUN_DAYS * 24);
      await verifiesClean();
    },
    SLOW,
  );

  test(
    "a dry run reports what it would collect and changes nothing",
    async () => {
      const before = await fleet.counts();
      const anchors = await scalar("SELECT sum(anchor_seq) FROM agents");
      const r = await gcAll(fleet.store, fleet.spec.spec, { now: last + 1, dryRun: true });
      expect(r.tombstoned).toBeGreaterThan(0);
      expect(r.episodesDeleted).toBeGreaterThan(0);
      expect(r.stimuliForgotten).toBeGreaterThan(0);
      expect(await fleet.counts()).toEqual(before);
      expect(await scalar("SELECT sum(anchor_seq) FROM agents")).toBe(anchors);
    },
    SLOW,
  );

  test(
    "a pass reaches its rows through indexes: none of its queries reads a whole table of the history",
    async () => {
      // Retention runs every minute on the gateway's thread: its cost must follow what it collects, not
      // what the store holds. Record every statement of a (dry) pass and ask SQLite how it would run each.
      const db = fleet.store.db as unknown as Record<"all" | "get" | "run", (q: unknown) => unknown>;
      const queries: { sql: string; params: unknown[] }[] = [];
      const originals = { all: db.all, get: db.get, run: db.run };
      for (const name of ["all", "get", "run"] as const) {
        const original = originals[name].bind(fleet.store.db);
        db[name] = (q: unknown) => {
          const raw = original(q) as { getQuery(): { sql: string; params: unknown[] } };
          queries.push(raw.getQuery());
          return raw;
        };
      }
      try {
        await gcPass(fleet.store, fleet.spec.spec, { now: last + 1, dryRun: true, batch: BATCH });
      } finally {
        Object.assign(db, originals);
      }
      expect(queries.length).toBeGreaterThanOrEqual(5);
      const scans: string[] = [];
      const planner = createClient({ url: `file:${fleet.dbPath}` });
      for (const q of queries) {
        const plan = await planner.execute({
          sql: `EXPLAIN QUERY PLAN ${q.sql}`,
          args: q.params as (string | number)[],
        });
        for (const row of plan.rows) {
          const detail = String(row[3]);
          // SEARCH reads a range of an index; SCAN reads all of it (or of the table). Agents may be scanned.
          if (/^SCAN (checkpoints|episodes|stimuli|events|budget_usage|wakeups)\b/.test(detail))
            scans.push(`${detail} in: ${q.sql.replace(/\s+/g, " ").slice(0, 120)}`);
        }
      }
      planner.close();
      expect(scans).toEqual([]);
    },
    SLOW,
  );

  test(
    "one background pass touches at most its batch per category and leaves every chain verifiable",
    async () => {
      const r = await gcPass(fleet.store, fleet.spec.spec, { now: last + 1, batch: BATCH });
      expectBounded(r, BATCH);
      expect(r.tombstoned).toBe(BATCH);
      expect(r.episodesDeleted).toBe(BATCH);
      await verifiesClean();
    },
    SLOW,
  );

  test(
    "a background round goes on past one batch while more is due, and stops at its pass limit",
    async () => {
      // More than one pass collects is due (the run's first three days): a fleet ending more episodes a
      // minute than one batch still has its history held at the retention window.
      const before = await fleet.counts();
      const { report, passes, behind } = await gcTick(fleet.store, fleet.spec.spec, {
        now: last + 1,
        batch: 100,
        maxPasses: 3,
      });
      expect(passes).toBe(3);
      // Its last pass still collected: the round says it is behind (fleet_retention_behind).
      expect(behind).toBe(true);
      expect(report.episodesDeleted).toBe(300);
      expect(report.tombstoned).toBe(300);
      expect((await fleet.counts()).episodes).toBe(before.episodes - 300);
      await verifiesClean();
    },
    SLOW,
  );

  test(
    "collecting at the end of the run keeps the newest `keep` states and only the last day of logs",
    async () => {
      const now = last + 1;
      const cutoff = now - DAY;
      const r = await gcAll(fleet.store, fleet.spec.spec, { now, batch: 5000 });
      // The single pass and the round before took BATCH and 300.
      expect(r.tombstoned + BATCH + 300).toBe(EPISODES - KEEP * fleet.agents.length);
      // Nothing is left to collect now: a background round stops after its first pass.
      const idle = await gcTick(fleet.store, fleet.spec.spec, { now, batch: 100, maxPasses: 5 });
      expect(idle.passes).toBe(1);
      expect(idle.behind).toBe(false);
      expect(gcTotal(idle.report)).toBe(0);

      const inWindow = Array.from({ length: EPISODES }, (_, i) => T0 + i * SPACING).filter((t) => t >= cutoff).length;
      const c = await fleet.counts();
      expect(c.live).toBe(KEEP * fleet.agents.length);
      for (const agent of fleet.agents)
        expect(await scalar("SELECT count(*) FROM checkpoints WHERE agent = ? AND state IS NOT NULL", [agent])).toBe(
          KEEP,
        );
      // Tombstones older than retention are gone; younger ones stay so the chain still verifies.
      expect(await scalar("SELECT count(*) FROM checkpoints WHERE created_at < ?", [cutoff])).toBe(0);
      expect(c.checkpoints).toBe(inWindow);
      expect(c.episodes).toBe(inWindow);
      expect(c.events).toBe(inWindow * EVENTS_PER_EPISODE);
      expect(await scalar("SELECT count(*) FROM episodes WHERE ended_at < ?", [cutoff])).toBe(0);
      expect(c.stimuli).toBe(inWindow);
      expect(await scalar("SELECT count(*) FROM stimuli WHERE done_at < ?", [cutoff])).toBe(0);
      // Budget windows nothing looks at any more: hours older than two days, days older than two.
      expect(
        await scalar(
          "SELECT count(*) FROM budget_usage WHERE window LIKE 'h:%' AND CAST(substr(window, 3) AS INTEGER) < ?",
          [Math.floor(now / HOUR) - 48],
        ),
      ).toBe(0);
      expect(
        await scalar(
          "SELECT count(*) FROM budget_usage WHERE window LIKE 'd:%' AND CAST(substr(window, 3) AS INTEGER) < ?",
          [Math.floor(now / DAY) - 2],
        ),
      ).toBe(0);
      expect(c.usage).toBeLessThanOrEqual(4 * (49 + 3));
      // Each agent's tombstone frontier is `keep` before its head: the next pass starts there.
      expect(await scalar("SELECT count(*) FROM agents WHERE tombstoned_seq != head_seq - ?", [KEEP])).toBe(0);
      // Each chain now starts at an anchor: the newest deleted checkpoint.
      for (const agent of fleet.agents) {
        const a = (await fleet.store.getAgent(agent))!;
        const first = (await fleet.store.listCheckpoints(agent, 1))[0]!;
        expect(a.anchorSeq).toBe(first.seq - 1);
        expect(first.parent).toBe(a.anchorHash);
      }
      await verifiesClean();
    },
    SLOW,
  );

  test(
    "a later background pass stays bounded when a whole day of tombstones expires at once",
    async () => {
      const r = await gcPass(fleet.store, fleet.spec.spec, { now: last + 2 * DAY, batch: BATCH });
      expectBounded(r, BATCH);
      expect(r.checkpointsDeleted).toBe(BATCH);
      await verifiesClean();
    },
    SLOW,
  );

  test(
    "past every retention window only the newest `keep` checkpoints per agent remain, and `fleet verify` passes",
    async () => {
      await gcAll(fleet.store, fleet.spec.spec, { now: last + 2 * DAY });
      await expectOnlyKeptCheckpoints();
      await verifiesClean();
      await fleet.checkpointWal();
      sizeAfterFirstCycle = statSync(fleet.dbPath).size;

      const v = await runCli(["verify", "--data-dir", join(dir, "data"), "--json"]);
      expect(v.code).toBe(0);
      expect(v.json).toMatchObject({ agents: 4, checkpoints: KEEP * 4, problems: [] });
    },
    SLOW,
  );

  test(
    "a second run of the same size reuses the freed pages: `fleet gc` keeps the file from growing",
    async () => {
      const start = last + 2 * DAY + SPACING;
      last = (await fleet.commit(EPISODES, start, SPACING)).last;
      expect((await fleet.counts()).episodes).toBe(EPISODES);
      await fleet.checkpointWal();

      const now = last + 2 * DAY;
      const gc = await runCli(
        ["gc", "--config", fleet.configPath, "--data-dir", join(dir, "data"), "--now", String(now), "--json"],
        { timeoutMs: SLOW },
      );
      expect(gc.code).toBe(0);
      expect(gc.json).toMatchObject({
        tombstoned: EPISODES,
        episodesDeleted: EPISODES,
        eventsDeleted: EPISODES * EVENTS_PER_EPISODE,
        stimuliForgotten: EPISODES,
      });
      expect(gc.json.checkpointsDeleted).toBe(EPISODES);

      await expectOnlyKeptCheckpoints();
      await verifiesClean();
      await fleet.checkpointWal();
      const size = statSync(fleet.dbPath).size;
      expect(size).toBeLessThanOrEqual(sizeAfterFirstCycle * 1.1);

      const v = await runCli(["verify", "--data-dir", join(dir, "data"), "--json"]);
      expect(v.code).toBe(0);
      expect(v.json.problems).toEqual([]);
    },
    SLOW,
  );
});
