/**
 * The operator dashboard (`GET /`): a static page, one vanilla JS module and a stylesheet,
 * served as they are from this folder (no build step, no dependencies). Everything it
 * shows comes from the JSON API and the `/api/events` stream.
 */

const ASSETS = {
  "/": { file: "index.html", type: "text/html; charset=utf-8" },
  "/ui/app.js": { file: "app.js", type: "text/javascript; charset=utf-8" },
  "/ui/style.css": { file: "style.css", type: "text/css; charset=utf-8" },
} as const;

/** Routes serving the dashboard's files. */
export function dashboardRoutes(): Record<string, () => Response> {
  const routes: Record<string, () => Response> = {};
  for (const [path, asset] of Object.entries(ASSETS)) {
    const file = Bun.file(new URL(`./${asset.file}`, import.meta.url));
    // Read on every request: the files are small, and an upgrade shows without a restart.
    routes[path] = () =>
      new Response(file, {
        headers: { "content-type": asset.type, "cache-control": "no-cache", "x-content-type-options": "nosniff" },
      });
  }
  return routes;
}
