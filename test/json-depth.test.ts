/**
 * How deep JSON may nest before it reaches an event log (agents/protocol.ts `MAX_JSON_DEPTH`):
 * the bracket scan, and stored payloads decoded for an agent (gateway/types.ts `decodePayload`).
 */
import { describe, expect, test } from "bun:test";
import { jsonNestedDeeper, MAX_JSON_DEPTH } from "../agents/protocol.ts";
import { decodePayload } from "../gateway/types.ts";

const nested = (n: number, open = "[", close = "]") => `${open.repeat(n)}${close.repeat(n)}`;

describe("jsonNestedDeeper", () => {
  test("counts arrays and objects alike, up to and past the limit", () => {
    expect(jsonNestedDeeper(nested(MAX_JSON_DEPTH))).toBe(false);
    expect(jsonNestedDeeper(nested(MAX_JSON_DEPTH + 1))).toBe(true);
    expect(jsonNestedDeeper(`${'{"a":'.repeat(MAX_JSON_DEPTH + 1)}1${"}".repeat(MAX_JSON_DEPTH + 1)}`)).toBe(true);
    expect(jsonNestedDeeper(nested(3), 2)).toBe(true);
    expect(jsonNestedDeeper(nested(2), 2)).toBe(false);
  });

  test("brackets inside strings (escaped quotes included) do not count", () => {
    const text = JSON.stringify({ s: `\\"${"[".repeat(500)}`, t: "[[[", u: [[1]] });
    expect(jsonNestedDeeper(text, 3)).toBe(false);
    expect(jsonNestedDeeper(text, 2)).toBe(true);
  });

  test("scans UTF-8 bytes as it scans text", () => {
    const text = `{"é":${nested(5)}}`;
    expect(jsonNestedDeeper(new TextEncoder().encode(text), 5)).toBe(true);
    expect(jsonNestedDeeper(new TextEncoder().encode(text), 6)).toBe(false);
  });

  test("siblings do not add up: depth is nesting, not the number of brackets", () => {
    expect(jsonNestedDeeper(`[${Array.from({ length: 1000 }, () => "[[1]]").join(",")}]`, 3)).toBe(false);
  });
});

describe("decodePayload", () => {
  const bytes = (s: string) => new TextEncoder().encode(s);

  test("gives JSON parsed, other bytes as text, nothing as null", () => {
    expect(decodePayload(bytes('{"v":[1,2]}'))).toEqual({ v: [1, 2] });
    expect(decodePayload(bytes("21.5 C"))).toBe("21.5 C");
    expect(decodePayload(null)).toBeNull();
  });

  test("gives JSON nested deeper than MAX_JSON_DEPTH as its text", () => {
    const deep = `{"id":"x","d":${nested(MAX_JSON_DEPTH + 5)}}`;
    expect(decodePayload(bytes(deep))).toBe(deep);
    const fine = `{"id":"x","d":${nested(MAX_JSON_DEPTH - 1)}}`;
    expect(decodePayload(bytes(fine))).toEqual(JSON.parse(fine));
  });
});
