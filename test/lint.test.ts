import { describe, expect, test } from "bun:test";
import { longLines, MAX_LINE } from "../scripts/lint-lines.ts";

describe("the line-length lint", () => {
  test("reports every line longer than 120 characters with its file and line number", () => {
    const ok = "x".repeat(MAX_LINE);
    const long = "y".repeat(MAX_LINE + 1);
    expect(longLines("a.ts", `${ok}\n${long}\nshort\n${long}`)).toEqual([
      "a.ts:2: 121 characters (max 120)",
      "a.ts:4: 121 characters (max 120)",
    ]);
  });

  test("counts characters, not bytes", () => {
    expect(longLines("a.ts", "é".repeat(MAX_LINE))).toEqual([]);
  });
});
