/**
 * A large center (issue 11): 100,000 episodes of one gateway, seeded straight into a real sqld
 * with batched inserts (valid hash chains and event-log hashes, no episodes run), behind a
 * response size limit they do not fit in. Every central read pages: agents, episodes, show,
 * audit, and verify walking 50,000-link chains. sqld runs with --max-response-size 200KB
 * so the limit bites at this scale (10 MB by default: the same failure at ~50x the data).
 * FLEET_CENTRAL_EPISODES changes the scale.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Client, InStatement, InValue } from "@libsql/client";
import { join } from "node:path";
import { verifyChains } from "../gateway/ops/index.ts";
import { CentralReader, centralStatements, prepareCentral } from "../gateway/replication/index.ts";
import { hashEvents, SCHEMA_VERSION, sealCheckpoint } from "../gateway/store/index.ts";
import { Sqld } from "./helpers/sqld.ts";
import { runCli } from "./helpers/gateway.ts";

const EPISODES = Number(process.env.FLEET_CENTRAL_EPISODES ?? 100_000);
const AGENTS = ["t/a", "t/b"];
const IDLE_AGENTS = 3000; // agents without episodes: the agent list alone passes the limit
const ACTIONS = 2000;
const GATEWAY = "0190f0c0-0000-7000-8000-00000000big1";
const SPEC = "f".repeat(64);
const T0 = Date.UTC(2025, 0, 6);

let sqld: Sqld;
let db: Client;
let reader: CentralReader;

const pad = (n: number) => String(n).padStart(7, "0");
const episodeId = (agent: string, seq: number) => `ep-${agent.replace("/", "-")}-${pad(seq)}`;

/** Rows for the central tables, in their column order (tables.ts), pushed the way the replicator pushes. */
async function seed(): Promise<void> {
  const rows: Record<"episodes" | "events" | "checkpoints" | "agents" | "audit", InValue[][]> = {
    episodes: [],
    events: [],
    checkpoints: [],
    agents: [],
    audit: [],
  };
  const flush = async (force = false) => {
    const n = rows.episodes.length + rows.events.length + rows.checkpoints.length + rows.agents.length;
    if (!force && n < 12_000) return;
    const stmts: InStatement[] = centralStatements("big", GATEWAY, { ...rows });
    await db.batch(stmts, "write");
    for (const k of Object.keys(rows) as (keyof typeof rows)[]) rows[k] = [];
  };
  const per = EPISODES / AGENTS.length;
  for (const agent of AGENTS) {
    let parent: string | null = null;
    for (let seq = 1; seq <= per; seq++) {
      const id = episodeId(agent, seq);
      const at = T0 + seq * 1000;
      const events = [
        { seq: 1, kind: "stimulus", data: JSON.stringify({ id: `s${seq}`, value: seq }) },
        { seq: 2, kind: "output", data: JSON.stringify({ topic: "out", n: seq }) },
      ];
      const { hash, stateText } = await sealCheckpoint({
        agent,
        seq,
        parent,
        episode: id,
        spec_version: SPEC,
        state: { count: seq },
      });
      // episodes: id, agent, stimulus_seq, stimulus_id, spec_version, status, error_kind, error, attempt,
      //   started_at, ended_at, checkpoint, parent, events_hash, event_count
      rows.episodes.push([
        id,
        agent,
        seq,
        `s${seq}`,
        SPEC,
        "committed",
        null,
        null,
        1,
        at,
        at + 5,
        hash,
        parent,
        await hashEvents(events),
        events.length,
      ]);
      for (const e of events) rows.events.push([id, e.seq, e.kind, e.data]);
      rows.checkpoints.push([hash, agent, seq, parent, id, SPEC, stateText, at + 5]);
      parent = hash;
      await flush();
    }
    const [type, key] = agent.split("/");
    rows.agents.push([agent, type!, key!, "active", null, null, 0, null, per, parent, per, 0, T0 + per * 1000, T0, T0]);
  }
  for (let i = 0; i < IDLE_AGENTS; i++)
    rows.agents.push([
      `idle/k${pad(i)}`,
      "idle",
      `k${pad(i)}`,
      "active",
      null,
      null,
      0,
      null,
      0,
      null,
      0,
      0,
      null,
      T0,
      T0,
    ]);
  for (let i = 1; i <= ACTIONS; i++) rows.audit.push([i, T0 + i, "ops", "agent.pause", `idle/k${pad(i)}`, 200, null]);
  await flush(true);
  await db.execute({
    sql: `INSERT INTO gateways (gateway, fleet, first_push_at, last_push_at, schema_version)
      VALUES (?, 'big', ?, ?, ?)`,
    args: [GATEWAY, T0, T0, SCHEMA_VERSION],
  });
}

beforeAll(async () => {
  sqld = await Sqld.start({ maxResponseSize: "200KB" });
  db = sqld.client();
  await prepareCentral(db, sqld.url);
  const started = performance.now();
  await seed();
  console.log(`seeded ${EPISODES} episodes in ${Math.round(performance.now() - started)} ms`);
  reader = await CentralReader.open(sqld.url);
}, 900_000);

afterAll(async () => {
  reader?.close();
  db?.close();
  await sqld?.dispose();
});

describe(`a center with ${EPISODES} episodes past sqld's response size limit`, () => {
  test("the limit bites: one unpaged read of the episodes is refused with RESPONSE_TOO_LARGE", async () => {
    await expect(
      db.execute({ sql: "SELECT * FROM episodes WHERE gateway = ?", args: [GATEWAY] }),
    ).rejects.toMatchObject({ code: "RESPONSE_TOO_LARGE" });
  });

  test("agents, episodes, show and audit read every row in pages", async () => {
    const agents = await reader.agents({ fleet: "big", limit: 100_000 });
    expect(agents.total).toBe(IDLE_AGENTS + AGENTS.length);
    expect(agents.rows).toHaveLength(IDLE_AGENTS + AGENTS.length);
    expect(new Set(agents.rows.map((a) => a.id)).size).toBe(agents.rows.length);
    const second = await reader.agents({ fleet: "big", limit: 10, offset: 2500 });
    expect(second.rows.map((a) => a.id)).toEqual(agents.rows.slice(2500, 2510).map((a) => a.id));

    const per = EPISODES / AGENTS.length;
    const eps = await reader.episodes("t/a", { fleet: "big", limit: 1_000_000 });
    expect(eps).toHaveLength(per);
    expect(eps[0]!.id).toBe(episodeId("t/a", per)); // newest first
    expect(eps.at(-1)!.id).toBe(episodeId("t/a", 1));
    expect(new Set(eps.map((e) => e.id)).size).toBe(per);

    const shown = await reader.episode(episodeId("t/b", 7));
    expect(shown?.events.map((e) => e.kind)).toEqual(["stimulus", "output"]);

    const actions = await reader.audit({ fleet: "big", limit: ACTIONS });
    expect(actions.map((a) => a.seq)).toEqual(Array.from({ length: ACTIONS }, (_, i) => ACTIONS - i));
  }, 300_000);

  test("verify walks every chain in bounded pages and passes; a tampered row in the middle is named", async () => {
    const ok = await verifyChains(reader.chains(GATEWAY));
    expect(ok).toMatchObject({ agents: AGENTS.length, checkpoints: EPISODES, episodes: EPISODES, problems: [] });
    const victim = episodeId("t/b", Math.floor(EPISODES / 4));
    await db.execute({
      sql: "UPDATE events SET data = json_set(data, '$.n', -1) WHERE gateway = ? AND episode = ? AND seq = 2",
      args: [GATEWAY, victim],
    });
    const broken = await verifyChains(reader.chains(GATEWAY), ["t/b"]);
    expect(broken.problems.map((p) => p.record)).toEqual([`episode ${victim}`]);
    // The CLI over the same center: the broken record named, exit 1.
    const cli = await runCli(["verify", "--central", sqld.url, "--agent", "t/b", "--json"], {
      timeoutMs: 300_000,
      env: { FLEET_CONFIG: join(import.meta.dir, "no-such-fleet.toml") },
    });
    expect(cli.code).toBe(1);
    expect(cli.json.problems.map((p: { record: string }) => p.record)).toEqual([`episode ${victim}`]);
  }, 600_000);
});
