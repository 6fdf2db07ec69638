/**
 * Versioned migrations: a data dir written by an older release upgrades at start in one
 * transaction and still verifies; a data dir written by newer code is refused untouched.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { chmodSync, copyFileSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import pino from "pino";
import { defaultSpawnOptions } from "../gateway/episode/index.ts";
import { replayEpisode, verifyStore } from "../gateway/ops/index.ts";
import {
  bundleOfSql,
  idOfSql,
  MIGRATIONS,
  type Migration,
  migrate,
  SCHEMA_VERSION,
  SchemaVersionError,
  Store,
  schemaVersion,
  STATUS_COMMITTED,
  STATUS_FAILED,
  stimulusKind,
} from "../gateway/store/index.ts";
import type { AgentId, NewStimulus, StimulusId } from "../gateway/types.ts";
import { runCli } from "./helpers/gateway.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";
import { inProcessGateway } from "./helpers/in-process.ts";

const FIXTURE = join(import.meta.dir, "fixtures/datadir-v1/fleet.db");
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A private copy of the release-0.1 data dir's database. */
function fixtureCopy(): string {
  const dir = mkdtempSync(join(tmpdir(), "fleet-migrate-"));
  dirs.push(dir);
  const path = join(dir, "fleet.db");
  copyFileSync(FIXTURE, path);
  return path;
}

async function versionOf(path: string): Promise<number> {
  const c = createClient({ url: `file:${path}` });
  try {
    return await schemaVersion(c);
  } finally {
    c.close();
  }
}

describe("schema migrations", () => {
  test("a release 0.1 data dir opens with the current code, is at the current version and verifies", async () => {
    const path = fixtureCopy();
    expect(await versionOf(path)).toBe(1);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      expect(await versionOf(path)).toBe(SCHEMA_VERSION);
      const report = await verifyStore(store);
      expect(report).toMatchObject({ agents: 3, checkpoints: 12, episodes: 12, problems: [] });
    } finally {
      await store.close();
    }
  });

  test("read commands on a data dir not upgraded yet: what they can read, else one line: upgrade it", async () => {
    const path = fixtureCopy();
    const dir = join(path, "..");
    const agents = await runCli(["agents", "--data-dir", dir, "--json"]);
    expect(agents.code).toBe(0);
    expect(agents.json.total).toBe(3);
    const status = await runCli(["status", "--data-dir", dir]);
    expect(status.code).toBe(1);
    expect(status.stderr.trim().split("\n")).toHaveLength(1);
    expect(status.stderr).toContain(`has schema version 1, older than this code's ${SCHEMA_VERSION}`);
    expect(status.stderr).toContain("`fleet start` upgrades it (irreversible; `fleet backup` first)");
    const quarantine = await runCli(["quarantine", "--data-dir", dir]);
    expect(quarantine.code).toBe(1);
    expect(quarantine.stderr).toContain(`has schema version 1, older than this code's ${SCHEMA_VERSION}`);
    expect(await versionOf(path)).toBe(1); // read-only: nothing was upgraded
  });

  test("read commands that look episodes up refuse a schema storing ids and outcomes in the old form", async () => {
    // Schema 23 stores episode ids as text and outcomes as words: lookups by this code's forms find nothing.
    const path = fixtureCopy();
    const dir = dirname(path);
    const c = createClient({ url: `file:${path}` });
    await migrate(c, path, MIGRATIONS.slice(0, 23));
    c.close();
    const listed = await runCli(["episodes", "temp-monitor/boiler-1", "--data-dir", dir, "--json"]);
    expect(listed.code).toBe(0);
    const ids = (listed.json.episodes as { id: string }[]).map((e) => e.id);
    expect(ids).toHaveLength(4);
    const config = join(dirname(FIXTURE), "fleet.toml");
    const commands = [
      ["show", ids[0]!.slice(0, 13)],
      ["show", ids[0]!],
      ["trace", ids[0]!],
      ["replay", ids[0]!],
      ["replay", "--agent", "temp-monitor/boiler-1"],
      ["episodes", "temp-monitor/boiler-1", "--status", "committed"],
      ["deploy", "--check", "--type", "temp-monitor", "--config", config],
    ];
    for (const args of commands) {
      const r = await runCli([...args, "--data-dir", dir]);
      expect({ args, code: r.code, stdout: r.stdout }).toEqual({ args, code: 1, stdout: "" });
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
      expect(r.stderr).toContain(`has schema version 23, older than this code's ${SCHEMA_VERSION}`);
      expect(r.stderr).toContain("`fleet start` upgrades it (irreversible; `fleet backup` first)");
    }
    expect(await versionOf(path)).toBe(23);
  });

  test("offline commands that write refuse a data dir an older release wrote and change nothing", async () => {
    const path = fixtureCopy();
    const dir = dirname(path);
    const before = readFileSync(path);
    const commands = [
      ["gc", "--dry-run"],
      ["token", "add", "ops", "--scope", "read"],
      ["pause", "temp-monitor/boiler-1"],
      ["retire", "temp-monitor/boiler-1", "--drain"],
      ["quarantine", "retry", "1"],
    ];
    for (const args of commands) {
      const r = await runCli([...args, "--data-dir", dir]);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr.trim()).toBe(
        `fleet: ${dir} was written by an older release (schema 1; this one is ${SCHEMA_VERSION}): ` +
          "`fleet start` upgrades it (irreversible; `fleet backup` first); nothing was changed",
      );
    }
    expect(await versionOf(path)).toBe(1);
    expect(readFileSync(path).equals(before)).toBe(true);
    expect(existsSync(join(dir, "tokens.json"))).toBe(false);
  });

  test("a gateway's start upgrades an older data dir and logs one line saying from which schema", async () => {
    const path = fixtureCopy();
    const dir = dirname(path);
    chmodSync(dir, 0o755); // episodes run as other uids when root
    const configPath = join(dir, "fleet.toml");
    writeFileSync(configPath, fleetHeader("upgrade") + counterType("counter", "c/+/in"));
    const lines: { msg?: string }[] = [];
    const logger = pino({ level: "info" }, { write: (line: string) => lines.push(JSON.parse(line)) });
    const gateway = inProcessGateway(configPath, dir, { logger });
    await gateway.start();
    await gateway.stop();
    const upgraded = lines.filter((l) => l.msg?.startsWith("data dir upgraded"));
    expect(upgraded).toEqual([
      expect.objectContaining({ from: 1, to: SCHEMA_VERSION, msg: expect.stringContaining(`1 to ${SCHEMA_VERSION}`) }),
    ]);
    expect(await versionOf(path)).toBe(SCHEMA_VERSION);
  });

  test("an episode from before code bundles whose module is gone replays as UNREPLAYABLE, saying why", async () => {
    const store = await Store.open(fixtureCopy(), { synchronous: "full", upgrade: true });
    try {
      const [ep] = await store.listEpisodes("temp-monitor/boiler-1" as AgentId, 1);
      const r = await replayEpisode(store, ep!.id, defaultSpawnOptions());
      expect(r).toMatchObject({ verdict: "UNREPLAYABLE", reason: expect.stringContaining("is no longer there") });
    } finally {
      await store.close();
    }
  });

  test("an episode from before code bundles replays on its module file as it is now, and says so", async () => {
    const path = fixtureCopy();
    // Its module file, as it is now, where its spec version says (moved into the copy's folder).
    const root = join(path, "..");
    chmodSync(root, 0o755); // agents may run as another uid (a gateway run as root)
    cpSync(join(import.meta.dir, "../agents"), join(root, "agents"), { recursive: true });
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    let id: string;
    try {
      const moved = "UPDATE spec_versions SET text = replace(text, '/work/wt-bench/agents/', ?)";
      await store.client.execute({ sql: moved, args: [`${root}/agents/`] });
      const [ep] = await store.listEpisodes("temp-monitor/boiler-1" as AgentId, 1);
      id = ep!.id;
      const r = await replayEpisode(store, id, defaultSpawnOptions());
      const module = join(root, "agents/examples/temp-monitor.ts");
      expect(r).toMatchObject({ verdict: "MATCH" });
      expect(r).toMatchObject({ note: `code not pinned: ran the module file as it is now (${module})` });
    } finally {
      await store.close();
    }
    const json = await runCli(["replay", id, "--data-dir", root, "--json"]);
    expect((json.json as { note?: string }).note).toContain("code not pinned: ran the module file as it is now");
    const human = await runCli(["replay", id, "--data-dir", root]);
    expect(human.stdout).toContain("code not pinned: ran the module file as it is now");
  });

  test("pending migrations apply in order, in one transaction with the version bump", async () => {
    const path = fixtureCopy();
    const next: Migration[] = [
      ...MIGRATIONS,
      {
        version: SCHEMA_VERSION + 1,
        name: "test: a note per agent",
        statements: ["CREATE TABLE agent_notes (agent TEXT PRIMARY KEY, note TEXT NOT NULL)"],
      },
    ];
    const c = createClient({ url: `file:${path}` });
    try {
      expect(await migrate(c, path, next)).toEqual({ from: 1, to: SCHEMA_VERSION + 1 });
      expect(await schemaVersion(c)).toBe(SCHEMA_VERSION + 1);
      // Applying again is a no-op.
      expect(await migrate(c, path, next)).toEqual({ from: SCHEMA_VERSION + 1, to: SCHEMA_VERSION + 1 });
      const tables = await c.execute("SELECT name FROM sqlite_master WHERE name = 'agent_notes'");
      expect(tables.rows).toHaveLength(1);
    } finally {
      c.close();
    }
  });

  test("two processes migrating one file at once: the second applies only what the first did not yet", async () => {
    const path = fixtureCopy();
    const first = createClient({ url: `file:${path}` });
    const second = createClient({ url: `file:${path}` });
    await second.execute("PRAGMA busy_timeout = 5000");
    // The second reads version 1, then the first migrates the whole way before the second takes the write lock.
    const racing = new Proxy(second, {
      get(target, key) {
        if (key === "transaction")
          return async (mode: "write") => {
            await migrate(first, path);
            return target.transaction(mode);
          };
        const v = Reflect.get(target, key) as unknown;
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
    try {
      expect(await migrate(racing, path)).toEqual({ from: SCHEMA_VERSION, to: SCHEMA_VERSION });
      expect(await schemaVersion(second)).toBe(SCHEMA_VERSION);
    } finally {
      first.close();
      second.close();
    }
  });

  test("a migration that fails leaves the old schema and version whole", async () => {
    const path = fixtureCopy();
    const broken: Migration[] = [
      ...MIGRATIONS,
      {
        version: SCHEMA_VERSION + 1,
        name: "test: half good, half broken",
        statements: ["CREATE TABLE half_done (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y INTEGER"],
      },
    ];
    const c = createClient({ url: `file:${path}` });
    try {
      const before = await schemaVersion(c);
      await expect(migrate(c, path, broken)).rejects.toThrow(/no_such_table/);
      expect(await schemaVersion(c)).toBe(before);
      const left = await c.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'");
      expect(left.rows).toHaveLength(0);
    } finally {
      c.close();
    }
  });

  test("a data dir from newer code is refused with a clear error and left untouched", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    await c.execute({
      sql: "UPDATE meta SET value = ? WHERE key = 'schema_version'",
      args: [String(SCHEMA_VERSION + 5)],
    });
    c.close();
    const bytes = readFileSync(path);
    for (const readonly of [false, true]) {
      const err = await Store.open(path, { synchronous: "full", readonly }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(SchemaVersionError);
      expect((err as SchemaVersionError).found).toBe(SCHEMA_VERSION + 5);
      expect((err as Error).message).toContain(`newer than this code's ${SCHEMA_VERSION}`);
    }
    expect(readFileSync(path).equals(bytes)).toBe(true);
  });

  test("older episodes learn their stimulus kind, from the event log where the stimulus was forgotten", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    // Retention forgot half of the dedup memory before the upgrade.
    await c.execute("DELETE FROM stimuli WHERE seq IN (SELECT stimulus_seq FROM episodes ORDER BY id LIMIT 6)");
    c.close();
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const kinds = await store.client.execute(
        `SELECT ${stimulusKind.ofSql("stimulus_kind")} AS kind, count(*) AS n FROM episodes GROUP BY stimulus_kind`,
      );
      expect(kinds.rows.map((r) => ({ kind: r.kind, n: Number(r.n) }))).toEqual([{ kind: "manual", n: 12 }]);
      // One index serves an agent's history with and without a kind filter, in time order (no sort).
      for (const kind of ["", `AND stimulus_kind = ${stimulusKind.sql("mqtt")} `]) {
        const plan = await store.client.execute(
          `EXPLAIN QUERY PLAN SELECT * FROM episodes WHERE agent = 'a/b' ${kind}ORDER BY started_at DESC LIMIT 50`,
        );
        const detail = plan.rows.map((r) => String(r.detail)).join("\n");
        expect(detail).toContain("USING INDEX episodes_agent (agent=?)");
        expect(detail).not.toContain("TEMP B-TREE");
      }
    } finally {
      await store.close();
    }
  });

  test("older event logs move into their episode rows whole: the same rows read back, and verify says OK", async () => {
    const path = fixtureCopy();
    const rows = async (c: ReturnType<typeof createClient>) =>
      // Episode ids are stored as their 16 bytes since migration 25: read as their text.
      (await c.execute(`SELECT ${idOfSql("episode")}, seq, kind, data FROM events ORDER BY episode, seq`)).rows.map(
        (r) => [r[0], r.seq, r.kind, r.data].map(String),
      );
    const c = createClient({ url: `file:${path}` });
    const before = await rows(c);
    c.close();
    expect(before.length).toBeGreaterThan(12);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      expect(await rows(store.client)).toEqual(before);
      // No table of events is left: each log is its episode row's `log`, read through the view.
      const objects = await store.client.execute("SELECT type, name FROM sqlite_master WHERE tbl_name = 'events'");
      expect(objects.rows.map((r) => [r.type, r.name])).toEqual([["view", "events"]]);
      const logs = await store.client.execute("SELECT count(*) AS n FROM episodes WHERE json_array_length(log) > 0");
      expect(Number(logs.rows[0]!.n)).toBe(new Set(before.map((r) => r[0])).size);
      expect((await verifyStore(store)).problems).toEqual([]);
      // The hash still covers the log: one changed byte of one event is found.
      const [first] = before;
      await store.client.execute({
        sql: `UPDATE episodes SET log = jsonb_set(log, '$[0][1]', json_object('tampered', 1))
          WHERE ${idOfSql("id")} = ?`,
        args: [first![0]!],
      });
      const problems = (await verifyStore(store)).problems;
      expect(problems.map((p) => [p.record, p.problem.split(" (")[0]])).toEqual([
        [`episode ${first![0]}`, "event log hash mismatch"],
      ]);
    } finally {
      await store.close();
    }
  });

  test("an older event whose data is not JSON does not stop the upgrade; verify reports its episode", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const [ep] = (await c.execute("SELECT episode FROM events ORDER BY episode LIMIT 1")).rows.map((r) => r.episode);
    await c.execute({ sql: "UPDATE events SET data = '{broken' WHERE episode = ? AND seq = 0", args: [ep!] });
    c.close();
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      expect(await versionOf(path)).toBe(SCHEMA_VERSION);
      const kept = await store.client.execute({
        sql: `SELECT data FROM events WHERE ${idOfSql("episode")} = ? AND seq = 0`,
        args: [ep!],
      });
      expect(kept.rows[0]!.data).toBe('"{broken"');
      const problems = (await verifyStore(store)).problems;
      expect(problems.map((p) => p.record)).toEqual([`episode ${String(ep)}`]);
    } finally {
      await store.close();
    }
  });

  test("stimuli, episodes and checkpoints of an older data dir stop repeating its gateway id, rows kept", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const count = async (client: ReturnType<typeof createClient>, table: string) =>
      Number((await client.execute(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
    const tables = ["stimuli", "episodes", "checkpoints"];
    const before = await Promise.all(tables.map((tb) => count(c, tb)));
    const ids = await c.execute(
      "SELECT DISTINCT gateway FROM episodes UNION SELECT value FROM meta WHERE key = 'gateway_id'",
    );
    c.close();
    // One gateway wrote everything: the id the rows repeated is the data dir's own.
    expect(ids.rows).toHaveLength(1);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      expect(store.gatewayId).toBe(String(ids.rows[0]![0]));
      expect(await Promise.all(tables.map((tb) => count(store.client, tb)))).toEqual(before);
      for (const tb of tables) {
        const cols = (await store.client.execute(`PRAGMA table_info(${tb})`)).rows.map((r) => String(r.name));
        expect(cols).not.toContain("gateway");
      }
      expect((await verifyStore(store)).problems).toEqual([]);
    } finally {
      await store.close();
    }
  });

  test("older episodes' hashes become their 32 bytes, read back as the same hex, and verify says OK", async () => {
    // Checkpoints' parents and spec versions too (migration 21): verify recomputes every sealed hash from them.
    const path = fixtureCopy();
    const cols = "id, checkpoint, parent, events_hash, spec_version";
    const c = createClient({ url: `file:${path}` });
    const before = (await c.execute(`SELECT ${cols} FROM episodes ORDER BY id`)).rows.map((r) => ({
      id: r.id,
      checkpoint: r.checkpoint,
      parent: r.parent,
      events_hash: r.events_hash,
      spec_version: r.spec_version,
    }));
    c.close();
    expect(before.length).toBeGreaterThan(0);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const raw = await store.client.execute(
        "SELECT count(*) AS n FROM episodes WHERE typeof(events_hash) = 'blob' AND length(events_hash) = 32",
      );
      expect(Number(raw.rows[0]!.n)).toBe(before.length);
      // Spec versions are named by their first 6 bytes since migration 27, episodes and checkpoints alike.
      const refs = await store.client.execute(
        "SELECT (SELECT count(*) FROM episodes WHERE length(spec_version) = 6) AS e, " +
          "(SELECT count(*) FROM checkpoints WHERE length(spec_version) = 6) AS c, " +
          "(SELECT count(*) FROM checkpoints) AS n",
      );
      expect({ ...refs.rows[0] }).toMatchObject({ e: before.length, c: Number(refs.rows[0]!.n) });
      const ids = await store.client.execute(`SELECT ${idOfSql("id")} AS id FROM episodes ORDER BY id`);
      const after = ids.rows.map(async (r) => {
        const ep = (await store.getEpisode(String(r.id)))!;
        const { id, checkpoint, parent, eventsHash, specVersion } = ep;
        return { id, checkpoint, parent, events_hash: eventsHash, spec_version: specVersion };
      });
      expect<unknown[]>(await Promise.all(after)).toEqual(before);
      // Every checkpoint is still found by its hash (its table rebuilt without the key, migration 28).
      const sealed = before.map((r) => r.checkpoint).filter((h) => h !== null);
      expect(sealed.length).toBeGreaterThan(0);
      for (const h of sealed) expect((await store.getCheckpoint(String(h)))?.hash).toBe(String(h));
      expect((await verifyStore(store)).problems).toEqual([]);
    } finally {
      await store.close();
    }
  });

  test("an older data dir's stimuli stay deduplicated once their index is keyed by id first", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const rows = (await c.execute("SELECT agent, sid, kind, topic FROM stimuli ORDER BY seq")).rows;
    c.close();
    expect(rows.length).toBeGreaterThan(0);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const cols = await store.client.execute("SELECT name FROM pragma_index_info('stimuli_dedup') ORDER BY seqno");
      expect(cols.rows.map((r) => String(r.name))).toEqual(["sid", "agent"]);
      const again = (r: (typeof rows)[number], agent = String(r.agent)) => ({
        agent: agent as AgentId,
        type: agent.split("/")[0]!,
        key: agent.split("/")[1]!,
        sid: String(r.sid) as StimulusId,
        kind: String(r.kind) as NewStimulus["kind"],
        topic: r.topic === null ? null : String(r.topic),
        payload: new Uint8Array(),
        receivedAt: Date.now(),
      });
      // Every stimulus the old release recorded is still known: sent again, it is a duplicate.
      const outcomes = await store.intake(rows.map((r) => again(r)));
      expect(outcomes.map((o) => o.seq)).toEqual(rows.map(() => null));
      // The same id for an agent that never had it is a new stimulus.
      const [other] = await store.intake([again(rows[0]!, "other/agent")]);
      expect(other!.seq).not.toBeNull();
    } finally {
      await store.close();
    }
  });

  test("older episode ids become their 16 bytes wherever they are stored and read back as the same text", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const text = async (sql: string) => (await c.execute(sql)).rows.map((r) => String(r[0]));
    const episodes = await text("SELECT id FROM episodes ORDER BY id");
    const checkpoints = await text("SELECT episode FROM checkpoints ORDER BY hash");
    const stimuli = await text("SELECT episode FROM stimuli WHERE episode IS NOT NULL ORDER BY seq");
    c.close();
    expect(episodes.length).toBe(12);
    expect(stimuli.length).toBeGreaterThan(0);
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const raw = await store.client.execute(
        `SELECT (SELECT count(*) FROM episodes WHERE typeof(id) = 'blob' AND length(id) = 16) AS e,
          (SELECT count(*) FROM checkpoints WHERE typeof(episode) = 'blob' AND length(episode) = 16) AS c,
          (SELECT count(*) FROM stimuli WHERE typeof(episode) = 'blob' AND length(episode) = 16) AS s`,
      );
      expect({ ...raw.rows[0] }).toMatchObject({ e: 12, c: checkpoints.length, s: stimuli.length });
      // Read back as the same text, in the same order, through every reader.
      const read = await store.client.execute(`SELECT ${idOfSql("id")} FROM episodes ORDER BY id`);
      expect(read.rows.map((r) => String(r[0]))).toEqual(episodes);
      for (const id of episodes) {
        expect((await store.getEpisode(id))?.id).toBe(id);
        expect((await store.listEvents(id))[0]?.episode).toBe(id);
      }
      const agents = await store.agentsWithCheckpoints();
      const chain = (await Promise.all(agents.map((a) => store.listCheckpoints(a)))).flat();
      expect(chain.map((r) => r.episode).sort()).toEqual([...checkpoints].sort());
      expect((await verifyStore(store)).problems).toEqual([]);
      // A new episode's replication entry names it by its text, as before.
      await store.client.execute("INSERT INTO meta (key, value) VALUES ('replication', 'on')");
      const [first] = episodes;
      const copy = `SELECT x'0199aaaabbbb7ccc8ddd000000000001', agent, stimulus_seq + 1000, stimulus_id, spec_version,
        ${STATUS_FAILED}, NULL, NULL, attempt, started_at, ended_at, NULL, parent, events_hash, event_count,
        stimulus_kind, bundle, log FROM episodes WHERE id = ?`;
      await store.client.execute({
        sql: `INSERT INTO episodes ${copy}`,
        args: [Buffer.from(first!.replaceAll("-", ""), "hex")],
      });
      const pending = await store.client.execute("SELECT key FROM repl_pending WHERE tbl = 'episode'");
      expect(pending.rows.map((r) => r[0])).toEqual(["0199aaaa-bbbb-7ccc-8ddd-000000000001"]);
    } finally {
      await store.close();
    }
  });

  test("older episodes' bundles become their 8-byte prefix (or 32 bytes), read back as the same hex", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const bundle = (c: string) => `b0${c}${"0".repeat(60)}`;
    // `twin` shares `a`'s first 8 bytes and is newer: only `a` is named by the prefix.
    const [a, b] = [bundle("a1"), bundle("b2")];
    const twin = `${a.slice(0, 16)}${"f".repeat(48)}`;
    const odd = "not-a-hash";
    let ids: string[];
    try {
      await migrate(
        c,
        path,
        MIGRATIONS.filter((m) => m.version < 30),
      );
      for (const [i, h] of [a, twin, b].entries())
        await c.execute({
          sql: "INSERT INTO bundles (hash, gateway, module, code, bytes, created_at) VALUES (?, 'g', 'm.ts', '', 0, ?)",
          args: [h, 1_000 + i],
        });
      ids = (await c.execute(`SELECT ${idOfSql("id")} FROM episodes ORDER BY id LIMIT 5`)).rows.map((r) =>
        String(r[0]),
      );
      const named = [a, twin, b, odd, null];
      for (const [i, id] of ids.entries())
        await c.execute({
          sql: `UPDATE episodes SET bundle = ? WHERE ${idOfSql("id")} = ?`,
          args: [named[i] ?? null, id],
        });
    } finally {
      c.close();
    }
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const raw = await store.client.execute(
        `SELECT typeof(bundle) AS t, length(bundle) AS n FROM episodes WHERE ${idOfSql("id")} IN (?, ?, ?, ?, ?)
          ORDER BY id`,
        ids,
      );
      expect(raw.rows.map((r) => [r.t, r.n])).toEqual([
        ["blob", 8],
        ["blob", 32],
        ["blob", 8],
        ["text", odd.length],
        ["null", null],
      ]);
      const read = await Promise.all(ids.map(async (id) => (await store.getEpisode(id))?.bundle ?? null));
      expect(read).toEqual([a, twin, b, odd, null]);
      const sql = await store.client.execute(
        `SELECT ${bundleOfSql("bundle")} AS b FROM episodes WHERE ${idOfSql("id")} IN (?, ?, ?, ?, ?) ORDER BY id`,
        ids,
      );
      expect(sql.rows.map((r) => r.b)).toEqual([a, twin, b, odd, null]);
      // The only problems: the made-up bundles' code does not hash to their made-up names.
      const problems = (await verifyStore(store)).problems.map((p) => `${p.record}: ${p.problem}`);
      expect(problems).toEqual(
        [a, twin, b].map((h) => `bundle ${h.slice(0, 16)}: stored code does not match its hash`),
      );
    } finally {
      await store.close();
    }
  });

  test("chains collected before migration 29 get a tombstone frontier: they verify, a collected head not", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    let agent: string;
    let head: number;
    try {
      await migrate(
        c,
        path,
        MIGRATIONS.filter((m) => m.version < 34),
      );
      const [row] = (await c.execute("SELECT id, head_seq FROM agents WHERE head_seq >= 3 ORDER BY id LIMIT 1")).rows;
      agent = String(row!.id);
      head = Number(row!.head_seq);
      // What retention did before migration 29: states collected, the frontier never recorded.
      await c.execute({ sql: "UPDATE checkpoints SET state = NULL WHERE agent = ? AND seq <= 2", args: [agent] });
      expect(
        (await c.execute({ sql: "SELECT tombstoned_seq FROM agents WHERE id = ?", args: [agent] })).rows[0]![0],
      ).toBe(0);
    } finally {
      c.close();
    }
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const [after] = (
        await store.client.execute({ sql: "SELECT tombstoned_seq FROM agents WHERE id = ?", args: [agent] })
      ).rows;
      expect(after![0]).toBe(2);
      expect((await verifyStore(store)).problems).toEqual([]);
      // A head collected is still named: the frontier stops below it.
      await store.client.execute({
        sql: "UPDATE checkpoints SET state = NULL WHERE agent = ? AND seq = ?",
        args: [agent, head],
      });
      const problems = (await verifyStore(store)).problems.map((p) => p.record);
      expect(problems.some((r) => r.includes(`${agent}#${head}`))).toBe(true);
    } finally {
      await store.close();
    }
  });

  test("budget windows booked before migration 35 count 0 bytes; their type totals keep bytes after it", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    let before: { agent: string; window: string; episodes: number; tokens: number }[];
    try {
      await migrate(
        c,
        path,
        MIGRATIONS.filter((m) => m.version < 35),
      );
      before = (await c.execute(`SELECT agent, "window", episodes, tokens FROM budget_usage ORDER BY 1, 2`)).rows.map(
        (r) => ({ agent: String(r[0]), window: String(r[1]), episodes: Number(r[2]), tokens: Number(r[3]) }),
      );
      expect(before.length).toBeGreaterThan(0);
    } finally {
      c.close();
    }
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const rows = await store.client.execute(`SELECT agent, "window", episodes, tokens, bytes FROM budget_usage
        ORDER BY 1, 2`);
      expect(rows.rows.map((r) => ({ agent: r[0], window: r[1], episodes: r[2], tokens: r[3] }))).toEqual(before);
      expect(rows.rows.every((r) => r[4] === 0)).toBe(true);
      // The remade triggers keep the type's totals, the bytes among them, in step with the ledger.
      const { agent, window } = before[0]!;
      await store.client.execute({
        sql: `UPDATE budget_usage SET bytes = bytes + 500 WHERE agent = ? AND "window" = ?`,
        args: [agent, window],
      });
      const total = async () =>
        (
          await store.client.execute({
            sql: `SELECT bytes, max_bytes, episodes FROM usage_totals WHERE "window" = ?
              AND type = substr(?, 1, instr(?, '/') - 1)`,
            args: [window, agent, agent],
          })
        ).rows[0];
      const sum = before.filter((u) => u.window === window && u.agent.split("/")[0] === agent.split("/")[0]);
      expect({ ...(await total()) }).toMatchObject({
        bytes: 500,
        max_bytes: 500,
        episodes: sum.reduce((n, u) => n + u.episodes, 0),
      });
      await store.client.execute({
        sql: `DELETE FROM budget_usage WHERE agent = ? AND "window" = ?`,
        args: [agent, window],
      });
      expect((await total())?.bytes ?? 0).toBe(0);
    } finally {
      await store.close();
    }
  });

  test("older episodes' outcomes and stimulus kinds become codes, read back as the same names", async () => {
    const path = fixtureCopy();
    const c = createClient({ url: `file:${path}` });
    const kinds = ["mqtt", "timer", "webhook", "inbox", "manual", "wake", "odd-kind", null];
    let ids: string[];
    try {
      await migrate(
        c,
        path,
        MIGRATIONS.filter((m) => m.version < 31),
      );
      ids = (await c.execute(`SELECT ${idOfSql("id")} FROM episodes ORDER BY rowid`)).rows.map((r) => String(r[0]));
      expect(ids.length).toBeGreaterThanOrEqual(kinds.length);
      for (const [i, id] of ids.entries())
        await c.execute({
          sql: `UPDATE episodes SET status = ?, stimulus_kind = ? WHERE ${idOfSql("id")} = ?`,
          args: [i % 3 === 0 ? "failed" : "committed", kinds[i % kinds.length] ?? null, id],
        });
    } finally {
      c.close();
    }
    const store = await Store.open(path, { synchronous: "full", upgrade: true });
    try {
      const raw = await store.client.execute(
        `SELECT ${idOfSql("id")} AS id, status, typeof(stimulus_kind) AS t, stimulus_kind FROM episodes ORDER BY rowid`,
      );
      // Rows keep their order and rowids; the names are gone from the file.
      expect(raw.rows.map((r) => String(r.id))).toEqual(ids);
      expect(raw.rows.map((r) => r.status)).toEqual(ids.map((_, i) => (i % 3 === 0 ? 0 : 1)));
      expect(raw.rows.slice(0, kinds.length).map((r) => [r.t, r.stimulus_kind])).toEqual([
        ["integer", 1],
        ["integer", 0],
        ["integer", 2],
        ["integer", 3],
        ["integer", 4],
        ["integer", 5],
        ["text", "odd-kind"],
        ["null", null],
      ]);
      const read = await Promise.all(ids.map((id) => store.getEpisode(id)));
      expect(read.map((e) => e?.status)).toEqual(ids.map((_, i) => (i % 3 === 0 ? "failed" : "committed")));
      expect(read.map((e) => e?.stimulusKind ?? null)).toEqual(ids.map((_, i) => kinds[i % kinds.length] ?? null));
      // The rebuilt table has its indexes, its replication trigger and the events view over it.
      const schema = await store.client.execute(
        "SELECT type, name FROM sqlite_master WHERE tbl_name = 'episodes' AND name NOT LIKE 'sqlite_%' ORDER BY name",
      );
      expect(schema.rows.map((r) => `${r.type} ${r.name}`)).toEqual([
        "trigger bundle_changed",
        "trigger bundle_unused",
        "trigger bundle_used",
        "table episodes",
        "index episodes_agent",
        "index episodes_once",
        "index episodes_time",
        "trigger repl_episode",
      ]);
      expect((await store.listEvents(ids[1]!)).length).toBeGreaterThan(0);
      // Exactly once still holds: a second committed episode of a committed stimulus is refused.
      const copy = (status: string) => ({
        sql: `INSERT INTO episodes (id, agent, stimulus_seq, stimulus_id, spec_version, status, attempt, started_at,
          ended_at, events_hash, event_count, log) SELECT 'copy-' || ${status}, agent, stimulus_seq,
          stimulus_id, spec_version, ${status}, attempt, started_at, ended_at, events_hash, event_count, log
          FROM episodes WHERE ${idOfSql("id")} = ?`,
        args: [ids[1]!],
      });
      await store.client.execute(copy(STATUS_FAILED));
      await expect(store.client.execute(copy(STATUS_COMMITTED))).rejects.toThrow(/UNIQUE constraint failed/);
      // The only problems: checkpoints sealed by an episode this test marked failed.
      const failed = ids.filter((_, i) => i % 3 === 0);
      for (const p of (await verifyStore(store)).problems)
        expect(
          failed.some((id) => p.problem === `its episode ${id} is missing, not committed, or not this agent's`),
        ).toBe(true);
    } finally {
      await store.close();
    }
  });

  test("migration versions run 1, 2, 3 ... without gaps", () => {
    expect(MIGRATIONS.map((m) => m.version)).toEqual(MIGRATIONS.map((_, i) => i + 1));
  });
});
