/**
 * Dashboard sessions: signing in with a token gives the browser an opaque session id in an
 * `HttpOnly; SameSite=Strict` cookie. The session keeps the token's digest, not the token,
 * and asks the `TokenAuth` on every use, so revoking the token ends its sessions at once.
 */
import type { TokenAuth } from "./authenticator.ts";
import type { Principal } from "./scopes.ts";
import { tokenDigest } from "./tokens.ts";

/** The cookie's name. */
export const SESSION_COOKIE = "fleet_session";

interface Session {
  readonly digest: Buffer;
  /** The digest in hex: which token's sessions this one counts among. */
  readonly token: string;
  readonly expires: number;
}

/** Options of `Sessions`. */
export interface SessionOptions {
  /** How long a session lasts (default 12 h). */
  readonly ttlMs?: number;
  /** Most live sessions; past it the oldest of the token with the most goes (default 1000). */
  readonly max?: number;
  /** Most live sessions of one token; past it that token's oldest goes (default 20). */
  readonly maxPerToken?: number;
  readonly now?: () => number;
}

/**
 * Live dashboard sessions, in memory (a restart signs everyone out). Signing in past a cap ends
 * sessions of the token that signs in, or of the token with the most: one token (a `read` one
 * shared with a Grafana) cannot sign the other tokens' users out.
 */
export class Sessions {
  private readonly live = new Map<string, Session>();
  /** Session ids by token (digest hex), oldest first. */
  private readonly byToken = new Map<string, Set<string>>();
  private readonly ttlMs: number;
  private readonly max: number;
  private readonly maxPerToken: number;
  private readonly now: () => number;

  constructor(
    private readonly auth: TokenAuth,
    opts: SessionOptions = {},
  ) {
    this.ttlMs = opts.ttlMs ?? 12 * 3_600_000;
    this.max = opts.max ?? 1000;
    this.maxPerToken = opts.maxPerToken ?? 20;
    this.now = opts.now ?? Date.now;
  }

  /** Seconds a new session lasts (the cookie's Max-Age). */
  get maxAgeSeconds(): number {
    return Math.floor(this.ttlMs / 1000);
  }

  /** Sign in with a token: a new session id and its principal, or null for a bad token. */
  open(token: string): { id: string; principal: Principal } | null {
    const digest = tokenDigest(token);
    const principal = this.auth.byDigest(digest);
    if (principal === null) return null;
    const key = digest.toString("hex");
    const mine = this.byToken.get(key);
    if (mine && mine.size >= this.maxPerToken) this.drop(mine.values().next().value!);
    if (this.live.size >= this.max) {
      let most: Set<string> | null = null;
      for (const ids of this.byToken.values()) if (most === null || ids.size > most.size) most = ids;
      if (most) this.drop(most.values().next().value!);
    }
    const id = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");
    this.live.set(id, { digest, token: key, expires: this.now() + this.ttlMs });
    const ids = this.byToken.get(key) ?? new Set<string>();
    ids.add(id);
    this.byToken.set(key, ids);
    return { id, principal };
  }

  /** Live sessions now (expired ones are dropped as they are next used). */
  get size(): number {
    return this.live.size;
  }

  /** End one session. */
  private drop(id: string): void {
    const s = this.live.get(id);
    if (!s) return;
    this.live.delete(id);
    const ids = this.byToken.get(s.token);
    ids?.delete(id);
    if (ids?.size === 0) this.byToken.delete(s.token);
  }

  /** The principal of a live session whose token is still valid, or null. */
  principal(id: string): Principal | null {
    const s = this.live.get(id);
    if (!s) return null;
    if (s.expires <= this.now()) {
      this.drop(id);
      return null;
    }
    const p = this.auth.byDigest(s.digest);
    if (p === null) this.drop(id);
    return p;
  }

  /** Sign out. */
  close(id: string): void {
    this.drop(id);
  }
}
