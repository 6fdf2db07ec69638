/**
 * The HTTP surface (docs/http-api.md) on Bun.serve: health, the JSON API, operator actions and
 * manual stimuli. Errors are `{ "error": { "code", "message" } }` with a fitting status.
 */
import type { BunRequest } from "bun";
import type { HttpHost } from "./host.ts";
import { flagQuery, httpError, json, parseBody, readJson, unexpectedError } from "./responses.ts";
import { SendBody } from "./bodies.ts";
import { type AgentId, agentId, keyProblem, shownStatus, traceparentOf } from "../types.ts";
import { Sessions } from "../auth/index.ts";
import type { FleetSpec } from "../spec/index.ts";
import { type AuditEntry, createGuard, noteAudit } from "./access.ts";
import { BodyBudget } from "./limits.ts";
import { Gauge, type Registry } from "prom-client";
import { auditRoutes } from "./audit.ts";
import { sessionRoutes, signInPage } from "./session.ts";
import type { StimulusId } from "../types.ts";
import { ownsAgent } from "../shard.ts";
import { handleHook, idempotencyKey, intakeResponse, otherShard, refusedResponse, reusedKey } from "./hooks.ts";
import { quarantineRoutes } from "./quarantine.ts";
import { rolloutRoutes } from "./rollouts.ts";
import { historyRoutes } from "./history.ts";
import { activityRoutes } from "./activity.ts";
import { deployRoutes } from "./deploy.ts";
import {
  agentDetail,
  agentEpisodes,
  agentWakeups,
  episodeDetail,
  listAgents,
  listRejected,
  observeRoutes,
} from "./read-api.ts";

type Req<P extends string> = BunRequest<P>;

/** A started HTTP server. */
export interface HttpServer {
  readonly port: number;
  /** Requests being handled now. */
  inFlight(): number;
  stop(): void;
}

/** Start the HTTP server of a gateway: every route behind the access guard (access.ts). */
export function startHttp(
  gw: HttpHost,
  opts: { http: () => FleetSpec["http"]; port: number; tls?: { cert: string; key: string } | null },
): HttpServer {
  const observe = observeRoutes(gw);
  /** The body an earlier stimulus was recorded with (webhooks and manual stimuli tell a retry from a reused key). */
  const storedPayload = async (agent: AgentId, sid: string) =>
    (await gw.store.findStimulus(agent, sid))?.payload ?? null;
  const sessions = new Sessions(gw.tokens);
  // Written before the response goes out. A write the disk refuses (full) does not turn the answer
  // into an error: what the request did (or, for a dry run, found) stands, and the log keeps the record.
  const audit = (entry: AuditEntry) =>
    gw
      .audit(entry)
      .catch((err: unknown) => gw.log.error({ err, audit: entry }, "audit record not written; this log line holds it"));
  const bodies = new BodyBudget(() => opts.http().max_body_bytes_in_flight);
  const guard = createGuard({
    http: opts.http,
    auth: gw.tokens,
    sessions,
    audit,
    signInPage,
    streams: observe.streams,
    bodies,
  });
  httpGauges(
    gw.metrics.registry,
    () => guard.inFlight() + observe.streams(),
    () => bodies.held,
  );
  const server = Bun.serve({
    hostname: opts.http().host, // a restart key: read once
    port: opts.port,
    // HTTPS when `[http] tls_cert`/`tls_key` are set.
    ...(opts.tls ? { tls: { cert: opts.tls.cert, key: opts.tls.key } } : {}),
    routes: guard.protect({
      "/healthz": () => json({ ok: true }),
      "/readyz": () => {
        const r = gw.readiness();
        return json(r, r.ready ? 200 : 503);
      },
      "/api/fleet": async () => json(await gw.health()),
      // Paging, filters and strict query parsing live in observe.ts.
      "/api/agents": (req: Request) => listAgents(gw, req),
      "/api/agents/:type/:key": (req: Req<"/api/agents/:type/:key">) =>
        agentDetail(gw, req.params.type, req.params.key),
      "/api/agents/:type/:key/episodes": (req: Req<"/api/agents/:type/:key/episodes">) =>
        agentEpisodes(gw, req.params.type, req.params.key, req),
      "/api/agents/:type/:key/wakeups": (req: Req<"/api/agents/:type/:key/wakeups">) =>
        agentWakeups(gw, req.params.type, req.params.key, req),
      "/api/agents/:type/:key/:action": {
        POST: async (req: Req<"/api/agents/:type/:key/:action">) => {
          const action = req.params.action;
          if (action === "stimuli") return manualStimulus(gw, storedPayload, req.params.type, req.params.key, req);
          if (action !== "pause" && action !== "resume" && action !== "retire")
            return httpError(404, "not_found", `no action ${action}`);
          const id = agentId(req.params.type, req.params.key);
          if (!id) return httpError(400, "bad_agent", "invalid agent id");
          const drain = drainQuery(new URL(req.url), action);
          if (drain instanceof Response) return drain;
          if (drain) noteAudit(req, { detail: "drain" });
          const r = await gw.setLifecycle(id, action, { drain });
          // As /api/agents shows it: the stored `active` is `idle`.
          if (r.ok)
            return json({ ok: true, agent: id, action, ...(drain ? { drain } : {}), status: shownStatus(r.status) });
          return r.code === "not_found"
            ? httpError(404, "not_found", r.message)
            : httpError(409, r.code === "retired" ? "conflict" : r.code, r.message);
        },
      },
      "/api/episodes/:id": (req: Req<"/api/episodes/:id">) => episodeDetail(gw, req.params.id),
      "/api/rejected": (req: Request) => listRejected(gw, req),
      "/hooks/:name": {
        POST: (req: Req<"/hooks/:name">) =>
          handleHook(
            { spec: () => gw.spec.spec, intake: gw.intake, secrets: gw.secrets, storedPayload },
            req.params.name,
            req,
          ),
      },
      "/api/gc": {
        // Retention runs on the gateway's own clock: a client-supplied time could forget dedup
        // ids early and let an already-processed stimulus run a second episode.
        POST: async (req: Request) => {
          const url = new URL(req.url);
          if (url.searchParams.has("now"))
            return httpError(400, "bad_query", "now is not accepted: retention runs on the gateway's clock");
          // The audit names the same flag (access.ts): a bad spelling runs nothing.
          const dryRun = flagQuery(url, "dry_run");
          if (dryRun instanceof Response) return dryRun;
          return json(await gw.gc({ dryRun }));
        },
      },
      ...quarantineRoutes(gw),
      ...rolloutRoutes(gw),
      ...historyRoutes(gw),
      ...activityRoutes(gw),
      ...deployRoutes(gw),
      ...auditRoutes(gw),
      ...sessionRoutes({ sessions, audit, log: gw.log }),
      ...observe.routes,
      "/api/send": {
        // Used by `fleet send`: route a topic like a device publish, as a manual stimulus.
        POST: async (req: Request) => {
          const body = await readJson(req);
          if (!body.ok) return body.res;
          const parsed = parseBody(SendBody, body.value);
          if (!parsed.ok) return parsed.res;
          const v = parsed.value;
          noteAudit(req, { target: v.topic });
          const route = gw.routeTopic(v.topic);
          // Sharded: only this shard's agents are recorded here; the others' shards are named.
          if (route.targets.length === 0 && route.elsewhere.length > 0)
            return otherShard(
              route.elsewhere.map((e) => e.agent),
              gw.spec.spec.fleet.shard,
            );
          if (route.targets.length === 0)
            return httpError(404, "no_target", route.problems[0] ?? `no agent subscribes to ${v.topic}`);
          const text = typeof v.payload === "string" ? v.payload : encodable(v.payload ?? null);
          if (text === null) return httpError(400, "bad_request", "payload nests too deep to be encoded again");
          const payload = new TextEncoder().encode(text);
          // `Idempotency-Key` dedups as on manual stimuli and webhooks; `id` is the body's spelling of it.
          const idem = idempotencyKey(req);
          if (idem instanceof Response) return idem;
          if (idem && v.id !== undefined)
            return httpError(400, "bad_request", "send an id in the body or an Idempotency-Key header, not both");
          const explicit = idem ?? (v.id !== undefined ? (`id:${v.id}` as StimulusId) : null);
          const report = await gw.intake.record(
            route.targets,
            route.inbox ? "inbox" : "manual",
            v.topic,
            payload,
            explicit,
            { traceparent: traceparentOf(req) },
          );
          const dup = report.duplicates[0];
          if (explicit && dup) {
            const reused = await reusedKey(storedPayload, report, dup.agent, explicit, payload);
            if (reused) return reused;
          }
          // Every target refused: not a success, so `fleet send` exits non-zero; a full queue is a 429 to retry.
          if (report.accepted.length + report.duplicates.length === 0) {
            const why = report.refused.map((r) => `${r.agent}: ${r.reason}`).join("; ");
            return refusedResponse(report, why, { ...report });
          }
          const elsewhere = route.elsewhere.map((e) => ({ agent: e.agent, shard: e.shard }));
          return json(elsewhere.length > 0 ? { ...report, elsewhere } : report, report.accepted.length > 0 ? 202 : 200);
        },
      },
    }),
    // Another method on a known path (PROPFIND, TRACE) is that route's 405; anything else a 404.
    fetch: (req, server) => guard.fallback(req, server),
    error: (err) => {
      const res = unexpectedError(err);
      // A bug or a failing disk, not the caller's mistake: the operator reads why in the log.
      gw.log.error({ err, status: res.status }, "HTTP request failed");
      return res;
    },
  });
  return {
    port: server.port ?? opts.port,
    inFlight: guard.inFlight,
    stop: () => {
      observe.close();
      void server.stop(true);
    },
  };
}

/** The HTTP limits as gauges: requests in flight (event streams included) and body bytes held. */
function httpGauges(registry: Registry, requests: () => number, bodyBytes: () => number): void {
  for (const [name, help, read] of [
    ["fleet_http_requests_in_flight", "HTTP requests being handled, event streams included.", requests],
    ["fleet_http_body_bytes_in_flight", "Request body bytes held across requests.", bodyBytes],
  ] as const) {
    registry.removeSingleMetric(name); // a restarted HTTP server registers them again
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read());
      },
    });
  }
}

/** `POST /api/agents/<type>/<key>/stimuli`: a manual stimulus (body = payload JSON; `Idempotency-Key` dedups). */
async function manualStimulus(
  gw: Pick<HttpHost, "spec" | "intake">,
  storedPayload: (agent: AgentId, sid: string) => Promise<Uint8Array | null>,
  typeName: string,
  key: string,
  req: Request,
): Promise<Response> {
  const type = gw.spec.spec.agents[typeName];
  const id = agentId(typeName, key);
  if (!type) return httpError(404, "not_found", `no agent type ${typeName}`);
  if (!id) {
    const why = keyProblem(key) ?? "is invalid";
    return httpError(400, "bad_agent", `"${key.slice(0, 160)}" is not a valid agent key: it ${why}`);
  }
  if (!ownsAgent(gw.spec.spec.fleet.shard, id)) return otherShard([id], gw.spec.spec.fleet.shard);
  const body = await readJson(req);
  if (!body.ok) return body.res;
  // As a webhook's: a retry with the same body is a duplicate, another body under the key a 422.
  const idem = idempotencyKey(req);
  if (idem instanceof Response) return idem;
  const report = await gw.intake.record([{ agent: id, type, key }], "manual", null, body.raw, idem, {
    traceparent: traceparentOf(req),
  });
  if (idem) {
    const reused = await reusedKey(storedPayload, report, id, idem, body.raw);
    if (reused) return reused;
  }
  return intakeResponse(report, id);
}

/**
 * `value` as JSON text, or null when it nests deeper than JSON.stringify can go (~50,000 levels
 * overflow its stack; JSON.parse took them): a payload the caller must send otherwise.
 */
function encodable(value: unknown): string | null {
  try {
    return JSON.stringify(value);
  } catch (err) {
    if (err instanceof RangeError) return null;
    throw err;
  }
}

/** `?drain=1` on a retire (finish the queued stimuli first); a flag as `flagQuery` reads it, on retire only. */
function drainQuery(url: URL, action: string): boolean | Response {
  const drain = flagQuery(url, "drain");
  if (drain === true && action !== "retire")
    return httpError(400, "bad_query", `drain applies to retire, not ${action}`);
  return drain;
}
