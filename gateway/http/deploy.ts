/**
 * `POST /api/deploy/check` (docs/http-api.md): the replay gate of `fleet deploy --check` run by
 * the gateway, against the spec it runs now. The body names the candidate fleet.toml text (absent:
 * the fleet.toml file as it is now) and how much history to replay. Nothing is applied; the
 * verdict is the answer (200 either way, `ok` says which), audited as `deploy.check`.
 */
import { SpecError } from "../spec/index.ts";
import type { HttpHost } from "./host.ts";
import { DeployCheckBody } from "./bodies.ts";
import { busy, noteAudit } from "./access.ts";
import { httpError, json, parseBody, readJson } from "./responses.ts";

type Server = { timeout(req: Request, seconds: number): void };

/** Routes to spread into `Bun.serve({ routes })`. */
export function deployRoutes(gw: Pick<HttpHost, "deployCheck">) {
  let checking = false;
  return {
    "/api/deploy/check": {
      POST: async (req: Request, server: Server) => {
        const body = await readJson(req);
        if (!body.ok) return body.res;
        const parsed = parseBody(DeployCheckBody, body.value);
        if (!parsed.ok) return parsed.res;
        // Each replay is a subprocess: one check at a time per gateway.
        if (checking) return busy("a deploy check is running");
        checking = true;
        // A check replays up to episodes x agents per changed type: longer than the idle timeout.
        server.timeout(req, 0);
        try {
          const v = parsed.value ?? {};
          const report = await gw.deployCheck(v.toml ?? null, {
            episodes: v.episodes,
            agents: v.agents,
            force: v.types,
          });
          // A forced name the candidate does not have is the caller's mistake, not an unchanged type.
          const known = new Set([...report.types.map((t) => t.type), ...report.added, ...report.unchanged]);
          const unknown = (v.types ?? []).findIndex((t) => !known.has(t));
          if (unknown >= 0) {
            const name = JSON.stringify(v.types![unknown]!.slice(0, 80));
            const where = report.candidate.path;
            return httpError(400, "bad_request", `body types[${unknown}] ${name} is not an agent type of ${where}`);
          }
          const bad = report.types.reduce((s, c) => s + c.counts.DIVERGED + c.counts.FAILED, 0);
          noteAudit(req, {
            target: `spec ${report.candidate.hash.slice(0, 12)}`,
            detail: report.ok ? "OK" : `${bad} DIVERGED or FAILED`,
          });
          return json(report);
        } catch (err) {
          if (!(err instanceof SpecError)) throw err;
          return json(
            {
              error: { code: "bad_spec", message: err.message },
              line: err.line,
              column: err.column,
              key_path: err.keyPath,
            },
            400,
          );
        } finally {
          checking = false;
        }
      },
    },
  };
}
