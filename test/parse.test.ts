import { describe, expect, test } from "bun:test";
import { z } from "zod";
import { describeZodError, parseOptionalInt, parseStrictInt } from "../gateway/parse.ts";

describe("parseStrictInt", () => {
  test.each([
    ["0", 0],
    ["7", 7],
    ["-3", -3],
    ["65535", 65535],
    ["9007199254740991", Number.MAX_SAFE_INTEGER],
  ])("accepts %j", (raw, value) => {
    expect(parseStrictInt(raw, { name: "n" })).toEqual({ ok: true, value });
  });

  test.each([
    ["", "missing"],
    [undefined, "missing"],
    [null, "missing"],
    ["1e3", "not_integer"],
    [" 7", "not_integer"],
    ["7 ", "not_integer"],
    ["0x10", "not_integer"],
    ["7.0", "not_integer"],
    ["+7", "not_integer"],
    ["007", "not_integer"],
    ["-0", "not_integer"],
    ["Infinity", "not_integer"],
    ["9007199254740993", "not_integer"],
    ["abc", "not_integer"],
  ] as const)("refuses %j as %s", (raw, code) => {
    const r = parseStrictInt(raw, { name: "n" });
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.code).toBe(code);
  });

  test("bounds are inclusive, and the message names the input and the range", () => {
    const b = { name: "--http-port", min: 0, max: 65535 };
    expect(parseStrictInt("65535", b)).toEqual({ ok: true, value: 65535 });
    expect(parseStrictInt("65536", b)).toEqual({
      ok: false,
      code: "out_of_range",
      message: "--http-port must be an integer from 0 to 65535, got 65536",
    });
    expect(parseStrictInt("80x", b)).toEqual({
      ok: false,
      code: "not_integer",
      message: '--http-port must be an integer from 0 to 65535, got "80x"',
    });
  });

  test("parseOptionalInt gives the default for an absent or empty input only", () => {
    expect(parseOptionalInt(null, 50, { name: "limit", min: 1 })).toEqual({ ok: true, value: 50 });
    expect(parseOptionalInt("", 50, { name: "limit", min: 1 })).toEqual({ ok: true, value: 50 });
    expect(parseOptionalInt("0", 50, { name: "limit", min: 1 }).ok).toBe(false);
  });
});

describe("describeZodError", () => {
  const schema = z.tuple([z.string(), z.strictObject({ qos: z.literal([0, 1], { error: "must be 0 or 1" }) })]);
  const fail = (v: unknown) => {
    const r = schema.safeParse(v);
    if (r.success) throw new Error("expected a failure");
    return r.error;
  };

  test("names a position by its argument name and a nested key by its path", () => {
    expect(describeZodError("publish", fail(["t", { qos: 2 }]), ["topic", "options"])).toBe(
      "publish options.qos must be 0 or 1",
    );
  });

  test("lists unknown keys", () => {
    expect(describeZodError("publish", fail(["t", { qos: 1, x: 1, y: 2 }]), ["topic", "options"])).toBe(
      "publish options has unknown key(s) x, y",
    );
  });
});
