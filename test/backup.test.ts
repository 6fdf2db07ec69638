/**
 * `backupDatabase` / `restoreDatabase` in-process on a synthetic data dir: what they leave on disk
 * besides the copy, and what they refuse.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SyntheticFleet } from "./helpers/ops.ts";
import { backupDatabase, restoreDatabase } from "../gateway/ops/index.ts";

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A stopped data dir with 4 committed episodes; its fleet.db path and the scratch dir. */
async function fleetDb(): Promise<{ dir: string; db: string }> {
  const dir = mkdtempSync(join(tmpdir(), "fleet-backup-"));
  dirs.push(dir);
  const fleet = await SyntheticFleet.create(dir, {
    types: [{ name: "meter", keys: ["m1", "m2"] }],
    keep: 0,
    episodesDays: 30,
    dedupDays: 7,
  });
  await fleet.commit(4, Date.now() - 60_000, 1000);
  await fleet.checkpointWal();
  await fleet.close();
  return { dir, db: fleet.dbPath };
}

describe("restore", () => {
  test("keeps backups named fleet.db-<date> in the data dir, the one restored from included", async () => {
    const { dir, db } = await fleetDb();
    const data = join(dir, "new");
    mkdirSync(data, { mode: 0o700 });
    const older = join(data, "fleet.db-2026-12-02");
    const newer = join(data, "fleet.db-2026-12-03");
    await backupDatabase(db, older);
    await backupDatabase(db, newer);
    writeFileSync(join(data, "fleet.db-shm"), "stale"); // a stale shm is still cleared
    const report = await restoreDatabase(newer, data, false);
    expect(report.verify.problems).toEqual([]);
    expect(existsSync(join(data, "fleet.db"))).toBe(true);
    expect(existsSync(older)).toBe(true);
    expect(existsSync(newer)).toBe(true);
    expect(existsSync(join(data, "fleet.db-shm"))).toBe(false);
  });
});
