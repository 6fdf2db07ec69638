/**
 * The operator dashboard (`GET /`): a static page, a stylesheet, an icon and one script. The script
 * is TypeScript under `client/` (type-checked with the DOM library by its own
 * `client/tsconfig.json`, part of `npm test`), bundled with `Bun.build` once per gateway
 * process when the routes are made and kept in memory. Everything it shows comes from the
 * JSON API and the `/api/events` stream.
 */

/** No page of another origin may frame the dashboard (to overlay its buttons): X-Frame-Options and CSP both. */
const HEADERS = {
  "cache-control": "no-cache",
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "content-security-policy": "frame-ancestors 'none'",
} as const;

const FILES = {
  "/": { file: "index.html", type: "text/html; charset=utf-8" },
  "/ui/style.css": { file: "style.css", type: "text/css; charset=utf-8" },
  "/ui/icon.svg": { file: "icon.svg", type: "image/svg+xml" },
} as const;

/** The client's entry point. */
export const DASHBOARD_ENTRY = new URL("./client/main.ts", import.meta.url).pathname;

/** Bundle the dashboard script (or `entry`): one ES module for the browser, or the build's error text. */
export async function buildDashboard(
  entry: string = DASHBOARD_ENTRY,
): Promise<{ ok: true; js: string } | { ok: false; error: string }> {
  try {
    const out = await Bun.build({ entrypoints: [entry], target: "browser", format: "esm" });
    const js = out.outputs[0];
    if (!out.success || !js) return { ok: false, error: out.logs.map(describe).join("\n") || "no output" };
    return { ok: true, js: await js.text() };
  } catch (err) {
    // Bun.build throws an AggregateError on syntax errors.
    const errors = err instanceof AggregateError ? err.errors : [err];
    return { ok: false, error: errors.map(describe).join("\n") };
  }
}

/** A build message with where it points: `file:line:column: message`. */
function describe(m: unknown): string {
  const pos = (m as { position?: { file: string; line: number; column: number } | null }).position;
  const text = m instanceof Error || (typeof m === "object" && m !== null && "message" in m) ? (m as Error).message : m;
  return pos ? `${pos.file}:${pos.line}:${pos.column}: ${String(text)}` : String(text);
}

/** Routes serving the dashboard; the script is built now, in the background, and served from memory. */
export function dashboardRoutes(): Record<string, () => Response | Promise<Response>> {
  const routes: Record<string, () => Response | Promise<Response>> = {};
  for (const [path, asset] of Object.entries(FILES)) {
    const file = Bun.file(new URL(`./${asset.file}`, import.meta.url));
    routes[path] = () => new Response(file, { headers: { "content-type": asset.type, ...HEADERS } });
  }
  const script = buildDashboard();
  routes["/ui/app.js"] = async () => {
    const built = await script;
    return built.ok
      ? new Response(built.js, { headers: { "content-type": "text/javascript; charset=utf-8", ...HEADERS } })
      : new Response(`dashboard script failed to build:\n${built.error}\n`, {
          status: 500,
          headers: { "content-type": "text/plain; charset=utf-8", ...HEADERS },
        });
  };
  return routes;
}
