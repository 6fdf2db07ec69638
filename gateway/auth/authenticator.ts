/**
 * Checks bearer tokens against the tokens file, re-reading it when it changes (a stat per
 * check: revoking a token takes effect on the next request). The comparison runs over every
 * stored digest with `timingSafeEqual`, so its time does not depend on which bytes match.
 * A per-run local token (the CLI's, see local.ts) is checked the same way.
 */
import { timingSafeEqual } from "node:crypto";
import type { Logger } from "pino";
import type { Principal, Scope } from "./scopes.ts";
import { diffTokens, fileStamp, readTokens, type StoredToken, type TokenChange, tokenDigest } from "./tokens.ts";

interface Entry extends Principal {
  readonly digest: Buffer;
}

/** Options of a `TokenAuth`. */
export interface TokenAuthOptions {
  readonly log?: Logger;
  /** Called after a reload that added or removed tokens (not for the first read). */
  readonly onChange?: (change: TokenChange) => void;
}

/** The gateway's view of who may call its API. */
export class TokenAuth {
  private stored: StoredToken[] = [];
  private entries: Entry[] = [];
  private extra: Entry[] = [];
  private stamp = "";

  constructor(
    readonly file: string,
    private readonly opts: TokenAuthOptions = {},
  ) {
    this.refresh(true);
  }

  /** Accept `token` too, as `name` with `scope`, for this process's lifetime (the local CLI token). */
  allow(token: string, name: string, scope: Scope): void {
    this.extra.push({ name, scope, digest: tokenDigest(token) });
  }

  /** Tokens in the file now. */
  get count(): number {
    this.refresh();
    return this.stored.length;
  }

  /** The tokens of the file as last read. */
  get tokens(): readonly StoredToken[] {
    return this.stored;
  }

  /** The principal a presented token stands for, or null. */
  authenticate(token: string): Principal | null {
    return this.byDigest(tokenDigest(token));
  }

  /** The principal of a token digest (a dashboard session keeps the digest, not the token), or null. */
  byDigest(digest: Buffer): Principal | null {
    this.refresh();
    let found: Entry | null = null;
    for (const e of this.entries) if (timingSafeEqual(e.digest, digest) && found === null) found = e;
    for (const e of this.extra) if (timingSafeEqual(e.digest, digest) && found === null) found = e;
    return found === null ? null : { name: found.name, scope: found.scope };
  }

  /** Re-read the file when it changed; an invalid file keeps the previous tokens (and is logged). */
  refresh(first = false): void {
    const stamp = fileStamp(this.file);
    if (stamp === this.stamp) return;
    this.stamp = stamp;
    let next: StoredToken[];
    try {
      next = readTokens(this.file);
    } catch (err) {
      this.opts.log?.error(`tokens file rejected, keeping the previous tokens: ${(err as Error).message}`);
      return;
    }
    const before = this.stored;
    this.stored = next;
    this.entries = next.map((t) => ({ name: t.name, scope: t.scope, digest: Buffer.from(t.sha256, "hex") }));
    if (first) return;
    const change = diffTokens(before, next);
    this.opts.log?.info({ file: this.file, tokens: next.length }, "tokens file reloaded");
    if (change.added.length + change.removed.length > 0) this.opts.onChange?.(change);
  }
}
