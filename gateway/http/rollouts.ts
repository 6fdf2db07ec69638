/**
 * Canary rollouts by hand (docs/upgrading.md; `fleet rollout promote|abort <type>`):
 * `POST /api/rollouts/<type>/promote` and `POST /api/rollouts/<type>/abort`. The rollouts
 * themselves are in `GET /api/fleet` (`rollouts`).
 */
import type { HttpHost } from "./host.ts";
import { httpError, json } from "./responses.ts";

type ParamRequest<P extends string> = Request & { params: Record<P, string> };

/** Routes to spread into `Bun.serve({ routes })`. */
export function rolloutRoutes(gw: Pick<HttpHost, "decideRollout" | "spec">) {
  return {
    "/api/rollouts/:type/:action": {
      POST: async (req: ParamRequest<"type" | "action">) => {
        const action = req.params.action;
        if (action !== "promote" && action !== "abort")
          return httpError(404, "not_found", `no action ${action} (promote or abort)`);
        // An unknown type is a 404 like an unknown agent; 409 is a known type with no rollout in progress.
        if (!Object.hasOwn(gw.spec.spec.agents, req.params.type))
          return httpError(404, "not_found", `no agent type ${req.params.type}`);
        const r = await gw.decideRollout(req.params.type, action);
        if (!r.ok) return httpError(409, "no_rollout", r.message);
        return json({ ok: true, type: req.params.type, action, message: r.message });
      },
    },
  };
}
