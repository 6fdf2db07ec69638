/**
 * Provenance over HTTP, the same answers as `fleet state` and `fleet trace`:
 * `GET /api/agents/<t>/<k>/state[?at=SEQ]`, `GET /api/agents/<t>/<k>/state/diff?from=A&to=B`,
 * `GET /api/episodes/<id|prefix>/trace`, `GET /api/trace?topic=T[&at=MS]`, and
 * `POST /api/episodes/<id|prefix>/replay` (the verdict of `fleet replay`).
 */
import { episodeForTopic, type StateMiss, stateAt, stateDiff, traceEpisode } from "../ops/index.ts";
import { type AgentId, agentId } from "../types.ts";
import type { HttpHost } from "./host.ts";
import { httpError, intQuery, json } from "./responses.ts";
import { busy, noteAudit } from "./access.ts";

type Req = Request & { params: Record<string, string> };
const MAX_SEQ = Number.MAX_SAFE_INTEGER;
/** Replays one gateway runs at once (each is a subprocess); more wait for a 503's Retry-After. */
const MAX_REPLAYS = 2;

function agentOf(req: Req): AgentId | Response {
  const id = agentId(req.params.type ?? "", req.params.key ?? "");
  return id ?? httpError(400, "bad_agent", "invalid agent id");
}

/**
 * A state read with nothing to show: 404 `not_found` for an unknown agent, as on every route, or
 * `no_checkpoint`; 409 `tampered` for a stored state that does not hash to its checkpoint.
 */
function stateMiss(miss: StateMiss): Response {
  if (miss.code === "tampered") return httpError(409, miss.code, miss.message);
  return httpError(404, miss.code === "no_agent" ? "not_found" : miss.code, miss.message);
}

/** Routes to spread into `Bun.serve({ routes })`. */
export function historyRoutes(gw: Pick<HttpHost, "store" | "replay">) {
  let replaying = 0;
  return {
    "/api/episodes/:id/replay": {
      // The dashboard's replay button (`fleet replay` on the data dir does the same): one subprocess
      // per call, so a few at a time; the verdict is the answer, never a change to the fleet.
      POST: async (req: Req) => {
        if (replaying >= MAX_REPLAYS) return busy(`${replaying} replays running`);
        replaying++;
        try {
          const r = await gw.replay(req.params.id ?? "");
          if ("code" in r) return httpError(r.code === "ambiguous" ? 409 : 404, r.code, r.message);
          noteAudit(req, { target: r.episode, detail: r.verdict });
          return json(r);
        } finally {
          replaying--;
        }
      },
    },
    "/api/agents/:type/:key/state": async (req: Req) => {
      const agent = agentOf(req);
      if (agent instanceof Response) return agent;
      const url = new URL(req.url);
      const at = url.searchParams.has("at") ? intQuery(url, "at", 1, 1, MAX_SEQ) : undefined;
      if (at instanceof Response) return at;
      const r = await stateAt(gw.store, agent, at);
      if ("code" in r) return stateMiss(r);
      return json(r);
    },
    "/api/agents/:type/:key/state/diff": async (req: Req) => {
      const agent = agentOf(req);
      if (agent instanceof Response) return agent;
      const url = new URL(req.url);
      if (!url.searchParams.has("from") || !url.searchParams.has("to")) {
        return httpError(400, "bad_query", "from and to (checkpoint numbers) are required");
      }
      const from = intQuery(url, "from", 1, 1, MAX_SEQ);
      if (from instanceof Response) return from;
      const to = intQuery(url, "to", 1, 1, MAX_SEQ);
      if (to instanceof Response) return to;
      const r = await stateDiff(gw.store, agent, from, to);
      if ("code" in r) return stateMiss(r);
      return json({ agent, from: r.from.seq, to: r.to.seq, patch: r.patch });
    },
    "/api/episodes/:id/trace": async (req: Req) => {
      const r = await traceEpisode(gw.store, req.params.id ?? "");
      if ("code" in r) return httpError(r.code === "ambiguous" ? 409 : 404, r.code, r.message);
      return json(r);
    },
    "/api/trace": async (req: Request) => {
      const url = new URL(req.url);
      const topic = url.searchParams.get("topic");
      if (!topic) return httpError(400, "bad_query", "topic is required");
      const at = url.searchParams.has("at") ? intQuery(url, "at", 0, 0, MAX_SEQ) : undefined;
      if (at instanceof Response) return at;
      const found = await episodeForTopic(gw.store, topic, at);
      if ("code" in found) return httpError(404, found.code, found.message);
      const r = await traceEpisode(gw.store, found.id);
      if ("code" in r) return httpError(404, r.code, r.message);
      return json(r);
    },
  };
}
