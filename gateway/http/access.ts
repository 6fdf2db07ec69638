/**
 * Who may call what (issue 9): every route is wrapped once, here, so no handler can forget.
 *  - `/api/*` and the dashboard need a token (`Authorization: Bearer`, or the dashboard's
 *    session cookie): GET needs `read`, state changes `operate`, retention and the audit log
 *    `admin`. A missing or bad token is 401, a token without the scope 403.
 *  - `/healthz`, `/readyz`, `/metrics` answer loopback peers without a token (any peer with
 *    `[http] open_metrics = true`); others need `read`.
 *  - `/hooks/<name>` keep their own per-hook secret; a foreign `Origin` (a web page's request) is
 *    refused, and on a loopback-bound gateway a foreign Host too (DNS rebinding).
 *  - Every request's Host must be an IP literal, localhost or an `[http] allowed_hosts` name
 *    (DNS rebinding); every state change must come with `content-type: application/json` and
 *    no foreign `Origin` (cross-site form or text/plain posts).
 *  - At most `max_concurrent_requests` are handled at once (health probes always answer);
 *    requests that need no token (webhooks, sign-in) at most a quarter of them, and half of
 *    the body budget, so they cannot starve the API.
 *  - Every state change by a known token is appended to the audit log, with its result.
 */
import type { Principal, Scope, Sessions, TokenAuth } from "../auth/index.ts";
import { SESSION_COOKIE, scopeCovers, tokenDigest } from "../auth/index.ts";
import type { FleetSpec } from "../spec/index.ts";
import { type BodyBudget, unauthenticatedShare, underBudget } from "./limits.ts";
import { httpError, parseFlag, unexpectedError } from "./responses.ts";

/** What a route needs before its handler runs. */
export type Need = Scope | "probe" | "hook" | "signin" | "dashboard";

/** One audit record as the guard reports it. */
export interface AuditEntry {
  readonly actor: string;
  readonly action: string;
  readonly target: string | null;
  readonly status: number;
  readonly detail: string | null;
}

/** What the guard needs from the gateway. */
export interface AccessDeps {
  /** The running spec's `[http]` table: read per request, so a reload applies its access keys at once. */
  readonly http: () => FleetSpec["http"];
  readonly auth: TokenAuth;
  readonly sessions: Sessions;
  /** Append one audit record (awaited before the response goes out). */
  readonly audit: (entry: AuditEntry) => Promise<void>;
  /** The sign-in page, for the dashboard without a session. */
  readonly signInPage: () => Response;
  /** Long-lived responses open now (event streams), counted against max_concurrent_requests. */
  readonly streams: () => number;
  /** The shared budget of request body bytes. */
  readonly bodies: BodyBudget;
}

type Server = { requestIP(req: Request): { address: string } | null; timeout(req: Request, seconds: number): void };
type Handler = (req: Request & { params: Record<string, string> }, server: Server) => Response | Promise<Response>;

/** Audit details a handler adds about its request (e.g. the topic of a send). */
const notes = new WeakMap<Request, { target?: string; detail?: string }>();

/** Tell the audit log more about this request than its route says. */
export function noteAudit(req: Request, note: { target?: string; detail?: string }): void {
  notes.set(req, { ...notes.get(req), ...note });
}

/** The principal of a request that passed the guard (for handlers that need to know who). */
const principals = new WeakMap<Request, Principal>();

/** Who made this request, once the guard let it through. */
export function principalOf(req: Request): Principal | null {
  return principals.get(req) ?? null;
}

/** Whether the credential a request came with still admits it (checked again by long-lived responses). */
const credentials = new WeakMap<Request, () => boolean>();

/**
 * Whether the token, session or `allow_unauthenticated` that let this request in still would:
 * false once the token is revoked, the session signed out or expired. An event stream asks
 * before every write and ends when it is false (access.md).
 */
export function credentialOf(req: Request): () => boolean {
  return credentials.get(req) ?? (() => true);
}

const READ_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

/** What `pattern` needs for `method`. */
export function needOf(pattern: string, method: string): Need {
  if (pattern === "/healthz" || pattern === "/readyz" || pattern === "/metrics") return "probe";
  if (pattern.startsWith("/hooks/")) return "hook";
  if (pattern === "/api/session") return method === "GET" ? "read" : "signin";
  if (!pattern.startsWith("/api/")) return "dashboard";
  if (pattern === "/api/gc" || pattern === "/api/audit") return "admin";
  return READ_METHODS.has(method) ? "read" : "operate";
}

/** The actions of the routes that take one from the path, as audited (`agent.pause`). */
const ACTIONS = {
  agent: ["pause", "resume", "retire", "stimuli"],
  quarantine: ["retry", "drop"],
  rollout: ["promote", "abort"],
} as const satisfies Record<string, readonly string[]>;

/** The audit action and target of a state change on `pattern`. */
function actionOf(pattern: string, req: Request & { params: Record<string, string> }): [string, string | null] {
  const p = req.params ?? {};
  // An action the route does not have is audited by its route, not by a name the caller made up.
  const named = (prefix: keyof typeof ACTIONS) =>
    p.action && (ACTIONS[prefix] as readonly string[]).includes(p.action)
      ? `${prefix}.${p.action}`
      : `${req.method} ${pattern}`;
  if (pattern === "/api/agents/:type/:key/:action") return [named("agent"), `${p.type}/${p.key}`];
  if (pattern === "/api/quarantine/:seq/:action") return [named("quarantine"), `stimulus ${p.seq}`];
  // The flag as the handler reads it: a dry run is audited as one, a refused spelling as the gc it did not run.
  if (pattern === "/api/gc") {
    const dryRun = parseFlag(new URL(req.url), "dry_run");
    return [dryRun.ok && dryRun.value ? "gc.dry_run" : "gc", null];
  }
  if (pattern === "/api/send") return ["send", null];
  if (pattern === "/api/episodes/:id/replay") return ["episode.replay", `episode ${p.id}`];
  if (pattern === "/api/deploy/check") return ["deploy.check", null];
  if (pattern === "/api/rollouts/:type/:action") return [named("rollout"), `type ${p.type}`];
  return [`${req.method} ${pattern}`, null];
}

/** Whether a peer address is this machine. */
export function isLoopbackPeer(address: string | undefined): boolean {
  if (!address) return false;
  return address === "::1" || address.startsWith("127.") || address.startsWith("::ffff:127.");
}

/** Whether a listen address (`[http] host`) is this machine only. */
function isLoopbackName(host: string): boolean {
  const h = host.toLowerCase();
  return h === "localhost" || h === "::1" || h === "[::1]" || h.startsWith("127.");
}

const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;

/** The host name of a Host header (no port, no brackets), lower case. */
function hostName(host: string): string {
  const h = host.trim().toLowerCase();
  if (h.startsWith("[")) return h.slice(1, h.indexOf("]"));
  const colon = h.lastIndexOf(":");
  return colon > 0 && h.indexOf(":") === colon ? h.slice(0, colon) : h;
}

/** The value of one cookie, or null. */
export function cookie(req: Request, name: string): string | null {
  const header = req.headers.get("cookie");
  if (!header) return null;
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

/** The guard over a route table: wraps every handler; `inFlight()` says how many run now. */
/** How long a request may take past its body's read deadline before the server drops it (s). */
const HANDLER_GRACE_S = 30;

export function createGuard(d: AccessDeps) {
  let inFlight = 0;
  /** Of those, requests that need no token (webhooks, sign-in and sign-out). */
  let openInFlight = 0;
  // The names of the `[http]` table in force, made again when a reload replaces it.
  let hostsOf: FleetSpec["http"] | null = null;
  let allowedHosts = new Set<string>();
  const hostsAllowed = (): Set<string> => {
    const http = d.http();
    if (http !== hostsOf) {
      allowedHosts = new Set(["localhost", http.host.toLowerCase(), ...http.allowed_hosts.map((h) => h.toLowerCase())]);
      hostsOf = http;
    }
    return allowedHosts;
  };

  const hostOk = (req: Request): boolean => {
    const host = req.headers.get("host");
    if (host === null) return false;
    const name = hostName(host);
    // An IPv6 literal is bracketed in a Host header (RFC 3986 §3.2.2); `evil.com:80:80` is no address.
    const ipv6 = host.trim().startsWith("[") && name.includes(":");
    return IPV4.test(name) || ipv6 || hostsAllowed().has(name);
  };

  /** Same-origin or no Origin at all (non-browser clients); a foreign or opaque origin is refused. */
  const originOk = (req: Request): boolean => {
    const origin = req.headers.get("origin");
    if (origin === null) return true;
    const host = req.headers.get("host");
    return host !== null && (origin === `http://${host}` || origin === `https://${host}`);
  };

  /** Bearer token first (a bad one is a 401 even with a good cookie), then the session cookie. */
  const principal = (req: Request): Principal | null | "bad" => {
    const authz = req.headers.get("authorization");
    if (authz !== null) {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(authz);
      return (m && d.auth.authenticate(m[1]!)) || "bad";
    }
    const sid = cookie(req, SESSION_COOKIE);
    if (sid !== null) return d.sessions.principal(sid) ?? "bad";
    return d.http().allow_unauthenticated ? { name: "anonymous", scope: "admin" } : null;
  };

  /** What `principal` read from the request, to be asked again later (the same order, the same answers). */
  const credential = (req: Request): (() => boolean) => {
    const authz = req.headers.get("authorization");
    if (authz !== null) {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(authz);
      const digest = m ? tokenDigest(m[1]!) : null;
      return () => digest !== null && d.auth.byDigest(digest) !== null;
    }
    const sid = cookie(req, SESSION_COOKIE);
    if (sid !== null) return () => d.sessions.principal(sid) !== null;
    return () => d.http().allow_unauthenticated;
  };

  const unauthorized = (why: string) => {
    const res = httpError(
      401,
      "unauthorized",
      `${why}: send Authorization: Bearer <token> ` +
        "(create one with `fleet token add NAME --scope read|operate|admin`)",
    );
    res.headers.set("www-authenticate", 'Bearer realm="fleet"');
    return res;
  };

  /**
   * Run `handler` for `pattern` if the request may; otherwise the refusal. `handler` is null for
   * a method the route does not have (`allow` are those it has): a 405 once the caller is known.
   */
  async function guarded(
    pattern: string,
    handler: Handler | null,
    allow: readonly string[],
    req: Request & { params: Record<string, string> },
    server: Server,
  ) {
    const need = needOf(pattern, req.method);
    const open = need === "hook" || need === "signin";
    if (pattern !== "/healthz" && pattern !== "/readyz") {
      const max = d.http().max_concurrent_requests;
      if (inFlight + d.streams() >= max)
        return busy(`${inFlight + d.streams()} requests in flight (max_concurrent_requests)`);
      // A client without a token cannot take the slots the API needs.
      if (open && openInFlight >= unauthenticatedShare(max, 1 / 4))
        return busy(`${openInFlight} webhook and sign-in requests in flight (a quarter of max_concurrent_requests)`);
    }
    // Webhooks: their own secret, the body budget; no web page may fire one (access.md).
    if (need === "hook") {
      if (isLoopbackName(d.http().host) && !hostOk(req))
        return httpError(403, "bad_host", "Host is not this gateway's (add the name to [http] allowed_hosts)");
      // Browsers send Origin on every cross-origin POST; webhook senders send none.
      if (!originOk(req)) return httpError(403, "bad_origin", "a web page of another origin may not call a webhook");
      return handler ? run(handler, req, server, true) : notAllowed(req.method, allow);
    }
    if (!hostOk(req))
      return httpError(403, "bad_host", "Host is not this gateway's (add the name to [http] allowed_hosts)");
    const changes = !READ_METHODS.has(req.method);
    if (changes && !originOk(req))
      return httpError(403, "bad_origin", "cross-origin requests may not change the fleet");
    let who: Principal | null = null;
    if (need !== "signin") {
      const p = principal(req);
      if (need === "probe") {
        const peer = server.requestIP(req)?.address;
        if (!(d.http().open_metrics || isLoopbackPeer(peer))) {
          if (p === null || p === "bad")
            return unauthorized(p === null ? "a token is needed from a remote peer" : "bad token");
        }
      } else {
        if (p === null || p === "bad") {
          if (need === "dashboard" && pattern === "/" && req.method === "GET") return d.signInPage();
          return unauthorized(p === null ? "missing token" : "bad or revoked token");
        }
        // After the token (a caller without one learns nothing more), before the scope: a wrong
        // method changes nothing, so it needs no scope and is not audited.
        if (handler === null) return notAllowed(req.method, allow);
        const scope: Scope = need === "dashboard" ? "read" : need;
        if (!scopeCovers(p.scope, scope)) {
          const res = httpError(403, "forbidden", `token "${p.name}" has scope ${p.scope}; this call needs ${scope}`);
          if (changes) await record(p, pattern, req, res.status);
          return res;
        }
        who = p;
        principals.set(req, p);
        credentials.set(req, credential(req));
      }
    }
    if (handler === null) return notAllowed(req.method, allow); // probes and sign-in
    // After the token (a missing one is a 401 whatever the body), before anything runs.
    if (changes && req.headers.get("content-type")?.split(";")[0]?.trim().toLowerCase() !== "application/json")
      return httpError(415, "unsupported_media_type", "state-changing calls need content-type: application/json");
    let res: Response;
    try {
      res = await run(handler, req, server, need === "signin");
    } catch (err) {
      // A change that threw part-way is still a change someone asked for: recorded with the status
      // the server's error handler answers (500, or 503 while commits fail), then answered by it.
      if (changes && who !== null) await record(who, pattern, req, unexpectedError(err as Error).status);
      throw err;
    }
    if (changes && who !== null) await record(who, pattern, req, res.status);
    return res;
  }

  /** Run a handler counted in flight, its body read under the shared budget; `open`: it needed no token. */
  async function run(
    handler: Handler,
    req: Request & { params: Record<string, string> },
    server: Server,
    open: boolean,
  ) {
    inFlight++;
    if (open) {
      openInFlight++;
      d.bodies.markUnauthenticated(req);
    }
    underBudget(req, d.bodies);
    // Bun ends a request after 10 s without a word (its idleTimeout, not reset by body bytes), which
    // would cut off a slow body before its 408 and a slow commit before its answer.
    server.timeout(req, Math.ceil(d.bodies.readDeadlineMs / 1000) + HANDLER_GRACE_S);
    try {
      return await handler(req, server);
    } finally {
      inFlight--;
      if (open) openInFlight--;
      d.bodies.release(req);
    }
  }

  async function record(
    who: Principal,
    pattern: string,
    req: Request & { params: Record<string, string> },
    status: number,
  ) {
    const [action, target] = actionOf(pattern, req);
    const note = notes.get(req);
    await d.audit({ actor: who.name, action, target: note?.target ?? target, status, detail: note?.detail ?? null });
  }

  /** The routes `protect` wrapped, by path segments (`:name` matches any one segment). */
  const known: { pattern: string; segments: string[]; literal: number; allow: readonly string[] }[] = [];

  /**
   * The answer for a request no route method took (Bun.serve's `fetch`): a method outside
   * `ROUTE_METHODS` (PROPFIND, TRACE) on a path that has a route is guarded as that route's
   * missing method (401 without a token, then 405 with `Allow`); any other path is a 404.
   */
  function fallback(req: Request, server: Server): Response | Promise<Response> {
    const parts = new URL(req.url).pathname.split("/");
    let best: (typeof known)[number] | null = null;
    for (const r of known) {
      if (r.segments.length !== parts.length) continue;
      if (!r.segments.every((s, i) => (s.startsWith(":") ? parts[i] !== "" : s === parts[i]))) continue;
      if (best === null || r.literal > best.literal) best = r;
    }
    if (best === null) return httpError(404, "not_found", "no such endpoint");
    return guarded(best.pattern, null, best.allow, Object.assign(req, { params: {} }), server);
  }

  /**
   * Wrap every handler of a Bun.serve route table. A bare function serves GET (and HEAD, which
   * Bun answers from GET); every other method of a route gets a guarded 405 naming those it has.
   */
  function protect<R extends Record<string, unknown>>(routes: R): R {
    const out: Record<string, unknown> = {};
    for (const [pattern, value] of Object.entries(routes)) {
      const table =
        typeof value === "function"
          ? { GET: value as Handler }
          : value && typeof value === "object" && !(value instanceof Response)
            ? (value as Record<string, Handler>)
            : null;
      if (table === null) {
        out[pattern] = value;
        continue;
      }
      const allow = Object.keys(table).includes("GET") ? [...Object.keys(table), "HEAD"] : Object.keys(table);
      const segments = pattern.split("/");
      known.push({ pattern, segments, literal: segments.filter((x) => !x.startsWith(":")).length, allow });
      const methods: Record<string, unknown> = {};
      for (const m of ROUTE_METHODS) {
        // HEAD of a GET route is Bun's: the GET handler's headers without the body.
        if (m === "HEAD" && allow.includes("GET")) continue;
        const h = table[m] ?? null;
        methods[m] = (req: Request & { params: Record<string, string> }, server: Server) =>
          guarded(pattern, h, allow, req, server);
      }
      out[pattern] = methods;
    }
    return out as R;
  }

  return { protect, fallback, inFlight: () => inFlight };
}

/** The methods a Bun.serve route table can name; any other method falls through to its `fetch` (`fallback`). */
const ROUTE_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] as const;

/** 405 with `Allow`: the route exists, the method is not one of its own. */
function notAllowed(method: string, allow: readonly string[]): Response {
  const res = httpError(405, "method_not_allowed", `${method} is not allowed here; allowed: ${allow.join(", ")}`);
  res.headers.set("allow", allow.join(", "));
  return res;
}

/** 503 with a short Retry-After: the gateway is at a cap, try again in a moment. */
export function busy(why: string): Response {
  const res = httpError(503, "busy", `too busy: ${why}; retry shortly`);
  res.headers.set("retry-after", "1");
  return res;
}
