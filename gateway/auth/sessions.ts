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
  readonly expires: number;
}

/** Options of `Sessions`. */
export interface SessionOptions {
  /** How long a session lasts (default 12 h). */
  readonly ttlMs?: number;
  /** Most live sessions; the oldest goes first (default 1000). */
  readonly max?: number;
  readonly now?: () => number;
}

/** Live dashboard sessions, in memory (a restart signs everyone out). */
export class Sessions {
  private readonly live = new Map<string, Session>();
  private readonly ttlMs: number;
  private readonly max: number;
  private readonly now: () => number;

  constructor(
    private readonly auth: TokenAuth,
    opts: SessionOptions = {},
  ) {
    this.ttlMs = opts.ttlMs ?? 12 * 3_600_000;
    this.max = opts.max ?? 1000;
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
    if (this.live.size >= this.max) this.live.delete(this.live.keys().next().value!);
    const id = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");
    this.live.set(id, { digest, expires: this.now() + this.ttlMs });
    return { id, principal };
  }

  /** The principal of a live session whose token is still valid, or null. */
  principal(id: string): Principal | null {
    const s = this.live.get(id);
    if (!s) return null;
    if (s.expires <= this.now()) {
      this.live.delete(id);
      return null;
    }
    const p = this.auth.byDigest(s.digest);
    if (p === null) this.live.delete(id);
    return p;
  }

  /** Sign out. */
  close(id: string): void {
    this.live.delete(id);
  }
}
