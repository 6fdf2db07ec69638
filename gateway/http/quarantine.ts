/**
 * Quarantine endpoints (used by `fleet quarantine` while the gateway runs):
 * `GET /api/quarantine`, `POST /api/quarantine/<seq>/retry`, `POST /api/quarantine/<seq>/drop`.
 */
import type { HttpHost } from "./host.ts";
import { httpError, intQuery, json } from "./responses.ts";
import { parseStrictInt } from "../parse.ts";
import { listQuarantine } from "../ops/index.ts";

type ParamRequest<P extends string> = Request & { params: Record<P, string> };

/** Routes to spread into `Bun.serve({ routes })`. */
export function quarantineRoutes(gw: Pick<HttpHost, "store" | "resolveQuarantined">) {
  return {
    "/api/quarantine": async (req: Request) => {
      const limit = intQuery(new URL(req.url), "limit", 100, 1, 10_000);
      if (limit instanceof Response) return limit;
      return json({ stimuli: await listQuarantine(gw.store, limit) });
    },
    "/api/quarantine/:seq/:action": {
      POST: async (req: ParamRequest<"seq" | "action">) => {
        const action = req.params.action;
        if (action !== "retry" && action !== "drop")
          return httpError(404, "not_found", `no action ${action} (retry or drop)`);
        const seq = parseStrictInt(req.params.seq, { name: "stimulus seq", min: 0 });
        if (!seq.ok) return httpError(400, "bad_seq", seq.message);
        // A retry is admitted like a new stimulus: refused for a retired agent or a full queue.
        const r = await gw.resolveQuarantined(seq.value, action);
        if (!r.ok)
          return r.code === "queue_full"
            ? json({ error: { code: r.code, message: r.message } }, 429, { "retry-after": "5" })
            : httpError(r.code === "not_found" ? 404 : 409, r.code, r.message);
        return json({ ok: true, seq: r.seq, agent: r.agent, action, state: r.state });
      },
    },
  };
}
