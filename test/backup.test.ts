/**
 * `backupDatabase` / `restoreDatabase` in-process on a synthetic data dir: what they leave on disk
 * besides the copy, and what they refuse.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { createClient } from "@libsql/client";
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT, SyntheticFleet } from "./helpers/ops.ts";
import { agentBlock, policyAgent } from "./helpers/policy.ts";
import { fleetHeader } from "./helpers/toml.ts";
import { DataDirInUse } from "../gateway/gateway.ts";
import { backupDatabase, restoreDatabase } from "../gateway/ops/index.ts";
import { MIGRATIONS, migrate, SCHEMA_VERSION } from "../gateway/store/index.ts";
import { inProcessGateway } from "./helpers/in-process.ts";

const FIXTURE = join(import.meta.dir, "fixtures/datadir-v1/fleet.db");

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

/** A stopped data dir an older release wrote: the release-0.1 fixture, upgraded to `version` as that release would. */
async function olderDb(version: number): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), "fleet-backup-"));
  dirs.push(dir);
  const db = join(dir, "fleet.db");
  copyFileSync(FIXTURE, db);
  const c = createClient({ url: `file:${db}` });
  await migrate(c, db, MIGRATIONS.slice(0, version));
  c.close();
  return db;
}

/** `meta.<key>` of a database file. */
function metaOf(db: string, key: string): string | undefined {
  const d = new Database(db, { readonly: true });
  try {
    return d.query<{ value: string }, [string]>("SELECT value FROM meta WHERE key = ?").get(key)?.value;
  } finally {
    d.close();
  }
}
const versionOf = (db: string) => Number(metaOf(db, "schema_version"));

describe("older releases", () => {
  for (const version of [1, 12]) {
    test(`a schema ${version} backup restores upgraded to this schema, with a new gateway id`, async () => {
      const backup = await olderDb(version);
      expect(versionOf(backup)).toBe(version);
      const data = join(backup, "..", "new");
      const report = await restoreDatabase(backup, data, false);
      expect(report).toMatchObject({ schema_version: SCHEMA_VERSION, upgraded_from: version });
      expect(report.verify).toMatchObject({ agents: 3, checkpoints: 12, problems: [] });
      expect(versionOf(join(data, "fleet.db"))).toBe(SCHEMA_VERSION);
      expect(versionOf(backup)).toBe(version); // the backup itself is left as it was
      expect(metaOf(join(data, "fleet.db"), "gateway_id")).not.toBe(metaOf(backup, "gateway_id"));
      expect(readdirSync(data).sort()).toEqual(["fleet.db", "sandboxes"]);
    });
  }

  test("a backup of a data dir an older release wrote keeps its schema and verifies as an upgraded copy", async () => {
    const db = await olderDb(12);
    const file = join(db, "..", "b.db");
    const report = await backupDatabase(db, file);
    expect(report).toMatchObject({ schema_version: 12, upgraded_from: 12 });
    expect(report.verify).toMatchObject({ agents: 3, checkpoints: 12, problems: [] });
    expect(versionOf(file)).toBe(12);
    expect(versionOf(db)).toBe(12);
    expect(readdirSync(join(db, "..")).filter((f) => f.startsWith(".fleet-backup"))).toEqual([]);
  });

  test("a backup a newer release wrote is refused, saying so, and nothing is restored", async () => {
    const { dir, db } = await fleetDb();
    const file = join(dir, "newer.db");
    await backupDatabase(db, file);
    const d = new Database(file);
    d.run(`UPDATE meta SET value = '${SCHEMA_VERSION + 1}' WHERE key = 'schema_version'`);
    d.close();
    const data = join(dir, "new");
    await expect(restoreDatabase(file, data, false)).rejects.toThrow(
      `was written by a newer release (schema ${SCHEMA_VERSION + 1}; this one is ${SCHEMA_VERSION})`,
    );
    expect(existsSync(data)).toBe(false); // a refused restore leaves no trace: not even the data dir
  });

  test("a backup that fails verification once upgraded is refused, and the data dir is left as it was", async () => {
    const db = await olderDb(12);
    const d = new Database(db);
    d.run(`UPDATE checkpoints SET state = '{"count":999}'`);
    d.close();
    const data = join(db, "..", "new");
    mkdirSync(data, { mode: 0o700 });
    writeFileSync(join(data, "fleet.db-shm"), "stale");
    await expect(restoreDatabase(db, data, false)).rejects.toThrow("fails verification");
    expect(readdirSync(data).sort()).toEqual(["fleet.db-shm"]);
  });
});

describe("restore", () => {
  for (const stale of ["fleet.db-wal", "fleet.db-shm", "fleet.db-journal"]) {
    test(`a stale ${stale} without its fleet.db is removed, and the backup restored`, async () => {
      const { dir, db } = await fleetDb();
      const file = join(dir, "b.db");
      await backupDatabase(db, file);
      const data = join(dir, "new");
      mkdirSync(data, { mode: 0o700 });
      writeFileSync(join(data, stale), "stale");
      const report = await restoreDatabase(file, data, false);
      expect(report.verify.problems).toEqual([]);
      expect(readdirSync(data).sort()).toEqual(["fleet.db", "sandboxes"]);
    });
  }

  test("a refused restore leaves an existing data dir as it was", async () => {
    const { dir } = await fleetDb();
    const garbage = join(dir, "garbage.db");
    writeFileSync(garbage, "not a database");
    const data = join(dir, "new");
    mkdirSync(data, { mode: 0o700 });
    writeFileSync(join(data, "tokens.json"), "{}");
    await expect(restoreDatabase(garbage, data, false)).rejects.toThrow();
    expect(readdirSync(data)).toEqual(["tokens.json"]);
  });

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
    const gateway = () => inProcessGateway(configPath, data);
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
