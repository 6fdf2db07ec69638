/**
 * Dashboard sign-in: `POST /api/session` with `{"token": "..."}` sets an `HttpOnly;
 * SameSite=Strict; Path=/` cookie (`Secure` over HTTPS) holding an opaque session id; `GET /api/session` says who
 * is signed in; `DELETE /api/session` signs out. `GET /` without a session shows the
 * sign-in page (a small form that posts the token as JSON: the API refuses form posts).
 */
import type { Logger } from "pino";
import type { Sessions } from "../auth/index.ts";
import { SESSION_COOKIE } from "../auth/index.ts";
import { type AuditEntry, cookie, principalOf } from "./access.ts";
import { httpError, json, readJson } from "./responses.ts";

/** What the session routes need. */
export interface SessionDeps {
  readonly sessions: Sessions;
  readonly audit: (entry: AuditEntry) => Promise<void>;
  /** The clock the sign-in audit is rate-limited on (default Date.now). */
  readonly now?: () => number;
  /** Where failed sign-ins are logged. */
  readonly log?: Pick<Logger, "warn">;
}

/** Failed sign-ins one peer may make in a minute; past them its sign-ins are a 429 until the minute ends. */
export const SIGNIN_FAILURES_PER_MINUTE = 10;
/** Peers whose failures are remembered at once (past it the oldest are forgotten). */
const FAILURE_PEERS = 10_000;

type Peer = { requestIP(req: Request): { address: string } | null };

/** One sign-in per token is audited in this window; the others are counted into the next one recorded. */
const SIGNIN_AUDIT_MS = 60_000;

const clearCookie = `${SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0`;

/** The `/api/session` route. */
export function sessionRoutes(d: SessionDeps) {
  const now = d.now ?? Date.now;
  /** Per token name: when its last sign-in was recorded, and how many came since. */
  const signins = new Map<string, { at: number; since: number }>();
  /** Audit a sign-in unless one of the token was recorded in the last minute (a loop cannot grow the table). */
  const auditSignin = async (name: string) => {
    const last = signins.get(name);
    if (last && now() - last.at < SIGNIN_AUDIT_MS) {
      last.since++;
      return;
    }
    signins.set(name, { at: now(), since: 0 });
    const detail = last?.since ? `${last.since} more sign-in(s) since the last recorded, not recorded each` : null;
    await d.audit({ actor: name, action: "session.signin", target: null, status: 200, detail });
  };
  /** Per peer address: when its minute of failed sign-ins began, and how many it made. */
  const failures = new Map<string, { since: number; count: number }>();
  const failuresOf = (peer: string) => {
    const f = failures.get(peer);
    if (f && now() - f.since < SIGNIN_AUDIT_MS) return f;
    if (f) failures.delete(peer);
    return null;
  };
  /** Count a failed sign-in: the first of a minute is logged, and the one that reaches the limit. */
  const failed = (peer: string) => {
    const f = failuresOf(peer) ?? { since: now(), count: 0 };
    if (f.count === 0) {
      if (failures.size >= FAILURE_PEERS) failures.delete(failures.keys().next().value!);
      failures.set(peer, f);
    }
    f.count++;
    if (f.count === 1) d.log?.warn({ peer }, "dashboard sign-in with a bad or revoked token");
    if (f.count === SIGNIN_FAILURES_PER_MINUTE)
      d.log?.warn({ peer, failures: f.count }, "failed dashboard sign-ins: refusing this peer's sign-ins for a minute");
  };
  return {
    "/api/session": {
      GET: (req: Request) => {
        const p = principalOf(req);
        return p ? json({ name: p.name, scope: p.scope }) : httpError(401, "unauthorized", "not signed in");
      },
      POST: async (req: Request, server: Peer) => {
        const peer = server.requestIP(req)?.address ?? "unknown";
        const f = failuresOf(peer);
        if (f && f.count >= SIGNIN_FAILURES_PER_MINUTE) {
          const wait = Math.max(1, Math.ceil((f.since + SIGNIN_AUDIT_MS - now()) / 1000));
          return json(
            { error: { code: "too_many_attempts", message: `too many failed sign-ins; retry in ${wait} s` } },
            429,
            { "retry-after": String(wait) },
          );
        }
        const body = await readJson(req, 4096);
        if (!body.ok) return body.res;
        const token = (body.value as { token?: unknown } | null)?.token;
        if (typeof token !== "string" || token.length === 0 || token.length > 256)
          return httpError(400, "bad_request", 'body must be {"token": "<token>"}');
        const s = d.sessions.open(token.trim());
        if (s === null) {
          failed(peer);
          return httpError(401, "unauthorized", "bad or revoked token");
        }
        await auditSignin(s.principal.name);
        // Over HTTPS the browser must never send the cookie over plain HTTP.
        const secure = new URL(req.url).protocol === "https:" ? "; Secure" : "";
        return json({ name: s.principal.name, scope: s.principal.scope }, 200, {
          "set-cookie":
            `${SESSION_COOKIE}=${s.id}; HttpOnly; SameSite=Strict; Path=/; ` +
            `Max-Age=${d.sessions.maxAgeSeconds}${secure}`,
        });
      },
      DELETE: async (req: Request) => {
        const sid = cookie(req, SESSION_COOKIE);
        const p = sid === null ? null : d.sessions.principal(sid);
        if (sid !== null) d.sessions.close(sid);
        if (p) await d.audit({ actor: p.name, action: "session.signout", target: null, status: 200, detail: null });
        return json({ ok: true }, 200, { "set-cookie": clearCookie });
      },
    },
  };
}

/** The sign-in page: self-contained (no assets need a session), posts the token as JSON. */
export function signInPage(): Response {
  return new Response(SIGN_IN_HTML, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "x-content-type-options": "nosniff",
      "x-frame-options": "DENY",
      // Inline style and script are this page's own; nothing else may load, and no page may frame it.
      "content-security-policy":
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; " +
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    },
  });
}

const SIGN_IN_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · Agent Fleets</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;background:#f5f6f8;color:#222;display:grid;place-items:center;
min-height:100vh;margin:0}
form{background:#fff;padding:24px 28px;border-radius:8px;box-shadow:0 1px 4px #0002;width:min(420px,90vw)}
h1{font-size:18px;margin:0 0 12px}input{width:100%;box-sizing:border-box;padding:8px;font:inherit;margin:6px 0 12px}
button{padding:8px 16px;font:inherit}p{color:#555;font-size:13px}#error{color:#b00020;min-height:1em}
</style></head>
<body><form id="signin">
<h1>Agent Fleets</h1>
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
<p id="error" role="alert"></p>
<p>Create a token on the gateway's machine: <code>fleet token add NAME --scope read</code></p>
</form>
<script>
document.getElementById("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = document.getElementById("token").value.trim();
  const res = await fetch("/api/session", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (res.ok) location.reload();
  else document.getElementById("error").textContent = (await res.json()).error?.message ?? "sign-in failed";
});
</script></body></html>
`;
