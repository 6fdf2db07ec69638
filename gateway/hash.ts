/**
 * Canonical encoding and BLAKE3 hashing. Everything that is sealed (checkpoints, event
 * logs, spec versions) is hashed over `canonicalJson`, so equal values hash equally
 * whatever order their keys were built in.
 */
import { createBLAKE3, type IHasher } from "hash-wasm";
import type { Blake3Hex } from "./types.ts";

/**
 * Deterministic JSON: object keys sorted by code unit, no whitespace, `undefined`
 * members dropped (as JSON.stringify does), non-finite numbers rejected.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value === "boolean" || typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new TypeError(`cannot encode non-finite number ${value}`);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((v) => (v === undefined ? "null" : canonicalJson(v))).join(",")}]`;
  if (typeof value === "object") {
    const obj = value as Record<string, unknown>;
    const parts: string[] = [];
    for (const k of Object.keys(obj).sort()) {
      const v = obj[k];
      if (v === undefined || typeof v === "function") continue;
      parts.push(`${JSON.stringify(k)}:${canonicalJson(v)}`);
    }
    return `{${parts.join(",")}}`;
  }
  throw new TypeError(`cannot encode ${typeof value}`);
}

// One hasher, reused (much cheaper than the one-shot blake3(), which sets up WASM
// state per call). init/update/digest run synchronously, so calls cannot interleave.
let hasher: IHasher | null = null;
let pending: Promise<IHasher> | null = null;

/** BLAKE3 (256-bit) of a string or bytes, as lowercase hex. */
export async function blake3Hex(data: string | Uint8Array): Promise<Blake3Hex> {
  const h = hasher ?? (await (pending ??= createBLAKE3().then((x) => (hasher = x))));
  return h.init().update(data).digest("hex") as Blake3Hex;
}

/** BLAKE3 over the canonical encoding of a value. */
export function hashValue(value: unknown): Promise<Blake3Hex> {
  return blake3Hex(canonicalJson(value));
}
