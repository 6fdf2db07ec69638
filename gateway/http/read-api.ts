/**
 * The observing side of the HTTP surface (docs/http-api.md): `/metrics`, the live event stream,
 * the dashboard, and the paged, filtered read API the dashboard and `fleet` use.
 * Query parameters are parsed strictly: a bad value is a 400 naming the parameter, in the
 * same `{ "error": { "code", "message" } }` shape as every other error.
 */
import type { HttpHost } from "./host.ts";
import { httpError, intQuery, json } from "./responses.ts";
import { credentialOf } from "./access.ts";
import { type AgentStatus, agentId, decodePayload, parseStimulusKind } from "../types.ts";
import { agentView, episodeView, episodesPage, recentCheckpoints } from "../store/index.ts";
import { EventStream } from "../observe/index.ts";
import { dashboardRoutes } from "../observe/index.ts";
import { Gauge } from "prom-client";
import type { StoredAgentStatus, WakeRow } from "../store/index.ts";
import type { EpisodeRecord } from "../../agents/protocol.ts";

type Route = (
  req: Request & { params: Record<string, string> },
  server: { timeout(req: Request, seconds: number): void },
) => Response | Promise<Response>;

/** What the read API needs from the gateway. */
type ReadHost = Pick<HttpHost, "store" | "queued" | "events" | "health" | "log" | "metrics" | "spec">;

/** Each status as shown (every one but the momentary `running`) -> the stored status it filters on. */
const STATUS_FILTER = {
  idle: "active",
  paused: "paused",
  draining: "draining",
  failed: "failed",
  retired: "retired",
} as const satisfies Record<Exclude<AgentStatus, "running">, StoredAgentStatus>;

/** The stored status a `status` filter names; the stored `active` is taken as an alias of `idle`. */
function statusFilter(raw: string): StoredAgentStatus | undefined {
  if (raw === "active") return "active";
  return Object.hasOwn(STATUS_FILTER, raw) ? STATUS_FILTER[raw as keyof typeof STATUS_FILTER] : undefined;
}

/**
 * `GET /api/rejected?limit=&before=`: messages that matched a subscription but could not
 * become a stimulus (e.g. an invalid agent key), newest first, with the reason.
 */
export async function listRejected(gw: Pick<HttpHost, "store">, req: Request): Promise<Response> {
  const url = new URL(req.url);
  const limit = intQuery(url, "limit", 100, 1, 1000);
  if (limit instanceof Response) return limit;
  const before = url.searchParams.has("before") ? intQuery(url, "before", 0, 1, Number.MAX_SAFE_INTEGER) : undefined;
  if (before instanceof Response) return before;
  const [rows, total] = await Promise.all([gw.store.listRejected(limit, before), gw.store.countRejected()]);
  return json({
    rejected: rows.map((r) => ({
      seq: r.seq,
      kind: r.kind,
      topic: r.topic,
      client: r.client,
      reason: r.reason,
      received_at: r.receivedAt,
      payload: decodePayload(r.payload),
    })),
    total,
  });
}

/**
 * `GET /api/agents?page=&limit=&q=&status=&type=` or `?after=<id>&...`: server-side paging for
 * 100,000 agents, in id order. `after` (the `next_after` of the previous page) is a keyset page
 * that costs the same however deep; `page` skips `(page - 1) * limit` agents. Not both.
 */
export async function listAgents(gw: ReadHost, req: Request): Promise<Response> {
  const url = new URL(req.url);
  const limit = intQuery(url, "limit", 50, 1, 1000);
  if (limit instanceof Response) return limit;
  const page = intQuery(url, "page", 1, 1, 1_000_000);
  if (page instanceof Response) return page;
  const after = url.searchParams.get("after") ?? undefined;
  if (after !== undefined && url.searchParams.has("page"))
    return httpError(400, "bad_query", "give page or after, not both");
  if (after !== undefined && after.length > 300) return httpError(400, "bad_query", "after must be an agent id");
  const statusRaw = url.searchParams.get("status") || null;
  const status = statusRaw === null ? undefined : statusFilter(statusRaw);
  if (statusRaw !== null && !status) {
    const hint = statusRaw === "running" ? " (running is momentary; filter idle)" : "";
    return httpError(
      400,
      "bad_query",
      `status must be one of ${Object.keys(STATUS_FILTER).join(", ")}; got "${statusRaw.slice(0, 40)}"${hint}`,
    );
  }
  const type = url.searchParams.get("type") || undefined;
  if (type !== undefined && !agentId(type, "x"))
    return httpError(400, "bad_query", `type "${type}" is not a valid type name`);
  const q = url.searchParams.get("q")?.trim() || undefined;
  if (q !== undefined && q.length > 200) return httpError(400, "bad_query", "q must be at most 200 characters");
  const { rows, total } = await gw.store.listAgents({ type, status, q, limit, offset: (page - 1) * limit, after });
  const last = rows.at(-1);
  return json({
    agents: rows.map((a) => agentView(a, gw.queued(a.id))),
    total,
    // A keyset page has no number: where it starts depends on the agents before `after`.
    page: after === undefined ? page : null,
    limit,
    pages: Math.max(1, Math.ceil(total / limit)),
    next_after: rows.length === limit && last ? last.id : null,
  });
}

async function agentOrError(gw: ReadHost, type: string, key: string) {
  const id = agentId(type, key);
  if (!id) return httpError(400, "bad_agent", `"${type}/${key}" is not a valid agent id`);
  return (await gw.store.getAgent(id)) ?? httpError(404, "not_found", `no agent ${type}/${key}`);
}

/** A checkpoint as the API shows it. */
function checkpointView(c: Awaited<ReturnType<typeof recentCheckpoints>>[number]) {
  return {
    hash: c.hash,
    seq: c.seq,
    parent: c.parent,
    episode: c.episode,
    spec_version: c.specVersion,
    collected: c.collected === 1,
    created_at: c.createdAt,
  };
}

/** `GET /api/agents/<type>/<key>`: the agent with the newest 20 links of its checkpoint chain. */
export async function agentDetail(gw: ReadHost, type: string, key: string): Promise<Response> {
  const a = await agentOrError(gw, type, key);
  if (a instanceof Response) return a;
  const checkpoints = await recentCheckpoints(gw.store, a.id, 20);
  return json({ ...agentView(a, gw.queued(a.id)), checkpoints: checkpoints.map(checkpointView) });
}

/** `GET /api/agents/<type>/<key>/episodes?limit=&before=&status=&kind=`: newest first; `next_before` pages on. */
export async function agentEpisodes(gw: ReadHost, type: string, key: string, req: Request): Promise<Response> {
  const a = await agentOrError(gw, type, key);
  if (a instanceof Response) return a;
  const url = new URL(req.url);
  const limit = intQuery(url, "limit", 50, 1, 1000);
  if (limit instanceof Response) return limit;
  const before = intQuery(url, "before", Number.MAX_SAFE_INTEGER, 0, Number.MAX_SAFE_INTEGER);
  if (before instanceof Response) return before;
  const status = url.searchParams.get("status") || undefined;
  if (status !== undefined && status !== "committed" && status !== "failed")
    return httpError(400, "bad_query", `status must be committed or failed, got "${status.slice(0, 40)}"`);
  const kindRaw = url.searchParams.get("kind") || undefined;
  const kind = kindRaw === undefined ? undefined : parseStimulusKind(kindRaw);
  if (kind && !kind.ok) return httpError(400, "bad_query", kind.message);
  const rows = await episodesPage(gw.store, a.id, { limit, before, status, kind: kind?.kind });
  const last = rows.at(-1);
  return json({
    agent: a.id,
    episodes: rows.map(episodeView),
    next_before: rows.length === limit && last ? last.startedAt : null,
  });
}

const WAKE_STATES = ["pending", "fired", "cancelled", "dropped"] as const;

/** A wake-up as the API shows it. */
export function wakeView(w: WakeRow) {
  let payload: unknown = null;
  try {
    payload = JSON.parse(w.payload);
  } catch {
    payload = w.payload;
  }
  return {
    id: w.id,
    due_at: w.dueAt,
    state: w.state,
    set_by: w.setBy,
    created_at: w.createdAt,
    done_at: w.doneAt,
    done_by: w.doneBy,
    payload,
  };
}

/** `GET /api/agents/<type>/<key>/wakeups?state=&limit=`: the agent's wake-ups, latest due first. */
export async function agentWakeups(gw: ReadHost, type: string, key: string, req: Request): Promise<Response> {
  const a = await agentOrError(gw, type, key);
  if (a instanceof Response) return a;
  const url = new URL(req.url);
  const limit = intQuery(url, "limit", 100, 1, 1000);
  if (limit instanceof Response) return limit;
  const raw = url.searchParams.get("state") || undefined;
  const state = WAKE_STATES.find((s) => s === raw);
  if (raw !== undefined && !state)
    return httpError(400, "bad_query", `state must be one of ${WAKE_STATES.join(", ")}; got "${raw}"`);
  const rows = await gw.store.listWakes(a.id, { state, limit });
  return json({ agent: a.id, wakeups: rows.map(wakeView) });
}

/** The record kinds an agent's episode writes (the compiler keeps this in step with `EpisodeRecord`). */
const RECORD_KINDS = {
  decide: true,
  emit: true,
  send: true,
  now: true,
  random: true,
  log: true,
  wake: true,
  cancel_wake: true,
  migrate: true,
  pending_wakes: true,
  tool: true,
} satisfies Record<EpisodeRecord["k"], true>;

/** The kinds of an episode's event log: its stimulus, the agent's records, then `end` or `failure`. */
export const EVENT_KINDS: readonly string[] = ["stimulus", ...Object.keys(RECORD_KINDS), "end", "failure"];

/** An event log row as the API shows it. */
function eventView(e: { seq: number; kind: string; data: string }) {
  return { seq: e.seq, kind: e.kind, data: JSON.parse(e.data) as unknown };
}

/** The decisions of an event log: `ctx.decide(name, data)` records in order. */
function decisionsOf(events: readonly { seq: number; kind: string; data: unknown }[]) {
  return events
    .filter((e) => e.kind === "decide")
    .map((e) => {
      const d = e.data as { name?: unknown; data?: unknown };
      return { seq: e.seq, name: typeof d.name === "string" ? d.name : "?", data: d.data ?? null };
    });
}

/** `GET /api/episodes/<id>`: the episode, its event log and its decisions. */
export async function episodeDetail(gw: ReadHost, id: string): Promise<Response> {
  const ep = await gw.store.getEpisode(id);
  if (!ep) return httpError(404, "not_found", `no episode ${id}`);
  const events = (await gw.store.listEvents(ep.id)).map(eventView);
  return json({ ...episodeView(ep), events, decisions: decisionsOf(events) });
}

/** The observing routes, to spread into Bun.serve's `routes`, and their cleanup. */
export function observeRoutes(gw: ReadHost): {
  routes: Record<string, Route | Record<string, Route>>;
  /** Event streams open now. */
  streams(): number;
  close(): void;
} {
  const stream = new EventStream({
    events: gw.events,
    health: () => gw.health(),
    onError: (err) => gw.log.warn({ err }, "event stream health tick failed"),
    // Half of max_concurrent_requests: streams (one token can open many) never crowd out the API.
    maxStreams: () => Math.max(1, Math.floor(gw.spec.spec.http.max_concurrent_requests / 2)),
  });
  gw.metrics.registry.removeSingleMetric("fleet_sse_clients"); // a restarted HTTP server re-registers it
  new Gauge({
    name: "fleet_sse_clients",
    help: "Open dashboard event streams (GET /api/events).",
    registers: [gw.metrics.registry],
    collect() {
      this.set(stream.size);
    },
  });
  const routes: Record<string, Route | Record<string, Route>> = {
    ...dashboardRoutes(),
    "/metrics": async () =>
      new Response(await gw.metrics.text(), { headers: { "content-type": gw.metrics.contentType } }),
    // The stream ends once its token is revoked or its session ends (checked before each write).
    "/api/events": (req, server) => stream.handle(req, server, credentialOf(req)),
    "/api/agents/:type/:key/checkpoints": async (req) => {
      const a = await agentOrError(gw, req.params.type!, req.params.key!);
      if (a instanceof Response) return a;
      const url = new URL(req.url);
      const limit = intQuery(url, "limit", 50, 1, 1000);
      if (limit instanceof Response) return limit;
      const before = intQuery(url, "before", Number.MAX_SAFE_INTEGER, 1, Number.MAX_SAFE_INTEGER);
      if (before instanceof Response) return before;
      const rows = await recentCheckpoints(gw.store, a.id, limit, before);
      const last = rows.at(-1);
      return json({
        agent: a.id,
        head: a.headHash,
        checkpoints: rows.map(checkpointView),
        next_before: rows.length === limit && last ? last.seq : null,
      });
    },
    "/api/episodes/:id/events": async (req) => {
      const kind = new URL(req.url).searchParams.get("kind") || null;
      if (kind !== null && !EVENT_KINDS.includes(kind))
        return httpError(400, "bad_query", `kind must be one of ${EVENT_KINDS.join(", ")}; got "${kind.slice(0, 40)}"`);
      const ep = await gw.store.getEpisode(req.params.id!);
      if (!ep) return httpError(404, "not_found", `no episode ${req.params.id}`);
      const events = (await gw.store.listEvents(ep.id)).map(eventView);
      return json({
        episode: ep.id,
        events: kind ? events.filter((e) => e.kind === kind) : events,
        decisions: decisionsOf(events),
      });
    },
  };
  return { routes, streams: () => stream.size, close: () => stream.close() };
}
