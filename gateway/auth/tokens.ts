/**
 * API tokens at rest: `<data-dir>/tokens.json` (0600), managed by `fleet token add|list|revoke`.
 * A token is 32 random bytes (base64url, prefixed `fleet_`), shown once; the file keeps only
 * its SHA-256. A fast hash is enough here (unlike a device's human-sized secret): a 256-bit
 * random token cannot be guessed or brute-forced from its digest, and the gateway checks it
 * on every request. Writes are atomic (temp file + rename), so a running gateway never reads
 * half a file.
 */
import { createHash } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { writeFileDurably } from "../durable.ts";
import { parseScope, type Scope } from "./scopes.ts";

/** The tokens file of a data dir. */
export const TOKENS_FILE = "tokens.json";
/** Token names: what `fleet token` and the audit log call a token. */
export const TOKEN_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
/** Every token starts with this, so it is recognisable in a leak scan. */
export const TOKEN_PREFIX = "fleet_";

/** A tokens file that cannot be read or is invalid; the message says which file and what is wrong. */
export class TokenFileError extends Error {
  override readonly name = "TokenFileError";
  constructor(
    readonly file: string,
    problem: string,
  ) {
    super(`${file}: ${problem}`);
  }
}

/** One stored token: never the token itself. */
export interface StoredToken {
  readonly name: string;
  readonly scope: Scope;
  /** Hex SHA-256 of the token. */
  readonly sha256: string;
  readonly created: string;
}

/** A fresh token: 32 random bytes, base64url. */
export function newToken(): string {
  return TOKEN_PREFIX + Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");
}

/** SHA-256 of a presented token. */
export function tokenDigest(token: string): Buffer {
  return createHash("sha256").update(token).digest();
}

/** The tokens in `file` ([] when it does not exist); a TokenFileError when it is invalid. */
export function readTokens(file: string): StoredToken[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return [];
    throw new TokenFileError(file, `cannot read: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new TokenFileError(file, `not JSON: ${(err as Error).message}`);
  }
  const list = (doc as { tokens?: unknown } | null)?.tokens;
  if (!Array.isArray(list)) throw new TokenFileError(file, 'must be {"tokens": [...]}');
  const seen = new Set<string>();
  return list.map((t: Record<string, unknown>, i) => {
    const where = `tokens[${i}]`;
    if (typeof t?.name !== "string" || !TOKEN_NAME_RE.test(t.name))
      throw new TokenFileError(file, `${where}.name must be 1-64 of A-Z a-z 0-9 _ . -`);
    if (seen.has(t.name)) throw new TokenFileError(file, `${where}.name "${t.name}" appears twice`);
    seen.add(t.name);
    const scope = typeof t.scope === "string" ? parseScope(t.scope) : null;
    if (!scope) throw new TokenFileError(file, `${where}.scope must be read, operate or admin`);
    if (typeof t.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(t.sha256))
      throw new TokenFileError(file, `${where}.sha256 must be 64 hex digits (use \`fleet token add\`)`);
    return { name: t.name, scope, sha256: t.sha256, created: typeof t.created === "string" ? t.created : "" };
  });
}

/** Write the list atomically and durably (a power cut leaves the old list or the new one), 0600 (it holds digests). */
function writeTokens(file: string, tokens: readonly StoredToken[]): void {
  writeFileDurably(file, `${JSON.stringify({ tokens }, null, 2)}\n`, 0o600);
}

/** Add a token named `name`; returns the token (the only time it exists outside the caller). */
export function addToken(file: string, name: string, scope: Scope, now = new Date()): string {
  if (!TOKEN_NAME_RE.test(name))
    throw new TokenFileError(file, `token name "${name}" must be 1-64 of A-Z a-z 0-9 _ . -`);
  const tokens = readTokens(file);
  if (tokens.some((t) => t.name === name))
    throw new TokenFileError(file, `a token named "${name}" exists (revoke it first, or pick another name)`);
  const token = newToken();
  writeTokens(file, [
    ...tokens,
    { name, scope, sha256: tokenDigest(token).toString("hex"), created: now.toISOString() },
  ]);
  return token;
}

/** Remove the token named `name`; false when there is none. */
export function revokeToken(file: string, name: string): boolean {
  const tokens = readTokens(file);
  const rest = tokens.filter((t) => t.name !== name);
  if (rest.length === tokens.length) return false;
  writeTokens(file, rest);
  return true;
}

/** Tokens that appeared in or disappeared from the file, and the tokens it holds now. */
export interface TokenChange {
  readonly added: readonly StoredToken[];
  readonly removed: readonly StoredToken[];
  readonly tokens: readonly StoredToken[];
}

/** What changed from `before` to `after` (a token re-added under its name with another digest or scope: both). */
export function diffTokens(before: readonly StoredToken[], after: readonly StoredToken[]): TokenChange {
  const key = (t: StoredToken) => `${t.name}\n${t.sha256}\n${t.scope}`;
  const old = new Set(before.map(key));
  const now = new Set(after.map(key));
  return {
    added: after.filter((t) => !old.has(key(t))),
    removed: before.filter((t) => !now.has(key(t))),
    tokens: after,
  };
}

/**
 * Meta key: the tokens file as the audit log last recorded it (`tokenSnapshot`). The gateway records
 * the changes since at start, so one made just before a stop or a crash is not lost; whoever records a
 * change updates it in the same transaction (store `appendAuditWithMeta`), so none is recorded twice.
 */
export const TOKENS_AUDITED_META = "tokens.audited";

/** The tokens as `TOKENS_AUDITED_META` keeps them (never a token: names, scopes, digests). */
export function tokenSnapshot(tokens: readonly StoredToken[]): string {
  return JSON.stringify(tokens.map((t) => ({ name: t.name, scope: t.scope, sha256: t.sha256, created: t.created })));
}

/** `tokenSnapshot`'s tokens; [] for a value that is not one. */
export function parseTokenSnapshot(text: string): StoredToken[] {
  try {
    const list = JSON.parse(text) as unknown;
    return Array.isArray(list) ? (list as StoredToken[]) : [];
  } catch {
    return [];
  }
}

/** The audit records of `change` (`token.add`, `token.revoke`) by `actor`, at `at`. */
export function tokenAuditRecords(change: TokenChange, actor: string, at: number) {
  return [
    ...change.added.map((t) => ({ action: "token.add", target: t.name, detail: `scope ${t.scope}` })),
    ...change.removed.map((t) => ({ action: "token.revoke", target: t.name, detail: `scope ${t.scope}` })),
  ].map((e) => ({ ...e, at, actor, status: 200 }));
}

/** What identifies one version of a file on disk (changes on every atomic rewrite). */
export function fileStamp(file: string): string {
  try {
    const s = statSync(file);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  } catch {
    return "missing";
  }
}
