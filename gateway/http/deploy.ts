/**
 * `POST /api/deploy/check` (docs/http-api.md): the replay gate of `fleet deploy --check` run by
 * the gateway, against the spec it runs now. The body names the candidate fleet.toml text (absent:
 * the fleet.toml file as it is now) and how much history to replay. Nothing is applied; the
 * verdict is the answer (200 either way, `ok` says which), audited as `deploy.check`.
 */
import { realpathSync } from "node:fs";
import { dirname, isAbsolute, relative } from "node:path";
import { compileSpec, SpecError, type SpecVersion } from "../spec/index.ts";
import type { HttpHost } from "./host.ts";
import { DeployCheckBody } from "./bodies.ts";
import { busy, noteAudit } from "./access.ts";
import { httpError, json, parseBody, readJson } from "./responses.ts";

type Server = { timeout(req: Request, seconds: number): void };

/** Routes to spread into `Bun.serve({ routes })`. */
export function deployRoutes(gw: Pick<HttpHost, "deployCheck" | "spec">) {
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
          if (v.toml !== undefined) {
            const refused = foreignModule(await compileSpec(v.toml, gw.spec.path), gw.spec);
            if (refused) return json({ error: { code: "bad_spec", message: refused.message }, ...refused.at }, 400);
          }
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

/** What a module may be: source code (a data file such as `.json` or `.toml` would be inlined as JS). */
const CODE_FILE = /\.[cm]?[jt]sx?$/;

/**
 * A candidate module the HTTP check must not bundle: one the running spec does not name, that is
 * not source code inside the fleet.toml folder tree. Bundling it would copy a file only the gateway
 * may read into a bundle file the sandbox (another uid) reads.
 */
function foreignModule(
  candidate: SpecVersion,
  running: SpecVersion,
): { message: string; at: { line: null; column: null; key_path: string } } | null {
  const trusted = new Set(Object.values(running.spec.agents).map((t) => t.module_path));
  const root = real(dirname(running.path));
  for (const t of Object.values(candidate.spec.agents)) {
    if (trusted.has(t.module_path)) continue;
    const rel = relative(root, real(t.module_path));
    if (CODE_FILE.test(t.module_path) && rel !== "" && !rel.startsWith("..") && !isAbsolute(rel)) continue;
    const key_path = `agents.${t.name}.module`;
    return {
      message: `${key_path} ${t.module_path} is not a source file inside ${root}: the HTTP check bundles only those`,
      at: { line: null, column: null, key_path },
    };
  }
  return null;
}

/** `path` with its symlinks resolved (as it is when missing: the check then reports it does not bundle). */
function real(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}
