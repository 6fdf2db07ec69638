/**
 * Replay and verify (docs/guarantees.md sealed checkpoints, §7 `fleet replay`,
 * `fleet verify`) against a real gateway process that ran real episodes: MQTT readings
 * into both example agents (temp-monitor, anomaly) and a fixture agent that uses
 * `ctx.random()`, `ctx.now()` and a tool; then the `fleet` CLI, human and `--json`, on the
 * data dir. Replays run fresh subprocesses on the recorded inputs, like the gateway does.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { hexOfSql, idToDriver } from "../gateway/store/index.ts";
import {
  TestFleet,
  cleanupAll,
  openDbFile,
  publishQos1,
  runCli,
  shippedAgent,
  type CliResult,
  type EpisodeJson,
} from "./helpers/gateway.ts";
import { agentType, fleetHeader, tempMonitorType } from "./helpers/toml.ts";

const ops = (name: string) => join(import.meta.dir, "fixtures/ops", `${name}.ts`);
const SLOW = 180_000;

const TOML =
  fleetHeader("e2e-replay") +
  tempMonitorType("temp-monitor") +
  agentType("anomaly", shippedAgent("anomaly"), ["sensors/+/temperature"], {
    dedup: "id",
    extra: 'tools = ["publish"]\npublish = ["alerts/anomaly/#"]\nconfig = { alpha = 0.1, z = 3.0, warmup = 3 }\n',
  }) +
  agentType("dice", ops("dice"), ["dice/+/roll"], {
    dedup: "id",
    extra: 'tools = ["publish"]\npublish = ["rolls/#"]\n\n[agents.dice.retry]\nmax_attempts = 1\n',
  });

/**
 * Readings for boiler-1. temp-monitor (threshold 80, hysteresis 2): quiet, quiet, quiet,
 * alert + publish, still high, clear + publish, ignored. anomaly (warmup 3): learns three,
 * flags 85 and publishes it.
 */
const READINGS: [string, unknown][] = [
  ["r1", 70],
  ["r2", 72],
  ["r3", 71],
  ["r4", 85],
  ["r5", 86],
  ["r6", 74],
  ["r7", "n/a"],
];

let fleet: TestFleet;
/** Episodes per agent, oldest first. */
const history: Record<string, EpisodeJson[]> = {};

interface ShownEvent {
  seq: number;
  kind: string;
  data: any;
}

async function events(episode: string): Promise<ShownEvent[]> {
  const r = await fleet.cli("show", episode);
  expect(r.code).toBe(0);
  return r.json.events as ShownEvent[];
}

/** `fleet <args> --data-dir D` without --json: what an operator reads. */
function human(...args: string[]): Promise<CliResult> {
  return runCli([...args, "--data-dir", fleet.dataDir], { timeoutMs: SLOW });
}

/** The episode of `agent` whose stimulus had id `sid`. */
function episodeOf(agent: string, sid: string, status: "committed" | "failed" = "committed"): EpisodeJson {
  const e = history[agent]!.find((x) => x.stimulus === `id:${sid}` && x.status === status);
  if (!e) throw new Error(`no ${status} episode of ${agent} for ${sid}: ${JSON.stringify(history[agent])}`);
  return e;
}

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  const client = await fleet.mqtt({ clientId: "e2e-replay" });
  for (const [id, value] of READINGS) await publishQos1(client, "sensors/boiler-1/temperature", { id, value });
  for (const id of ["d1", "d2", "d3"]) await publishQos1(client, "dice/d1/roll", { id });
  await publishQos1(client, "dice/d1/roll", { id: "d4", boom: true });

  await fleet.waitCommitted("temp-monitor/boiler-1", READINGS.length, 90_000);
  await fleet.waitCommitted("anomaly/boiler-1", READINGS.length, 90_000);
  await fleet.waitCommitted("dice/d1", 3, 90_000);
  await fleet.waitEpisodes(
    "dice/d1",
    (eps) => eps.some((e) => e.status === "failed"),
    60_000,
    "the failed dice episode",
  );
  for (const agent of ["temp-monitor/boiler-1", "anomaly/boiler-1", "dice/d1"]) {
    history[agent] = (await fleet.episodes(agent)).sort((a, b) => a.id.localeCompare(b.id));
  }
}, SLOW);

afterAll(() => cleanupAll(), 60_000);

describe("fleet replay <episode>", () => {
  test(
    "a temp-monitor episode that raised an alert through the publish tool replays as MATCH",
    async () => {
      const alert = episodeOf("temp-monitor/boiler-1", "r4");
      const ev = await events(alert.id);
      expect(ev.find((e) => e.kind === "decide")?.data).toMatchObject({
        name: "alert",
        data: { value: 85, threshold: 80 },
      });
      expect(ev.find((e) => e.kind === "tool")?.data).toMatchObject({
        tool: "publish",
        ok: true,
        args: ["alerts/boiler-1", { level: "alert", value: 85 }],
      });
      expect(ev.some((e) => e.kind === "now")).toBe(true);

      const h = await human("replay", alert.id);
      expect(h.code).toBe(0);
      expect(h.stdout.trim()).toMatch(new RegExp(`^MATCH\\s+${alert.id}\\s+temp-monitor/boiler-1$`));

      const j = await fleet.cli("replay", alert.id);
      expect(j.code).toBe(0);
      expect(j.json).toEqual({ episode: alert.id, agent: "temp-monitor/boiler-1", verdict: "MATCH" });

      // The clear episode used the tool too, and `now()` for the alarm's duration.
      const clear = await fleet.cli("replay", episodeOf("temp-monitor/boiler-1", "r6").id);
      expect([clear.code, clear.json.verdict]).toEqual([0, "MATCH"]);
    },
    SLOW,
  );

  test(
    "an anomaly episode that flagged a reading and published it replays as MATCH",
    async () => {
      const flagged = episodeOf("anomaly/boiler-1", "r4");
      const ev = await events(flagged.id);
      expect(ev.find((e) => e.kind === "decide")?.data).toMatchObject({ name: "anomaly", data: { x: 85 } });
      expect(ev.find((e) => e.kind === "tool")?.data).toMatchObject({
        tool: "publish",
        ok: true,
        args: ["alerts/anomaly/boiler-1", { level: "anomaly", x: 85 }],
      });

      const h = await human("replay", flagged.id);
      expect(h.code).toBe(0);
      expect(h.stdout).toStartWith("MATCH");
      const j = await fleet.cli("replay", flagged.id);
      expect([j.code, j.json.verdict, j.json.agent]).toEqual([0, "MATCH", "anomaly/boiler-1"]);
    },
    SLOW,
  );

  test(
    "an episode that used ctx.random(), ctx.now() and a tool result replays as MATCH",
    async () => {
      const ep = episodeOf("dice/d1", "d2");
      const ev = await events(ep.id);
      const kinds = ev.map((e) => e.kind);
      expect(kinds).toEqual(["stimulus", "random", "now", "decide", "tool", "emit", "end"]);
      // The recorded tool result is what the agent emitted: replay must hand the same one back.
      const tool = ev.find((e) => e.kind === "tool")!.data;
      expect(ev.find((e) => e.kind === "emit")!.data.data.receipt).toEqual(tool.result);

      const j = await fleet.cli("replay", ep.id);
      expect(j.code).toBe(0);
      expect(j.json.verdict).toBe("MATCH");
    },
    SLOW,
  );

  test(
    "a failed (throwing) episode replays as MATCH: the replay fails the same way",
    async () => {
      const failed = episodeOf("dice/d1", "d4", "failed");
      expect(failed.error_kind).toBe("threw");
      const ev = await events(failed.id);
      expect(ev.map((e) => e.kind)).toEqual(["stimulus", "random", "now", "decide", "tool", "failure"]);
      expect(ev.at(-1)!.data.message).toContain("boom after rolling");

      const h = await human("replay", failed.id);
      expect(h.stdout + h.stderr).toStartWith("MATCH");
      expect(h.code).toBe(0);
      expect(h.stdout).toStartWith("MATCH");
      const j = await fleet.cli("replay", failed.id);
      expect([j.code, j.json.verdict]).toEqual([0, "MATCH"]);
    },
    SLOW,
  );

  test(
    "a modified module with a renamed decision is DIVERGED at that decision, exit 1",
    async () => {
      const alert = episodeOf("temp-monitor/boiler-1", "r4");
      const h = await human("replay", alert.id, "--module", ops("temp-monitor-renamed"));
      expect(h.code).toBe(1);
      expect(h.stdout).toContain(`DIVERGED  ${alert.id} temp-monitor/boiler-1 at decision #1`);
      expect(h.stdout).toContain('"name":"alert"');
      expect(h.stdout).toContain('"name":"alarm"');

      const j = await fleet.cli("replay", alert.id, "--module", ops("temp-monitor-renamed"));
      expect(j.code).toBe(1);
      expect(j.json).toEqual({
        episode: alert.id,
        agent: "temp-monitor/boiler-1",
        verdict: "DIVERGED",
        divergence: {
          at: "decision #1",
          expected: { "decision #1": { name: "alert", data: { value: 85, threshold: 80 } } },
          actual: { "decision #1": { name: "alarm", data: { value: 85, threshold: 80 } } },
        },
      });

      // An episode that never made that decision still matches under the new code.
      const quiet = await fleet.cli(
        "replay",
        episodeOf("temp-monitor/boiler-1", "r2").id,
        "--module",
        ops("temp-monitor-renamed"),
      );
      expect([quiet.code, quiet.json.verdict]).toEqual([0, "MATCH"]);
    },
    SLOW,
  );

  test(
    "a modified module with different threshold logic is DIVERGED at the first step it does differently",
    async () => {
      const alert = episodeOf("temp-monitor/boiler-1", "r4");
      const j = await fleet.cli("replay", alert.id, "--module", ops("temp-monitor-stricter"));
      expect(j.code).toBe(1);
      expect(j.json.verdict).toBe("DIVERGED");
      // Recorded: an alert decision first. New code (threshold 90): no alert, straight to the emit.
      expect(j.json.divergence).toEqual({
        at: "step 1",
        expected: { "decision #1": { name: "alert", data: { value: 85, threshold: 80 } } },
        actual: { "emit #1": { value: 85, alarm: false, count: 4 } },
      });
    },
    SLOW,
  );

  test(
    "--module naming a missing file is one clear line (exit 2); an id prefix names the episode",
    async () => {
      const [ep] = await fleet.episodes("temp-monitor/boiler-1");
      const missing = await fleet.cli("replay", ep!.id, "--module", "missing.ts");
      expect(missing.code).toBe(2);
      expect(missing.stderr).toContain("--module missing.ts: no such file");
      const byPrefix = await fleet.cli("replay", ep!.id.slice(0, 20));
      expect(byPrefix.json).toMatchObject({ episode: ep!.id, verdict: "MATCH" });
    },
    SLOW,
  );

  test(
    "an unknown episode is an error on stderr, as in show, exit 1",
    async () => {
      const j = await fleet.cli("replay", "00000000-0000-7000-8000-000000000000");
      expect(j.code).toBe(1);
      expect(j.stderr.trim()).toBe("fleet: no episode starts with 00000000-0000-7000-8000-000000000000");
    },
    SLOW,
  );
});

describe("fleet replay --agent <type/key> --module FILE", () => {
  test(
    "each agent's whole history replays as MATCH on its own code",
    async () => {
      for (const [agent, n] of [
        ["temp-monitor/boiler-1", READINGS.length],
        ["anomaly/boiler-1", READINGS.length],
        ["dice/d1", 3],
      ] as const) {
        const j = await fleet.cli("replay", "--agent", agent);
        expect(j.code).toBe(0);
        expect(j.json).toMatchObject({ agent, episodes: n, matched: n, diverged: 0 });
        // Oldest first, committed episodes only.
        expect(j.json.results.map((r: { episode: string }) => r.episode)).toEqual(
          history[agent]!.filter((e) => e.status === "committed").map((e) => e.id),
        );
      }
      const h = await human("replay", "--agent", "temp-monitor/boiler-1", "--module", shippedAgent("temp-monitor"));
      // With stderr beside, so a failure shows all that the operator would have read.
      expect({ code: h.code, stdout: h.stdout.trim(), stderr: h.stderr }).toMatchObject({
        code: 0,
        stdout: `${READINGS.length}/${READINGS.length} episode(s) MATCH, 0 DIVERGED, 0 UNREPLAYABLE`,
      });
    },
    SLOW,
  );

  test(
    "the history against modified code counts the episodes that diverge, exit 1",
    async () => {
      const renamed = await fleet.cli(
        "replay",
        "--agent",
        "temp-monitor/boiler-1",
        "--module",
        ops("temp-monitor-renamed"),
      );
      expect(renamed.code).toBe(1);
      expect(renamed.json).toMatchObject({ episodes: 7, matched: 6, diverged: 1 });
      const divergedIds = (j: CliResult) =>
        j.json.results
          .filter((r: { verdict: string }) => r.verdict === "DIVERGED")
          .map((r: { episode: string }) => r.episode);
      expect(divergedIds(renamed)).toEqual([episodeOf("temp-monitor/boiler-1", "r4").id]);

      // Threshold 90 instead of 80: the alert, the "still high" and the clear all go differently.
      const stricter = await fleet.cli(
        "replay",
        "--agent",
        "temp-monitor/boiler-1",
        "--module",
        ops("temp-monitor-stricter"),
      );
      expect(stricter.code).toBe(1);
      expect(stricter.json).toMatchObject({ episodes: 7, matched: 4, diverged: 3 });
      expect(divergedIds(stricter)).toEqual(
        ["r4", "r5", "r6"].map((sid) => episodeOf("temp-monitor/boiler-1", sid).id),
      );

      const h = await human("replay", "--agent", "temp-monitor/boiler-1", "--module", ops("temp-monitor-stricter"));
      expect(h.code).toBe(1);
      expect(h.stdout).toContain("4/7 episode(s) MATCH, 3 DIVERGED");
      expect(h.stdout.match(/^DIVERGED /gm)?.length).toBe(3);
    },
    SLOW,
  );
});

describe("fleet gc while the gateway runs", () => {
  test(
    "`fleet gc --dry-run` goes through the running gateway (POST /api/gc) and changes nothing",
    async () => {
      const count = async (table: string) =>
        Number(Object.values((await fleet.query(`SELECT count(*) AS n FROM ${table}`))[0]!)[0]);
      const before = {
        episodes: await count("episodes"),
        events: await count("events"),
        stimuli: await count("stimuli"),
        checkpoints: await count("checkpoints"),
      };
      expect(before).toMatchObject({ episodes: 18, stimuli: 18, checkpoints: 17 });

      // Nothing is old yet, and no agent has more than `keep` (default 50) checkpoints.
      const now = await fleet.cli("gc", "--dry-run");
      expect(now.code).toBe(0);
      expect(now.json).toMatchObject({
        tombstoned: 0,
        checkpointsDeleted: 0,
        episodesDeleted: 0,
        eventsDeleted: 0,
        stimuliForgotten: 0,
      });

      // Forty days on, every episode log (30 days) and dedup record (7 days) would go.
      const later = await fleet.cli("gc", "--dry-run", "--now", String(Date.now() + 40 * 86_400_000));
      expect(later.code).toBe(0);
      expect(later.json).toMatchObject({
        tombstoned: 0,
        checkpointsDeleted: 0,
        episodesDeleted: 18,
        eventsDeleted: before.events,
        // Every dedup record but the quarantined d4's: quarantine_days (30) drops it first, and its id
        // is remembered dedup_days more.
        stimuliForgotten: 17,
        quarantineExpired: 1,
      });
      expect({
        episodes: await count("episodes"),
        events: await count("events"),
        stimuli: await count("stimuli"),
        checkpoints: await count("checkpoints"),
      }).toEqual(before);
    },
    SLOW,
  );
});

describe("fleet verify", () => {
  const AGENT = "temp-monitor/boiler-1";
  let db: ReturnType<typeof openDbFile>;

  async function row<T>(sql: string, args: (string | number | Buffer)[]): Promise<T> {
    const rs = await db.execute({ sql, args });
    return { ...rs.rows[0] } as T;
  }

  async function verify(...args: string[]): Promise<CliResult> {
    return fleet.cli("verify", ...args);
  }

  beforeAll(async () => {
    // Tampering is done to a stopped gateway's file (the read commands work either way).
    expect(await fleet.stop()).toBe(0);
    db = openDbFile(join(fleet.dataDir, "fleet.db"));
  }, SLOW);

  afterAll(() => db?.close());

  test(
    "an untouched store verifies: exit 0",
    async () => {
      const j = await verify();
      expect(j.code).toBe(0);
      expect(j.json).toEqual({ agents: 3, checkpoints: 17, episodes: 18, problems: [] });
      const h = await human("verify");
      expect(h.code).toBe(0);
      expect(h.stdout.trim()).toBe("verified 3 agent(s), 17 checkpoint(s), 18 episode(s): OK");
    },
    SLOW,
  );

  test(
    "a changed byte in a checkpoint's state fails verify naming that checkpoint",
    async () => {
      // `hash` is stored as its bytes (store/hashes.ts): kept raw to find the row, read as hex to compare.
      const cp = await row<{ hash: ArrayBuffer; hex: string; state: string }>(
        `SELECT hash, ${hexOfSql("hash")} AS hex, state FROM checkpoints WHERE agent = ? AND seq = 2`,
        [AGENT],
      );
      expect(cp.state).toContain('"count":2');
      await db.execute({
        sql: "UPDATE checkpoints SET state = ? WHERE hash = ?",
        args: [cp.state.replace('"count":2', '"count":3'), cp.hash],
      });
      try {
        const j = await verify();
        expect(j.code).toBe(1);
        expect(j.json.problems).toEqual([
          {
            agent: AGENT,
            record: `checkpoint ${AGENT}#2 ${cp.hex.slice(0, 16)}`,
            problem: expect.stringContaining("hash mismatch"),
          },
        ]);
        const h = await human("verify");
        expect(h.code).toBe(1);
        expect(h.stdout).toContain(`BROKEN checkpoint ${AGENT}#2 ${cp.hex.slice(0, 16)}: `);
      } finally {
        await db.execute({ sql: "UPDATE checkpoints SET state = ? WHERE hash = ?", args: [cp.state, cp.hash] });
      }
      expect((await verify()).code).toBe(0);
    },
    SLOW,
  );

  test(
    "a checkpoint whose parent link points elsewhere fails verify naming it",
    async () => {
      // Hashes are stored as their bytes (store/hashes.ts): kept raw to write back, read as hex to compare.
      const cp = await row<{ hash: ArrayBuffer; hex: string; parent: ArrayBuffer; parentHex: string }>(
        `SELECT hash, ${hexOfSql("hash")} AS hex, parent, ${hexOfSql("parent")} AS parentHex FROM checkpoints
          WHERE agent = ? AND seq = 3`,
        [AGENT],
      );
      const first = await row<{ hash: ArrayBuffer; hex: string }>(
        `SELECT hash, ${hexOfSql("hash")} AS hex FROM checkpoints WHERE agent = ? AND seq = 1`,
        [AGENT],
      );
      await db.execute({ sql: "UPDATE checkpoints SET parent = ? WHERE hash = ?", args: [first.hash, cp.hash] });
      try {
        const j = await verify("--agent", AGENT);
        expect(j.code).toBe(1);
        const record = `checkpoint ${AGENT}#3 ${cp.hex.slice(0, 16)}`;
        expect(j.json.problems.map((p: { record: string }) => p.record)).toEqual([record, record]);
        expect(j.json.problems[0].problem).toBe(
          `parent ${first.hex.slice(0, 16)} does not link to #2 ${cp.parentHex.slice(0, 16)}`,
        );
        // The parent is part of the sealed record, so the hash no longer matches either.
        expect(j.json.problems[1].problem).toContain("hash mismatch");
      } finally {
        await db.execute({ sql: "UPDATE checkpoints SET parent = ? WHERE hash = ?", args: [cp.parent, cp.hash] });
      }
      expect((await verify("--agent", AGENT)).code).toBe(0);
    },
    SLOW,
  );

  test(
    "an edited event row fails verify naming the episode whose event-log hash broke",
    async () => {
      const alert = episodeOf(AGENT, "r4");
      const ev = await row<{ seq: number; data: string }>(
        "SELECT seq, data FROM events WHERE episode = ? AND kind = 'decide'",
        [idToDriver(alert.id)],
      );
      // The log is the episode row's `log` (store/migrate.ts, migrations 18 and 22): a record event is
      // its data alone there, another event [kind, data]. Edit one event's data in it.
      const setData = (data: string) =>
        db.execute({
          sql: `UPDATE episodes SET log = CASE json_type(log, ?1) WHEN 'object' THEN jsonb_set(log, ?1, jsonb(?2))
            ELSE jsonb_set(log, ?1 || '[1]', jsonb(?2)) END WHERE id = ?3`,
          args: [`$[${ev.seq}]`, data, idToDriver(alert.id)],
        });
      await setData(ev.data.replace('"value":85', '"value":58'));
      try {
        const j = await verify();
        expect(j.code).toBe(1);
        expect(j.json.problems).toEqual([
          { agent: AGENT, record: `episode ${alert.id}`, problem: expect.stringContaining("event log hash mismatch") },
        ]);
        // Other agents' records are intact.
        const other = await verify("--agent", "anomaly/boiler-1");
        expect([other.code, other.json.problems]).toEqual([0, []]);
      } finally {
        await setData(ev.data);
      }
      expect((await verify()).code).toBe(0);
    },
    SLOW,
  );

  test(
    "an episode whose whole event log was deleted fails verify too (retention never does that)",
    async () => {
      const ep = episodeOf("dice/d1", "d2");
      const saved = await row<{ log: ArrayBuffer; n: number }>(
        "SELECT log, json_array_length(log) AS n FROM episodes WHERE id = ?",
        [idToDriver(ep.id)],
      );
      expect(saved.n).toBe(7);
      await db.execute({ sql: "UPDATE episodes SET log = NULL WHERE id = ?", args: [idToDriver(ep.id)] });
      try {
        const j = await verify();
        expect(j.code).toBe(1);
        expect(j.json.problems).toEqual([
          { agent: "dice/d1", record: `episode ${ep.id}`, problem: "event log missing (7 event(s) recorded)" },
        ]);
      } finally {
        await db.execute({ sql: "UPDATE episodes SET log = ? WHERE id = ?", args: [saved.log, idToDriver(ep.id)] });
      }
      expect((await verify()).code).toBe(0);
    },
    SLOW,
  );
});

describe("fleet gc on the stopped gateway's data dir", () => {
  test(
    "collecting past every retention window keeps the chains verifiable; a collected episode is not found",
    async () => {
      const collected = episodeOf("temp-monitor/boiler-1", "r4");
      const gc = await runCli(
        [
          "gc",
          "--config",
          fleet.configPath,
          "--data-dir",
          fleet.dataDir,
          "--now",
          String(Date.now() + 40 * 86_400_000),
          "--json",
        ],
        { timeoutMs: SLOW },
      );
      // A failure says why. It failed twice in CI: the WAL deleted under the command's store by this test's own
      // connection closing (gateway/store/files.ts `ensurePrivateFile`; test/store.test.ts "the WAL file").
      if (gc.code !== 0) throw new Error(`fleet gc exited ${gc.code}: ${gc.stderr}${gc.stdout}`);
      expect(gc.json).toMatchObject({
        tombstoned: 0,
        checkpointsDeleted: 0,
        episodesDeleted: 18,
        stimuliForgotten: 17, // d4 is dropped (quarantine_days), its id remembered dedup_days more
        quarantineExpired: 1,
      });

      const v = await fleet.cli("verify");
      expect(v.code).toBe(0);
      expect(v.json).toEqual({ agents: 3, checkpoints: 17, episodes: 0, problems: [] });

      // Its row is collected too: an unknown episode, as `fleet show` says it.
      const r = await fleet.cli("replay", collected.id);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(`fleet: no episode starts with ${collected.id}\n`);
    },
    SLOW,
  );
});
