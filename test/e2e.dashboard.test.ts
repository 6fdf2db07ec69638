/**
 * The dashboard in a real headless browser (Debian's chromium driven by playwright-core)
 * against a real gateway process that runs real episodes. Asserts what an operator sees and
 * does: the overview counts, finding an agent, its episodes with their event log and
 * decisions, pause and resume, and a new episode appearing live without a reload.
 * Screenshots go to test-output/ (git-ignored).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import type { Browser, Page } from "playwright-core";
import { addToken, launchChromium, signIn } from "./helpers/browser.ts";
import { ROOT, TestFleet, cleanupAll, publishQos1, waitFor, within } from "./helpers/gateway.ts";
import { counterType, fleetHeader, tempMonitorType, throwerType } from "./helpers/toml.ts";

const OUT = join(ROOT, "test-output");
const DEVICES = Array.from({ length: 60 }, (_, i) => `pump-${String(i).padStart(2, "0")}`);
/** While this file exists the gateway's commits fail like a full disk (FLEET_TEST_COMMIT_FAULT_FILE). */
const DISK_FULL = join(tmpdir(), `fleet-dashboard-disk-full-${process.pid}`);

const TOML =
  fleetHeader("plant-7") +
  tempMonitorType("temp-monitor", {
    instances: ["boiler-1", "boiler-2"],
    extra: "\n[agents.temp-monitor.budget]\nepisodes_per_hour = 20\n",
  }) +
  counterType("counter", "pumps/+/in", { instances: DEVICES }) +
  throwerType("bad/+/in");

let fleet: TestFleet;
let client: MqttClient;
let browser: Browser;
let page: Page;
let base: string;
let signInToken: string;

const api = async (path: string, init?: RequestInit) => (await fleet.fetch(path, init)).json() as Promise<any>;
const byTestId = (id: string) => page.getByTestId(id);

/**
 * Budget figures count the current UTC hour's episodes: the overview's "2 of 20 this hour" read while
 * the hour turns would count the episodes of the next one only. Set-up and the overview's test take
 * well under 90 s, so when less than that is left of the hour, wait for the next one.
 */
async function awayFromHourEdge(margin = 90_000): Promise<void> {
  const left = 3_600_000 - (Date.now() % 3_600_000);
  if (left < margin) await Bun.sleep(left + 1000);
}

beforeAll(async () => {
  mkdirSync(OUT, { recursive: true });
  await awayFromHourEdge();
  fleet = new TestFleet(TOML, { env: { FLEET_TEST_COMMIT_FAULT_FILE: DISK_FULL } });
  await fleet.start();
  base = fleet.httpUrl;
  // Minted before the episodes below: the overview's one-minute rates must still cover them.
  signInToken = await addToken(fleet, "dashboard-e2e", "admin");
  client = await fleet.mqtt({ clientId: "e2e-dashboard" });
  // Real episodes: an alert and a clear on boiler-1, readings on a few pumps, one failure.
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t1", value: 91.5 });
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t2", value: 72 });
  await publishQos1(client, "sensors/boiler-2/temperature", { id: "u1", value: 65 });
  for (let i = 0; i < 6; i++) await publishQos1(client, `pumps/pump-0${i}/in`, { id: `p${i}`, rpm: 1400 + i });
  await publishQos1(client, "bad/valve-9/in", { id: "boom" });
  await fleet.waitCommitted("temp-monitor/boiler-1", 2);
  await fleet.waitCommitted("counter/pump-05", 1);
  await fleet.waitEpisodes("thrower/valve-9", (eps) => eps.length === 1, 30_000, "the failed thrower episode");

  browser = await launchChromium();
  // Signed in through the API here; the sign-in form itself is tested on a page of its own.
  page = await signIn(fleet, browser, signInToken);
}, 220_000);

afterAll(async () => {
  await browser?.close();
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

describe("the dashboard", () => {
  test("the overview shows the fleet: counts, rates, spec version, and the agent table", async () => {
    const fleetInfo = await api("/api/fleet");
    await page.goto(`${base}/`);
    await page.waitForFunction(() => document.querySelector('[data-testid="fleet-name"]')?.textContent === "plant-7");
    await byTestId("live").and(page.locator('[data-state="open"]')).waitFor({ timeout: 15_000 });
    expect(await byTestId("spec-version").textContent()).toBe(fleetInfo.spec_version.slice(0, 12));
    expect(await byTestId("spec-error").isHidden()).toBe(true);

    await page.waitForFunction(() => document.querySelector('[data-testid="kpi-agents-value"]')?.textContent === "63");
    expect(await byTestId("count-idle").textContent()).toContain("63 idle");
    expect(await byTestId("count-paused").textContent()).toContain("0 paused");
    // 10 episodes ran in the last minute, one of them failed.
    await page.waitForFunction(
      () => document.querySelector('[data-testid="kpi-episode-rate-value"]')?.textContent === "10",
    );
    expect(await byTestId("kpi-failure-rate-value").textContent()).toBe("10%");
    expect(await byTestId("kpi-lag-value").textContent()).toBe("0 ms");
    expect(await byTestId("kpi-budget-value").textContent()).toBe("10%"); // boiler-1: 2 of 20 episodes this hour

    const types = byTestId("types-table");
    await expect(types.locator("tbody tr").count()).resolves.toBe(3);
    expect(await types.locator('tr[data-type="counter"] td').nth(1).textContent()).toBe("60");

    const table = byTestId("agents-table");
    await table.locator('tr[data-agent="counter/pump-00"]').waitFor();
    expect(await table.locator("tbody tr").count()).toBe(50); // one page of 63, ordered by id
    expect(await byTestId("agents-count").textContent()).toBe("1–50 of 63 agents");

    await byTestId("page-next").click();
    await page.waitForFunction(
      () => document.querySelector('[data-testid="agents-count"]')?.textContent === "51–63 of 63 agents",
    );
    expect(await table.locator("tbody tr").count()).toBe(13);
    expect(page.url()).toContain("page=2");
    const boiler = table.locator('tr[data-agent="temp-monitor/boiler-1"]');
    expect(await boiler.locator("td.status").textContent()).toBe("idle");
    expect(await boiler.locator('td[data-col="episodes"]').textContent()).toBe("2");
    await page.evaluate(() => window.scrollTo(0, 0)); // the pager sits at the bottom; the sticky header at the top
    await page.screenshot({ path: join(OUT, "dashboard.png"), fullPage: true });
  }, 60_000);

  test("search and filters narrow the table on the server", async () => {
    await page.goto(`${base}/#/`);
    const table = byTestId("agents-table");
    await byTestId("agent-search").fill("boiler");
    await page.waitForFunction(
      () => document.querySelector('[data-testid="agents-count"]')?.textContent === "1–2 of 2 agents",
    );
    expect(
      await table
        .locator("tbody tr[data-agent]")
        .evaluateAll((rows) => rows.map((r) => (r as HTMLElement).dataset.agent)),
    ).toEqual(["temp-monitor/boiler-1", "temp-monitor/boiler-2"]);

    await byTestId("agent-search").fill("boiler-1");
    await page.waitForFunction(
      () => document.querySelector('[data-testid="agents-count"]')?.textContent === "1–1 of 1 agents",
    );

    await byTestId("agent-search").fill("");
    await page.waitForFunction(
      () => document.querySelector('[data-testid="agents-count"]')?.textContent === "1–50 of 63 agents",
    );
    await byTestId("filter-type").selectOption("thrower");
    await page.waitForFunction(
      () =>
        [...document.querySelectorAll('[data-testid="agents-table"] tbody tr[data-agent]')]
          .map((r) => (r as HTMLElement).dataset.agent)
          .join() === "thrower/valve-9",
    );
    expect(await byTestId("agents-count").textContent()).toBe("1–1 of 1 agents");
    expect(await table.locator('tr[data-agent="thrower/valve-9"] td').nth(4).textContent()).toBe("1"); // failures

    await byTestId("filter-type").selectOption("");
    await byTestId("filter-status").selectOption("paused");
    await page.waitForFunction(
      () => document.querySelector('[data-testid="agents-count"]')?.textContent === "0 agents",
    );
    expect(await table.textContent()).toContain("No agents match these filters.");
    await byTestId("filter-status").selectOption("");
  }, 60_000);

  test("the agent page shows episodes, the event log with decisions, and the checkpoint chain", async () => {
    await page.goto(`${base}/#/`);
    await byTestId("agent-search").fill("boiler-1");
    const link = byTestId("agents-table").locator('tr[data-agent="temp-monitor/boiler-1"] a');
    await link.waitFor();
    await link.click();
    await expect(byTestId("agent-title").textContent()).resolves.toBe("temp-monitor/boiler-1");
    expect(page.url()).toContain("#/agents/temp-monitor/boiler-1");
    await expect(byTestId("agent-status").textContent()).resolves.toBe("idle");

    const episodes = byTestId("episodes-table").locator("tbody tr[data-episode]");
    await page.waitForFunction(
      () => document.querySelectorAll('[data-testid="episodes-table"] tbody tr[data-episode]').length === 2,
    );
    expect(await episodes.count()).toBe(2);
    const chain = byTestId("checkpoint-chain").locator("li[data-seq]");
    expect(await chain.evaluateAll((li) => li.map((l) => (l as HTMLElement).dataset.seq))).toEqual(["2", "1"]);

    // The older episode raised the alert: pick it and read its log.
    const eps = (await api("/api/agents/temp-monitor/boiler-1/episodes")).episodes;
    const alert = eps.find((e: any) => e.stimulus === "id:t1");
    await byTestId("episodes-table").locator(`tr[data-episode="${alert.id}"]`).click();
    const log = byTestId("event-log");
    await page.waitForFunction(
      (id) => location.hash.endsWith(id) && document.querySelector('[data-testid="event-log"]') !== null,
      alert.id,
    );
    await page.waitForFunction(() =>
      document.querySelector('[data-testid="decisions"] li')?.textContent?.includes("alert"),
    );
    expect(await byTestId("decisions").locator("li").count()).toBe(1);
    expect(await byTestId("decisions").textContent()).toContain('{"value":91.5,"threshold":80}');
    const kinds = await log.locator("li").evaluateAll((li) => li.map((l) => (l as HTMLElement).dataset.kind));
    expect(kinds[0]).toBe("stimulus");
    expect(kinds).toContain("decide");
    expect(kinds).toContain("tool");
    expect(kinds.at(-1)).toBe("end");
    expect(await log.textContent()).toContain("publish(");
    await page.screenshot({ path: join(OUT, "dashboard-agent.png"), fullPage: true });
  }, 60_000);

  test("the agent page shows the state, a checkpoint's diff from its parent, and an episode's lineage", async () => {
    await page.goto(`${base}/#/agents/temp-monitor/boiler-1`);
    await page.waitForFunction(() => document.querySelector('[data-testid="state-json"]') !== null);
    const head = JSON.parse((await byTestId("state-json").textContent()) ?? "null");
    expect(head).toMatchObject({ count: 2 });
    // The diff from #1 to the head names what the second reading changed.
    await page.waitForFunction(() => document.querySelector('[data-testid="state-diff"]') !== null);
    expect(await byTestId("state-diff").textContent()).toContain("/count: 1 → 2");

    // Pick checkpoint #1: its state, and no diff (it has no parent).
    await byTestId("checkpoint-chain").locator('li[data-seq="1"]').click();
    await page.waitForFunction(
      () => document.querySelector('[data-testid="state-panel"]')?.textContent?.includes("State at #1") === true,
    );
    expect(JSON.parse((await byTestId("state-json").textContent()) ?? "null")).toMatchObject({ count: 1 });

    // The alert episode's lineage names the device topic above and the publish below.
    const eps = (await api("/api/agents/temp-monitor/boiler-1/episodes")).episodes;
    const alert = eps.find((e: any) => e.stimulus === "id:t1");
    await byTestId("episodes-table").locator(`tr[data-episode="${alert.id}"]`).click();
    await page.waitForFunction(() => document.querySelector('[data-testid="trace"]') !== null);
    const trace = (await byTestId("trace").textContent()) ?? "";
    expect(trace).toContain("publish alerts/boiler-1");
    expect(trace).toContain("sensors/boiler-1/temperature");
    await page.screenshot({ path: join(OUT, "dashboard-provenance.png"), fullPage: true });
  }, 60_000);

  test("pause and resume from the page change the agent's status, and the API agrees", async () => {
    await page.goto(`${base}/#/agents/temp-monitor/boiler-1`);
    await expect(byTestId("agent-status").textContent()).resolves.toBe("idle");
    expect(await byTestId("btn-resume").isDisabled()).toBe(true);

    await byTestId("btn-pause").click();
    await page.waitForFunction(() => document.querySelector('[data-testid="agent-status"]')?.textContent === "paused");
    expect(await byTestId("agent-reason").textContent()).toBe("paused by operator");
    expect(await byTestId("btn-pause").isDisabled()).toBe(true);
    expect((await api("/api/agents/temp-monitor/boiler-1")).status).toBe("paused");

    await byTestId("btn-resume").click();
    await page.waitForFunction(() => document.querySelector('[data-testid="agent-status"]')?.textContent === "idle");
    expect((await api("/api/agents/temp-monitor/boiler-1")).status).toBe("idle");
    expect(await byTestId("btn-resume").isDisabled()).toBe(true);
  }, 60_000);

  test("a new episode appears live, without a reload", async () => {
    await page.goto(`${base}/#/agents/temp-monitor/boiler-1`);
    await page.waitForFunction(
      () => document.querySelectorAll('[data-testid="episodes-table"] tbody tr[data-episode]').length === 2,
    );
    await byTestId("live").and(page.locator('[data-state="open"]')).waitFor({ timeout: 15_000 });
    await page.evaluate(() => ((window as unknown as { __noReload: number }).__noReload = 42));

    await publishQos1(client, "sensors/boiler-1/temperature", { id: "t3", value: 88 });
    await page.waitForFunction(
      () => document.querySelectorAll('[data-testid="episodes-table"] tbody tr[data-episode]').length === 3,
      undefined,
      { timeout: 30_000 },
    );
    const newest = (await api("/api/agents/temp-monitor/boiler-1/episodes")).episodes[0];
    expect(newest.stimulus).toBe("id:t3");
    expect(
      await byTestId("episodes-table").locator("tbody tr[data-episode]").first().getAttribute("data-episode"),
    ).toBe(newest.id);
    // Following the newest episode, the detail shows its alert decision, and the chain grew.
    await page.waitForFunction(() =>
      document.querySelector('[data-testid="decisions"] li')?.textContent?.includes('"value":88'),
    );
    await page.waitForFunction(
      () => document.querySelector('[data-testid="checkpoint-chain"] li[data-seq]')?.getAttribute("data-seq") === "3",
    );
    expect(await page.evaluate(() => (window as unknown as { __noReload?: number }).__noReload)).toBe(42);

    // The overview is live too: a status change shows without a reload.
    await page.goto(`${base}/#/?q=pump-0`);
    const row = byTestId("agents-table").locator('tr[data-agent="counter/pump-07"]');
    await row.waitFor();
    await byTestId("live").and(page.locator('[data-state="open"]')).waitFor({ timeout: 15_000 });
    await page.evaluate(() => ((window as unknown as { __noReload: number }).__noReload = 7));
    await fleet.fetch("/api/agents/counter/pump-07/pause", { method: "POST" });
    await page.waitForFunction(
      () => document.querySelector('tr[data-agent="counter/pump-07"] td.status')?.textContent === "paused",
    );
    await fleet.fetch("/api/agents/counter/pump-07/resume", { method: "POST" });
    await page.waitForFunction(
      () => document.querySelector('tr[data-agent="counter/pump-07"] td.status')?.textContent === "idle",
    );
    // An episode of another visible agent updates its row.
    expect(await page.locator('tr[data-agent="counter/pump-08"] td[data-col="episodes"]').textContent()).toBe("0");
    await publishQos1(client, "pumps/pump-08/in", { id: "late" });
    await page.waitForFunction(
      () => document.querySelector('tr[data-agent="counter/pump-08"] td[data-col="episodes"]')?.textContent === "1",
      undefined,
      { timeout: 30_000 },
    );
    expect(await page.evaluate(() => (window as unknown as { __noReload?: number }).__noReload)).toBe(7);
  }, 60_000);

  test("while commits fail the header says not ready, with the reason; the banner goes once one succeeds", async () => {
    await page.goto(`${base}/`);
    await page.waitForFunction(() => document.querySelector('[data-testid="fleet-name"]')?.textContent === "plant-7");
    expect(await byTestId("storage-error").isHidden()).toBe(true);
    writeFileSync(DISK_FULL, "");
    try {
      const device = await fleet.mqtt({ clientId: "disk-full" });
      const dropped = new Promise<void>((resolve) => device.once("close", () => resolve()));
      device.publish("pumps/pump-09/in", JSON.stringify({ id: "disk" }), { qos: 1 });
      await within(dropped, 15_000, "the publish the gateway could not record to be refused");
      await page.reload();
      const banner = byTestId("storage-error");
      await banner.waitFor({ state: "visible", timeout: 15_000 });
      expect(await banner.textContent()).toContain("commits failing (disk_full)");
      await page.screenshot({ path: join(OUT, "dashboard-not-ready.png") });
    } finally {
      rmSync(DISK_FULL, { force: true });
    }
    await waitFor(async () => (await fetch(`${base}/readyz`)).status === 200, 15_000, "/readyz 200 again");
    await page.reload();
    await byTestId("storage-error").waitFor({ state: "hidden", timeout: 15_000 });
  }, 60_000);

  test("without a session it asks for a token; a bad one is refused, a good one opens the dashboard", async () => {
    expect((await fetch(`${base}/ui/app.js`)).status).toBe(401);
    const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
    await page.goto(`${base}/`);
    await page.locator("#token").fill("fleet_not-a-token");
    await page.locator('button[type="submit"]').click();
    await page.waitForFunction(() => document.getElementById("error")?.textContent?.includes("bad or revoked token"));
    await page.locator("#token").fill(signInToken);
    await page.locator('button[type="submit"]').click();
    await page.waitForFunction(() => document.querySelector('[data-testid="fleet-name"]')?.textContent === "plant-7");
    const cookie = (await page.context().cookies()).find((c) => c.name === "fleet_session");
    expect(cookie).toMatchObject({ httpOnly: true, sameSite: "Strict", path: "/" });
    await page.waitForFunction(
      () => document.querySelector('[data-testid="whoami"]')?.textContent === "dashboard-e2e (admin)",
    );
  }, 60_000);

  test("the audit panel lists the operator actions taken from the page, by the signed-in token's name", async () => {
    await page.goto(`${base}/#/`);
    const rows = byTestId("audit-table").locator("tbody tr[data-seq]");
    await rows.first().waitFor();
    const texts = await rows.allTextContents();
    expect(
      texts.some(
        (t) => t.includes("dashboard-e2e") && t.includes("agent.pause") && t.includes("temp-monitor/boiler-1"),
      ),
    ).toBe(true);
    expect(texts.some((t) => t.includes("dashboard-e2e") && t.includes("agent.resume") && t.includes("ok (200)"))).toBe(
      true,
    );
    expect(texts.some((t) => t.includes("session.signin"))).toBe(true);
  }, 60_000);

  test("signing out ends the session: the page asks for a token again and the old cookie reads nothing", async () => {
    const before = (await page.context().cookies()).find((c) => c.name === "fleet_session")!;
    await byTestId("sign-out").click();
    await page.locator("#token").waitFor();
    expect((await fetch(`${base}/api/agents`, { headers: { cookie: `fleet_session=${before.value}` } })).status).toBe(
      401,
    );
  }, 60_000);
});
