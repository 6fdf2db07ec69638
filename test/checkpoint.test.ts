/**
 * Sealed checkpoints (docs/guarantees.md): canonical encoding, deterministic BLAKE3 seals, and the
 * integrity check that refuses a tampered or collected checkpoint.
 */
import { describe, expect, test } from "bun:test";
import { IntegrityError, sealCheckpoint, verifyCheckpointRow, type CheckpointRecord } from "../gateway/store/index.ts";
import { canonicalJson } from "../gateway/hash.ts";
import type { CheckpointRow } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const PARENT = "a".repeat(64);
const SPEC = "b".repeat(64);

const record: CheckpointRecord = {
  agent: "temp-monitor/boiler-1",
  seq: 7,
  parent: PARENT,
  episode: "0190f000-0000-7000-8000-000000000007",
  spec_version: SPEC,
  state: { count: 3, last: { t: 81.5, at: 1_700_000_000_000 }, tags: ["hot", "boiler"], note: "héllo ✓" },
};

/** A stored row, exactly as the episode executor writes it. */
async function sealedRow(rec: CheckpointRecord = record): Promise<CheckpointRow> {
  const { hash, stateText } = await sealCheckpoint(rec);
  return {
    hash,
    agent: rec.agent as AgentId,
    seq: rec.seq,
    parent: rec.parent,
    episode: rec.episode,
    specVersion: rec.spec_version,
    state: stateText,
    createdAt: 1_700_000_000_000,
    stateVersion: rec.state_version ?? null,
    migratedFrom: rec.migrated_from ?? null,
  };
}

/** The IntegrityError `fn` rejects with (fails the test if it resolves or throws anything else). */
async function integrityError(fn: () => Promise<unknown>): Promise<IntegrityError> {
  let caught: unknown = null;
  try {
    await fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(IntegrityError);
  return caught as IntegrityError;
}

describe("canonicalJson", () => {
  test("encodes equal values identically whatever order their keys were built in", () => {
    const a = { b: 1, a: { d: [1, { z: true, y: null }], c: "x" }, e: "" };
    const b = { e: "", a: { c: "x", d: [1, { y: null, z: true }] }, b: 1 };
    expect(canonicalJson(a)).toBe(canonicalJson(b));
    expect(canonicalJson(a)).toBe('{"a":{"c":"x","d":[1,{"y":null,"z":true}]},"b":1,"e":""}');
  });

  test("drops undefined members like JSON.stringify and keeps array holes as null", () => {
    expect(canonicalJson({ a: undefined, b: 2 })).toBe('{"b":2}');
    expect(canonicalJson([1, undefined, 3])).toBe("[1,null,3]");
  });

  test.each([
    ["NaN", Number.NaN],
    ["Infinity", Number.POSITIVE_INFINITY],
    ["-Infinity", Number.NEGATIVE_INFINITY],
    ["NaN nested in an object", { a: { b: Number.NaN } }],
    ["Infinity nested in an array", [1, 2, Number.POSITIVE_INFINITY]],
  ])("rejects %s", (_name, value) => {
    expect(() => canonicalJson(value)).toThrow(TypeError);
  });

  test("rejects values JSON cannot carry (BigInt)", () => {
    expect(() => canonicalJson({ n: 1n })).toThrow(TypeError);
  });
});

describe("sealCheckpoint", () => {
  test("is deterministic: the same record seals to the same hash and state text", async () => {
    const one = await sealCheckpoint(record);
    const two = await sealCheckpoint({ ...record, state: structuredClone(record.state) });
    expect(one).toEqual(two);
    expect(one.hash).toMatch(/^[0-9a-f]{64}$/);
    expect(JSON.parse(one.stateText)).toEqual(record.state);
  });

  test("does not depend on the key order of the state", async () => {
    const reordered = { tags: ["hot", "boiler"], note: "héllo ✓", last: { at: 1_700_000_000_000, t: 81.5 }, count: 3 };
    expect((await sealCheckpoint({ ...record, state: reordered })).hash).toBe((await sealCheckpoint(record)).hash);
  });

  test.each([
    ["state", { state: { count: 4 } }],
    ["seq", { seq: 8 }],
    ["parent", { parent: null }],
    ["episode", { episode: "0190f000-0000-7000-8000-000000000008" }],
    ["spec_version", { spec_version: "c".repeat(64) }],
    ["agent", { agent: "temp-monitor/boiler-2" }],
  ])("changes when %s changes", async (_field, change) => {
    expect((await sealCheckpoint({ ...record, ...change })).hash).not.toBe((await sealCheckpoint(record)).hash);
  });

  test("refuses a state that has no canonical JSON encoding", async () => {
    await expect(sealCheckpoint({ ...record, state: { t: Number.NaN } })).rejects.toThrow(TypeError);
  });
});

describe("verifyCheckpointRow", () => {
  test("returns the state of an intact checkpoint", async () => {
    expect(await verifyCheckpointRow(await sealedRow())).toEqual(record.state);
  });

  test("verifies the first checkpoint of a chain (no parent)", async () => {
    const row = await sealedRow({ ...record, seq: 1, parent: null });
    expect(await verifyCheckpointRow(row)).toEqual(record.state);
  });

  test("refuses a state text with one byte changed", async () => {
    const row = await sealedRow();
    const i = row.state!.indexOf("3");
    const tampered = { ...row, state: `${row.state!.slice(0, i)}4${row.state!.slice(i + 1)}` };
    expect(JSON.parse(tampered.state)).not.toEqual(record.state); // still valid JSON: only the hash can tell
    const err = await integrityError(() => verifyCheckpointRow(tampered));
    expect(err.agent).toBe(record.agent);
    expect(err.seq).toBe(record.seq);
    expect(err.hash).toBe(row.hash);
    expect(err.message).toContain("hash mismatch");
  });

  test("refuses a state text that differs only in whitespace", async () => {
    const row = await sealedRow();
    await integrityError(() => verifyCheckpointRow({ ...row, state: `${row.state} ` }));
  });

  test.each([
    ["seq", { seq: 8 }],
    ["parent", { parent: "d".repeat(64) }],
    ["parent (dropped)", { parent: null }],
    ["spec_version", { specVersion: "c".repeat(64) }],
    ["episode", { episode: "0190f000-0000-7000-8000-000000000009" }],
    ["agent", { agent: "temp-monitor/boiler-9" as AgentId }],
    ["hash", { hash: "e".repeat(64) }],
  ])("refuses a row whose %s was changed", async (_field, change) => {
    const row = await sealedRow();
    const err = await integrityError(() => verifyCheckpointRow({ ...row, ...change }));
    expect(err.message).toContain("hash mismatch");
  });

  test("refuses to load a tombstone (state collected)", async () => {
    const row = await sealedRow();
    const err = await integrityError(() => verifyCheckpointRow({ ...row, state: null }));
    expect(err.message).toContain("tombstone");
    expect(err.seq).toBe(record.seq);
  });
});
