/**
 * `verifyStore` on a tampered copy of a synthetic data dir: every edit of history below needs no hash
 * recomputed, and each one is named as a broken record. The untouched copy verifies clean.
 */
import { Database } from "bun:sqlite";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SyntheticFleet } from "./helpers/ops.ts";
import { type ChainSource, storeChains, verifyChains, verifyStore, type VerifyReport } from "../gateway/ops/index.ts";
import { Store } from "../gateway/store/index.ts";

let dir: string;
let base: string;
let copies = 0;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-verify-"));
  const fleet = await SyntheticFleet.create(dir, {
    types: [{ name: "meter", keys: ["m1", "m2"] }],
    keep: 0,
    episodesDays: 30,
    dedupDays: 7,
    bundle: true,
  });
  await fleet.commit(8, Date.now() - 60_000, 1000); // 4 checkpoints per agent
  await fleet.checkpointWal();
  await fleet.close();
  base = fleet.dbPath;
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Verify a copy of the base data dir after running `sql` on it. */
async function tampered(...sql: string[]): Promise<VerifyReport> {
  const file = join(dir, `copy-${++copies}.db`);
  copyFileSync(base, file);
  const db = new Database(file);
  for (const q of sql) db.run(q);
  db.close();
  const store = await Store.open(file, { synchronous: "normal", readonly: true });
  try {
    return await verifyStore(store);
  } finally {
    await store.close();
  }
}

/** The head episode of meter/m1, as SQL (its stored id). */
const HEAD = "(SELECT episode FROM checkpoints WHERE agent = 'meter/m1' AND seq = 4)";

const problemsOf = (r: VerifyReport) => r.problems.map((p) => `${p.record.split(" ")[0]}: ${p.problem}`);

describe("verify", () => {
  test("passes the untouched data dir", async () => {
    const r = await tampered();
    expect(r).toMatchObject({ agents: 2, checkpoints: 8, episodes: 8, problems: [] });
  });

  test("names an edited state once: the record names the checkpoint, the problem says what is wrong", async () => {
    const r = await tampered(`UPDATE checkpoints SET state = '{"edited":1}' WHERE agent = 'meter/m1' AND seq = 2`);
    expect(r.problems).toEqual([
      {
        agent: "meter/m1",
        record: expect.stringMatching(/^checkpoint meter\/m1#2 [0-9a-f]{16}$/),
        problem: expect.stringMatching(/^hash mismatch/),
      },
    ]);
  });

  test("names a head checkpoint whose state was collected", async () => {
    const r = await tampered("UPDATE checkpoints SET state = NULL WHERE agent = 'meter/m1' AND seq = 4");
    expect(problemsOf(r)).toEqual(["checkpoint: head state collected"]);
  });

  test("names a state collected above the retention frontier, and passes one at or below it", async () => {
    const mid = "UPDATE checkpoints SET state = NULL WHERE agent = 'meter/m1' AND seq = 2";
    expect((await tampered(mid)).problems).toEqual([
      {
        agent: "meter/m1",
        record: expect.stringMatching(/^checkpoint meter\/m1#2 /),
        problem: "state collected above the retention frontier #0",
      },
    ]);
    expect((await tampered(mid, "UPDATE agents SET tombstoned_seq = 2 WHERE id = 'meter/m1'")).problems).toEqual([]);
  });

  test("reads the event logs of an agent with episodes but no checkpoint", async () => {
    // meter/m2's stimuli all failed: failed episodes, no chain; then one of its logs is edited.
    const r = await tampered(
      "DELETE FROM checkpoints WHERE agent = 'meter/m2'",
      "UPDATE agents SET head_seq = 0, head_hash = NULL, episodes = 0 WHERE id = 'meter/m2'",
      "UPDATE episodes SET status = 0, checkpoint = NULL, error_kind = 'threw' WHERE agent = 'meter/m2'",
      `UPDATE episodes SET log = jsonb(replace(json(log), '"reading"', '"edited"'))
        WHERE rowid = (SELECT min(rowid) FROM episodes WHERE agent = 'meter/m2')`,
    );
    expect(r).toMatchObject({ agents: 2, episodes: 8 });
    expect(problemsOf(r)).toEqual([expect.stringMatching(/^episode: event log hash mismatch/)]);
  });

  test("names an agent whose head is set but whose whole chain and episodes are gone", async () => {
    const r = await tampered(
      "DELETE FROM episodes WHERE agent = 'meter/m1'",
      "DELETE FROM checkpoints WHERE agent = 'meter/m1'",
    );
    expect(r).toMatchObject({ agents: 2, checkpoints: 4, episodes: 4 });
    expect(r.problems).toEqual([
      {
        agent: "meter/m1",
        record: "agent meter/m1",
        problem: expect.stringMatching(/^head #4 [0-9a-f]{16} missing: no checkpoints$/),
      },
    ]);
  });

  test("passes an agent with no head, no checkpoint and no episode", async () => {
    const r = await tampered(
      "DELETE FROM episodes WHERE agent = 'meter/m1'",
      "DELETE FROM checkpoints WHERE agent = 'meter/m1'",
      "UPDATE agents SET head_seq = 0, head_hash = NULL, episodes = 0 WHERE id = 'meter/m1'",
    );
    expect(r).toMatchObject({ agents: 1, checkpoints: 4, episodes: 4, problems: [] });
  });

  test.each([
    ["a committed episode deleted", [`DELETE FROM episodes WHERE id = ${HEAD}`]],
    [
      "a committed episode marked failed",
      [`UPDATE episodes SET status = 0, error_kind = 'timeout' WHERE id = ${HEAD}`],
    ],
    ["an episode naming another checkpoint", [`UPDATE episodes SET checkpoint = parent WHERE id = ${HEAD}`]],
    ["an episode moved to another agent", [`UPDATE episodes SET agent = 'meter/m2' WHERE id = ${HEAD}`]],
    ["the agent row deleted", ["DELETE FROM agents WHERE id = 'meter/m1'"]],
    [
      "the head rolled back one checkpoint",
      [
        "DELETE FROM checkpoints WHERE agent = 'meter/m1' AND seq = 4",
        `UPDATE agents SET head_seq = 3, head_hash = (SELECT hash FROM checkpoints WHERE agent = 'meter/m1' AND seq = 3)
          WHERE id = 'meter/m1'`,
      ],
    ],
    ["the head seq changed", ["UPDATE agents SET head_seq = 5 WHERE id = 'meter/m1'"]],
    ["the episode count lowered", ["UPDATE agents SET episodes = 1 WHERE id = 'meter/m1'"]],
  ])("names history that needs no hash recomputed: %s", async (_what, sql) => {
    const r = await tampered(...sql);
    expect(r.problems.length).toBeGreaterThan(0);
  });

  test("recomputes the hashes of stored code bundles and spec versions", async () => {
    const r = await tampered("UPDATE bundles SET code = code || ' '", "UPDATE spec_versions SET text = text || '#x'");
    expect(problemsOf(r)).toEqual([
      "bundle: stored code does not match its hash",
      "spec: stored fleet.toml text (or its code) does not match its hash",
    ]);
  });
});

/**
 * A synthetic fleet of meter agents `keys` being written (the running gateway's side) and a read-only
 * handle of the same file (verify's), for `body`; both closed and the folder removed after it.
 */
async function besideWriter(
  keys: string[],
  body: (writer: SyntheticFleet, reader: Store) => Promise<void>,
): Promise<void> {
  const live = mkdtempSync(join(tmpdir(), "fleet-verify-live-"));
  const writer = await SyntheticFleet.create(live, {
    types: [{ name: "meter", keys }],
    keep: 0,
    episodesDays: 30,
    dedupDays: 7,
  });
  const reader = await Store.open(writer.dbPath, { synchronous: "normal", readonly: true });
  try {
    await body(writer, reader);
  } finally {
    await reader.close();
    await writer.close();
    rmSync(live, { recursive: true, force: true });
  }
}

describe("verify beside a running gateway", () => {
  test("a read that fails inside a snapshot ends it: its error is reported, the next sees later commits", () =>
    besideWriter(["m1"], async (writer, reader) => {
      const count = async () => Number((await reader.client.execute("SELECT count(*) FROM checkpoints")).rows[0]![0]);
      await writer.commit(2, Date.now() - 60_000, 1000);
      await writer.store.writer.drain();
      const failing = reader.readSnapshot(async () => {
        await count();
        await reader.client.execute("SELECT no_such_column FROM checkpoints");
      });
      await expect(failing).rejects.toThrow(/no_such_column/);
      await writer.commit(1, Date.now(), 1);
      await writer.store.writer.drain();
      expect(await reader.readSnapshot(count)).toBe(3);
    }));

  test("sees each agent as of one moment: episodes committed between its reads are no broken chain", () =>
    besideWriter(["m1", "m2"], async (writer, reader) => {
      await writer.commit(4, Date.now() - 60_000, 1000);
      await writer.store.writer.drain();
      // Right after verify reads each agent's row, the gateway commits an episode for every agent:
      // its chain, episodes and counts are read after that commit.
      const src = storeChains(reader);
      const committing: ChainSource = {
        ...src,
        agent: async (agent) => {
          const row = await src.agent(agent);
          await writer.commit(2, Date.now(), 1);
          await writer.store.writer.drain();
          return row;
        },
      };
      const during = await verifyChains(committing);
      expect(during.problems).toEqual([]);
      // m1 as of before the first commit (2 of each), m2 as of before the second (the first gave it one more).
      expect(during).toMatchObject({ agents: 2, checkpoints: 2 + 3, episodes: 2 + 3 });
      // The commits landed: read again, every one of them verifies.
      const after = await verifyStore(reader);
      expect(after).toMatchObject({ agents: 2, checkpoints: 8, episodes: 8, problems: [] });
    }));
});
