/**
 * `fleet backup` / `fleet restore` against a real gateway process: an online backup while
 * the gateway runs is consistent and verified; a restore into an empty data dir lets a new
 * gateway resume the agents' chains where the backup left them.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { existsSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { cleanupAll, publishQos1, scratchDir, TestFleet } from "./helpers/gateway.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

afterAll(cleanupAll);

const TOML = fleetHeader("backup") + counterType("counter", "c/+/in");

describe("backup and restore", () => {
  test("an online backup verifies, and a gateway restored from it resumes each chain", async () => {
    const fleet = new TestFleet(TOML);
    await fleet.start();
    const client = await fleet.mqtt();
    for (let i = 1; i <= 3; i++) await publishQos1(client, "c/a/in", { id: `a-${i}` });
    await publishQos1(client, "c/b/in", { id: "b-1" });
    await fleet.waitCommitted("counter/a", 3);
    await fleet.waitCommitted("counter/b", 1);

    const dir = scratchDir("fleet-backup-");
    const file = join(dir, "nightly.db");
    const backup = await fleet.cli("backup", file);
    expect(backup.code).toBe(0);
    expect(backup.json).toMatchObject({ file, schema_version: expect.any(Number) });
    expect(backup.json.verify).toMatchObject({ agents: 2, checkpoints: 4, problems: [] });
    expect(statSync(file).mode & 0o777).toBe(0o600);

    // The backup is a copy, not a link: work after it does not reach it.
    await publishQos1(client, "c/a/in", { id: "a-4" });
    await fleet.waitCommitted("counter/a", 4);
    await fleet.stop();

    // Restore into a new, empty data dir and run a new gateway on it.
    const restored = new TestFleet(TOML);
    const restore = await restored.cli("restore", file);
    expect(restore.code).toBe(0);
    expect(restore.json.verify).toMatchObject({ agents: 2, checkpoints: 4, problems: [] });
    await restored.start();
    const c2 = await restored.mqtt();
    await publishQos1(c2, "c/a/in", { id: "after-restore" });
    const episodes = await restored.waitCommitted("counter/a", 4);
    expect(episodes.length).toBe(4); // 3 from the backup + 1 new; a-4 came after the backup
    const a = await restored.agent("counter/a");
    expect(a).toMatchObject({ seq: 4, episodes: 4 });
    await restored.stop();
    const verify = await restored.cli("verify");
    expect(verify.code).toBe(0);
    expect(verify.json).toMatchObject({ agents: 2, checkpoints: 5, problems: [] });
  });

  test("restore refuses a data dir that holds a database, a running gateway, and a damaged backup", async () => {
    const fleet = new TestFleet(TOML);
    await fleet.start();
    const client = await fleet.mqtt();
    await publishQos1(client, "c/a/in", { id: "x-1" });
    await fleet.waitCommitted("counter/a", 1);
    const dir = scratchDir("fleet-backup-");
    const file = join(dir, "b.db");
    expect((await fleet.cli("backup", file)).code).toBe(0);

    const onRunning = await fleet.cli("restore", file);
    expect(onRunning.code).toBe(1);
    expect(onRunning.stderr).toContain("a gateway is running");
    await fleet.stop();
    const onFull = await fleet.cli("restore", file);
    expect(onFull.code).toBe(1);
    expect(onFull.stderr).toContain("already holds a fleet database");

    // A tampered checkpoint in the backup: restore names it and writes nothing.
    const db = createClient({ url: `file:${file}` });
    await db.execute(`UPDATE checkpoints SET state = '{"count":999}'`);
    db.close();
    const empty = new TestFleet(TOML);
    const tampered = await empty.cli("restore", file);
    expect(tampered.code).toBe(1);
    expect(tampered.stderr).toContain("fails verification");
    expect(existsSync(join(empty.dataDir, "fleet.db"))).toBe(false);

    const garbage = join(dir, "garbage.db");
    writeFileSync(garbage, "this is not a database".repeat(100));
    const bad = await empty.cli("restore", garbage);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain("cannot be read as a fleet database");

    const again = await fleet.cli("backup", file);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain("already exists");
  });
});
