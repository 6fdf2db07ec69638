/**
 * The central dashboard off loopback, in a real headless browser (Debian's chromium driven by
 * playwright-core): `FLEET_CENTRAL_API_TOKEN=… fleet central --host 0.0.0.0` over a real sqld a
 * synthetic gateway replicated to. The page asks for the token when the API answers 401, keeps it
 * in sessionStorage only, sends it on every /api call, asks again for a wrong one, and signs out;
 * its CSP lets its own script and style run and nothing else.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import pino from "pino";
import { enableReplication, Replicator } from "../gateway/replication/index.ts";
import { launchChromium } from "./helpers/browser.ts";
import { ROOT } from "./helpers/gateway.ts";
import { SyntheticFleet } from "./helpers/ops.ts";
import { Sqld } from "./helpers/sqld.ts";

const TOKEN = "s3cret-central-token";
const STORED = "fleet-central-token"; // the page's sessionStorage key

let dir: string;
let sqld: Sqld;
let central: Bun.Subprocess<"ignore", "pipe", "pipe">;
let base: string;
let browser: Browser;
let page: Page;
/** What the page's console said about the Content Security Policy. */
const cspViolations: string[] = [];
/** The Authorization header of every /api request the page made. */
const apiCalls: { path: string; authorization: string | null }[] = [];

beforeAll(async () => {
  sqld = await Sqld.start();
  dir = mkdtempSync(join(tmpdir(), "fleet-central-dashboard-"));
  const f = await SyntheticFleet.create(dir, {
    types: [{ name: "t", keys: ["a", "b"] }],
    keep: 0,
    episodesDays: 30,
    dedupDays: 7,
  });
  await enableReplication(f.store, sqld.url);
  await f.commit(6, Date.now() - 600_000, 1000);
  const spec = { url: sqld.url, auth_token_env: null, interval_ms: 50, batch_rows: 500, required: true };
  const r = new Replicator({
    store: f.store,
    spec: { ...spec, max_backlog_mb: 1024 },
    fleet: "north",
    log: pino({ level: "silent" }),
  });
  await r.drain();
  await r.stop();
  await f.close();

  central = Bun.spawn(
    [process.execPath, join(ROOT, "gateway/cli/main.ts"), "central", "--url", sqld.url, "--host", "0.0.0.0"].concat([
      "--port",
      "0",
      "--config",
      join(dir, "no-such-fleet.toml"),
    ]),
    { stdout: "pipe", stderr: "pipe", env: { PATH: process.env.PATH ?? "", FLEET_CENTRAL_API_TOKEN: TOKEN } },
  );
  const first = await central.stdout.getReader().read();
  const port = /on http:\/\/0\.0\.0\.0:(\d+)/.exec(new TextDecoder().decode(first.value))?.[1];
  if (!port) throw new Error(`fleet central did not start: ${await new Response(central.stderr).text()}`);
  base = `http://127.0.0.1:${port}`;

  browser = await launchChromium();
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (err) => console.error("page error:", err));
  page.on("console", (m) => {
    if (m.text().includes("Content Security Policy")) cspViolations.push(m.text());
  });
  page.on("request", (req) => {
    const path = new URL(req.url()).pathname;
    if (path.startsWith("/api/")) apiCalls.push({ path, authorization: req.headers().authorization ?? null });
  });
}, 180_000);

afterAll(async () => {
  await browser?.close();
  central?.kill();
  await central?.exited;
  await sqld?.dispose();
  if (dir) rmSync(dir, { recursive: true, force: true });
}, 60_000);

const stored = () => page.evaluate((key) => sessionStorage.getItem(key), STORED);
const signInError = async () => (await page.locator("#signin-error").textContent()) ?? "";

/** Paste `token` into the sign-in form and send it. */
async function submit(token: string): Promise<void> {
  await page.locator("#token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
}

describe("the central dashboard with FLEET_CENTRAL_API_TOKEN, off loopback", () => {
  test("the API's 401 shows a token form instead of the overview; nothing is stored yet", async () => {
    await page.goto(`${base}/`);
    await page.locator("#signin").waitFor({ timeout: 30_000 });
    expect(await signInError()).toBe("/api/fleets: 401 (bearer token required)");
    expect(await page.locator("#token").getAttribute("type")).toBe("password");
    expect(await page.locator("#signout").isHidden()).toBe(true);
    expect(await stored()).toBeNull();
  });

  test("a wrong token shows the 401 again and is not kept", async () => {
    await submit("not-the-token");
    await page.waitForFunction(() => document.querySelector("#signin-error")?.textContent?.includes("refused"), null, {
      timeout: 30_000,
    });
    expect(await signInError()).toBe("/api/fleets: 401 (bearer token refused)");
    expect(await stored()).toBeNull();
  });

  test("the right token shows every fleet; it is sent on every /api call and kept in sessionStorage only", async () => {
    apiCalls.length = 0;
    await submit(TOKEN);
    await page.getByText("north", { exact: true }).waitFor({ timeout: 30_000 });
    expect(await page.locator("#signin").count()).toBe(0);
    expect(await page.locator("#signout").isVisible()).toBe(true);
    expect(await stored()).toBe(TOKEN);
    expect(await page.evaluate(() => localStorage.length)).toBe(0);
    expect(await page.context().cookies()).toEqual([]);
    // Drill down: the fleet's agents and operator actions, then an agent's episodes, each with the token.
    await page.getByText("north", { exact: true }).click();
    await page.getByText("t/a", { exact: true }).click();
    await page.locator("main table tr").nth(3).waitFor({ timeout: 30_000 }); // header + 3 episodes
    const paths = apiCalls.map((c) => c.path);
    expect(paths).toContain("/api/fleets");
    expect(paths.some((p) => p.endsWith("/agents"))).toBe(true);
    expect(paths.some((p) => p.endsWith("/audit"))).toBe(true);
    expect(paths.some((p) => p.endsWith("/agents/t/a/episodes"))).toBe(true);
    expect(apiCalls.filter((c) => c.authorization !== `Bearer ${TOKEN}`)).toEqual([]);
    // A reload of the tab keeps it.
    await page.goto(`${base}/`);
    await page.getByText("north", { exact: true }).waitFor({ timeout: 30_000 });
    expect(await page.locator("#signin").count()).toBe(0);
  });

  test("sign out forgets the token and asks for it again; the overview's refresh leaves the form alone", async () => {
    await page.locator("#signout").click();
    await page.locator("#signin").waitFor({ timeout: 30_000 });
    expect(await stored()).toBeNull();
    expect(await signInError()).toBe("/api/fleets: 401 (bearer token required)");
    // The overview refreshes every 5 s; half-typed token stays put across a refresh.
    await page.locator("#token").fill("half-typ");
    await Bun.sleep(6000);
    expect(await page.locator("#token").inputValue()).toBe("half-typ");
  }, 30_000);

  test("the page's CSP let its own style and script run and blocked nothing they do", () => {
    expect(cspViolations).toEqual([]);
  });
});
