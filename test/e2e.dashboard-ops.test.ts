/**
 * The dashboard's operator tools in a real headless browser (Debian's chromium driven by
 * playwright-core) against a real gateway: the per-minute charts show exactly the episodes,
 * failures and lag the test caused; the output feed lists alerts newest first, grows live and
 * links to each output's trace; the quarantine's Retry runs a poison stimulus once its cause is
 * fixed and Discard drops one; Replay says MATCH; Retire retires; the agent page filters its
 * episodes by stimulus kind. Every button goes through the audited API the CLI uses.
 * Screenshots go to test-output/ (the README's come from here: docs/dashboard-*.png).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import type { Browser, Page } from "playwright-core";
import { addToken, launchChromium, signIn } from "./helpers/browser.ts";
import { cleanupAll, publishQos1, ROOT, TestFleet, waitFor } from "./helpers/gateway.ts";
import { agentType, counterType, fleetHeader, tempMonitorType } from "./helpers/toml.ts";

const OUT = join(ROOT, "test-output");
const PICKY = join(ROOT, "test/fixtures/ops/picky.ts");
/** The lag the test causes: a reading waits this long in a paused agent's queue. */
const HELD_MS = 1500;

const toml = (accept: boolean) =>
  fleetHeader("ops-7") +
  tempMonitorType("temp-monitor", { instances: ["boiler-1"] }) +
  counterType("counter", "pumps/+/in", { instances: ["pump-1", "pump-2"] }) +
  agentType("picky", PICKY, ["jobs/+/in"], {
    dedup: "id",
    extra: `config = { accept = ${accept} }\n[agents.picky.retry]\nmax_attempts = 1\nbackoff_ms = 10\n`,
  });

let fleet: TestFleet;
let client: MqttClient;
let browser: Browser;
let page: Page;
let base: string;

const api = async (path: string, init?: RequestInit) => (await fleet.fetch(path, init)).json() as Promise<any>;
const byTestId = (id: string) => page.getByTestId(id);
const noReload = (mark: number) =>
  page.evaluate((m) => ((window as unknown as { __noReload: number }).__noReload = m), mark);
const stillNoReload = () => page.evaluate(() => (window as unknown as { __noReload?: number }).__noReload);

beforeAll(async () => {
  mkdirSync(OUT, { recursive: true });
  fleet = new TestFleet(toml(false));
  await fleet.start();
  base = fleet.httpUrl;
  const token = await addToken(fleet, "dashboard-ops", "operate");
  client = await fleet.mqtt({ clientId: "e2e-dashboard-ops" });

  // What the charts must show: 8 episode attempts, 2 of them failed, one reading held HELD_MS.
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t1", value: 91.5 }); // alert
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t2", value: 72 }); // clear
  await publishQos1(client, "pumps/pump-1/in", { id: "p1", rpm: 1400 });
  await publishQos1(client, "pumps/pump-1/in", { id: "p2", rpm: 1410 });
  expect(
    (await fleet.fetch("/api/agents/counter/pump-1/stimuli", { method: "POST", body: '{"by":"hand"}' })).status,
  ).toBe(202);
  await publishQos1(client, "jobs/j1/in", { id: "j1" }); // quarantined: picky refuses
  await publishQos1(client, "jobs/j2/in", { id: "j2" }); // quarantined too, to be discarded
  expect((await fleet.fetch("/api/agents/counter/pump-2/pause", { method: "POST" })).status).toBe(200);
  await publishQos1(client, "pumps/pump-2/in", { id: "held" });
  // The wait is what is measured here (lag), not a synchronisation.
  await Bun.sleep(HELD_MS);
  expect((await fleet.fetch("/api/agents/counter/pump-2/resume", { method: "POST" })).status).toBe(200);
  await fleet.waitCommitted("temp-monitor/boiler-1", 2);
  await fleet.waitCommitted("counter/pump-1", 3);
  await fleet.waitCommitted("counter/pump-2", 1);
  await waitFor(async () => (await api("/api/quarantine")).stimuli.length === 2, 30_000, "two quarantined jobs");

  browser = await launchChromium();
  page = await signIn(fleet, browser, token);
}, 120_000);

afterAll(async () => {
  await browser?.close();
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

/** The values of one chart's bars, by minute. */
async function bars(id: string): Promise<Map<number, number | null>> {
  const pairs = await byTestId(`chart-${id}`)
    .locator("rect[data-t]")
    .evaluateAll((rs) => rs.map((r) => [Number(r.getAttribute("data-t")), r.getAttribute("data-value")] as const));
  return new Map(pairs.map(([t, v]) => [t, v === "" || v === null ? null : Number(v)]));
}

describe("the dashboard's charts", () => {
  test("GET /api/activity: 60 zero-filled minutes whose totals are what the test caused", async () => {
    const a = await api("/api/activity?minutes=60");
    expect(a.bucket_ms).toBe(60_000);
    expect(a.buckets).toHaveLength(60);
    expect(a.buckets.every((b: any, i: number) => i === 0 || b.t - a.buckets[i - 1].t === 60_000)).toBe(true);
    expect(a.buckets.at(-1).t).toBe(Math.floor(a.now / 60_000) * 60_000);
    const sum = (k: string) => a.buckets.reduce((n: number, b: any) => n + b[k], 0);
    expect(sum("episodes")).toBe(8);
    expect(sum("failures")).toBe(2);
    const lag = Math.max(...a.buckets.map((b: any) => b.lag_ms_max ?? 0));
    expect(lag).toBeGreaterThanOrEqual(HELD_MS);
    expect(a.buckets.filter((b: any) => b.episodes === 0).every((b: any) => b.lag_ms_max === null)).toBe(true);

    const typed = await api("/api/activity?minutes=60&type=picky");
    expect(typed.buckets.reduce((n: number, b: any) => n + b.failures, 0)).toBe(2);
    for (const [q, msg] of [
      ["minutes=0", "minutes must be"],
      ["minutes=abc", "minutes must be"],
      ["minutes=1441", "minutes must be"],
      ["type=a%20b", 'type "a b" is not a valid type name'],
    ]) {
      const res = await fleet.fetch(`/api/activity?${q}`);
      expect(res.status).toBe(400);
      expect(((await res.json()) as any).error.message).toContain(msg);
    }
  });

  test("the overview draws one bar per minute with the API's values: 8 episodes, 2 failures, the lag", async () => {
    // The page and the test each read the last 60 minutes: both read again if a minute turned in between.
    let api1: any;
    let episodes = new Map<number, number | null>();
    for (let attempt = 1; attempt <= 3; attempt++) {
      if (attempt === 1) await page.goto(`${base}/#/`);
      else await page.reload();
      await byTestId("chart-episodes").waitFor();
      episodes = await bars("episodes");
      api1 = await api("/api/activity?minutes=60");
      if (episodes.has(api1.buckets.at(-1).t)) break;
    }
    expect(episodes.size).toBe(60);
    for (const b of api1.buckets) expect(episodes.get(b.t)).toBe(b.episodes);
    expect([...episodes.values()].reduce<number>((n, v) => n + (v ?? 0), 0)).toBe(8);
    expect([...(await bars("failures")).values()].reduce<number>((n, v) => n + (v ?? 0), 0)).toBe(2);
    const lag = [...(await bars("lag")).values()].reduce<number>((m, v) => Math.max(m, v ?? 0), 0);
    expect(lag).toBeGreaterThanOrEqual(HELD_MS);
    expect(await byTestId("chart-episodes-summary").textContent()).toBe("8 in the last hour");
    expect(await byTestId("chart-failures-summary").textContent()).toBe("2 in the last hour");
    // Minutes with episodes have a visible bar, the others none.
    const heights = await byTestId("chart-episodes")
      .locator("rect[data-t]")
      .evaluateAll((rs) => rs.map((r) => [r.getAttribute("data-value"), Number(r.getAttribute("height"))] as const));
    expect(heights.every(([v, hgt]) => (Number(v) > 0 ? hgt > 0 : hgt === 0))).toBe(true);
  }, 60_000);
});

describe("the output feed", () => {
  test("lists outputs newest first, alerts included, each linking to its trace", async () => {
    const r = await api("/api/outputs?limit=50");
    expect(r.outputs.map((o: any) => o.topic)).toContain("alerts/boiler-1");
    expect(r.outputs.filter((o: any) => o.topic === "fleet/agents/counter/pump-1/out")).toHaveLength(3);
    const starts = r.outputs.map((o: any) => o.started_at);
    expect(starts).toEqual([...starts].sort((x: number, y: number) => y - x));
    const one = await api("/api/outputs?agent=counter/pump-2");
    expect(one.outputs).toHaveLength(1);
    expect(one.outputs[0]).toMatchObject({ kind: "emit", agent: "counter/pump-2", data: { count: 1 } });
    expect((await fleet.fetch("/api/outputs?agent=nokey")).status).toBe(400);
    for (const q of ["limit=501", "limit=0", "before=abc", "before=-1", "agent=a/b/c%20d"])
      expect((await fleet.fetch(`/api/outputs?${q}`)).status).toBe(400);

    await page.goto(`${base}/#/`);
    const feed = byTestId("output-feed");
    await feed.locator("li[data-episode]").first().waitFor();
    const topics = await feed
      .locator("li[data-episode]")
      .evaluateAll((li) => li.map((l) => l.getAttribute("data-topic")));
    expect(topics).toEqual(r.outputs.slice(0, 30).map((o: any) => o.topic));
  }, 60_000);

  test("a new alert appears at the top live, and its link opens the trace of the episode behind it", async () => {
    await page.goto(`${base}/#/`);
    const feed = byTestId("output-feed");
    await feed.locator("li[data-episode]").first().waitFor();
    await byTestId("live").and(page.locator('[data-state="open"]')).waitFor({ timeout: 15_000 });
    await noReload(11);
    await publishQos1(client, "sensors/boiler-1/temperature", { id: "t3", value: 95 });
    const [alert] = (await fleet.waitCommitted("temp-monitor/boiler-1", 3)).filter((e) => e.stimulus === "id:t3");
    await page.waitForFunction(
      (ep) =>
        document.querySelector('[data-testid="output-feed"] li[data-episode]')?.getAttribute("data-episode") === ep,
      alert!.id,
      { timeout: 30_000 },
    );
    // The episode's outputs, newest first: its publish to alerts/ is among them.
    const top = feed.locator(`li[data-episode="${alert!.id}"][data-topic="alerts/boiler-1"]`);
    expect(await top.textContent()).toContain('"value":95');
    expect(await top.getAttribute("class")).toContain("alert");
    expect(await stillNoReload()).toBe(11);
    await page.screenshot({ path: join(OUT, "dashboard-overview.png"), fullPage: true });

    await top.getByTestId("feed-trace").click();
    await page.waitForFunction((ep) => location.hash === `#/trace/${ep}`, alert!.id);
    await page.waitForFunction(() => document.querySelector('[data-testid="trace"]') !== null);
    const trace = (await byTestId("trace").textContent()) ?? "";
    expect(trace).toContain("publish alerts/boiler-1");
    expect(trace).toContain("sensors/boiler-1/temperature");
  }, 60_000);
});

describe("the quarantine panel", () => {
  test("Discard drops a poison stimulus; after the fix, Retry runs the other one to a commit", async () => {
    const before = (await api("/api/quarantine")).stimuli;
    const j1 = before.find((s: any) => s.agent === "picky/j1");
    const j2 = before.find((s: any) => s.agent === "picky/j2");
    await page.goto(`${base}/#/`);
    const table = byTestId("quarantine-table");
    await table.locator(`tr[data-seq="${j2.seq}"]`).waitFor();
    expect(await table.locator(`tr[data-seq="${j1.seq}"]`).textContent()).toContain("picky: not accepting id:j1 yet");

    page.once("dialog", (d) => void d.accept());
    await table.locator(`tr[data-seq="${j2.seq}"]`).getByTestId("btn-q-discard").click();
    await table.locator(`tr[data-seq="${j2.seq}"]`).waitFor({ state: "detached" });
    const [dropped] = await fleet.query<{ state: string }>("SELECT state FROM stimuli WHERE seq = ?", [j2.seq]);
    expect(dropped!.state).toBe("dropped");

    // The cause is fixed (the agent's config), then the operator retries.
    const v1 = (await api("/api/fleet")).spec_version;
    writeFileSync(fleet.configPath, toml(true));
    process.kill(fleet.pid, "SIGHUP");
    await waitFor(async () => (await api("/api/fleet")).spec_version !== v1, 15_000, "the reload");
    await table.locator(`tr[data-seq="${j1.seq}"]`).getByTestId("btn-q-retry").click();
    await table.locator(`tr[data-seq="${j1.seq}"]`).waitFor({ state: "detached" });
    const [done] = await fleet.waitCommitted("picky/j1", 1);
    expect(done!.stimulus).toBe("id:j1");
    expect((await api("/api/quarantine")).stimuli).toEqual([]);
    await page.waitForFunction(() =>
      document.querySelector('[data-testid="quarantine-table"]')?.textContent?.includes("Nothing is quarantined."),
    );
  }, 60_000);
});

describe("the agent page's buttons", () => {
  test("Replay re-runs the alert episode on its recorded inputs: MATCH", async () => {
    const eps = (await api("/api/agents/temp-monitor/boiler-1/episodes")).episodes;
    const alert = eps.find((e: any) => e.stimulus === "id:t1");
    await page.goto(`${base}/#/agents/temp-monitor/boiler-1/${alert.id}`);
    await page.reload(); // a fresh page: no toast left over from the tests before
    await page.waitForFunction(() => document.querySelector('[data-testid="decisions"] li') !== null);
    await byTestId("btn-replay").click();
    await page.waitForFunction(() => document.querySelector('[data-testid="replay-verdict"]') !== null, undefined, {
      timeout: 30_000,
    });
    expect(await byTestId("replay-verdict").textContent()).toBe("MATCH");
    // The page lists this agent's outputs (its alerts among them), and only this agent's.
    await byTestId("output-feed").locator('li[data-topic="alerts/boiler-1"]').first().waitFor();
    const agents = await byTestId("output-feed")
      .locator("li[data-episode]")
      .evaluateAll((li) => li.map((l) => l.getAttribute("data-agent")));
    expect(new Set(agents)).toEqual(new Set(["temp-monitor/boiler-1"]));
    await page.screenshot({ path: join(OUT, "dashboard-agent-ops.png"), fullPage: true });

    const direct = await fleet.fetch(`/api/episodes/${alert.id.slice(0, 18)}/replay`, { method: "POST" });
    expect(await direct.json()).toEqual({ episode: alert.id, agent: "temp-monitor/boiler-1", verdict: "MATCH" });
    const missing = await fleet.fetch("/api/episodes/0000ffff/replay", { method: "POST" });
    expect(missing.status).toBe(404);
    // Episode ids are time-ordered: every episode of this run shares its first four characters.
    const ambiguous = await fleet.fetch(`/api/episodes/${alert.id.slice(0, 4)}/replay`, { method: "POST" });
    expect(ambiguous.status).toBe(409);
    expect(((await ambiguous.json()) as any).error.code).toBe("ambiguous");
    const form = await fleet.fetch(`/api/episodes/${alert.id}/replay`, {
      method: "POST",
      headers: { "content-type": "text/plain" },
    });
    expect(form.status).toBe(415);
  }, 60_000);

  test("Retire asks first, then retires the agent; the API agrees", async () => {
    await page.goto(`${base}/#/agents/counter/pump-2`);
    await page.waitForFunction(() => document.querySelector('[data-testid="agent-status"]')?.textContent === "idle");
    page.once("dialog", (d) => void d.dismiss());
    await byTestId("btn-retire").click();
    expect((await api("/api/agents/counter/pump-2")).status).toBe("idle");
    page.once("dialog", (d) => void d.accept());
    await byTestId("btn-retire").click();
    await page.waitForFunction(() => document.querySelector('[data-testid="agent-status"]')?.textContent === "retired");
    expect(await byTestId("btn-retire").isDisabled()).toBe(true);
    expect((await api("/api/agents/counter/pump-2")).status).toBe("retired");
  }, 60_000);

  test("episodes filter by stimulus kind and status on the page", async () => {
    await page.goto(`${base}/#/agents/counter/pump-1`);
    const rows = byTestId("episodes-table").locator("tbody tr[data-episode]");
    const count = (n: number) =>
      page.waitForFunction(
        (k) => document.querySelectorAll('[data-testid="episodes-table"] tbody tr[data-episode]').length === k,
        n,
      );
    await count(3);
    await byTestId("filter-kind").selectOption("manual");
    await count(1);
    expect(await rows.first().locator("td.kind").textContent()).toBe("manual");
    await byTestId("filter-kind").selectOption("mqtt");
    await count(2);
    await byTestId("filter-episode-status").selectOption("failed");
    await page.waitForFunction(() =>
      document
        .querySelector('[data-testid="episodes-table"]')
        ?.textContent?.includes("No episodes match these filters."),
    );
    await byTestId("filter-episode-status").selectOption("");
    await byTestId("filter-kind").selectOption("");
    await count(3);
  }, 60_000);

  test("every button went through the audited API, under the signed-in token's name", async () => {
    const { records } = await api("/api/audit?limit=50");
    const mine = records.filter((r: any) => r.actor === "dashboard-ops").map((r: any) => [r.action, r.status]);
    expect(mine).toContainEqual(["quarantine.drop", 200]);
    expect(mine).toContainEqual(["quarantine.retry", 200]);
    expect(mine).toContainEqual(["episode.replay", 200]);
    expect(mine).toContainEqual(["agent.retire", 200]);
    const replay = records.find((r: any) => r.actor === "dashboard-ops" && r.action === "episode.replay");
    expect(replay.detail).toBe("MATCH");
    expect(replay.target).toMatch(/^[0-9a-f-]{36}$/);
  });
});
