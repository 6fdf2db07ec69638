/**
 * `backupDatabase` / `restoreDatabase` in-process on a synthetic data dir: what they leave on disk
 * besides the copy, and what they refuse.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { ROOT, SyntheticFleet } from "./helpers/ops.ts";
import { agentBlock, policyAgent } from "./helpers/policy.ts";
import { fleetHeader } from "./helpers/toml.ts";
import { DataDirInUse, Gateway } from "../gateway/gateway.ts";
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

/** Pad a stopped fleet.db with `mb` MB of random rows, so copying it takes a while. */
function pad(db: string, mb: number): void {
  const d = new Database(db);
  d.run("CREATE TABLE pad (x BLOB)");
  for (let i = 0; i < mb; i++) d.run("INSERT INTO pad VALUES (randomblob(1048576))");
  d.close();
}

describe("restore holds the data dir", () => {
  test("a gateway started while a restore writes refuses the data dir, and starts on it once restored", async () => {
    const { dir, db } = await fleetDb();
    chmodSync(dir, 0o755); // episodes run as other uids when root
    pad(db, 32);
    const file = join(dir, "nightly.db");
    await backupDatabase(db, file);
    const data = join(dir, "restored");
    const configPath = join(dir, "fleet.toml");
    writeFileSync(configPath, fleetHeader("restored") + agentBlock("steady", policyAgent("steady")));
    const gateway = () =>
      new Gateway({ configPath, dataDir: data, mqttPort: 0, httpPort: 0, logger: pino({ level: "silent" }) });
    const script = `const { restoreDatabase } = await import(${JSON.stringify(join(ROOT, "gateway/ops/index.ts"))});
      await restoreDatabase(${JSON.stringify(file)}, ${JSON.stringify(data)}, false);`;
    const restore = Bun.spawn(["bun", "-e", script], { stdout: "ignore", stderr: "pipe" });
    // Stop the restore while it copies: between its checks and the rename into place.
    while (restore.exitCode === null && !existsSync(join(data, "fleet.db.restoring"))) await Bun.sleep(2);
    restore.kill("SIGSTOP");
    try {
      const early = gateway();
      const error = await early.start().then(
        () => null,
        (err: unknown) => err,
      );
      await early.stop();
      expect(error).toBeInstanceOf(DataDirInUse);
      expect(existsSync(join(data, "fleet.db"))).toBe(false);
    } finally {
      restore.kill("SIGCONT");
    }
    expect(await restore.exited).toBe(0);
    const later = gateway();
    try {
      await later.start();
      expect(later.state).toBe("running");
    } finally {
      await later.stop();
    }
  }, 120_000);
});

describe("backup", () => {
  test("restore of a file with no schema version says it may be an incomplete backup", async () => {
    const { dir } = await fleetDb();
    const file = join(dir, "partial.db");
    new Database(file).run("CREATE TABLE t (x)");
    await expect(restoreDatabase(file, join(dir, "new"), false)).rejects.toThrow(
      `${file} is not a fleet database or not a complete backup (no schema version)`,
    );
  });

  test("a backup killed while it copies leaves no readable file under the final name", async () => {
    const { dir, db } = await fleetDb();
    pad(db, 32);
    const out = join(dir, "out");
    const file = join(out, "nightly.db");
    const script = `process.umask(0o022); const { backupDatabase } = await import(${JSON.stringify(
      join(ROOT, "gateway/ops/index.ts"),
    )}); await backupDatabase(${JSON.stringify(db)}, ${JSON.stringify(file)});`;
    const proc = Bun.spawn(["bun", "-e", script], { stdout: "ignore", stderr: "ignore" });
    const modes = new Set<number>();
    // Wait until the copy is under way: a file under the final name, or the private scratch dir.
    for (let started = false; !started && proc.exitCode === null; await Bun.sleep(0)) {
      if (existsSync(file)) modes.add(statSync(file).mode & 0o777);
      started = existsSync(out) && readdirSync(out).length > 0;
    }
    proc.kill(9);
    await proc.exited;
    if (existsSync(file)) modes.add(statSync(file).mode & 0o777);
    for (const m of modes) expect(m.toString(8)).toBe("600");
    for (const entry of existsSync(out) ? readdirSync(out) : []) {
      if (entry !== "nightly.db") expect(statSync(join(out, entry)).mode & 0o777).toBe(0o700);
    }
  });
});
