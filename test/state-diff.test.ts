/**
 * `diffJson`, the RFC 6902 JSON Patch of `fleet state --diff`, /state/diff and the dashboard: applied to
 * the older state it gives the newer one, for any keys, including those named like Object.prototype's
 * members (state maps keyed by device-supplied names can hold them).
 */
import { describe, expect, test } from "bun:test";
import { diffJson, type PatchOp } from "../gateway/ops/index.ts";

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

const unescapeToken = (t: string) => t.replaceAll("~1", "/").replaceAll("~0", "~");
const own = (o: object, k: string, value: unknown) =>
  Object.defineProperty(o, k, { value, enumerable: true, writable: true, configurable: true });

/** RFC 6902 `apply`, strict: a remove or replace of a member that is not there is an error. */
function apply(doc: Json, patch: readonly PatchOp[]): Json {
  let root = structuredClone(doc);
  for (const op of patch) {
    if (op.op !== "remove" && !Object.hasOwn(op, "value")) throw new Error(`${op.op} ${op.path} has no value`);
    const value = op.op === "remove" ? null : (structuredClone(op.value) as Json);
    if (op.path === "") {
      root = value;
      continue;
    }
    const tokens = op.path.split("/").slice(1).map(unescapeToken);
    let parent = root as Record<string, Json> | Json[];
    for (const t of tokens.slice(0, -1)) parent = (parent as Record<string, Json>)[t] as Record<string, Json>;
    const last = tokens.at(-1)!;
    if (Array.isArray(parent)) {
      const i = Number(last);
      if (op.op === "add") parent.splice(i, 0, value);
      else if (i >= parent.length) throw new Error(`${op.op} ${op.path}: no such index`);
      else if (op.op === "remove") parent.splice(i, 1);
      else parent[i] = value;
    } else if (op.op === "add") own(parent, last, value);
    else if (!Object.hasOwn(parent, last)) throw new Error(`${op.op} ${op.path}: no such member`);
    else if (op.op === "remove") delete parent[last];
    else own(parent, last, value);
  }
  return root;
}

/** Canonical text, keys sorted (own keys only, `__proto__` included). */
const canon = (v: Json): string =>
  v === null || typeof v !== "object"
    ? JSON.stringify(v)
    : Array.isArray(v)
      ? `[${v.map(canon).join(",")}]`
      : `{${Object.keys(v)
          .sort()
          .map((k) => `${JSON.stringify(k)}:${canon(v[k]!)}`)
          .join(",")}}`;

const KEYS = ["a", "x/y", "m~n", "", "0", "constructor", "toString", "__proto__", "hasOwnProperty", "valueOf"];

describe("diffJson", () => {
  test("a key named like an Object.prototype member is removed, added and replaced like any other", () => {
    const a = JSON.parse('{"obj":{"constructor":1,"toString":"x"}}');
    const b = JSON.parse('{"obj":{"toString":"x"}}');
    expect(diffJson(a, b)).toEqual([{ op: "remove", path: "/obj/constructor", from_value: 1 }]);
    expect(diffJson(b, a)).toEqual([{ op: "add", path: "/obj/constructor", value: 1 }]);
    const proto = JSON.parse('{"__proto__":{"n":1}}');
    expect(diffJson(proto, {})).toEqual([{ op: "remove", path: "/__proto__", from_value: { n: 1 } }]);
    expect(diffJson({}, proto)).toEqual([{ op: "add", path: "/__proto__", value: { n: 1 } }]);
  });

  test("fuzz: the patch, applied to A, gives B, for random states over awkward keys", () => {
    let seed = 1;
    const rand = () => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed / 2147483648;
    };
    const gen = (depth: number): Json => {
      const x = rand();
      if (depth > 3 || x < 0.3) return ([null, 1, "s", true, 0, ""] as const)[Math.floor(rand() * 6)]!;
      if (x < 0.6) return Array.from({ length: Math.floor(rand() * 4) }, () => gen(depth + 1));
      const o: Record<string, Json> = {};
      for (const k of KEYS) if (rand() < 0.35) own(o, k, gen(depth + 1));
      return o;
    };
    for (let i = 0; i < 5000; i++) {
      // Through JSON text, as states are stored: `__proto__` is an own member after JSON.parse.
      const a = JSON.parse(JSON.stringify(gen(0))) as Json;
      const b = JSON.parse(JSON.stringify(gen(0))) as Json;
      const patch = JSON.parse(JSON.stringify(diffJson(a, b))) as PatchOp[];
      expect({ a, b, result: canon(apply(a, patch)) }).toEqual({ a, b, result: canon(b) });
    }
  });
});
