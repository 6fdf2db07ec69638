/** `GET /api/audit?limit=&before=`: operator actions newest first; `next_before` pages on (admin scope). */
import { auditView, listAudit } from "../store/index.ts";
import type { HttpHost } from "./host.ts";
import { intQuery, json } from "./responses.ts";

/** The audit route. */
export function auditRoutes(gw: Pick<HttpHost, "store">) {
  return {
    "/api/audit": async (req: Request) => {
      const url = new URL(req.url);
      const limit = intQuery(url, "limit", 50, 1, 1000);
      if (limit instanceof Response) return limit;
      const before = intQuery(url, "before", Number.MAX_SAFE_INTEGER, 1, Number.MAX_SAFE_INTEGER);
      if (before instanceof Response) return before;
      const rows = await listAudit(gw.store, { limit, before });
      const last = rows.at(-1);
      return json({ records: rows.map(auditView), next_before: rows.length === limit && last ? last.seq : null });
    },
  };
}
