/**
 * Recent activity for the dashboard (docs/http-api.md): `GET /api/outputs?limit=&before=&agent=`,
 * the output feed, and `GET /api/activity?minutes=&type=`, per-minute buckets of episodes,
 * failures and lag for the small charts. Both on the gateway's clock.
 */
import { ActivityHistory, MAX_MINUTES, recentOutputs } from "../observe/index.ts";
import { agentId, parseAgentId } from "../types.ts";
import type { HttpHost } from "./host.ts";
import { httpError, intQuery, json } from "./responses.ts";

/** Routes to spread into `Bun.serve({ routes })`. */
export function activityRoutes(gw: Pick<HttpHost, "store" | "now" | "spec">) {
  const history = new ActivityHistory(gw.store);
  return {
    "/api/outputs": async (req: Request) => {
      const url = new URL(req.url);
      const limit = intQuery(url, "limit", 50, 1, 500);
      if (limit instanceof Response) return limit;
      const before = intQuery(url, "before", Number.MAX_SAFE_INTEGER, 0, Number.MAX_SAFE_INTEGER);
      if (before instanceof Response) return before;
      const agentRaw = url.searchParams.get("agent") || undefined;
      const agent = agentRaw === undefined ? undefined : parseAgentId(agentRaw)?.id;
      if (agentRaw !== undefined && !agent)
        return httpError(400, "bad_query", `agent must be <type>/<key>, got "${agentRaw.slice(0, 80)}"`);
      const outputs = await recentOutputs(gw.store, { limit, before, agent });
      const last = outputs.at(-1);
      if (outputs.length < limit || !last) return json({ outputs, next_before: null });
      // The next page starts below the last row's start, so this one ends with every output of that ms
      // (an episode's emit and publish, or episodes that started together): none falls between pages.
      const sameMs = await recentOutputs(gw.store, { limit: -1, at: last.started_at, agent });
      const page = [...outputs.filter((o) => o.started_at !== last.started_at), ...sameMs];
      return json({ outputs: page, next_before: last.started_at });
    },
    "/api/activity": async (req: Request) => {
      const url = new URL(req.url);
      const minutes = intQuery(url, "minutes", 60, 1, MAX_MINUTES);
      if (minutes instanceof Response) return minutes;
      const type = url.searchParams.get("type") || undefined;
      if (type !== undefined && !agentId(type, "x"))
        return httpError(400, "bad_query", `type "${type.slice(0, 80)}" is not a valid type name`);
      // A typo would read as a fleet with no activity.
      const types = Object.keys(gw.spec.spec.agents);
      if (type !== undefined && !types.includes(type))
        return httpError(400, "bad_query", `type "${type}" is not in the fleet; its types: ${types.join(", ")}`);
      const now = gw.now();
      const buckets = await history.buckets({ now, minutes, type });
      return json({ now, bucket_ms: 60_000, minutes, type: type ?? null, buckets });
    },
  };
}
