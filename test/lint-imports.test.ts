/** The folder rule: another folder is imported only through its index.ts (scripts/lint-imports.ts). */
import { describe, expect, test } from "bun:test";
import { deepImports, folderOf, heavyDoorImports, LIGHT_DOORS } from "../scripts/lint-imports.ts";

describe("lint-imports", () => {
  test("a deep import into another folder is a violation that names the door to use", () => {
    const src = 'import { x } from "../store/sql.ts";\nimport type { Y } from "../store/index.ts";';
    expect(deepImports("gateway/http/server.ts", src)).toEqual([
      'gateway/http/server.ts: imports "../store/sql.ts"; import gateway/store/index.ts instead',
    ]);
  });

  test("siblings, the shared root files and example agents are not folders' internals", () => {
    const src = [
      'import { a } from "./responses.ts";',
      'import { b } from "../types.ts";',
      'import m from "../../agents/examples/temp-monitor.ts";',
    ].join("\n");
    expect(deepImports("gateway/http/server.ts", src)).toEqual([]);
    expect(folderOf("gateway/types.ts")).toBeNull();
    expect(folderOf("agents/examples/anomaly.ts")).toBeNull();
    expect(folderOf("broker/hooks.ts")).toBe("broker");
  });

  test("tests and scripts obey the same doors", () => {
    // Split so this file's own source does not hold a deep import for the lint to find.
    const deep = `import { y } from ${JSON.stringify("../gateway/episode/runner.ts")};`;
    expect(deepImports("test/x.test.ts", deep)).toHaveLength(1);
    expect(deepImports("test/x.test.ts", 'import { y } from "../gateway/episode/index.ts";')).toEqual([]);
  });

  test("a light door may be imported from another folder, and may itself import types only", () => {
    expect(LIGHT_DOORS.has("broker/topics.ts")).toBe(true);
    expect(deepImports("gateway/devices/acl.ts", 'import { matchTopic } from "../../broker/topics.ts";')).toEqual([]);
    expect(deepImports("gateway/devices/acl.ts", 'import { x } from "../../broker/hooks.ts";')).toHaveLength(1);
    const src = [
      'import type { Logger } from "pino";',
      'export type { A } from "./a.ts";',
      'import { parse } from "smol-toml";',
      'export * from "./persistence/index.ts";',
      'import "./side-effect.ts";',
      "export class BrokerBusy extends Error {}",
      'import type { PersistenceChoice } from "./persistence/index.ts";',
      'import {\n  a,\n  b,\n} from "./multi-line.ts";',
    ].join("\n");
    expect(heavyDoorImports("broker/types.ts", src)).toEqual([
      'broker/types.ts: a light door imports "smol-toml" at runtime; it may import types only',
      'broker/types.ts: a light door imports "./persistence/index.ts" at runtime; it may import types only',
      'broker/types.ts: a light door imports "./multi-line.ts" at runtime; it may import types only',
      'broker/types.ts: a light door imports "./side-effect.ts" at runtime; it may import types only',
    ]);
  });
});
