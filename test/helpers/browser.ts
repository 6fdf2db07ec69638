/**
 * Headless Chromium on a test fleet's dashboard (Debian's chromium driven by playwright-core).
 * The browser tests do not skip: without /usr/bin/chromium they fail.
 */
import { existsSync } from "node:fs";
import { type Browser, chromium, type Page } from "playwright-core";
import { type TestFleet, waitFor } from "./gateway.ts";

export const CHROMIUM = "/usr/bin/chromium";

/** Start headless Chromium. */
export async function launchChromium(): Promise<Browser> {
  if (!existsSync(CHROMIUM))
    throw new Error(`the dashboard browser test needs Debian's chromium at ${CHROMIUM} (apt-get install -y chromium)`);
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** `fleet token add` a token of `scope`, and wait until the running gateway accepts it. */
export async function addToken(fleet: TestFleet, name: string, scope: "read" | "operate" | "admin"): Promise<string> {
  const added = await fleet.cli("token", "add", name, "--scope", scope);
  if (added.code !== 0) throw new Error(`fleet token add failed: ${added.stderr}`);
  const token = String(added.json.token);
  // The gateway re-reads the tokens file when it changes; a sign-in before that is a 401.
  await waitFor(
    async () => (await fetch(`${fleet.httpUrl}/api/session`, { headers: { authorization: `Bearer ${token}` } })).ok,
    15_000,
    "the new token to be accepted",
  );
  return token;
}

/** A new page of `browser` signed in with `token` (through the API; the sign-in form is tested on its own). */
export async function signIn(fleet: TestFleet, browser: Browser, token: string): Promise<Page> {
  const session = await fetch(`${fleet.httpUrl}/api/session`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const id = /fleet_session=([^;]+)/.exec(session.headers.get("set-cookie") ?? "")?.[1];
  if (!id) throw new Error(`sign-in failed: HTTP ${session.status}`);
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  await page
    .context()
    .addCookies([{ name: "fleet_session", value: id, url: fleet.httpUrl, httpOnly: true, sameSite: "Strict" }]);
  page.on("pageerror", (err) => console.error("page error:", err));
  return page;
}

/** Chromium with one page signed in with a fresh token of `scope`. */
export async function signedInPage(
  fleet: TestFleet,
  scope: "read" | "operate" | "admin" = "read",
): Promise<{ browser: Browser; page: Page }> {
  const token = await addToken(fleet, `browser-${scope}-${Math.random().toString(36).slice(2, 8)}`, scope);
  const browser = await launchChromium();
  return { browser, page: await signIn(fleet, browser, token) };
}
