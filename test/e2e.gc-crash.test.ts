/**
 * Retention under kill -9 (ops/gc.ts): a pass collects in several transactions (tombstones,
 * episodes with their logs and the chain anchors that replace them, stimuli, usage rows, bundles).
 * However a crash cuts it, what is left must verify, and the next start must finish the collection
 * without touching anything inside the window.
 */
import { afterAll, expect, test } from "bun:test";
import { cleanupAll, seeded, TestFleet, waitFor } from "./helpers/gateway.ts";
import { DAY, SyntheticFleet } from "./helpers/ops.ts";
import { idOfSql } from "../gateway/store/index.ts";

afterAll(cleanupAll);

test("kill -9 during retention: the history verifies at every crash point; the next start finishes it", async () => {
  const rand = seeded(61);
  const f = new TestFleet("");
  const synthetic = await SyntheticFleet.create(f.dir, {
    types: [{ name: "t", keys: ["a", "b", "c", "d"] }],
    keep: 3,
    episodesDays: 2,
    dedupDays: 1,
  });
  // 20,000 episodes over the last 10 days: the ~16,000 older than 2 days are due, several passes' worth.
  const now = Date.now();
  await synthetic.commit(20_000, now - 10 * DAY, (10 * DAY - 60_000) / 20_000);
  await synthetic.close();
  // What the window keeps (with an hour's margin for the time the test takes), and each agent's head.
  const recent = async () =>
    (
      await f.query<{ id: string }>(`SELECT ${idOfSql("id")} AS id FROM episodes WHERE ended_at >= ? ORDER BY 1`, [
        now - 2 * DAY + 3_600_000,
      ])
    ).map((r) => r.id);
  const heads = "SELECT id, head_seq, hex(head_hash) AS h FROM agents ORDER BY id";
  const keptBefore = await recent();
  const headsBefore = await f.query(heads);
  const total = async () => Number((await f.query<{ n: number }>("SELECT count(*) AS n FROM episodes"))[0]!.n);
  expect(await total()).toBe(20_000);

  const cuts: number[] = [];
  for (let i = 0; i < 4; i++) {
    await f.start(120_000);
    // The background round may have begun already; ask for a whole collection too, and cut it.
    void f.fetch("/api/gc", { method: "POST" }).catch(() => undefined);
    // The first cut waits for the collection to have begun (on a busy box it may not have in 260 ms), so at
    // least one kill lands inside it; the others fall where they fall.
    if (i === 0) await waitFor(async () => (await total()) < 20_000 || undefined, 60_000, "the collection to begin", 5);
    else await Bun.sleep(10 + Math.floor(rand() * 250));
    await f.kill();
    cuts.push(await total());
    const verify = await f.cli("verify");
    expect({ cut: i, code: verify.code, out: verify.code === 0 ? "" : verify.stdout }).toEqual({
      cut: i,
      code: 0,
      out: "",
    });
  }

  await f.start(120_000);
  // The collection's clock reads at least this: what ended two days before it is due. A cutoff read after the
  // answer would count as overdue the episodes that ended while the collection ran (one per 43 s of its time).
  const asked = Date.now();
  const res = await f.fetch("/api/gc", { method: "POST" });
  expect(res.status).toBe(200);
  const [{ n: old }] = (await f.query<{ n: number }>("SELECT count(*) AS n FROM episodes WHERE ended_at < ?", [
    asked - 2 * DAY,
  ])) as [{ n: number }];
  expect(Number(old)).toBe(0);
  expect(await recent()).toEqual(keptBefore);
  expect(await f.query(heads)).toEqual(headsBefore);
  expect((await f.cli("verify")).code).toBe(0);
  // The kills did cut the collection: at least one left a history between the start and the end.
  const end = await total();
  expect(cuts.some((n) => n < 20_000 && n > end)).toBe(true);
  expect(await f.stop()).toBe(0);
}, 300_000);
