/**
 * `--central URL` on `agents`, `episodes`, `show`, `verify`: the same commands over the
 * central database, every fleet side by side (`--fleet NAME|GATEWAY` narrows to one).
 * The token, when the server wants one, comes from `centralToken`.
 */
import { agentView, episodeView } from "../store/index.ts";
import { verifyChains, type VerifyProblem } from "../ops/index.ts";
import { existsSync } from "node:fs";
import {
  CentralError,
  CentralReader,
  centralAuditView,
  describeGap,
  type LayoutGap,
  layoutGaps,
  parseAuditCursor,
  parseBefore,
  parseEpisodeCursor,
  seqBeforeRefusal,
  startCentralServer,
} from "../replication/index.ts";
import { centralUrlProblem, displayUrl, loadSpec } from "../spec/index.ts";
import { type AgentId, parseAgentId } from "../types.ts";
import { type Cli, intArg, table, UsageError, when } from "./context.ts";

/**
 * The central server's token and the env var it came from: `--token-env NAME`, else the var
 * `[replication] auth_token_env` names in fleet.toml (the one the gateway reads), else
 * FLEET_CENTRAL_TOKEN; none is fine for a server without auth. A var named but not set is an error.
 */
export async function centralToken(
  cli: Pick<Cli, "flags" | "configPath">,
  env: Readonly<Record<string, string | undefined>> = process.env,
): Promise<{ token?: string; from: string | null }> {
  const named = cli.flags["token-env"];
  if (named !== undefined) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(named))
      throw new UsageError(`--token-env takes the name of an environment variable, got "${named}"`);
    const token = env[named];
    if (!token)
      throw new CentralError(
        `--token-env ${named}: ${named} is not set (export the central server's JWT in it)`,
        "auth",
      );
    return { token, from: named };
  }
  let specEnv: string | null = null;
  if (existsSync(cli.configPath)) {
    try {
      specEnv = (await loadSpec(cli.configPath)).spec.replication?.auth_token_env ?? null;
    } catch {
      // An unreadable fleet.toml names no token; reading the center does not need one.
    }
  }
  if (specEnv && env[specEnv]) return { token: env[specEnv], from: specEnv };
  if (env.FLEET_CENTRAL_TOKEN) return { token: env.FLEET_CENTRAL_TOKEN, from: "FLEET_CENTRAL_TOKEN" };
  if (specEnv)
    throw new CentralError(
      `[replication] auth_token_env in ${cli.configPath} names ${specEnv}, which is not set here: ` +
        `export it (the gateway's token for the central server), or pass --token-env NAME`,
      "auth",
    );
  return { from: null };
}

/** Where the CLI takes the central server's token from, instead of the URL. */
const CLI_SECRETS =
  "(a command line shows in process lists and shell history): export the server's token in " +
  "FLEET_CENTRAL_TOKEN, or pass --token-env NAME";

/**
 * `--central URL` (or `fleet central --url URL`) as the libSQL client takes it: a URL it would refuse, or
 * one carrying a token, is a bad command line (exit 2) before anything is read or connected.
 */
export function checkCentralUrl(flag: string, url: string): string {
  const problem = centralUrlProblem(url, CLI_SECRETS);
  if (problem !== null) throw new UsageError(`${flag} ${URL.canParse(url) ? displayUrl(url) : "URL"} ${problem}`);
  return url;
}

/** Open the central database at `url` with the token `centralToken` finds; says which token was refused. */
export async function openCentral(cli: Pick<Cli, "flags" | "configPath">, url: string): Promise<CentralReader> {
  const { token, from } = await centralToken(cli);
  try {
    return await CentralReader.open(url, token);
  } catch (err) {
    if (!(err instanceof CentralError) || err.kind !== "auth") throw err;
    const hint = from
      ? `the token in ${from} was refused (wrong, expired, or signed for another server)`
      : // from null: no --token-env, fleet.toml names no auth_token_env (or there is none), FLEET_CENTRAL_TOKEN unset
        "no token was sent: export the central server's JWT in FLEET_CENTRAL_TOKEN, " +
        "or pass --token-env NAME naming the variable that holds it";
    throw new CentralError(`${err.message}\n${hint}`, "auth");
  }
}

/**
 * Run `run` on the central database named by --central. A --fleet the center has never heard of
 * (no fleet id, fleet name or gateway id of it) is an error, exit 1, whatever the command.
 */
async function withCentral<T>(cli: Cli, run: (c: CentralReader) => Promise<T>): Promise<T> {
  const c = await openCentral(cli, checkCentralUrl("--central", cli.flags.central!));
  try {
    const { fleet } = cli.flags;
    if (fleet !== undefined && (await c.gateways(fleet)).length === 0)
      throw new CentralError(`no fleet or gateway "${fleet}" in the central database`);
    return await run(c);
  } finally {
    c.close();
  }
}

/** An agent id flag parsed at the edge, as the local commands parse it: a malformed one is a usage error. */
function agentArg(flag: string, value: string): AgentId {
  const parsed = parseAgentId(value);
  if (!parsed) throw new UsageError(`${flag} needs an agent <type>/<key>, got "${value}"`);
  return parsed.id;
}

/**
 * Gateway ids as the central tables show them: the first 8 characters, as the central dashboard does, or
 * more where two of `ids` would read alike (UUIDv7s minted within a minute share their first 8).
 */
export function shortGateways(ids: Iterable<string>): (id: string) => string {
  const distinct = [...new Set(ids)];
  let n = 8;
  while (n < 36 && new Set(distinct.map((id) => id.slice(0, n))).size < distinct.length) n++;
  return (id) => id.slice(0, n);
}

/** The shards of the fleets read whose newest layout never reported (layoutGaps), as warning lines. */
async function gapsOf(c: CentralReader, fleet: string | undefined): Promise<{ gaps: LayoutGap[]; lines: string[] }> {
  const gaps = layoutGaps(await c.gateways(), fleet);
  return { gaps, lines: gaps.map((g) => `warning: ${describeGap(g)}`) };
}

/** `fleet agents --central URL [--fleet F] [--type T] [--status S] [--limit N] [--page N]` */
export function cmdCentralAgents(cli: Cli): Promise<number> {
  const { flags } = cli;
  // Flags as the local `agents` parses them (a bad one is exit 2, before anything is asked of the center).
  const limit = intArg("--limit", flags.limit, 100, { min: 1, max: 100_000 });
  const page = intArg("--page", flags.page, 1, { min: 1 });
  const status = flags.status === "idle" ? "active" : flags.status;
  return withCentral(cli, async (c) => {
    const { rows, total } = await c.agents({
      fleet: flags.fleet,
      type: flags.type,
      status,
      limit,
      offset: (page - 1) * limit,
    });
    const views = rows.map((a) => ({ fleet: a.fleet, gateway: a.gateway, ...agentView(a, 0) }));
    const { gaps, lines } = await gapsOf(c, flags.fleet);
    // As the local `agents` says it: a page with more after it ends with where the next one starts.
    const nextPage = total > (page - 1) * limit + rows.length && rows.length > 0 ? page + 1 : null;
    const gw = shortGateways(views.map((v) => v.gateway));
    cli.print(
      { agents: views, total, page, limit, next_page: nextPage, incomplete: gaps },
      () =>
        `${table(
          views.map((v) => ({
            ...v,
            gateway: gw(v.gateway),
            checkpoint: v.checkpoint?.slice(0, 12) ?? null,
            last_episode: when(v.last_episode_at),
          })),
          ["fleet", "gateway", "id", "status", "episodes", "failures", "seq", "checkpoint", "last_episode", "reason"],
        )}\n${[`${total} agent(s)`, ...(nextPage === null ? [] : [`more: --page ${nextPage}`]), ...lines].join("\n")}`,
    );
    return 0;
  });
}

/**
 * `--before`: a plain integer from `min` (a SEQ or MS) or the cursor a full page ended with
 * (cursor.ts); a bad one is exit 2, before anything is asked of the center.
 */
function beforeArg<K>(raw: string | undefined, min: number, parse: (text: string) => K | null): number | K | undefined {
  if (raw === undefined) return undefined;
  const v = parseBefore(raw, { name: "--before", min }, parse);
  if (!v.ok) throw new UsageError(v.message);
  return v.value;
}

/** `fleet episodes <type/key> --central URL [--fleet F] [--limit N] [--before MS|CURSOR]`: newest first, paged. */
export function cmdCentralEpisodes(cli: Cli, agent: string | undefined): Promise<number> {
  if (!agent || !parseAgentId(agent)) throw new UsageError("episodes needs an agent <type>/<key>");
  const { flags } = cli;
  const limit = intArg("--limit", flags.limit, 50, { min: 1, max: 100_000 });
  const before = beforeArg(flags.before, 0, parseEpisodeCursor);
  return withCentral(cli, async (c) => {
    // As the local `episodes`: an agent none of the gateways read has is exit 1, not an empty list.
    if (!(await c.hasAgent(agent, flags.fleet))) {
      console.error(`fleet: no agent ${agent} in the central database${flags.fleet ? ` (${flags.fleet})` : ""}`);
      return 1;
    }
    const page = await c.episodesPage(agent, { fleet: flags.fleet, limit, before });
    const rows = page.episodes.map((e) => ({ fleet: e.fleet, gateway: e.gateway, ...episodeView(e) }));
    // A full page ends with where the next one starts, as the local `episodes` says it.
    const nextBefore = page.nextBefore;
    const { gaps, lines } = await gapsOf(c, flags.fleet);
    const gw = shortGateways(rows.map((e) => e.gateway));
    cli.print({ agent, episodes: rows, next_before: nextBefore, incomplete: gaps }, () =>
      [
        table(
          rows.map((e) => ({
            ...e,
            gateway: gw(e.gateway),
            started: when(e.started_at),
            checkpoint: e.checkpoint?.slice(0, 12) ?? null,
          })),
          ["fleet", "gateway", "id", "status", "started", "ms", "attempt", "stimulus", "checkpoint", "error_kind"],
        ),
        ...(nextBefore === null ? [] : [`more: --before ${nextBefore}`]),
        ...lines,
      ].join("\n"),
    );
    return 0;
  });
}

/** `fleet show <episode|prefix> --central URL`: by id or a unique prefix (at least 4 characters), as locally. */
export function cmdCentralShow(cli: Cli, id: string | undefined): Promise<number> {
  if (!id) throw new UsageError("show needs an episode id (or a unique prefix of one)");
  return withCentral(cli, async (c) => {
    const found = await c.findEpisode(id);
    if ("code" in found) {
      console.error(`fleet: ${found.message} in the central database`);
      return 1;
    }
    const { episode: ep } = found;
    const events = found.events.map((e) => ({ seq: e.seq, kind: e.kind, data: JSON.parse(e.data) }));
    cli.print({ fleet: ep.fleet, gateway: ep.gateway, ...episodeView(ep), events }, () =>
      [
        `episode    ${ep.id}`,
        `fleet      ${ep.fleet} (gateway ${ep.gateway})`,
        `agent      ${ep.agent}`,
        `status     ${ep.status}${ep.errorKind ? ` (${ep.errorKind}: ${ep.error?.split("\n")[0]})` : ""}`,
        `stimulus   ${ep.stimulusId}`,
        `started    ${when(ep.startedAt)} (${ep.endedAt - ep.startedAt} ms, attempt ${ep.attempt})`,
        `checkpoint ${ep.checkpoint ?? "-"} (parent ${ep.parent ?? "-"})`,
        "events:",
        ...events.map(
          (e) => `  ${String(e.seq).padStart(3)} ${e.kind.padEnd(9)} ${JSON.stringify(e.data).slice(0, 160)}`,
        ),
      ].join("\n"),
    );
    return 0;
  });
}

/**
 * `fleet audit --central URL [--fleet F] [--limit N] [--before SEQ|CURSOR]`: every fleet's operator actions,
 * newest first. A SEQ pages a read of one gateway; a read across gateways pages with the cursor a full page
 * ends with (`more: --before …`).
 */
export function cmdCentralAudit(cli: Cli): Promise<number> {
  const { flags } = cli;
  const limit = intArg("--limit", flags.limit, 50, { min: 1, max: 100_000 });
  const before = beforeArg(flags.before, 1, parseAuditCursor);
  return withCentral(cli, async (c) => {
    const refused = typeof before === "number" ? seqBeforeRefusal(await c.gateways(), flags.fleet) : null;
    if (refused !== null)
      throw new UsageError(
        `--before SEQ: ${refused}: page on with the --before a full page ends with (more: --before …), ` +
          "or pass a gateway id to --fleet",
      );
    const page = await c.auditPage({ fleet: flags.fleet, limit, before });
    const records = page.records.map(centralAuditView);
    const gw = shortGateways(records.map((r) => r.gateway));
    cli.print({ records, next_before: page.nextBefore }, () =>
      [
        table(
          records.map((r) => ({ ...r, gateway: gw(r.gateway), when: when(r.at) })),
          ["fleet", "gateway", "seq", "when", "actor", "action", "target", "status", "detail"],
        ),
        ...(page.nextBefore === null ? [] : [`more: --before ${page.nextBefore}`]),
      ].join("\n"),
    );
    return 0;
  });
}

/**
 * `fleet verify --central URL [--fleet F] [--agent type/key]`: every replicated chain; 1 on a mismatch. With
 * --agent, as the local `verify --agent`: a malformed id is exit 2, an agent no gateway read has is exit 1,
 * and only the gateways that have it are verified and counted.
 */
export function cmdCentralVerify(cli: Cli): Promise<number> {
  const only = cli.flags.agent === undefined ? undefined : agentArg("--agent", cli.flags.agent);
  return withCentral(cli, async (c) => {
    const read = await c.gateways(cli.flags.fleet);
    const problems: (VerifyProblem & { fleet: string; gateway: string })[] = [];
    const fleets = [];
    const gateways = [];
    let agents = 0;
    let checkpoints = 0;
    let episodes = 0;
    for (const g of read) {
      // A gateway may be pushing as verify reads: what its next push completes is not reported as broken.
      const settle = c.settling(g.gateway);
      const r = await verifyChains(c.chains(g.gateway), only ? [only] : undefined, { settle });
      if (only && r.agents === 0) continue; // this gateway does not have the agent
      gateways.push(g);
      agents += r.agents;
      checkpoints += r.checkpoints;
      episodes += r.episodes;
      for (const p of r.problems) problems.push({ fleet: g.fleet, gateway: g.gateway, ...p });
      fleets.push({
        fleet: g.fleet,
        gateway: g.gateway,
        agents: r.agents,
        checkpoints: r.checkpoints,
        episodes: r.episodes,
        problems: r.problems.length,
      });
    }
    if (only && agents === 0) {
      console.error(`fleet: no agent ${only} in the central database${cli.flags.fleet ? ` (${cli.flags.fleet})` : ""}`);
      return 1;
    }
    // Shards of the newest layout that never reported: their chains are not here to verify. Not a
    // mismatch (exit 0 when the rest verifies), but never a bare OK (docs/replication.md).
    const { gaps, lines } = await gapsOf(c, cli.flags.fleet);
    cli.print({ central: c.url, fleets, agents, checkpoints, episodes, problems, incomplete: gaps }, () => {
      const head =
        `verified ${gateways.length} gateway(s) at the center: ${agents} agent(s), ` +
        `${checkpoints} checkpoint(s), ${episodes} episode(s)`;
      const broken = problems.map((p) => `  BROKEN ${p.fleet} (${p.gateway}) ${p.record}: ${p.problem}`);
      if (problems.length > 0) return [`${head}: ${problems.length} problem(s)`, ...broken, ...lines].join("\n");
      if (gaps.length > 0) return [`${head}: these verify, but the view is INCOMPLETE`, ...lines].join("\n");
      return `${head}: OK`;
    });
    return problems.length === 0 ? 0 : 1;
  });
}

/** `fleet central --url URL [--host H] [--port N]`: the read-only central dashboard and JSON API, until stopped. */
export async function cmdCentralServe(cli: Cli): Promise<void> {
  const { flags } = cli;
  if (!flags.url) throw new UsageError("central needs --url URL of the central libSQL server");
  const port = intArg("--port", flags.port, 8090, { min: 0, max: 65_535 });
  const reader = await openCentral(cli, checkCentralUrl("--url", flags.url));
  const server = startCentralServer({
    reader,
    host: flags.host ?? "127.0.0.1",
    port,
    token: process.env.FLEET_CENTRAL_API_TOKEN || null,
  });
  console.log(`central view of ${reader.url} on ${server.url} (read-only)`);
  const stop = () => {
    server.stop();
    reader.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
