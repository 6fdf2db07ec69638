/**
 * `fleet central --url URL`: a read-only JSON API and a small dashboard over the central
 * database, every fleet side by side with drill-down to one fleet's agents and episodes.
 * Only GET; it binds 127.0.0.1 unless told otherwise, and a non-loopback host needs a
 * bearer token (env FLEET_CENTRAL_API_TOKEN) that every /api request must carry.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { parseOptionalInt } from "../parse.ts";
import { shownStatus } from "../types.ts";
import { type CentralReader, CentralError, gatewaysFor, layoutGaps, seqBeforeRefusal } from "./central.ts";
import { parseAuditCursor, parseBefore, parseEpisodeCursor } from "./cursor.ts";
import { DASHBOARD_HEADERS, DASHBOARD_HTML } from "./dashboard.ts";
import { type AuditRow, auditView } from "../store/index.ts";
import type { Origin } from "./central.ts";

/** An operator action as the central API and `fleet audit --central` show it (the gateway's shape plus its origin). */
export function centralAuditView(r: AuditRow & Origin) {
  return { fleet: r.fleet, gateway: r.gateway, ...auditView(r) };
}

/** How to serve. */
export interface CentralServerOptions {
  readonly reader: CentralReader;
  readonly host?: string;
  readonly port?: number;
  /** Bearer token for /api (required off loopback). */
  readonly token?: string | null;
  readonly now?: () => number;
}

/** A running central server. */
export interface CentralServer {
  readonly url: string;
  readonly port: number;
  stop(): void;
}

/** Whether `host` is a loopback address: 127.0.0.0/8, ::1 (also written [::1]), or localhost. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[(.*)\]$/, "$1").toLowerCase();
  if (h === "localhost" || h === "::1" || h === "0:0:0:0:0:0:0:1") return true;
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(h.replace(/^::ffff:/, ""));
  if (!v4) return false;
  return v4[1] === "127" && v4.slice(1).every((o) => Number(o) <= 255);
}

/** `http://host:port`, with an IPv6 address in brackets (RFC 3986 3.2.2). */
export function serverUrl(host: string, port: number): string {
  const h = host.replace(/^\[(.*)\]$/, "$1");
  return `http://${h.includes(":") ? `[${h}]` : h}:${port}`;
}

const json = (body: unknown, status = 200) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
/** Errors are `{"error": {"code", "message"}}`, as the gateway's API words them (docs/http-api.md). */
const problem = (status: number, code: string, message: string) => json({ error: { code, message } }, status);

/** Whether an Authorization header carries `token`, compared in constant time (digests of equal length). */
function sameToken(auth: string | null, token: string): boolean {
  if (auth === null) return false;
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(auth), digest(`Bearer ${token}`));
}

/** Start serving; throws CentralError when a non-loopback host has no token. */
export function startCentralServer(opts: CentralServerOptions): CentralServer {
  const host = opts.host ?? "127.0.0.1";
  const token = opts.token ?? null;
  if (!isLoopback(host) && !token)
    throw new CentralError(
      `fleet central binds ${host}, off loopback: set FLEET_CENTRAL_API_TOKEN ` +
        "(clients send Authorization: Bearer <token>)",
    );
  const { reader } = opts;
  const now = opts.now ?? Date.now;
  const server = Bun.serve({
    hostname: host.replace(/^\[(.*)\]$/, "$1"),
    port: opts.port ?? 8090,
    async fetch(req) {
      const url = new URL(req.url);
      if (req.method !== "GET" && req.method !== "HEAD")
        return problem(405, "method_not_allowed", "the central view is read-only");
      if (url.pathname === "/healthz") return new Response("ok\n");
      // The page needs no token: it asks for one when an /api call answers 401 (dashboard.ts).
      if (url.pathname === "/") return new Response(DASHBOARD_HTML, { headers: DASHBOARD_HEADERS });
      if (!url.pathname.startsWith("/api/")) return problem(404, "not_found", `no route ${url.pathname}`);
      const auth = req.headers.get("authorization");
      if (token && !sameToken(auth, token))
        return problem(401, "unauthorized", auth === null ? "bearer token required" : "bearer token refused");
      try {
        return await route(reader, url, now());
      } catch (err) {
        return problem(
          502,
          "central_unavailable",
          `central database: ${err instanceof Error ? err.message : String(err)}`,
        );
      }
    },
  });
  const port = server.port ?? 0;
  return { url: serverUrl(host, port), port, stop: () => server.stop(true) };
}

/** The path's segments, decoded; null when one is not valid percent-encoding. */
function segments(pathname: string): string[] | null {
  try {
    return pathname.split("/").filter(Boolean).map(decodeURIComponent);
  } catch {
    return null;
  }
}

/** An integer query parameter in [min, max] (its default when absent or empty), or the 400 naming it. */
function intParam(q: URLSearchParams, name: string, dflt: number, min: number, max: number): number | Response {
  const v = parseOptionalInt(q.get(name), dflt, { name, min, max });
  return v.ok ? v.value : problem(400, "bad_query", v.message);
}

/**
 * `before`: a plain integer from `min` (a SEQ or MS) or a cursor `parse` reads (cursor.ts); undefined
 * when absent or empty, a 400 naming it when neither.
 */
function beforeParam<K>(
  q: URLSearchParams,
  min: number,
  parse: (text: string) => K | null,
): number | K | undefined | Response {
  const raw = q.get("before");
  if (raw === null || raw === "") return undefined;
  const v = parseBefore(raw, { name: "before", min }, parse);
  return v.ok ? v.value : problem(400, "bad_query", v.message);
}

async function route(reader: CentralReader, url: URL, now: number): Promise<Response> {
  const parts = segments(url.pathname); // ["api", ...]
  if (!parts)
    return problem(400, "bad_request", `the path ${url.pathname.slice(0, 200)} is not valid percent-encoding`);
  const q = url.searchParams;
  // ?limit= of every list: 100 agents or 50 episodes or operator actions by default, at most 1,000.
  const agentList = parts.length === 4 && parts[1] === "fleets" && parts[3] === "agents";
  const limit = intParam(q, "limit", agentList ? 100 : 50, 1, 1000);
  if (limit instanceof Response) return limit;
  const all = await reader.gateways();
  // /api/fleets
  if (parts.length === 2 && parts[1] === "fleets") {
    const incomplete = layoutGaps(all);
    return json({ at: now, fleets: await reader.summary(now), incomplete });
  }
  // Routes under /api/fleets/<fleet or gateway>/ name one the center has heard of.
  const fleet = parts[1] === "fleets" ? parts[2] : undefined;
  if (fleet !== undefined && parts.length > 3 && gatewaysFor(all, fleet).length === 0)
    return problem(404, "not_found", `no fleet or gateway "${fleet.slice(0, 200)}" in the central database`);
  // /api/fleets/<gateway>/agents
  if (agentList) {
    const offset = intParam(q, "offset", 0, 0, Number.MAX_SAFE_INTEGER);
    if (offset instanceof Response) return offset;
    const status = q.get("status") || undefined;
    const r = await reader.agents({
      fleet,
      type: q.get("type") || undefined,
      status: status === "idle" ? "active" : status, // shown `idle`, stored `active`
      limit,
      offset,
    });
    const agents = r.rows.map((a) => ({ ...a, status: shownStatus(a.status) }));
    return json({ agents, total: r.total, incomplete: layoutGaps(all, fleet) });
  }
  // /api/fleets/<gateway>/agents/<type>/<key>/episodes?limit=&before=MS|CURSOR: newest first; next_before pages on
  if (parts.length === 7 && parts[1] === "fleets" && parts[3] === "agents" && parts[6] === "episodes") {
    const before = beforeParam(q, 0, parseEpisodeCursor);
    if (before instanceof Response) return before;
    const agent = `${parts[4]}/${parts[5]}`;
    const page = await reader.episodesPage(agent, { fleet, limit, before });
    return json({ agent, episodes: page.episodes, next_before: page.nextBefore });
  }
  // /api/audit and /api/fleets/<gateway>/audit?limit=&before=SEQ|CURSOR: operator actions, newest first
  if (
    (parts.length === 2 && parts[1] === "audit") ||
    (parts.length === 4 && parts[1] === "fleets" && parts[3] === "audit")
  ) {
    const before = beforeParam(q, 1, parseAuditCursor);
    if (before instanceof Response) return before;
    const refused = typeof before === "number" ? seqBeforeRefusal(all, fleet) : null;
    if (refused !== null)
      return problem(
        400,
        "bad_query",
        `before=SEQ: ${refused}; pass the next_before a full page returned, ` +
          "or read one gateway (/api/fleets/<gateway id>/audit)",
      );
    const page = await reader.auditPage({ fleet, limit, before });
    return json({ records: page.records.map(centralAuditView), next_before: page.nextBefore });
  }
  // /api/episodes/<id or unique prefix>
  if (parts.length === 3 && parts[1] === "episodes") {
    const found = await reader.findEpisode(parts[2]!);
    if ("code" in found) return problem(found.code === "ambiguous" ? 409 : 404, found.code, found.message);
    return json(found);
  }
  return problem(404, "not_found", `no route ${url.pathname.slice(0, 200)}`);
}
