/**
 * `fleet central --url URL`: a read-only JSON API and a small dashboard over the central
 * database, every fleet side by side with drill-down to one fleet's agents and episodes.
 * Only GET; it binds 127.0.0.1 unless told otherwise, and a non-loopback host needs a
 * bearer token (env FLEET_CENTRAL_API_TOKEN) that every /api request must carry.
 */
import { type CentralReader, CentralError } from "./central.ts";
import { DASHBOARD_HTML } from "./dashboard.ts";
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

const LOOPBACK = new Set(["127.0.0.1", "::1", "localhost"]);

const json = (body: unknown, status = 200) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
const problem = (status: number, message: string) => json({ error: { message } }, status);

/** Start serving; throws CentralError when a non-loopback host has no token. */
export function startCentralServer(opts: CentralServerOptions): CentralServer {
  const host = opts.host ?? "127.0.0.1";
  const token = opts.token ?? null;
  if (!LOOPBACK.has(host) && !token)
    throw new CentralError(
      `fleet central binds ${host}, off loopback: set FLEET_CENTRAL_API_TOKEN ` +
        "(clients send Authorization: Bearer <token>)",
    );
  const { reader } = opts;
  const now = opts.now ?? Date.now;
  const server = Bun.serve({
    hostname: host,
    port: opts.port ?? 8090,
    async fetch(req) {
      const url = new URL(req.url);
      if (req.method !== "GET" && req.method !== "HEAD") return problem(405, "the central view is read-only");
      if (url.pathname === "/healthz") return new Response("ok\n");
      if (url.pathname === "/")
        return new Response(DASHBOARD_HTML, { headers: { "content-type": "text/html; charset=utf-8" } });
      if (!url.pathname.startsWith("/api/")) return problem(404, `no route ${url.pathname}`);
      if (token && req.headers.get("authorization") !== `Bearer ${token}`) return problem(401, "bearer token required");
      try {
        return await route(reader, url, now());
      } catch (err) {
        return problem(502, `central database: ${err instanceof Error ? err.message : String(err)}`);
      }
    },
  });
  return { url: `http://${host}:${server.port}`, port: server.port ?? 0, stop: () => server.stop(true) };
}

async function route(reader: CentralReader, url: URL, now: number): Promise<Response> {
  const parts = url.pathname.split("/").filter(Boolean).map(decodeURIComponent); // ["api", ...]
  const q = url.searchParams;
  const int = (k: string, d: number) => {
    const v = Number(q.get(k) ?? d);
    return Number.isSafeInteger(v) && v >= 0 ? Math.min(v, 1000) : d;
  };
  // /api/fleets
  if (parts.length === 2 && parts[1] === "fleets") return json({ at: now, fleets: await reader.summary(now) });
  // /api/fleets/<gateway>/agents
  if (parts.length === 4 && parts[1] === "fleets" && parts[3] === "agents") {
    const r = await reader.agents({
      fleet: parts[2],
      type: q.get("type") ?? undefined,
      status: q.get("status") ?? undefined,
      limit: int("limit", 100),
      offset: int("offset", 0),
    });
    return json({ agents: r.rows, total: r.total });
  }
  // /api/fleets/<gateway>/agents/<type>/<key>/episodes
  if (parts.length === 7 && parts[1] === "fleets" && parts[3] === "agents" && parts[6] === "episodes") {
    const agent = `${parts[4]}/${parts[5]}`;
    return json({ agent, episodes: await reader.episodes(agent, { fleet: parts[2], limit: int("limit", 50) }) });
  }
  // /api/audit and /api/fleets/<gateway>/audit: operator actions, newest first
  if (
    (parts.length === 2 && parts[1] === "audit") ||
    (parts.length === 4 && parts[1] === "fleets" && parts[3] === "audit")
  ) {
    const before = q.has("before") ? Number(q.get("before")) : undefined;
    if (before !== undefined && (!Number.isSafeInteger(before) || before < 1))
      return problem(400, "before must be an audit seq (a positive integer)");
    if (before !== undefined && parts.length === 2)
      return problem(400, "before pages within one fleet: use /api/fleets/<gateway>/audit");
    const records = (await reader.audit({ fleet: parts[2], limit: int("limit", 50), before })).map(centralAuditView);
    const last = records.at(-1);
    const limit = int("limit", 50);
    return json({ records, next_before: parts.length === 4 && records.length === limit && last ? last.seq : null });
  }
  // /api/episodes/<id>
  if (parts.length === 3 && parts[1] === "episodes") {
    const found = await reader.episode(parts[2]!);
    return found ? json(found) : problem(404, `no episode ${parts[2]}`);
  }
  return problem(404, `no route ${url.pathname}`);
}
