/**
 * The data dir on a real small filesystem (a tmpfs mounted for the test, so root only): a disk that fills to
 * its last byte, and the reserve `[fleet] disk_free_limit_mb` that keeps it from getting there. Other tests
 * inject a full disk at the commit (FLEET_TEST_COMMIT_FAULT_FILE); here libSQL, the broker and every other
 * writer meet ENOSPC for real. Real gateway process, real MQTT clients, real episode subprocesses.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { closeSync, mkdirSync, openSync, rmSync, statfsSync, writeSync } from "node:fs";
import { join } from "node:path";
import { connectAsync, type MqttClient } from "mqtt";
import { TestFleet, cleanupAll, fixture, runCli, scratchDir, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, counterType, fleetHeader } from "./helpers/toml.ts";

const MB = 1024 * 1024;
const mounted: string[] = [];
/** Devices that reconnect by themselves: ended after the tests, whatever became of them. */
const devices: MqttClient[] = [];

afterAll(async () => {
  for (const d of devices) d.end(true);
  // Lazily: a gateway still running keeps its files until it stops; the folders can then be removed.
  for (const dir of [...mounted]) unmount(dir);
  await cleanupAll();
}, 60_000);

/** Mount a tmpfs of `mb` (and `inodes` files, if given) on `dir`; false where this process may not mount. */
function mountTmpfs(dir: string, mb: number, inodes?: number): boolean {
  mkdirSync(dir, { recursive: true });
  const opts = `size=${mb}m,mode=0700${inodes === undefined ? "" : `,nr_inodes=${inodes}`}`;
  const r = Bun.spawnSync(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", dir], {
    stderr: "pipe",
  });
  if (r.exitCode !== 0) return false;
  mounted.push(dir);
  return true;
}

/** Whether this process may mount a tmpfs (root, and a kernel that lets it): the tests need one each. */
function mountable(): boolean {
  if (process.getuid?.() !== 0) return false;
  const probe = scratchDir("fleet-mount-probe-");
  if (!mountTmpfs(probe, 1)) return false;
  unmount(probe);
  return true;
}

function unmount(dir: string): void {
  Bun.spawnSync(["umount", "-l", dir]);
  mounted.splice(mounted.indexOf(dir), 1);
}

const canMount = mountable();

/** Write `path` until the disk is full, or until `leaveBytes` are left. */
function fill(path: string, leaveBytes = 0): void {
  const fd = openSync(path, "w");
  const chunk = Buffer.alloc(64 * 1024, 7);
  try {
    for (;;) {
      const fs = statfsSync(path);
      const left = fs.bavail * fs.bsize - leaveBytes;
      if (left <= 0) break;
      writeSync(fd, chunk, 0, Math.min(chunk.length, left));
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOSPC") throw err;
  } finally {
    closeSync(fd);
  }
}

/** A device that reconnects and resends what was not acknowledged, as mqtt.js does by default. */
async function device(port: number, clientId: string): Promise<MqttClient> {
  const c = await connectAsync(`mqtt://127.0.0.1:${port}`, { clientId, clean: false, reconnectPeriod: 300 });
  devices.push(c);
  return c;
}

/** Publish each id at QoS 1; `acked` gets each id as its PUBACK comes, the promise resolves once all came. */
function publishAll(c: MqttClient, topics: (i: number) => string, ids: readonly string[], acked: string[]) {
  return Promise.all(
    ids.map((id, i) => c.publishAsync(topics(i), JSON.stringify({ id }), { qos: 1 }).then(() => acked.push(id))),
  );
}

const slowType = () => agentType("slow", fixture("slow-counter"), ["slow/+/c"], { dedup: "id" });

/** A fleet started on a tmpfs of `mb` as its data dir. */
async function fleetOnTmpfs(toml: string, mb: number, inodes?: number): Promise<TestFleet> {
  const fleet = new TestFleet(toml);
  expect(mountTmpfs(fleet.dataDir, mb, inodes)).toBe(true);
  await fleet.start();
  return fleet;
}

/** Four stimuli for `slow/a`, acknowledged now; their episodes take 300 ms each, one after another. */
async function queueSlow(fleet: TestFleet): Promise<void> {
  const first = await fleet.mqtt({ clientId: "first" });
  for (let i = 0; i < 4; i++)
    await first.publishAsync("slow/a/c", JSON.stringify({ id: `s${i}`, hold_ms: 300 }), { qos: 1 });
}

/** Wait for /readyz 503; its reason. */
async function notReady(fleet: TestFleet): Promise<string> {
  const body = await waitFor(
    async () => {
      const r = await fleet.fetch("/readyz");
      return r.status === 503 ? ((await r.json()) as { reason: string }) : undefined;
    },
    20_000,
    "/readyz 503",
  );
  return body.reason;
}

describe.skipIf(!canMount)("a data disk that fills to its last byte (reserve off)", () => {
  test("nothing is acknowledged while it is full; once there is space all lands once, without a restart", async () => {
    const toml =
      fleetHeader("e2e-disk-full", { fleet: "disk_free_limit_mb = 0" }) +
      counterType("counter", "full/+/c") +
      slowType();
    const fleet = await fleetOnTmpfs(toml, 48);
    // Accepted before the disk fills: their episodes commit after it did.
    await queueSlow(fleet);
    const filler = join(fleet.dataDir, "filler");
    fill(filler);

    const dev = await device(fleet.mqttPort, "dev");
    const acked: string[] = [];
    const ids = Array.from({ length: 24 }, (_, i) => `m${i}`);
    const all = publishAll(dev, (i) => `full/k${i % 3}/c`, ids, acked);
    expect(await notReady(fleet)).toContain("commits failing (disk_full)");
    const post = await fleet.fetch("/api/agents/counter/h/stimuli", { method: "POST", body: '{"id":"h1"}' });
    expect(post.status).toBe(503);
    expect(((await post.json()) as { error: { code: string } }).error.code).toBe("storage_unavailable");
    await Bun.sleep(1500); // the device resends meanwhile, and is refused each time
    expect(acked).toEqual([]);

    rmSync(filler);
    await all;
    expect(acked.sort()).toEqual([...ids].sort());
    for (const k of ["k0", "k1", "k2"]) await fleet.waitCommitted(`counter/${k}`, 8);
    await fleet.waitCommitted("slow/a", 4);
    // Exactly once: one stimulus and one committed episode per message, counts that end at 8 and 4.
    const perAgent = await fleet.query<{ agent: string; n: number }>(
      "SELECT agent, count(*) AS n FROM stimuli GROUP BY agent ORDER BY agent",
    );
    expect(perAgent.map((r) => [r.agent, Number(r.n)])).toEqual([
      ["counter/k0", 8],
      ["counter/k1", 8],
      ["counter/k2", 8],
      ["slow/a", 4],
    ]);
    expect((await fleet.agent("slow/a"))?.seq).toBe(4);
    expect((await fleet.agent("counter/k0"))?.episodes).toBe(8);
    dev.end(true);
    expect(await fleet.stop()).toBe(0);
    expect((await fleet.cli("verify")).json).toMatchObject({ problems: [] });

    // A start on the full disk fails with one line that says so, and succeeds once there is room.
    fill(filler);
    await expect(fleet.start()).rejects.toThrow("gateway exited (code 1");
    expect(fleet.logTail(5)).toContain(`fleet: cannot start: the disk of ${fleet.dataDir} is full: free space`);
    // `fleet status` of the stopped gateway shows why.
    const stopped = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(stopped.stdout).toContain("gateway stopped");
    expect(stopped.stdout).toMatch(/\ndisk +0\.0 MB free of 48\.0 MB\n/);
    expect((await fleet.cli("status")).json.disk).toMatchObject({ free_bytes: 0, total_bytes: 48 * MB });
    rmSync(filler);
    await fleet.start();
    expect((await fleet.agent("slow/a"))?.seq).toBe(4);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});

describe.skipIf(!canMount)("[fleet] disk_free_limit_mb: the reserve", () => {
  test("below it outside stimuli are refused, accepted ones still run and the operator can still write", async () => {
    const toml =
      fleetHeader("e2e-disk-reserve", { fleet: "disk_free_limit_mb = 24" }) +
      counterType("counter", "res/+/c") +
      slowType();
    const fleet = await fleetOnTmpfs(toml, 64);
    await queueSlow(fleet);
    const filler = join(fleet.dataDir, "filler");
    fill(filler, 16 * MB);
    // The gateway looks at the disk every 250 ms at most (2 s without traffic): a device that publishes at
    // once may still get in. Once /readyz says so, nothing does.
    expect(await notReady(fleet)).toMatch(
      /^the data disk is low \(1\d\.\d MB free, below \[fleet\] disk_free_limit_mb = 24\)/,
    );
    const dev = await device(fleet.mqttPort, "dev");
    const acked: string[] = [];
    const ids = Array.from({ length: 12 }, (_, i) => `m${i}`);
    const all = publishAll(dev, (i) => `res/k${i % 2}/c`, ids, acked);
    const post = await fleet.fetch("/api/agents/counter/h/stimuli", { method: "POST", body: '{"id":"h1"}' });
    expect(post.status).toBe(503);
    expect(post.headers.get("retry-after")).toBe("5");
    expect(((await post.json()) as { error: { code: string; message: string } }).error).toMatchObject({
      code: "storage_unavailable",
      message: expect.stringContaining("disk_free_limit_mb = 24"),
    });
    // What was accepted runs and commits: the room kept is for it.
    await fleet.waitCommitted("slow/a", 4);
    // The operator's writes go through: a pause and its resume.
    expect((await fleet.cli("pause", "slow/a")).code).toBe(0);
    expect((await fleet.cli("resume", "slow/a")).code).toBe(0);
    const api = (await (await fleet.fetch("/api/fleet")).json()) as { disk: Record<string, unknown> };
    expect(api.disk).toMatchObject({ low: true, limit_bytes: 24 * MB });
    expect(api.disk.free_bytes as number).toBeLessThan(24 * MB);
    const status = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(status.stdout).toContain("NOT READY: the data disk is low");
    expect(status.stdout).toMatch(
      /disk +1\d\.\d MB free of 64\.0 MB, reserve 24\.0 MB: LOW, stimuli from outside refused since /,
    );
    const metrics = await scrape(fleet.httpUrl);
    expect(sampleValue(metrics, "fleet_disk_low")).toBe(1);
    expect(sampleValue(metrics, "fleet_disk_free_bytes")).toBeLessThan(24 * MB);
    expect(sampleValue(metrics, "fleet_intake_refused_total", { reason: "disk_low", source: "mqtt" })).toBeGreaterThan(
      0,
    );
    expect(acked).toEqual([]);
    expect(await fleet.query("SELECT 1 FROM stimuli WHERE agent LIKE 'counter/%'")).toEqual([]);

    // A reload that lowers the limit under the free space ends the refusal (applied on reload); the devices'
    // messages, resent, land once each.
    const before = (await fleet.cli("status")).json.spec_version;
    await Bun.write(fleet.configPath, toml.replace("disk_free_limit_mb = 24", "disk_free_limit_mb = 8"));
    await waitFor(
      async () => ((await fleet.cli("status")).json.spec_version !== before ? true : undefined),
      30_000,
      "the edit applied",
    );
    await all;
    expect(acked.sort()).toEqual([...ids].sort());
    await fleet.waitCommitted("counter/k0", 6);
    await fleet.waitCommitted("counter/k1", 6);
    expect((await fleet.fetch("/readyz")).status).toBe(200);
    expect(sampleValue(await scrape(fleet.httpUrl), "fleet_disk_low")).toBe(0);
    const logged = fleet.logTail(400);
    expect(logged.match(/data disk low: new stimuli/g)).toHaveLength(1);
    expect(logged.match(/data disk has room again/g)).toHaveLength(1);
    dev.end(true);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});

describe.skipIf(!canMount)("a data disk the fleet's own history filled", () => {
  test("below the reserve, `fleet gc` makes room in fleet.db and devices are taken again", async () => {
    const toml =
      fleetHeader("e2e-disk-own", { fleet: "disk_free_limit_mb = 12" }) +
      agentType("fat", fixture("fat"), ["fat/+/c"], {
        dedup: "id",
        extra: "\n[agents.fat.checkpoint]\nkeep = 2\n",
      });
    const fleet = await fleetOnTmpfs(toml, 48);
    const dev = await fleet.mqtt({ clientId: "dev" });
    // 256 KB of state per episode, each one kept as a checkpoint until gc: the history fills the disk.
    let accepted = 0;
    // A publish past the line is refused (no PUBACK, this client closed): it ends the filling too.
    let refusedId: string | null = null;
    const isLow = async () => (await fleet.fetch("/readyz")).status === 503;
    while (refusedId === null && !(await isLow()) && accepted < 400) {
      for (let i = 0; i < 10 && refusedId === null; i++) {
        const id = `f${accepted}`;
        const ack = dev.publishAsync("fat/a/c", JSON.stringify({ id, kb: 256 }), { qos: 1 }).then(
          () => true,
          () => false,
        );
        if (await Promise.race([ack, Bun.sleep(3000).then(() => false)])) accepted++;
        else refusedId = id;
      }
      await fleet.waitCommitted("fat/a", accepted, 60_000);
      await Bun.sleep(300); // one look at the disk
    }
    expect(accepted).toBeGreaterThan(20);
    expect(accepted).toBeLessThan(400);
    expect(await notReady(fleet)).toStartWith("the data disk is low");
    // Devices are refused now.
    const probe = await fleet.mqtt({ clientId: "probe" });
    const refused = probe.publishAsync("fat/a/c", JSON.stringify({ id: "refused", kb: 1 }), { qos: 1 });
    refused.catch(() => undefined);
    expect(await Promise.race([refused.then(() => "acked"), Bun.sleep(1500).then(() => "not acked")])).toBe(
      "not acked",
    );
    await fleet.waitCommitted("fat/a", accepted, 60_000);

    // Retention drops all but the last two checkpoints: pages free inside fleet.db, the file as large as before.
    const gc = await fleet.cli("gc");
    expect(gc.code).toBe(0);
    // It says how much room it made: free pages in fleet.db, which new writes reuse.
    expect(gc.json.dbFreeBytes).toBeGreaterThan(12 * MB);
    await waitFor(async () => ((await fleet.fetch("/readyz")).status === 200 ? true : undefined), 20_000, "ready");
    const disk = ((await (await fleet.fetch("/api/fleet")).json()) as { disk: Record<string, number> }).disk;
    expect(disk.db_free_bytes).toBeGreaterThan(12 * MB);
    expect(disk.free_bytes).toBeLessThan(12 * MB);
    const again = await fleet.mqtt({ clientId: "dev2" });
    await again.publishAsync("fat/a/c", JSON.stringify({ id: "after", kb: 1 }), { qos: 1 });
    await fleet.waitCommitted("fat/a", accepted + 1);
    const never = ["id:refused", `id:${refusedId}`];
    expect(await fleet.query("SELECT sid FROM stimuli WHERE sid IN (?, ?)", never)).toEqual([]);
    expect(await fleet.stop()).toBe(0);
    expect((await fleet.cli("verify")).json).toMatchObject({ problems: [] });
    // On the stopped gateway `fleet gc` says it too.
    const offline = await runCli(["gc", "--config", fleet.configPath, "--data-dir", fleet.dataDir]);
    expect(offline.stdout).toMatch(
      /; fleet\.db has \d+\.\d MB of free pages, which new writes reuse before the file grows\n$/,
    );
  }, 180_000);
});

describe.skipIf(!canMount)("a data disk with no file left to make (inodes), its bytes free", () => {
  test("the gateway needs no new file there: devices are acknowledged and episodes commit", async () => {
    const fleet = await fleetOnTmpfs(fleetHeader("e2e-disk-inodes") + counterType("counter", "ino/+/c"), 64, 400);
    const c = await fleet.mqtt({ clientId: "dev" });
    await c.publishAsync("ino/a/c", JSON.stringify({ id: "before" }), { qos: 1 });
    await fleet.waitCommitted("counter/a", 1);
    // Every inode taken by empty files of another program.
    const junk = join(fleet.dataDir, "junk");
    mkdirSync(junk);
    let files = 0;
    try {
      for (;;) closeSync(openSync(join(junk, `f${files++}`), "w"));
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe("ENOSPC");
    }
    expect(statfsSync(fleet.dataDir).ffree).toBe(0);
    for (let i = 0; i < 5; i++) await c.publishAsync("ino/a/c", JSON.stringify({ id: `after${i}` }), { qos: 1 });
    await fleet.waitCommitted("counter/a", 6);
    expect((await fleet.fetch("/readyz")).status).toBe(200);
    expect((await fleet.agent("counter/a"))?.seq).toBe(6);
    expect(await fleet.stop()).toBe(0);
  }, 60_000);
});
