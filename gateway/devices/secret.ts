/**
 * Device secrets: random, shown once, stored only as an argon2id hash in PHC form
 * (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`, base64 without padding).
 */
import { createHash, pbkdf2Sync, randomBytes, timingSafeEqual } from "node:crypto";
import { argon2id } from "hash-wasm";
import { argon2idOffThread, type Argon2Request } from "./argon2-thread.ts";

/** argon2id cost (OWASP 2023 minimum: 19 MiB, 2 passes, 1 lane). */
export const ARGON2_PARAMS = Object.freeze({ memorySize: 19_456, iterations: 2, parallelism: 1, hashLength: 32 });

/** Bounds a hash read from a file must keep, so a hand-edited entry cannot stall the gateway. */
const LIMITS = { memorySize: [8, 262_144], iterations: [1, 16], parallelism: [1, 16] } as const;

/** A parsed `$argon2id$...` string. */
export interface Argon2Hash {
  readonly memorySize: number;
  readonly iterations: number;
  readonly parallelism: number;
  readonly salt: Uint8Array;
  readonly hash: Uint8Array;
}

/** A new device secret: 32 random bytes, base64url (43 characters). */
export function newSecret(): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");
}

/** Hash a secret with argon2id and a random 16-byte salt. */
export async function hashSecret(secret: string, params = ARGON2_PARAMS): Promise<string> {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  return argon2id({ password: secret, salt, ...params, outputType: "encoded" });
}

const b64 = (s: string): Uint8Array | null =>
  /^[A-Za-z0-9+/]+$/.test(s) ? new Uint8Array(Buffer.from(s, "base64")) : null;

/** Parse a PHC argon2id string; the error says what is wrong with it. */
export function parseArgon2(encoded: string): { ok: true; value: Argon2Hash } | { ok: false; problem: string } {
  const parts = encoded.split("$");
  // "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
  if (parts.length !== 6 || parts[0] !== "" || parts[1] !== "argon2id") {
    return {
      ok: false,
      problem: 'must be an argon2id hash "$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>" (use `fleet device add`)',
    };
  }
  if (parts[2] !== "v=19") return { ok: false, problem: "must be argon2 version 19 (v=19)" };
  const params = new Map((parts[3] ?? "").split(",").map((kv) => kv.split("=") as [string, string]));
  const num = (k: string) => (/^\d+$/.test(params.get(k) ?? "") ? Number(params.get(k)) : NaN);
  const value = { memorySize: num("m"), iterations: num("t"), parallelism: num("p") };
  for (const [k, [lo, hi]] of Object.entries(LIMITS)) {
    const v = value[k as keyof typeof value];
    if (!(v >= lo && v <= hi)) return { ok: false, problem: `has ${k} out of range (${lo}..${hi})` };
  }
  if (value.memorySize < 8 * value.parallelism) return { ok: false, problem: "needs m >= 8 * p" };
  const salt = b64(parts[4] ?? "");
  const hash = b64(parts[5] ?? "");
  if (!salt || salt.length < 8) return { ok: false, problem: "has a missing or short salt" };
  if (!hash || hash.length < 16) return { ok: false, problem: "has a missing or short hash" };
  return { ok: true, value: { ...value, salt, hash } };
}

/** Whether `secret` matches the parsed hash; the comparison is constant-time. */
export async function verifySecret(secret: Uint8Array | string, h: Argon2Hash): Promise<boolean> {
  return verifyWith(secret, h, (args) => argon2id({ ...args, outputType: "binary" }));
}

/**
 * `verifySecret` with the hash computed on a thread of its own (argon2-thread.ts): what the
 * broker's logins use, so no login, good or bad, blocks the gateway's thread.
 */
export async function verifySecretOffThread(secret: Uint8Array | string, h: Argon2Hash): Promise<boolean> {
  return verifyWith(secret, h, argon2idOffThread);
}

async function verifyWith(
  secret: Uint8Array | string,
  h: Argon2Hash,
  compute: (args: Omit<Argon2Request, "id">) => Promise<Uint8Array>,
): Promise<boolean> {
  // argon2 refuses an empty password; an empty secret never matches, but costs the same.
  const empty = secret.length === 0;
  const computed = await compute({
    password: empty ? "\u0000" : secret,
    salt: h.salt,
    memorySize: h.memorySize,
    iterations: h.iterations,
    parallelism: h.parallelism,
    hashLength: h.hash.length,
  });
  return computed.length === h.hash.length && timingSafeEqual(computed, h.hash) && !empty;
}

/** SHA-256 of a secret: the key of the verified-secret cache (never stored on disk). */
export function secretDigest(secret: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(secret).digest());
}

/** Constant-time equality of two digests. */
export function digestsEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/**
 * PBKDF2-SHA512 iterations of Mosquitto's `$7$` hashes: mosquitto_passwd's own default (2.0). Cheap
 * on purpose (Mosquitto pays it on every CONNECT); device secrets are 256 random bits, so a
 * guess costs nothing less than the 2^256 space.
 */
export const MOSQUITTO_ITERATIONS = 101;

/** A secret hashed the way Mosquitto's password file wants it: `$7$<iterations>$<salt>$<hash>` (base64). */
export function mosquittoHash(secret: string, iterations = MOSQUITTO_ITERATIONS): string {
  const salt = randomBytes(12);
  const hash = pbkdf2Sync(secret, salt, iterations, 64, "sha512");
  return `$7$${iterations}$${salt.toString("base64")}$${hash.toString("base64")}`;
}

/** Why a `$7$` string is not a Mosquitto PBKDF2-SHA512 hash, or null when it is one. */
export function mosquittoHashProblem(encoded: string): string | null {
  const m = /^\$7\$(\d{1,7})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})$/.exec(encoded);
  if (!m) return 'must be a Mosquitto hash "$7$<iterations>$<salt>$<hash>" (written by `fleet device add`)';
  if (Buffer.from(m[3] ?? "", "base64").length !== 64) return "must hold a 64-byte PBKDF2-SHA512 hash";
  return null;
}
