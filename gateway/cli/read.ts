/**
 * The `fleet` commands that only read: status, agents, episodes, show, verify, replay.
 * They open the data dir read-only and work whether the gateway runs or not (status asks
 * a running gateway for its live health instead).
 */
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { intArg, table, UsageError, when, type Cli } from "./context.ts";
import { liveRead } from "./live.ts";
import type { ReplayResult } from "../ops/index.ts";
import { type AgentId, parseAgentId, parseStimulusKind, shownStatus } from "../types.ts";
import { agentView, episodeView, episodesPage } from "../store/index.ts";
import type { DiskStatus } from "../observe/index.ts";
import { diskSpace, mbText } from "../disk.ts";
import type { Store } from "../store/index.ts";
import type { SpecPending } from "../fleet/index.ts";

/** The operator commands' library, loaded by `show`, `verify` and `replay` only (the listings need the store). */
const ops = () => import("../ops/index.ts");

/** `fleet status`: live health from a running gateway, else what the data dir says. */
export async function cmdStatus(cli: Cli): Promise<number> {
  const live = await cli.running();
  if (live) {
    const health = await liveRead<Record<string, unknown>>(live, "/api/fleet", "status");
    const ready = (health as { readiness?: { ready: boolean; reason?: string } }).readiness;
    cli.print(health, () =>
      [
        ...(ready && !ready.ready ? [`NOT READY: ${ready.reason}`] : []),
        ...Object.entries(health).map(
          ([k, v]) =>
            `${k.padEnd(18)} ${
              k === "replication" && v
                ? replicationLine(v as ReplicationLine)
                : k === "rollouts" && Array.isArray(v)
                  ? rolloutLines(v as RolloutLine[])
                  : k === "spec_pending" && v
                    ? pendingLine(v as SpecPending)
                    : k === "disk" && v
                      ? diskLine(v as DiskStatus)
                      : typeof v === "object"
                        ? JSON.stringify(v)
                        : String(v)
            }`,
        ),
      ].join("\n"),
    );
    return 0;
  }
  const store = await cli.openReadonly();
  const counts = (await store.agentCounts()).map((c) => ({ ...c, status: shownStatus(c.status) }));
  const specs = await store.listSpecVersions(1);
  // The queue is in the data dir: what the center has not confirmed shows with the gateway stopped too.
  let replication: { backlog_rows: number; confirmed_seq: number } | null = null;
  if ((await store.getMeta("replication")) === "on") {
    const rs = await store.client.execute("SELECT count(*) AS n FROM repl_pending");
    const confirmed = Number((await store.getMeta("replication.confirmed_seq")) ?? 0);
    replication = { backlog_rows: Number(rs.rows[0]?.n ?? 0), confirmed_seq: confirmed };
  }
  // A gateway that will not start on a full disk says so; its free space here (the reserve's limit is the gateway's).
  const space = stoppedDisk(await cli.dataDir());
  const data = { state: "stopped", spec_version: specs[0]?.hash ?? null, agents: counts, replication, disk: space };
  cli.print(
    data,
    () =>
      `gateway stopped\nspec_version ${data.spec_version}\n` +
      (space ? `disk               ${mb(space.free_bytes)} MB free of ${mb(space.total_bytes)} MB\n` : "") +
      (replication
        ? `replication        ${replication.backlog_rows} row(s) not confirmed by the central server ` +
          `(confirmed cursor #${replication.confirmed_seq})\n`
        : "") +
      table(counts, ["type", "status", "n"]),
  );
  return 0;
}

/** Bytes as MB with one decimal ("?" unknown). */
const mb = (b: number | null): string => (b === null ? "?" : mbText(b));

/** The free space of a stopped gateway's data disk, or null where it cannot be read. */
function stoppedDisk(dir: string): { free_bytes: number; total_bytes: number } | null {
  try {
    const s = diskSpace(dir);
    return { free_bytes: s.freeBytes, total_bytes: s.totalBytes };
  } catch {
    return null;
  }
}

/** The data disk (`/api/fleet` `disk`): free space against `[fleet] disk_free_limit_mb`, and whether it refuses. */
export function diskLine(d: DiskStatus): string {
  const space = `${mb(d.free_bytes)} MB free of ${mb(d.total_bytes)} MB, reserve ${mb(d.limit_bytes)} MB`;
  if (!d.low) return space;
  const since = d.low_since === null ? "" : ` since ${new Date(d.low_since).toISOString()}`;
  return `${space}: LOW, stimuli from outside refused${since}`;
}

/** A reload checking a new version (`/api/fleet` `spec_pending`): which check, of what, how long so far. */
function pendingLine(p: SpecPending): string {
  const secs = Math.max(0, Math.round((Date.now() - p.since) / 1000));
  return `${p.step} of ${p.spec_version.slice(0, 12)} running for ${secs} s (not applied yet)`;
}

/** The fields of `/api/fleet`'s `rollouts` that `fleet status` prints. */
interface RolloutLine {
  type: string;
  state: string;
  from_bundle: string | null;
  to_bundle: string;
  canary_agents: string[];
  episodes: number;
  failures: number;
  min_episodes: number;
  reason: string | null;
}

/** One line per type's newest rollout (docs/upgrading.md). */
function rolloutLines(rs: readonly RolloutLine[]): string {
  if (rs.length === 0) return "none";
  return rs
    .map(
      (r) =>
        `${r.type}: ${r.state.replace("_", " ")} ${r.from_bundle?.slice(0, 12) ?? "(module file)"} -> ` +
        `${r.to_bundle.slice(0, 12)}, ${r.canary_agents.length} agent(s) on the new code, ` +
        `${r.episodes}/${r.min_episodes} episode(s), ${r.failures} failed${r.reason ? ` (${r.reason})` : ""}`,
    )
    .join(`\n${" ".repeat(19)}`);
}

/** The fields of `/api/fleet`'s `replication` that `fleet status` prints. */
interface ReplicationLine {
  state: string;
  url: string;
  backlog: { rows: number; bytes: number; lag_s: number };
  cursor?: { confirmed_seq: number; queued_seq: number };
  lost_rows: number;
  last_push_at: number | null;
  last_error: { kind: string; message: string } | null;
}

/** One readable line: how far behind the center is, and why when it is failing. */
function replicationLine(r: ReplicationLine): string {
  const parts = [
    `${r.state} to ${r.url}: ${r.backlog.rows} row(s) behind (~${Math.round(r.backlog.bytes / 1024)} KiB, ` +
      `lag ${Math.round(r.backlog.lag_s)} s)`,
    ...(r.cursor ? [`confirmed #${r.cursor.confirmed_seq} of #${r.cursor.queued_seq}`] : []),
    `last push ${r.last_push_at ? when(r.last_push_at) : "never"}`,
    ...(r.lost_rows > 0 ? [`${r.lost_rows} row(s) lost`] : []),
    ...(r.last_error ? [`last error ${r.last_error.kind}: ${r.last_error.message}`] : []),
  ];
  return parts.join("; ");
}

/** What `agents --status` filters by: the stored statuses, `active` shown as `idle`. */
const AGENT_STATUSES: readonly string[] = ["idle", "paused", "draining", "retired", "failed"];

/** `fleet agents [--type T] [--status S] [--limit N] [--page N]` */
export async function cmdAgents(cli: Cli): Promise<number> {
  const { flags } = cli;
  const store = await cli.openReadonly();
  const limit = intArg("--limit", flags.limit, 100, { min: 1, max: 100_000 });
  const page = intArg("--page", flags.page, 1, { min: 1 });
  if (flags.status !== undefined && !AGENT_STATUSES.includes(flags.status))
    throw new UsageError(`--status must be one of ${AGENT_STATUSES.join(", ")}; got "${flags.status}"`);
  // Agents show as `idle`; the store calls that `active`.
  const status = flags.status === "idle" ? "active" : flags.status;
  const { rows, total } = await store.listAgents({ type: flags.type, status, limit, offset: (page - 1) * limit });
  // The queue lengths come from the store: the data dir is the truth whether or not a gateway runs.
  const queued = new Map((await store.queuedSummary()).map((q) => [q.agent, q.n]));
  const views = rows.map((a) => agentView(a, queued.get(a.id) ?? 0));
  const nextPage = total > (page - 1) * limit + rows.length && rows.length > 0 ? page + 1 : null;
  cli.print(
    { agents: views, total, page, limit, next_page: nextPage },
    () =>
      `${table(
        views.map((v) => ({
          ...v,
          checkpoint: v.checkpoint?.slice(0, 12) ?? null,
          last_episode: when(v.last_episode_at),
        })),
        ["id", "status", "episodes", "failures", "queued", "seq", "checkpoint", "last_episode", "reason"],
      )}\n${total} agent(s)${nextPage === null ? "" : `\nmore: --page ${nextPage}`}`,
  );
  return 0;
}

/** `fleet episodes <type/key> [--kind K] [--status committed|failed] [--limit N] [--before MS]` */
export async function cmdEpisodes(cli: Cli, agent: string | undefined): Promise<number> {
  const id = agent ? parseAgentId(agent)?.id : undefined;
  if (!id) throw new UsageError("episodes needs an agent <type>/<key>");
  const { flags } = cli;
  const limit = intArg("--limit", flags.limit, 50, { min: 1, max: 100_000 });
  const before = intArg("--before", flags.before, undefined, { min: 0 });
  const status = flags.status;
  if (status !== undefined && status !== "committed" && status !== "failed")
    throw new UsageError(`--status must be committed or failed, got "${status}"`);
  const kind = flags.kind === undefined ? undefined : parseStimulusKind(flags.kind);
  if (kind && !kind.ok) throw new UsageError(`--${kind.message}`);
  // Filtering by outcome or kind looks up their stored codes; a plain listing reads any schema.
  const store = await cli.openReadonly(status || kind ? "`fleet episodes --status|--kind`" : undefined);
  if (!(await knownAgent(store, id))) return 1;
  const rows = (await episodesPage(store, id, { limit, before, status, kind: kind?.kind })).map(episodeView);
  const last = rows.at(-1);
  const nextBefore = rows.length === limit && last ? last.started_at : null;
  cli.print({ agent, episodes: rows, next_before: nextBefore }, () =>
    [
      table(
        rows.map((e) => ({
          ...e,
          started: when(e.started_at),
          checkpoint: e.checkpoint?.slice(0, 12) ?? null,
          error: e.error_kind,
        })),
        ["id", "kind", "status", "started", "ms", "attempt", "stimulus", "checkpoint", "error"],
      ),
      ...(nextBefore === null ? [] : [`more: --before ${nextBefore}`]),
    ].join("\n"),
  );
  return 0;
}

const WAKE_STATES = ["pending", "fired", "cancelled", "dropped"] as const;

/** `fleet wakeups <type/key> [--state S] [--limit N]`: the agent's wake-ups, latest due first. */
export async function cmdWakeups(cli: Cli, agent: string | undefined): Promise<number> {
  const id = agent ? parseAgentId(agent)?.id : undefined;
  if (!id) throw new UsageError("wakeups needs an agent <type>/<key>");
  const raw = cli.flags.state;
  const state = WAKE_STATES.find((s) => s === raw);
  if (raw !== undefined && !state)
    throw new UsageError(`--state must be one of ${WAKE_STATES.join(", ")}; got "${raw}"`);
  const store = await cli.openReadonly();
  if (!(await knownAgent(store, id))) return 1;
  const rows = await store.listWakes(id, {
    state,
    limit: intArg("--limit", cli.flags.limit, 50, { min: 1, max: 100_000 }),
  });
  const wakeups = rows.map((w) => ({
    id: w.id,
    due_at: w.dueAt,
    state: w.state,
    set_by: w.setBy,
    done_at: w.doneAt,
    done_by: w.doneBy,
    payload: JSON.parse(w.payload) as unknown,
  }));
  cli.print({ agent: id, wakeups }, () =>
    table(
      wakeups.map((w) => ({ ...w, due: when(w.due_at), payload: JSON.stringify(w.payload).slice(0, 60) })),
      ["id", "state", "due", "set_by", "done_by", "payload"],
    ),
  );
  return 0;
}

/** `fleet show <episode|prefix>`: one episode with its whole event log. */
export async function cmdShow(cli: Cli, id: string | undefined): Promise<number> {
  if (!id) throw new UsageError("show needs an episode id (or a unique prefix of one)");
  const store = await cli.openReadonly("`fleet show`");
  const { findEpisode, readEventLog } = await ops();
  const ep = await findEpisode(store, id);
  if ("code" in ep) {
    console.error(`fleet: ${ep.message}`);
    return 1;
  }
  // A log that cannot be read is an EventLogError naming the episode (one line, exit 1: cli/main.ts).
  const events = (await readEventLog(store, ep.id)).map((e) => ({
    seq: e.seq,
    kind: e.kind,
    data: JSON.parse(e.data),
  }));
  const view = { ...episodeView(ep), events };
  cli.print(view, () =>
    [
      `episode    ${ep.id}`,
      `agent      ${ep.agent}`,
      `status     ${ep.status}${ep.errorKind ? ` (${ep.errorKind}: ${ep.error?.split("\n")[0]})` : ""}`,
      `stimulus   ${ep.stimulusId}`,
      `started    ${when(ep.startedAt)} (${ep.endedAt - ep.startedAt} ms, attempt ${ep.attempt})`,
      `spec       ${ep.specVersion}`,
      `code       ${ep.bundle ? `bundle ${ep.bundle}` : "module file (no bundle)"}`,
      `checkpoint ${ep.checkpoint ?? "-"} (parent ${ep.parent ?? "-"})`,
      "events:",
      ...events.map(
        // Whole lines: `show` is where an operator reads what happened, so nothing is cut.
        (e) => `  ${String(e.seq).padStart(3)} ${e.kind.padEnd(9)} ${JSON.stringify(e.data)}`,
      ),
    ].join("\n"),
  );
  return 0;
}

/** `fleet verify [--agent type/key]`: recompute every hash chain; 1 on a mismatch. */
export async function cmdVerify(cli: Cli): Promise<number> {
  const only = agentFlag(cli.flags.agent);
  const store = await cli.openReadonly();
  if (only && !(await knownAgent(store, only))) return 1;
  const { verifyStore } = await ops();
  const report = await verifyStore(store, only ? [only] : undefined);
  cli.print(report, () => {
    const { agents, checkpoints, episodes } = report;
    const head = `verified ${agents} agent(s), ${checkpoints} checkpoint(s), ${episodes} episode(s)`;
    if (report.problems.length === 0) return `${head}: OK`;
    return (
      `${head}: ${report.problems.length} ` +
      `problem(s)\n${report.problems.map((p) => `  BROKEN ${p.record}: ${p.problem}`).join("\n")}`
    );
  });
  return report.problems.length === 0 ? 0 : 1;
}

/** Whether the data dir has this agent; when not, says so in one line (the caller exits 1, docs/cli.md). */
async function knownAgent(store: Store, id: AgentId): Promise<boolean> {
  if (await store.getAgent(id)) return true;
  console.error(`fleet: no agent ${id}`);
  return false;
}

/** `--agent <type>/<key>` parsed at the edge: undefined when absent, a usage error when malformed. */
function agentFlag(flag: string | undefined): AgentId | undefined {
  if (flag === undefined) return undefined;
  const parsed = parseAgentId(flag);
  if (!parsed) throw new UsageError(`--agent needs an agent <type>/<key>, got "${flag}"`);
  return parsed.id;
}

function describeReplay(r: ReplayResult): string {
  if (r.verdict === "UNREPLAYABLE") return `UNREPLAYABLE ${r.episode} ${r.agent}: ${r.reason}`;
  const note = r.note ? `\n  ${r.note}` : "";
  if (r.verdict === "MATCH") return `MATCH     ${r.episode} ${r.agent}${note}`;
  const d = r.divergence;
  return (
    `DIVERGED  ${r.episode} ${r.agent} at ${d.at}\n  expected ` +
    `${JSON.stringify(d.expected)}\n  actual   ${JSON.stringify(d.actual)}${note}`
  );
}

/** `fleet replay <episode> | --agent <type/key> [--module FILE]`: 0 only when everything MATCHes. */
export async function cmdReplay(cli: Cli, episode: string | undefined): Promise<number> {
  const { flags } = cli;
  const store = await cli.openReadonly("`fleet replay`");
  const module = flags.module ? resolve(flags.module) : undefined;
  if (module !== undefined && !existsSync(module)) throw new UsageError(`--module ${flags.module}: no such file`);
  const [{ findEpisode, replayAgent, replayEpisode }, { BundleFiles, bundleDir }, { commandSpawnOptions }] =
    await Promise.all([ops(), import("../code/index.ts"), import("../episode/index.ts")]);
  const spawn = commandSpawnOptions("auto", {}, "fleet replay");
  const files = new BundleFiles(bundleDir(await cli.dataDir(), spawn), (h) => store.bundleCode(h));
  const bundleFile = (h: string) => files.file(h);
  const agent = agentFlag(flags.agent);
  if (agent) {
    if (!(await knownAgent(store, agent))) return 1;
    const results = await replayAgent(store, agent, spawn, module, bundleFile);
    const count = (v: ReplayResult["verdict"]) => results.filter((r) => r.verdict === v).length;
    const unpinned = results.filter((r) => r.verdict !== "UNREPLAYABLE" && r.note).length;
    const summary = {
      agent: flags.agent,
      episodes: results.length,
      matched: count("MATCH"),
      diverged: count("DIVERGED"),
      unreplayable: count("UNREPLAYABLE"),
      results,
    };
    cli.print(summary, () =>
      [
        ...results.filter((r) => r.verdict !== "MATCH").map(describeReplay),
        `${summary.matched}/${results.length} episode(s) MATCH, ${summary.diverged} DIVERGED, ` +
          `${summary.unreplayable} UNREPLAYABLE`,
        ...(unpinned > 0
          ? [`${unpinned} from before code was pinned: code not pinned, ran the module file as it is now`]
          : []),
      ].join("\n"),
    );
    if (results.length === 0) console.error(`fleet: ${agent} has no committed episode to replay`);
    else if (summary.matched === 0 && summary.diverged === 0)
      console.error(`fleet: none of ${agent}'s ${results.length} committed episode(s) could be replayed`);
    // Nothing replayed is no evidence: at least one MATCH, and no DIVERGED.
    return summary.diverged === 0 && summary.matched > 0 ? 0 : 1;
  }
  if (!episode) throw new UsageError("replay needs an episode id or --agent <type/key>");
  // The episode or a unique prefix of its id; anything else is an error, as in `show`.
  const found = await findEpisode(store, episode);
  if ("code" in found) {
    console.error(`fleet: ${found.message}`);
    return 1;
  }
  const r = await replayEpisode(store, found.id, spawn, module, undefined, bundleFile);
  cli.print(r, () => describeReplay(r));
  return r.verdict === "MATCH" ? 0 : 1;
}
