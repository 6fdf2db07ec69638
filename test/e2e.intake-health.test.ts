/**
 * What a device and an operator see at the edges of intake, against the real gateway
 * process: a message that names no valid agent is recorded with its reason (never acked and
 * dropped), failing commits make /readyz 503 with the reason until a commit succeeds again,
 * and `[broker] max_connections` refuses extra devices while HTTP keeps answering.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectAsync } from "mqtt";
import { ROOT, TestFleet, authed, cleanupAll, publishQos1, waitFor, within } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, counterType, fleetHeader } from "./helpers/toml.ts";

afterAll(async () => {
  await cleanupAll();
}, 60_000);

/** GET a URL of `f`'s gateway as the local operator. */
const getJson = async (url: string, f: TestFleet) => {
  const res = await fetch(url, authed(f.token));
  return { status: res.status, body: (await res.json()) as any };
};

describe("a message that matches a subscription but names no valid agent", () => {
  test("is acknowledged only after it is recorded as rejected with its reason (GET /api/rejected)", async () => {
    const fleet = new TestFleet(fleetHeader("e2e-rejected") + counterType("counter", "dev/+/c"));
    await fleet.start();
    const client = await fleet.mqtt({ clientId: "e2e-rejected" });
    await publishQos1(client, "dev/bad key!/c", { id: "r1", v: 1 });
    await publishQos1(client, `dev/${"k".repeat(129)}/c`, { id: "r2" });
    await publishQos1(client, "dev/good/c", { id: "g1" });
    // Acked means recorded: the rows are there the moment the PUBACK arrived.
    const { status, body } = await getJson(`${fleet.httpUrl}/api/rejected`, fleet);
    expect(status).toBe(200);
    expect(body.total).toBe(2);
    const [long, bad] = body.rejected;
    expect(bad).toMatchObject({
      kind: "mqtt",
      topic: "dev/bad key!/c",
      client: "e2e-rejected",
      payload: { id: "r1", v: 1 },
    });
    expect(bad.reason).toContain("gives no valid key for counter");
    expect(long.reason).toContain("is longer than 128 bytes (129)");
    expect((await getJson(`${fleet.httpUrl}/api/fleet`, fleet)).body.rejected_messages).toBe(2);
    expect(sampleValue(await scrape(fleet.httpUrl), "fleet_intake_rejected_messages_total")).toBe(2);
    // The same cap for a manual stimulus, with the same reason.
    const manual = await fleet.fetch(`/api/agents/counter/${"k".repeat(129)}/stimuli`, { method: "POST", body: "{}" });
    expect(manual.status).toBe(400);
    expect(((await manual.json()) as { error: { message: string } }).error.message).toContain(
      "is longer than 128 bytes (129)",
    );
    await fleet.waitCommitted("counter/good", 1);
    expect(await fleet.stop()).toBe(0);
  }, 60_000);
});

describe("failing commits", () => {
  test("/readyz is 503 with the reason while commits fail, nothing is acked; 200 once a commit succeeds", async () => {
    const faultFile = join(tmpdir(), `fleet-disk-full-${process.pid}-${Date.now()}`);
    const hook = '\n[hooks.h]\nagent = "counter/h"\n';
    const withFault = new TestFleet(fleetHeader("e2e-disk") + counterType("counter", "disk/+/c") + hook, {
      env: { FLEET_TEST_COMMIT_FAULT_FILE: faultFile },
    });
    await withFault.start();
    const base = withFault.httpUrl;
    expect((await getJson(`${base}/readyz`, withFault)).status).toBe(200);
    await publishQos1(await withFault.mqtt({ clientId: "before" }), "disk/a/c", { id: "before" });

    writeFileSync(faultFile, "");
    const client = await withFault.mqtt({ clientId: "during" });
    const closed = new Promise<void>((resolve) => client.once("close", () => resolve()));
    let acked = false;
    client.publish("disk/a/c", JSON.stringify({ id: "during" }), { qos: 1 }, (err) => (acked = !err));
    await within(closed, 15_000, "the broker to drop the publish it could not record");
    expect(acked).toBe(false);

    const down = await getJson(`${base}/readyz`, withFault);
    expect(down.status).toBe(503);
    expect(down.body.ready).toBe(false);
    expect(down.body.reason).toContain("commits failing (disk_full)");
    expect(await getJson(`${base}/healthz`, withFault)).toMatchObject({ status: 200 });
    const health = (await getJson(`${base}/api/fleet`, withFault)).body;
    expect(health.readiness.ready).toBe(false);
    expect(health.db.ok).toBe(false);
    expect(health.db.failure_kind).toBe("disk_full");
    const status = await withFault.cli("status");
    expect(status.json.readiness.reason).toContain("disk_full");
    const metrics = await scrape(base);
    expect(sampleValue(metrics, "fleet_commit_failures_total", { kind: "disk_full" })).toBeGreaterThanOrEqual(1);
    expect(sampleValue(metrics, "fleet_storage_ok")).toBe(0);
    // A webhook or `fleet send` is told to try again (503, Retry-After), not that the gateway broke (500).
    for (const res of [
      await fetch(`${base}/hooks/h`, { method: "POST", body: '{"id":"w"}' }),
      await withFault.fetch("/api/send", { method: "POST", body: '{"topic":"disk/a/c","payload":{"id":"s"}}' }),
    ]) {
      expect(res.status).toBe(503);
      expect(res.headers.get("retry-after")).toBe("5");
      const err = ((await res.json()) as { error: { code: string; message: string } }).error;
      expect(err.code).toBe("storage_unavailable");
      expect(err.message).toContain("nothing was recorded: commits are failing (disk_full)");
    }
    const sent = await withFault.cli("send", "disk/a/c", '{"id":"s"}');
    expect(sent.code).toBe(1);
    expect(sent.stderr).toContain("nothing was recorded");
    // A dry run changes nothing: it answers though its audit record cannot be written, which the log keeps.
    const preview = await withFault.cli("gc", "--dry-run", "--json");
    expect(preview.code).toBe(0);
    expect(preview.json).toMatchObject({ tombstoned: 0, episodesDeleted: 0 });
    const unwritten = logged(withFault, "audit record not written; this log line holds it");
    expect(unwritten.map((l) => l.audit)).toContainEqual(
      expect.objectContaining({ action: "gc.dry_run", status: 200, actor: expect.any(String) }),
    );
    // A real collection has to write: refused, nothing collected.
    const gc = await withFault.cli("gc");
    expect(gc.code).toBe(1);
    expect(gc.stderr).toContain("gc refused");

    rmSync(faultFile);
    // The gateway probes with a tiny write while failing, so readiness returns without traffic.
    await waitFor(async () => (await fetch(`${base}/readyz`)).status === 200, 15_000, "/readyz back to 200");
    await publishQos1(await withFault.mqtt({ clientId: "after" }), "disk/a/c", { id: "during" });
    await withFault.waitCommitted("counter/a", 2);
    expect((await fetch(`${base}/hooks/h`, { method: "POST", body: '{"id":"w"}' })).status).toBe(202);
    expect(await withFault.stop()).toBe(0);
  }, 60_000);
});

/** The gateway log's JSON lines with this `msg`. */
function logged(f: TestFleet, msg: string): Record<string, any>[] {
  return readFileSync(f.logPath, "utf8")
    .split("\n")
    .filter((l) => l.includes(msg))
    .map((l) => JSON.parse(l) as Record<string, any>)
    .filter((l) => l.msg === msg);
}

describe("storage that comes back", () => {
  test("an agent whose commits the full disk refused runs at once, not when its backoff ends", async () => {
    const faultFile = join(tmpdir(), `fleet-disk-back-${process.pid}-${Date.now()}`);
    const fleet = new TestFleet(
      fleetHeader("e2e-disk-back") + agentType("slow", join(ROOT, "test/fixtures/ops/counter-slow.ts"), ["back/+/c"]),
      { env: { FLEET_TEST_COMMIT_FAULT_FILE: faultFile } },
    );
    await fleet.start();
    // Recorded, then the disk fills while its episode runs (1.5 s): every commit of it fails.
    await publishQos1(await fleet.mqtt({ clientId: "back" }), "back/a/c", { id: "s1" });
    writeFileSync(faultFile, "");
    const failed = "episode turn failed unexpectedly";
    // Each failed turn doubles the agent's wait: 1, 2, 4, 8, then 16 s.
    await waitFor(() => logged(fleet, failed).length >= 5 || undefined, 60_000, "five failed turns");
    const last = logged(fleet, failed).at(-1)!;
    expect(last.retry_in_ms).toBe(16_000);
    const backoffEnds = Date.parse(last.time) + last.retry_in_ms;
    rmSync(faultFile);
    const [episode] = await fleet.waitCommitted("slow/a", 1, 60_000);
    expect(logged(fleet, "commits succeed again; ready")).toHaveLength(1);
    // Woken when commits succeeded again (the probe runs every 2 s), not at the end of its 16 s wait.
    expect(episode!.started_at).toBeLessThan(backoffEnds);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});

describe("a fleet.toml edit while the disk is full", () => {
  test("is shown as not applied by status, and applied by itself once commits succeed again", async () => {
    const faultFile = join(tmpdir(), `fleet-disk-edit-${process.pid}-${Date.now()}`);
    const toml = fleetHeader("e2e-disk-edit") + counterType("counter", "edit/+/c");
    const fleet = new TestFleet(toml, { env: { FLEET_TEST_COMMIT_FAULT_FILE: faultFile } });
    await fleet.start();
    const before = (await fleet.cli("status", "--json")).json.spec_version as string;
    writeFileSync(faultFile, "");
    writeFileSync(fleet.configPath, toml + counterType("second", "second/+/c"));
    const edited = (await fleet.cli("validate", fleet.configPath, "--json")).json.hash as string;
    expect(edited).not.toBe(before);
    // The new version could not be stored: status says so (it said nothing, as if it were applied).
    const refused = await waitFor(
      async () => {
        const s = (await fleet.cli("status", "--json")).json;
        return typeof s.spec_error === "string" ? s : undefined;
      },
      30_000,
      "the reload's failure in status",
    );
    expect(refused.spec_error).toContain("not applied: ");
    expect(refused.spec_error).toContain("disk is full");
    expect(refused.spec_version).toBe(before);
    rmSync(faultFile);
    // No second edit, no SIGHUP: the reload runs again when commits succeed again.
    const applied = await waitFor(
      async () => {
        const s = (await fleet.cli("status", "--json")).json;
        return s.spec_version === edited ? s : undefined;
      },
      30_000,
      "the edit applied",
    );
    expect(applied.spec_error).toBeNull();
    await publishQos1(await fleet.mqtt({ clientId: "edit" }), "second/a/c", { id: "x" });
    await fleet.waitCommitted("second/a", 1);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});

describe("a start on a full disk", () => {
  test("fails with one line naming the data dir and saying the disk is full", async () => {
    const faultFile = join(tmpdir(), `fleet-disk-start-${process.pid}-${Date.now()}`);
    writeFileSync(faultFile, "");
    const fleet = new TestFleet(fleetHeader("e2e-disk-start") + counterType("counter", "start/+/c"), {
      env: { FLEET_TEST_COMMIT_FAULT_FILE: faultFile },
    });
    await expect(fleet.start()).rejects.toThrow("gateway exited (code 1");
    rmSync(faultFile);
    const line = fleet
      .logTail(5)
      .split("\n")
      .find((l) => l.startsWith("fleet: "));
    expect(line).toStartWith(`fleet: cannot start: the disk of ${fleet.dataDir} is full: free space and start again (`);
    expect(line).toContain("disk is full");
    // Once space is back it starts as usual.
    await fleet.start();
    expect(await fleet.stop()).toBe(0);
  }, 60_000);
});

describe("[broker] max_connections", () => {
  test("past the limit a device gets CONNACK 3, the refusal is counted, and /healthz keeps answering", async () => {
    const fleet = new TestFleet(fleetHeader("e2e-maxconn", { broker: "max_connections = 2" }));
    await fleet.start();
    await fleet.mqtt({ clientId: "one" });
    await fleet.mqtt({ clientId: "two" });
    const err = await connectAsync(`mqtt://127.0.0.1:${fleet.mqttPort}`, {
      clientId: "three",
      reconnectPeriod: 0,
      connectTimeout: 5000,
    }).then(
      (c) => {
        c.end(true);
        return null;
      },
      (e: { code?: number }) => e,
    );
    expect(err?.code).toBe(3);
    expect((await getJson(`${fleet.httpUrl}/healthz`, fleet)).status).toBe(200);
    const metrics = await scrape(fleet.httpUrl);
    expect(sampleValue(metrics, "fleet_broker_connections_refused_total")).toBe(1);
    expect(sampleValue(metrics, "fleet_broker_connections")).toBe(2);
    expect(await fleet.stop()).toBe(0);
  }, 60_000);
});

describe("a clock behind the data dir", () => {
  test("a restart whose clock reads earlier than the newest record says so: /api/fleet, gauge, log", async () => {
    const env: Record<string, string> = {};
    const fleet = new TestFleet(fleetHeader("e2e-clock") + counterType("counter", "clock/+/c"), { env });
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "clock/a/c", { id: "1" });
      await fleet.waitCommitted("counter/a", 1);
      const fleetView = async () => (await getJson(`${fleet.httpUrl}/api/fleet`, fleet)).body;
      expect((await fleetView()).clock_behind_ms).toBe(0);
      expect(sampleValue(await scrape(fleet.httpUrl), "fleet_clock_behind_seconds")).toBe(0);
      expect(await fleet.stop()).toBe(0);

      // A box without a real-time clock, booted an hour in the past (before NTP sets it).
      env.FLEET_TEST_CLOCK_OFFSET_MS = String(-3_600_000);
      await fleet.start();
      const behind = (await fleetView()).clock_behind_ms as number;
      expect(behind).toBeGreaterThan(3_500_000);
      expect(behind).toBeLessThanOrEqual(3_600_000);
      expect(sampleValue(await scrape(fleet.httpUrl), "fleet_clock_behind_seconds")).toBeGreaterThan(3500);
      expect(fleet.logTail(100)).toContain("earlier than the newest time this data dir recorded");
    } finally {
      await fleet.dispose();
    }
  }, 90_000);
});
