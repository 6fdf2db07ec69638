/**
 * `fleet reshard` (docs/shards.md): offline, each agent's chain moves whole into the data dir of
 * its owner under the new shard count, and every chain verifies there. Sources are data dirs
 * filled through the gateway's own commit path (test/helpers/ops.ts), one with a collected prefix.
 */
import type { InValue } from "@libsql/client";
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { gcAll, reshard, ReshardError, sessionsToDrop, shardChangeRefusal } from "../gateway/ops/index.ts";
import { blake3Hex } from "../gateway/hash.ts";
import { startTicks } from "../gateway/pids.ts";
import { ownerShard } from "../gateway/shard.ts";
import { Rollouts } from "../gateway/fleet/index.ts";
import type { SpecVersion } from "../gateway/spec/index.ts";
import { idBytesSql, idOfSql, type RolloutState, Store } from "../gateway/store/index.ts";
import type { Blake3Hex } from "../gateway/types.ts";
import { runCli, zombie } from "./helpers/gateway.ts";
import { HOUR, SyntheticFleet } from "./helpers/ops.ts";
import { counterType, fleetHeader, q } from "./helpers/toml.ts";

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "fleet-reshard-"));
  dirs.push(d);
  return d;
}

const T0 = Date.UTC(2026, 10, 1);

/** Two data dirs holding disjoint agents, as two shards (or two old gateways) would. */
async function sources(): Promise<{ a: SyntheticFleet; b: SyntheticFleet; root: string }> {
  const root = tempDir();
  const keys = (p: string) => Array.from({ length: 40 }, (_, i) => `${p}${i}`);
  const a = await SyntheticFleet.create(join(root, "a"), {
    types: [{ name: "temp", keys: keys("a") }],
    keep: 3,
    episodesDays: 30,
    dedupDays: 30,
  });
  const b = await SyntheticFleet.create(join(root, "b"), {
    types: [
      { name: "temp", keys: keys("b") },
      { name: "door", keys: keys("d").slice(0, 10) },
    ],
    keep: 0,
    episodesDays: 30,
    dedupDays: 30,
  });
  await a.commit(400, T0, 1000);
  await b.commit(500, T0, 1000);
  // Retention collected a's oldest checkpoints: those chains verify from their anchors.
  await gcAll(a.store, a.spec.spec, { now: T0 + HOUR });
  // Queued work, a wake-up and an unsent output must move too.
  const enc = new TextEncoder();
  await a.store.intake([
    {
      agent: "temp/a1" as never,
      type: "temp",
      key: "a1",
      sid: "q:1" as never,
      kind: "mqtt",
      topic: "t",
      payload: enc.encode("{}"),
      receivedAt: T0 + HOUR,
    },
  ]);
  const [ep] = (
    await b.store.client.execute(`SELECT ${idOfSql("id")} AS id FROM episodes WHERE agent = 'door/d3' LIMIT 1`)
  ).rows;
  await b.store.client.execute({
    sql: `INSERT INTO wakeups (id, gateway, agent, due_at, payload, set_by, created_at)
      VALUES (?, ?, 'door/d3', ?, '{}', ?, ?)`,
    args: [`${ep!.id}.w0`, b.store.gatewayId, T0 + 2 * HOUR, String(ep!.id), T0],
  });
  await b.store.client.execute({
    sql: "INSERT INTO outbox (episode, seq, topic, payload, qos, retain, created_at) VALUES (?, 0, 'x', '{}', 1, 0, ?)",
    args: [String(ep!.id), T0],
  });
  await a.close();
  await b.close();
  return { a, b, root };
}

/** Three code bundles, oldest first, saved in `db` (the same hashes in every data dir). */
async function codes(db: Store): Promise<[Blake3Hex, Blake3Hex, Blake3Hex]> {
  const save = async (code: string) => {
    const hash = (await blake3Hex(code)) as Blake3Hex;
    await db.saveBundle({ hash, module: "/m/temp.ts", code, at: T0 });
    return hash;
  };
  return [await save("// older"), await save("// old"), await save("// young")];
}

/** A rollout as a gateway leaves it (fleet/rollouts.ts): its row, a `started` step and, once decided, its verdict. */
async function addRollout(
  db: Store,
  r: { type: string; from: string; to: string; state: RolloutState; canary: number; at: number },
): Promise<void> {
  const decided = r.state === "canary" ? null : r.at + 60_000;
  const [row] = (
    await db.client.execute({
      sql: `INSERT INTO rollouts (gateway, type, from_bundle, to_bundle, canary, min_episodes, max_failure_rate,
        bake_ms, state, reason, started_at, decided_at) VALUES (?, ?, ?, ?, ?, 50, 0.05, 600000, ?, ?, ?, ?)
        RETURNING id`,
      args: [db.gatewayId, r.type, r.from, r.to, r.canary, r.state, decided && "decided", r.at, decided],
    })
  ).rows;
  for (const [step, at] of [["started", r.at] as const, ...(decided ? [[r.state, decided] as const] : [])])
    await db.client.execute({
      sql: "INSERT INTO rollout_steps (rollout, at, step, detail) VALUES (?, ?, ?, '{}')",
      args: [Number(row!.id), at, step],
    });
}

/** A data dir's rollouts in id order, each with its steps (ids left out: they are renumbered). */
async function rollouts(dbPath: string): Promise<Record<string, unknown>[]> {
  const s = await Store.open(dbPath, { synchronous: "normal", readonly: true });
  try {
    const q = async (sql: string, ...args: InValue[]) =>
      (await s.client.execute({ sql, args })).rows.map((r) => ({ ...r }));
    const rows = await q(
      "SELECT id, type, from_bundle, to_bundle, canary, state, reason, started_at, decided_at FROM rollouts " +
        "ORDER BY id",
    );
    const out: Record<string, unknown>[] = [];
    for (const { id, ...r } of rows)
      out.push({ ...r, steps: await q("SELECT at, step FROM rollout_steps WHERE rollout = ? ORDER BY seq", id!) });
    return out;
  } finally {
    await s.close();
  }
}

/** The bundle each agent runs when a gateway starts on `sv` in this data dir (fleet/rollouts.ts). */
async function runs(dbPath: string, sv: SpecVersion, agents: readonly string[]): Promise<Map<string, string | null>> {
  const s = await Store.open(dbPath, { synchronous: "normal", readonly: true });
  try {
    const r = new Rollouts({
      store: s,
      log: pino({ level: "silent" }),
      now: () => T0 + 2 * HOUR,
      agentsOf: async (type) => agents.filter((a) => a.startsWith(`${type}/`)),
      retry: async () => {},
      wake: () => {},
    });
    await r.start(sv);
    return new Map(agents.map((a) => [a, r.bundleFor(a, a.slice(0, a.indexOf("/")), sv)]));
  } finally {
    await s.close();
  }
}

/** Per agent: what each table holds of it, as comparable values. */
async function snapshot(dbPaths: readonly string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const path of dbPaths) {
    const s = await Store.open(path, { synchronous: "normal", readonly: true });
    const q = async (sql: string) => (await s.client.execute(sql)).rows;
    const agents = await q("SELECT id, status, head_seq, head_hash, anchor_seq, anchor_hash, episodes FROM agents");
    for (const r of agents) {
      const id = String(r.id);
      const rows = async (sql: string) => JSON.stringify((await s.client.execute({ sql, args: [id] })).rows);
      out.set(
        id,
        JSON.stringify({
          agent: [r.status, r.head_seq, r.head_hash, r.anchor_seq, r.anchor_hash, r.episodes],
          checkpoints: await rows("SELECT hash, seq, parent, state FROM checkpoints WHERE agent = ? ORDER BY seq"),
          // The stimulus an episode ran is found by its sid (seqs are renumbered between dirs).
          episodes: await rows(
            `SELECT e.id, e.events_hash, s.sid, (SELECT count(*) FROM events v WHERE v.episode = e.id) AS n
              FROM episodes e LEFT JOIN stimuli s ON s.seq = e.stimulus_seq WHERE e.agent = ? ORDER BY e.id`,
          ),
          stimuli: await rows("SELECT sid, state, payload FROM stimuli WHERE agent = ? ORDER BY seq"),
          usage: await rows("SELECT window, episodes FROM budget_usage WHERE agent = ? ORDER BY window"),
          wakeups: await rows("SELECT id, due_at, state FROM wakeups WHERE agent = ?"),
          outbox: await rows(
            // The outbox names an episode by its id's text; the episode row stores its 16 bytes.
            `SELECT o.topic FROM outbox o JOIN episodes e ON e.id = ${idBytesSql("o.episode")} WHERE e.agent = ?
              ORDER BY o.id`,
          ),
        }),
      );
    }
    await s.close();
  }
  return out;
}

describe("fleet reshard", () => {
  test("2 -> 3: every agent's chain moves whole to exactly one shard, its owner; every chain verifies", async () => {
    const { a, b, root } = await sources();
    const before = await snapshot([a.dbPath, b.dbPath]);
    const report = await reshard([join(a.dir, "data"), join(b.dir, "data")], 3, join(root, "s"));
    expect(report.verified).toBe(true);
    expect(report.targets.map((t) => t.problems)).toEqual([[], [], []]);
    expect(report.agents).toBe(90);
    const outs = [1, 2, 3].map((i) => join(root, `s${i}`, "fleet.db"));
    const after = await snapshot(outs);
    expect([...after.keys()].sort()).toEqual([...before.keys()].sort());
    for (const [agent, rows] of before) expect({ agent, rows: after.get(agent) }).toEqual({ agent, rows });
    for (const [i, path] of outs.entries()) {
      const s = await Store.open(path, { synchronous: "normal", readonly: true });
      const ids = (await s.client.execute("SELECT id FROM agents")).rows.map((r) => String(r.id));
      expect(ids.filter((id) => ownerShard(id, 3) !== i + 1)).toEqual([]);
      // Every new dir can replay any episode: the spec versions came along; the gateway ids are new.
      expect((await s.client.execute("SELECT count(*) AS n FROM spec_versions")).rows[0]!.n).toBe(2);
      expect([a.store.gatewayId, b.store.gatewayId]).not.toContain(s.gatewayId);
      await s.close();
    }
    const verify = await runCli(["verify", "--data-dir", join(root, "s2")]);
    expect(verify.code).toBe(0);
  });

  test("a rolled-back canary stays rolled back and one in progress stays a canary in every new shard", async () => {
    const { b, root } = await sources();
    const db = await Store.open(b.dbPath, { synchronous: "normal" });
    const [older, old, young] = await codes(db);
    // Older history of temp first: the newest rollout of a type is the one that rules it.
    await addRollout(db, { type: "temp", from: older, to: old, state: "promoted", canary: 0.1, at: T0 });
    await addRollout(db, { type: "temp", from: old, to: young, state: "rolled_back", canary: 0.1, at: T0 + HOUR });
    await addRollout(db, { type: "door", from: old, to: young, state: "canary", canary: 0.5, at: T0 + HOUR });
    await db.close();
    const sv = { ...b.spec, bundles: { temp: young, door: young } };
    const before = await runs(b.dbPath, sv, b.agents);
    const door = b.agents.filter((a) => a.startsWith("door/"));
    // The canary share splits door's agents; every temp agent is back on the previous bundle.
    expect(new Set(door.map((a) => before.get(a)))).toEqual(new Set([old, young]));
    expect(b.agents.filter((a) => a.startsWith("temp/") && before.get(a) !== old)).toEqual([]);
    const history = await rollouts(b.dbPath);

    await reshard([join(b.dir, "data")], 2, join(root, "s"));
    for (const i of [1, 2]) {
      const path = join(root, `s${i}`, "fleet.db");
      expect({ shard: i, rollouts: await rollouts(path) }).toEqual({ shard: i, rollouts: history });
      expect({ shard: i, runs: await runs(path, sv, b.agents) }).toEqual({ shard: i, runs: before });
      const s = await Store.open(path, { synchronous: "normal", readonly: true });
      const have = (await s.client.execute("SELECT hash FROM bundles")).rows.map((r) => String(r.hash));
      expect(have).toEqual(expect.arrayContaining([old, young]));
      await s.close();
    }
  });

  test("code one shard rolled back and another promoted stays off every agent whatever the --from order", async () => {
    const { a, b, root } = await sources();
    const [dbA, dbB] = [
      await Store.open(a.dbPath, { synchronous: "normal" }),
      await Store.open(b.dbPath, { synchronous: "normal" }),
    ];
    const [, old, young] = await codes(dbA);
    await codes(dbB);
    // Each shard judged its own canaries: a's failed, b's did well.
    await addRollout(dbA, { type: "temp", from: old, to: young, state: "rolled_back", canary: 0.1, at: T0 });
    await addRollout(dbB, { type: "temp", from: old, to: young, state: "promoted", canary: 0.1, at: T0 + HOUR });
    await dbA.close();
    await dbB.close();
    const sv = { ...b.spec, bundles: { temp: young, door: old } };
    const temp = [...a.agents, ...b.agents].filter((x) => x.startsWith("temp/"));
    for (const [name, from] of [
      ["ab", [a, b]],
      ["ba", [b, a]],
    ] as const) {
      await reshard(
        from.map((f) => join(f.dir, "data")),
        3,
        join(root, name),
      );
      for (const i of [1, 2, 3]) {
        const path = join(root, `${name}${i}`, "fleet.db");
        expect((await rollouts(path)).map((r) => r.state).sort()).toEqual(["promoted", "rolled_back"]);
        const on = await runs(path, sv, temp);
        const onNew = temp.filter((x) => on.get(x) !== old);
        expect({ from: name, shard: i, onNew }).toEqual({ from: name, shard: i, onNew: [] });
      }
    }
  });

  test("the command line reports each new shard and exits 0 when every chain verifies", async () => {
    const { a, b, root } = await sources();
    const r = await runCli([
      "reshard",
      "--from",
      `${join(a.dir, "data")},${join(b.dir, "data")}`,
      "--to",
      "2",
      "--out",
      join(root, "two-"),
      "--json",
    ]);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as { verified: boolean; targets: { shard: string; agents: number }[] };
    expect(report.verified).toBe(true);
    expect(report.targets.map((t) => t.shard)).toEqual(["1/2", "2/2"]);
    expect(report.targets.reduce((n, t) => n + t.agents, 0)).toBe(90);
    const human = await runCli(["reshard", "--from", join(a.dir, "data"), "--to", "1", "--out", join(root, "one-")]);
    expect(human.code).toBe(0);
    expect(human.stdout).toContain("resharded 40 agent(s) from 1 data dir(s) into 1 shard(s)");
    expect(human.stdout).toContain("every chain verifies");
  });

  test("refuses a data dir a gateway is running on, and writes nothing", async () => {
    const { a, b, root } = await sources();
    writeFileSync(join(a.dir, "data", "gateway.json"), JSON.stringify({ pid: process.pid }));
    const err = await reshard([join(a.dir, "data"), join(b.dir, "data")], 3, join(root, "s")).catch((e) => e);
    expect(err).toBeInstanceOf(ReshardError);
    expect(err.message).toContain(`a gateway (pid ${process.pid}) is running on ${join(a.dir, "data")}`);
    expect(existsSync(join(root, "s1"))).toBe(false);
    const cli = await runCli(["reshard", "--from", join(a.dir, "data"), "--to", "2", "--out", join(root, "c")]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain("is running on");
  });

  test("a gateway.json whose pid is now another process's (started at another time) does not refuse", async () => {
    const { a, b, root } = await sources();
    const start = Number(startTicks(process.pid));
    writeFileSync(join(a.dir, "data", "gateway.json"), JSON.stringify({ pid: process.pid, pid_start: `${start + 1}` }));
    const report = await reshard([join(a.dir, "data"), join(b.dir, "data")], 2, join(root, "r"));
    expect(report.targets).toHaveLength(2);
    // The same pid with its own start time is the gateway: refused.
    writeFileSync(join(b.dir, "data", "gateway.json"), JSON.stringify({ pid: process.pid, pid_start: `${start}` }));
    const err = await reshard([join(a.dir, "data"), join(b.dir, "data")], 2, join(root, "q")).catch((e) => e);
    expect(err).toBeInstanceOf(ReshardError);
    expect(err.message).toContain(`a gateway (pid ${process.pid}) is running on ${join(b.dir, "data")}`);
  });

  test("a gateway.json whose gateway was killed but not reaped yet (a zombie) does not refuse", async () => {
    const { a, b, root } = await sources();
    const z = await zombie();
    try {
      writeFileSync(join(a.dir, "data", "gateway.json"), JSON.stringify({ pid: z.pid }));
      const report = await reshard([join(a.dir, "data"), join(b.dir, "data")], 2, join(root, "z"));
      expect(report.targets).toHaveLength(2);
    } finally {
      z.end();
    }
  });

  test("refuses an agent found in two data dirs, a non-empty output and a dir without fleet data", async () => {
    const { a, root } = await sources();
    const copy = join(root, "copy");
    mkdirSync(copy);
    const s = await Store.open(a.dbPath, { synchronous: "normal" });
    await s.client.execute({ sql: "VACUUM INTO ?", args: [join(copy, "fleet.db")] });
    await s.close();
    const twice = await reshard([join(a.dir, "data"), copy], 2, join(root, "t")).catch((e) => e);
    expect(twice.message).toMatch(/agent temp\/a\d+ is in both/);
    expect(readdirSync(root).filter((f) => f.startsWith("t"))).toEqual([]);

    mkdirSync(join(root, "u1"));
    writeFileSync(join(root, "u1", "x"), "");
    const taken = await reshard([join(a.dir, "data")], 2, join(root, "u")).catch((e) => e);
    expect(taken.message).toContain("exists and is not empty");

    const empty = await reshard([join(root, "nothing")], 2, join(root, "v")).catch((e) => e);
    expect(empty.message).toContain("no fleet data in");
    const self = await reshard([join(root, "w1")], 2, join(root, "w")).catch((e) => e);
    expect(self).toBeInstanceOf(ReshardError);
  });

  test("a data dir named twice in --from is refused (exit 2), by its real path too; nothing is written", async () => {
    const { a, root } = await sources();
    const dir = join(a.dir, "data");
    symlinkSync(dir, join(root, "alias"));
    for (const from of [`${dir},${dir}`, `${dir},${join(root, "alias")}`]) {
      const r = await runCli(["reshard", "--from", from, "--to", "3", "--out", join(root, "n-")]);
      expect({ from, code: r.code }).toEqual({ from, code: 2 });
      expect(r.stderr).toContain("twice");
    }
    expect(await reshard([dir, `${dir}/`], 2, join(root, "m")).catch((e) => e)).toBeInstanceOf(ReshardError);
    expect(readdirSync(root).filter((f) => f.startsWith("n-") || f.startsWith("m"))).toEqual([]);
  });

  test("a shard whose sibling is not among the sources is refused unless --partial, naming it", async () => {
    const { a, b, root } = await sources();
    // Two shards as reshard writes them (each knows it is i/2 until its gateway starts on it).
    await reshard([join(a.dir, "data"), join(b.dir, "data")], 2, join(root, "s"));
    const [s1, s2] = [join(root, "s1"), join(root, "s2")];
    const refused = await reshard([s1], 3, join(root, "n")).catch((e) => e);
    expect(refused).toBeInstanceOf(ReshardError);
    expect(refused.message).toContain("2/2 is not among the sources");
    expect(refused.message).toContain(`${s1} is shard 1/2`);
    expect(refused.message).toContain("--partial");
    expect(existsSync(join(root, "n1"))).toBe(false);
    const cli = await runCli(["reshard", "--from", s1, "--to", "3", "--out", join(root, "c")]);
    expect([cli.code, cli.stderr.includes("2/2 is not among the sources")]).toEqual([1, true]);
    // Asked for: only shard 1's agents move, and the report says what was left out.
    const partial = await runCli(["reshard", "--from", s1, "--to", "3", "--out", join(root, "p"), "--partial"]);
    expect(partial.code).toBe(0);
    expect(partial.stdout).toContain("partial: 2/2 of the old layout were not among --from");
    // Both shards: the layout is whole.
    expect((await reshard([s1, s2], 3, join(root, "w"))).left_out).toEqual([]);
    // A dir whose gateway last ran as shard 1/2 of another layout (its spec says so) knows it too.
    const ran = await SyntheticFleet.create(join(root, "ran"), {
      types: [{ name: "temp", keys: ["r1"] }],
      keep: 0,
      episodesDays: 30,
      dedupDays: 30,
    });
    const text = `[fleet]\nname = "plant"\nshard = "1/2"\n`;
    await ran.store.saveSpecVersion({ hash: "e".repeat(64), path: "fleet.toml", text, summary: "", at: 1 });
    await ran.store.setMeta("instances_deployed", "e".repeat(64));
    await ran.close();
    const sharded = await reshard([join(ran.dir, "data")], 2, join(root, "r")).catch((e) => e);
    expect(sharded.message).toContain("2/2 is not among the sources");
  });

  test("a gateway does not start on a data dir of another shard: refused, naming both; nothing written", async () => {
    const { a, b, root } = await sources();
    await reshard([join(a.dir, "data"), join(b.dir, "data")], 2, join(root, "s"));
    const s1 = join(root, "s1");
    const start = (shard: string | null) => {
      const toml = join(root, `fleet-${shard?.replace("/", "-") ?? "none"}.toml`);
      const fleet = `data_dir = ${q(s1)}${shard === null ? "" : `\nshard = ${q(shard)}`}`;
      const broker = 'url = "mqtt://127.0.0.1:22549"\nclient_id = "gw-plant"';
      writeFileSync(toml, fleetHeader("plant", { fleet, broker }) + counterType("temp", "t/+/in"));
      return runCli(["start", "--config", toml, "--http-port", "22548"], { timeoutMs: 30_000 });
    };
    const grown = await start("1/3");
    expect([grown.code, grown.stderr]).toEqual([1, expect.stringContaining(`the data dir ${s1} is shard 1/2`)]);
    expect(grown.stderr).toContain('fleet.toml says shard = "1/3"');
    expect(grown.stderr).toContain("needs `fleet reshard`");
    const sibling = await start("2/2");
    expect([sibling.code, sibling.stderr]).toEqual([1, expect.stringContaining("point data_dir at shard 2/2's")]);
    const unsharded = await start(null);
    expect([unsharded.code, unsharded.stderr]).toEqual([1, expect.stringContaining("fleet.toml says unsharded")]);
    // Shrinking 2 -> 1 leaves shard 2's session: the new dir's gateway ends it (and -shard-1: it runs unsharded),
    // and the unsharded <client_id> has no session yet: said so.
    const shrunk = await reshard([s1, join(root, "s2")], 1, join(root, "one"));
    expect([shrunk.ended_sessions, shrunk.new_sessions]).toEqual([[1, 2], [0]]);
    // Growing 2 -> 3: shard 3 has no session yet; nothing to end.
    const grown3 = await reshard([s1, join(root, "s2")], 3, join(root, "three"));
    expect([grown3.ended_sessions, grown3.new_sessions]).toEqual([[], [3]]);
    const said = await runCli([
      "reshard",
      "--from",
      `${s1},${join(root, "s2")}`,
      "--to",
      "3",
      "--out",
      join(root, "t"),
    ]);
    expect(said.stdout).toContain("the broker has no session <client_id>-shard-3 yet");
    const one = await Store.open(join(root, "one1", "fleet.db"), { synchronous: "normal", readonly: true });
    try {
      expect(await sessionsToDrop(one, "gw-plant")).toEqual(["gw-plant-shard-1", "gw-plant-shard-2"]);
    } finally {
      await one.close();
    }
    // `reshard --to 1` writes 1/1 and advises running the gateway unsharded: both own every agent.
    expect(shardChangeRefusal(s1, { known: true, shard: { index: 1, count: 1 } }, null)).toBeNull();
    const store = await Store.open(join(s1, "fleet.db"), { synchronous: "normal", readonly: true });
    try {
      // No gateway ran on it: it still says it is 1/2 as reshard wrote it, with no spec of its own.
      expect(await store.getMeta("instances_deployed")).toBeNull();
      expect(await store.getMeta("reshard.shard")).toBe("1/2");
    } finally {
      await store.close();
    }
  }, 120_000);

  const DOUBLED =
    "shrinking 3 -> 2 reports the moved agents of types without a dedup key (their readings can run twice), " +
    "not those of a type with one or those that stay on their shard";
  test(DOUBLED, async () => {
    const { a, b, root } = await sources();
    await reshard([join(a.dir, "data"), join(b.dir, "data")], 3, join(root, "s"));
    const three = [1, 2, 3].map((i) => join(root, `s${i}`));
    // Each shard's gateway ran on a fleet.toml where door has a dedup key and temp has none.
    for (const [k, dir] of three.entries()) {
      const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
      const text = `[fleet]\nname = "plant"\nshard = "${k + 1}/3"\n[agents.door]\ndedup = "id"\n[agents.temp]\n`;
      const hash = await blake3Hex(text);
      await store.saveSpecVersion({ hash, path: "fleet.toml", text, summary: "", at: 1 });
      await store.setMeta("instances_deployed", hash);
      await store.close();
    }
    const ids = [...(await snapshot(three.map((d) => join(d, "fleet.db")))).keys()];
    // Shard 3's agents move to 1 or 2; the others stay where they were (rendezvous hashing).
    const moved = ids.filter((id) => id.startsWith("temp/") && ownerShard(id, 3) === 3).length;
    expect(moved).toBeGreaterThan(0);
    expect(ids.some((id) => id.startsWith("door/") && ownerShard(id, 3) === 3)).toBe(true);
    const report = await reshard(three, 2, join(root, "two"));
    expect(report.moved_without_dedup).toEqual([{ type: "temp", agents: moved }]);
    const said = await runCli(["reshard", "--from", three.join(","), "--to", "2", "--out", join(root, "t")]);
    expect({ code: said.code, stderr: said.stderr }).toEqual({ code: 0, stderr: "" });
    expect(said.stdout).toContain(`warning: ${moved} temp agent(s) now read another broker session than before`);
    expect(said.stdout).toContain("Nothing doubles when the old gateways stopped together");
  });

  test("bad command lines are usage errors (exit 2)", async () => {
    for (const args of [
      ["reshard"],
      ["reshard", "--from", "a", "--to", "2"],
      ["reshard", "--from", "a", "--out", "p"],
      ["reshard", "--from", "a", "--to", "0", "--out", "p"],
      ["reshard", "--from", "a", "--to", "65", "--out", "p"],
      ["reshard", "--from", "a", "--to", "two", "--out", "p"],
    ]) {
      const r = await runCli(args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
    }
  });
});
