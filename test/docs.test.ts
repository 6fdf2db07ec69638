/** The docs that are generated from code match it, so they cannot drift. */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fleetTomlKeys, fleetTomlReference } from "../gateway/spec/index.ts";

describe("docs/fleet-toml.md", () => {
  test("every key fleet.toml accepts has a meaning in gateway/spec/reference.ts", () => {
    const undocumented = fleetTomlKeys()
      .filter((k) => !k.doc)
      .map((k) => k.path);
    expect(undocumented).toEqual([]);
  });

  test("the committed page is what `bun scripts/gen-docs.ts` writes", () => {
    const committed = readFileSync(join(import.meta.dir, "..", "docs", "fleet-toml.md"), "utf8");
    expect(committed).toBe(fleetTomlReference());
  });
});
