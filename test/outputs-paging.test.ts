/**
 * `GET /api/outputs` paging in-process (the route on a synthetic store): following `next_before`
 * returns every output once, even where outputs share their episode's start ms across a page boundary.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SyntheticFleet } from "./helpers/ops.ts";
import { activityRoutes } from "../gateway/http/index.ts";

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe("GET /api/outputs", () => {
  test("paging by next_before loses no output that shares a start ms with a page's last row", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-outputs-"));
    dirs.push(dir);
    const fleet = await SyntheticFleet.create(dir, {
      types: [{ name: "meter", keys: ["m1", "m2", "m3"] }],
      keep: 0,
      episodesDays: 30,
      dedupDays: 7,
    });
    try {
      const t = Date.now() - 60_000;
      // One emit per episode: 3 episodes start at t, 3 at t + 1, 3 at t + 2 (their emits share a ms).
      for (let i = 0; i < 3; i++) await fleet.commit(3, t + i, 0);
      // The outputs route reads no spec (only /api/activity checks its type against it).
      const spec = { spec: { agents: {} } } as never;
      const route = activityRoutes({ store: fleet.store, now: () => Date.now(), spec })["/api/outputs"];
      const get = async (q: string) => (await route(new Request(`http://x/api/outputs?${q}`))).json();
      const all = await get("limit=500");
      expect(all.outputs).toHaveLength(9);
      const paged: { episode: string }[] = [];
      let before: number | null = null;
      for (let pages = 0; pages < 10; pages++) {
        const page = await get(`limit=2${before === null ? "" : `&before=${before}`}`);
        paged.push(...page.outputs);
        before = page.next_before;
        if (before === null) break;
      }
      expect(paged.map((o) => o.episode)).toEqual(all.outputs.map((o: { episode: string }) => o.episode));
    } finally {
      await fleet.close();
    }
  });
});
