/**
 * A signed-in headless Chromium on a test fleet's dashboard (Debian's chromium driven by
 * playwright-core). The browser tests do not skip: without /usr/bin/chromium they fail.
 */
import { existsSync } from "node:fs";
import { type Browser, chromium, type Page } from "playwright-core";
import { type TestFleet, waitFor } from "./gateway.ts";

export const CHROMIUM = "/usr/bin/chromium";

/** Launch Chromium, add a token of `scope`, sign in with it and return the page (at no URL yet). */
export async function signedInPage(
  fleet: TestFleet,
  scope: "read" | "operate" | "admin" = "read",
): Promise<{ browser: Browser; page: Page }> {
  if (!existsSync(CHROMIUM)) throw new Error(`the dashboard browser test needs Debian's chromium at ${CHROMIUM}`);
  const name = `browser-${scope}-${Math.random().toString(36).slice(2, 8)}`;
  const added = await fleet.cli("token", "add", name, "--scope", scope);
  if (added.code !== 0) throw new Error(`fleet token add failed: ${added.stderr}`);
  const token = String(added.json.token);
  // The gateway reads the tokens file on each request; wait until it knows the new token.
  await waitFor(
    async () => (await fetch(`${fleet.httpUrl}/api/session`, { headers: { authorization: `Bearer ${token}` } })).ok,
    15_000,
    "the new token to be accepted",
  );
  const session = await fetch(`${fleet.httpUrl}/api/session`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const id = /fleet_session=([^;]+)/.exec(session.headers.get("set-cookie") ?? "")?.[1];
  if (!id) throw new Error(`sign-in failed: HTTP ${session.status}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  await page
    .context()
    .addCookies([{ name: "fleet_session", value: id, url: fleet.httpUrl, httpOnly: true, sameSite: "Strict" }]);
  page.on("pageerror", (err) => console.error("page error:", err));
  return { browser, page };
}
