import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildDashboard, dashboardRoutes } from "../gateway/observe/index.ts";

describe("the dashboard script", () => {
  test("is bundled from the TypeScript client into one self-contained browser module", async () => {
    const built = await buildDashboard();
    if (!built.ok) throw new Error(built.error);
    // Every client module is inlined: no import of a .ts file is left for the browser to resolve.
    expect(built.js).not.toMatch(/\bimport\s*(?:[^;]*?from\s*)?["'][^"']+\.ts["']/);
    // Type annotations are gone (the browser runs it as JavaScript).
    expect(built.js).not.toContain(": HTMLElement");
    expect(built.js).toContain("/api/events");
  });

  test("is served from memory as JavaScript at /ui/app.js", async () => {
    const res = await dashboardRoutes()["/ui/app.js"]!();
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/javascript; charset=utf-8");
    expect(await res.text()).toContain("/api/fleet");
  });

  test("a client that does not build is reported with the bundler's error", async () => {
    const dir = mkdtempSync(join(tmpdir(), "dashboard-"));
    const entry = join(dir, "broken.ts");
    writeFileSync(entry, "export const broken = (;\n");
    try {
      const built = await buildDashboard(entry);
      expect(built.ok).toBe(false);
      if (!built.ok) expect(built.error).toContain(`${entry}:1:`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
