import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { buildDashboard, DASHBOARD_ENTRY, dashboardRoutes } from "../gateway/observe/index.ts";

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

/** A client module as the browser gets it, bundled by the dashboard's own build, loaded here. */
async function clientModule<T>(name: string): Promise<T> {
  const built = await buildDashboard(join(dirname(DASHBOARD_ENTRY), `${name}.ts`));
  if (!built.ok) throw new Error(built.error);
  const dir = mkdtempSync(join(tmpdir(), "dashboard-client-"));
  try {
    writeFileSync(join(dir, `${name}.mjs`), built.js);
    return (await import(join(dir, `${name}.mjs`))) as T;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("the dashboard's wording", () => {
  test("the trace page says how each upstream episode caused the next: a send, or a wake-up it set", async () => {
    type Node = { stimulus: { sent_by: string | null; set_by: string | null } | null };
    const { causeLink } = await clientModule<{ causeLink: (n: Node) => string }>("history");
    expect(causeLink({ stimulus: { sent_by: "e1", set_by: null } })).toBe("sent →");
    expect(causeLink({ stimulus: { sent_by: null, set_by: "e1" } })).toBe("set the wake-up →");
  });

  test("durations are rounded before they are split: never 60 s or 60 min", async () => {
    const { fmtMs } = await clientModule<{ fmtMs: (ms: number | null) => string }>("format");
    const cases: [number | null, string][] = [
      [null, "—"],
      [850, "850 ms"],
      [999.6, "1.0 s"],
      [4_240, "4.2 s"],
      [9_960, "10 s"],
      [59_600, "1 min 0 s"],
      [119_700, "2 min 0 s"],
      [185_000, "3 min 5 s"],
      [3_599_700, "1 h 0 min"],
      [7_170_000, "2 h 0 min"],
      [7_800_000, "2 h 10 min"],
    ];
    expect(cases.map(([ms]) => [ms, fmtMs(ms)])).toEqual(cases);
  });
});
