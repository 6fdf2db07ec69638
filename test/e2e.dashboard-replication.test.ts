/**
 * Replication lag where operators look (issue 11, docs/replication.md): the dashboard's
 * replication tile in a real headless browser (Debian's chromium via playwright-core), /metrics,
 * `fleet status` (running and stopped) and the retained `fleet/health`, against a real gateway
 * replicating to a real sqld that is killed with kill -9 and restarted.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import type { MqttClient } from "mqtt";
import { chromium, type Browser, type Page } from "playwright-core";
import { cleanupAll, publishQos1, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { caughtUp, replicationOf, replicationToml } from "./helpers/replication.ts";
import { Sqld } from "./helpers/sqld.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

const CHROMIUM = "/usr/bin/chromium";

let sqld: Sqld;
let fleet: TestFleet;
let client: MqttClient;
let browser: Browser;
let page: Page;

const tile = (id: string) => page.getByTestId(id);
const textOf = async (id: string) => (await tile(id).textContent()) ?? "";

/** Wait until the replication tile's value (rows behind) is `rows`. */
async function tileRows(rows: string): Promise<void> {
  await page.waitForFunction(
    (want) => document.querySelector('[data-testid="kpi-replication-value"]')?.textContent === want,
    rows,
    { timeout: 60_000 },
  );
}

beforeAll(async () => {
  if (!existsSync(CHROMIUM))
    throw new Error(`the dashboard browser test needs Debian's chromium at ${CHROMIUM}; it does not skip`);
  sqld = await Sqld.start();
  fleet = new TestFleet(
    fleetHeader("plant-9") +
      counterType("counter", "sensors/+/count") +
      replicationToml(sqld.url, { interval: "100ms" }),
  );
  await fleet.start(120_000);
  client = await fleet.mqtt({ clientId: "e2e-repl-dashboard" });
  for (let i = 0; i < 3; i++) await publishQos1(client, "sensors/a/count", { id: `a${i}`, value: i });
  await fleet.waitCommitted("counter/a", 3, 120_000);
  const added = await fleet.cli("token", "add", "repl-dashboard", "--scope", "read");
  expect(added.code).toBe(0);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  const session = await fetch(`${fleet.httpUrl}/api/session`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token: added.json.token }),
  });
  const id = /fleet_session=([^;]+)/.exec(session.headers.get("set-cookie") ?? "")?.[1];
  if (!id) throw new Error(`sign-in failed: HTTP ${session.status}`);
  await page.context().addCookies([{ name: "fleet_session", value: id, url: fleet.httpUrl, sameSite: "Strict" }]);
  page.on("pageerror", (err) => console.error("page error:", err));
}, 180_000);

afterAll(async () => {
  await browser?.close();
  await cleanupAll();
  await sqld?.dispose();
}, 60_000);

describe("replication lag on the dashboard, /metrics, fleet status and fleet/health", () => {
  test("caught up: 0 rows behind, the confirmed cursor at the newest entry, no error", async () => {
    const s = await caughtUp(fleet);
    expect(s.cursor).toBeDefined();
    expect(s.cursor!.confirmed_seq).toBeGreaterThan(0);
    expect(s.cursor!.confirmed_seq).toBe(s.cursor!.queued_seq);
    await page.goto(`${fleet.httpUrl}/`);
    await tileRows("0");
    await page.waitForFunction(
      () => /confirmed #\d+ of #\d+/.test(document.querySelector('[data-testid="repl-cursor"]')?.textContent ?? ""),
      null,
      { timeout: 30_000 },
    );
    const [confirmed, queued] = (await textOf("repl-cursor"))
      .match(/#(\d+) of #(\d+)/)!
      .slice(1)
      .map(Number);
    expect(confirmed).toBe(queued!);
    expect(confirmed).toBeGreaterThanOrEqual(s.cursor!.confirmed_seq);
    expect(await textOf("kpi-replication")).toContain("streaming");
    expect(await tile("repl-error").count()).toBe(0);
    expect(await textOf("repl-last-push")).not.toContain("never");

    const m = await scrape(fleet.httpUrl);
    expect(sampleValue(m, "fleet_replication_confirmed_seq")).toBeGreaterThanOrEqual(s.cursor!.confirmed_seq);
    expect(sampleValue(m, "fleet_replication_last_error_timestamp_seconds")).toBe(0);

    const status = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(status.code).toBe(0);
    expect(status.stdout).toMatch(/replication +streaming to http:\/\/127\.0\.0\.1:\d+: 0 row\(s\) behind/);
    expect(status.stdout).toMatch(/confirmed #\d+ of #\d+/);

    // fleet/health (retained) carries the same object.
    const health = await new Promise<{ replication: { backlog: unknown; cursor: unknown } }>((resolve) => {
      client.subscribe("fleet/health", { qos: 0 });
      client.on("message", (topic, payload) => {
        if (topic === "fleet/health") resolve(JSON.parse(payload.toString()));
      });
    });
    expect(health.replication).toMatchObject({ backlog: { rows: expect.any(Number) }, cursor: expect.any(Object) });
  }, 120_000);

  test("center down (kill -9): rows, bytes and lag grow, the error shows; back up: it drains to 0", async () => {
    await sqld.kill();
    for (let i = 0; i < 3; i++) await publishQos1(client, "sensors/b/count", { id: `b${i}`, value: i });
    await fleet.waitCommitted("counter/b", 3, 120_000);
    const failing = await waitFor(
      async () => {
        const r = await replicationOf(fleet);
        return r.last_error?.kind === "unreachable" && r.backlog.rows > 0 ? r : undefined;
      },
      60_000,
      "unreachable with a backlog",
    );
    expect(failing.backlog.bytes).toBeGreaterThan(0);
    await page.waitForFunction(
      () => document.querySelector('[data-testid="repl-error"]')?.textContent?.startsWith("unreachable:"),
      null,
      { timeout: 60_000 },
    );
    expect(Number((await textOf("kpi-replication-value")).replaceAll(",", ""))).toBeGreaterThan(0);
    expect(await tile("kpi-replication").getAttribute("class")).toContain("bad");
    expect(await textOf("repl-backlog")).toMatch(/^\d+(\.\d)? (B|KB) · lag /);
    const m = await scrape(fleet.httpUrl);
    expect(sampleValue(m, "fleet_replication_backlog_rows")).toBeGreaterThan(0);
    expect(sampleValue(m, "fleet_replication_last_error_timestamp_seconds")).toBeGreaterThan(0);
    const status = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(status.stdout).toContain("last error unreachable: central server");

    await sqld.restart();
    const s = await caughtUp(fleet, 120_000);
    expect(s.cursor!.confirmed_seq).toBe(s.cursor!.queued_seq);
    await tileRows("0");
    await page.waitForFunction(() => !document.querySelector('[data-testid="repl-error"]'), null, {
      timeout: 30_000,
    });
  }, 240_000);

  test("fleet status with the gateway stopped reads the backlog and cursor from the data dir", async () => {
    const confirmed = (await replicationOf(fleet)).cursor!.confirmed_seq;
    expect(await fleet.stop()).toBe(0);
    const json = await fleet.cli("status");
    expect(json.json.replication).toEqual({ backlog_rows: 0, confirmed_seq: confirmed });
    const text = await runCli(["status", "--data-dir", fleet.dataDir]);
    expect(text.stdout).toContain(`0 row(s) not confirmed by the central server (confirmed cursor #${confirmed})`);
    // Statuses as everywhere else: the store's `active` is shown as `idle`.
    const statuses = (json.json.agents as { status: string }[]).map((a) => a.status);
    expect(statuses).toContain("idle");
    expect(statuses).not.toContain("active");
  }, 120_000);
});
