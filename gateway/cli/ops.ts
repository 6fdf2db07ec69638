/**
 * The `fleet` commands that change the fleet: gc, pause/resume/retire, send, validate. Changes go
 * through the running gateway's HTTP API (it is the only writer), or to the data dir directly when it
 * is stopped; what that needs (the store's writers, the spec, the sandbox for validate) is loaded then.
 */
import { resolve } from "node:path";
import { intArg, UsageError, type Cli } from "./context.ts";
import { liveFetch } from "./live.ts";
import type { GcOutcome } from "../ops/index.ts";
import { mbText } from "../disk.ts";
import { lifecycleRefusal, OPERATOR_DRAIN, parseAgentId, shownStatus } from "../types.ts";

/** The operator library (retention, the audit log), for a command run on a stopped gateway's data dir. */
const ops = () => import("../ops/index.ts");
/** The fleet.toml loader, for retention's settings and `validate`. */
const specs = () => import("../spec/index.ts");

/**
 * `fleet gc [--dry-run] [--now MS]`: retention now, by the running gateway (on its own clock) or on
 * the stopped data dir. `--now` pretends it is another time: with `--dry-run` it only previews
 * (read-only, gateway running or not); without it, it works only on a stopped gateway's data dir
 * and warns loudly, since a future time forgets dedup ids early (an old id could run again).
 */
export async function cmdGc(cli: Cli): Promise<number> {
  const { flags } = cli;
  const dryRun = flags["dry-run"] === true;
  const now = intArg("--now (epoch milliseconds)", flags.now, undefined, { min: 0 });
  const live = await cli.running();
  let report: GcOutcome;
  if (now !== undefined && dryRun) {
    const [{ gcAll }, { loadSpec }] = await Promise.all([ops(), specs()]);
    const store = await cli.openReadonly();
    const spec = (await loadSpec(cli.configPath)).spec;
    report = await gcAll(store, spec, { now, dryRun: true, keepUnconfirmed: spec.replication?.required ?? false });
    await store.close();
  } else if (live) {
    if (now !== undefined) {
      // A state mistake, not a bad command line (exit 1, as `rollout` on a stopped gateway).
      console.error(
        "fleet: gc --now works only with --dry-run or on a stopped gateway's data dir: " +
          "the running gateway collects on its own clock",
      );
      return 1;
    }
    const res = await liveFetch(live, `/api/gc${dryRun ? "?dry_run=1" : ""}`, { method: "POST" });
    const body = (await res.json()) as GcOutcome & { error?: { message: string } };
    if (!res.ok) {
      console.error(`fleet: gc refused: ${body.error?.message ?? `HTTP ${res.status}`}`);
      return 1;
    }
    report = body;
  } else {
    if (now !== undefined && now > Date.now())
      console.error(
        `WARNING: collecting as of ${new Date(now).toISOString()}, a time in the future: dedup ids younger than ` +
          `dedup_days are forgotten, so a stimulus already processed may run a second episode if it is sent again.`,
      );
    const [{ auditLocal, gcAll }, { loadSpec }] = await Promise.all([ops(), specs()]);
    const store = await cli.openWritable();
    const spec = (await loadSpec(cli.configPath)).spec;
    // A stopped gateway cannot tell how big its backlog is against max_backlog_mb: keep what `required` keeps.
    report = await gcAll(store, spec, {
      now: now ?? Date.now(),
      dryRun,
      keepUnconfirmed: spec.replication?.required ?? false,
    });
    if (!dryRun) report.dbFreeBytes = await store.freePageBytes();
    // Recorded as the running gateway records POST /api/gc (http/access.ts).
    await auditLocal(store, {
      action: dryRun ? "gc.dry_run" : "gc",
      target: null,
      status: 200,
      detail: now === undefined ? null : `--now ${now}`,
    });
    await store.close();
  }
  cli.print(
    report,
    () =>
      `${dryRun ? "would collect" : "collected"}: ${report.tombstoned} checkpoint state(s) ` +
      `tombstoned, ${report.checkpointsDeleted} tombstone(s), ${report.episodesDeleted} ` +
      `episode(s) with ${report.eventsDeleted} event(s), ${report.stimuliForgotten} dedup ` +
      `record(s), ${report.quarantineExpired} quarantined stimulus(es) past quarantine_days dropped, ` +
      `${report.usageRowsDeleted} budget row(s), ${report.bundlesDeleted} code bundle(s) ` +
      `in ${Math.round(report.ms)} ms` +
      (report.dbFreeBytes === undefined
        ? ""
        : `; fleet.db has ${mbText(report.dbFreeBytes)} MB of free pages, ` +
          "which new writes reuse before the file grows"),
  );
  return 0;
}

/** `fleet pause|resume|retire <type/key>`; `retire --drain` retires after the queued stimuli ran. */
export async function cmdLifecycle(
  cli: Cli,
  action: "pause" | "resume" | "retire",
  agent: string | undefined,
): Promise<number> {
  const a = agent ? parseAgentId(agent) : null;
  if (!a) throw new UsageError(`${action} needs an agent <type>/<key>`);
  const drain = cli.flags.drain === true;
  const live = await cli.running();
  if (live) {
    const res = await liveFetch(live, `/api/agents/${a.type}/${a.key}/${action}${drain ? "?drain=1" : ""}`, {
      method: "POST",
    });
    const body = (await res.json()) as { status?: string; error?: { message: string } };
    if (!res.ok) {
      if (cli.json) cli.print(body, () => "");
      console.error(`fleet: ${body.error?.message ?? `HTTP ${res.status}`}`);
      return 1;
    }
    cli.print(body, () =>
      body.status === "draining"
        ? `draining ${a.id}: it takes no new stimuli, runs those already queued, then is retired`
        : `${action}d ${a.id}`,
    );
    return res.ok ? 0 : 1;
  }
  // Stopped: we are the only writer now.
  const { auditLocal } = await ops();
  const store = await cli.openWritable();
  const row = await store.getAgent(a.id);
  // Recorded as the running gateway records POST /api/agents/<type>/<key>/<action> (http/access.ts).
  const audit = (status: number) =>
    auditLocal(store, { action: `agent.${action}`, target: a.id, status, detail: drain ? "drain" : null });
  const refuse = async (status: number, message: string) => {
    await audit(status);
    await store.close();
    console.error(`fleet: ${message}`);
    return 1;
  };
  if (!row) return refuse(404, `no agent ${a.id}`);
  const refused = lifecycleRefusal(row, action);
  if (refused) return refuse(409, refused.message);
  await audit(200); // before the change below: a failed write is an error the operator sees
  // Draining with nothing queued (or a failed agent, which cannot run its queue) is retiring.
  const drains = drain && row.status !== "retired" && row.status !== "failed" && !!(await store.headOfQueue(a.id));
  const status = action === "pause" ? "paused" : action === "resume" ? "active" : drains ? "draining" : "retired";
  if (row.status !== "retired" || !drain)
    await store.setAgentStatus(
      a.id,
      status,
      action === "resume" ? null : drains ? OPERATOR_DRAIN : `${action}d by operator`,
    );
  await store.close();
  // The status as the API answers it (`idle`, never the stored `active`).
  cli.print({ ok: true, agent: a.id, action, ...(drain ? { drain } : {}), status: shownStatus(status) }, () =>
    drains
      ? `draining ${a.id} (gateway stopped): at the next start it runs the stimuli already queued, then is retired`
      : `${action}d ${a.id} (gateway stopped; takes effect at next start)`,
  );
  return 0;
}

/** `fleet send <topic> <json> [--id ID]`: through the running gateway only. */
export async function cmdSend(cli: Cli, topic: string | undefined, payload: string | undefined): Promise<number> {
  if (!topic || payload === undefined) throw new UsageError("send needs <topic> <json>");
  let value: unknown;
  try {
    value = JSON.parse(payload);
  } catch (err) {
    throw new UsageError(`payload is not JSON: ${(err as Error).message}`);
  }
  const live = await cli.running();
  if (!live) {
    console.error("fleet: the gateway is not running (start it with `fleet start`)");
    return 1;
  }
  const res = await liveFetch(live, "/api/send", {
    method: "POST",
    body: JSON.stringify({ topic, payload: value, ...(cli.flags.id ? { id: cli.flags.id } : {}) }),
  });
  const body = (await res.json()) as SendReport & { error?: { message: string } };
  if (!res.ok) {
    if (cli.json) cli.print(body, () => "");
    console.error(`fleet: ${body.error?.message ?? `HTTP ${res.status}`}`);
    return 1;
  }
  cli.print(body, () => describeSend(body));
  return 0;
}

/** What `POST /api/send` answers when some target took the message (docs/http-api.md). */
export interface SendReport {
  readonly accepted?: readonly { agent: string; sid: string }[];
  readonly duplicates?: readonly unknown[];
  readonly refused?: readonly { agent: string; code: string; reason: string }[];
  /** Targets another shard owns: this gateway recorded nothing for them. */
  readonly elsewhere?: readonly { agent: string; shard: number }[];
}

/**
 * `fleet send`'s text: every target, so a target another shard owns or one that refused is not mistaken
 * for one that ran (`--json` has the same lists).
 */
export function describeSend(r: SendReport): string {
  const { accepted = [], duplicates = [], refused = [], elsewhere = [] } = r;
  return [
    `accepted ${accepted.length}, duplicates ${duplicates.length}` +
      (refused.length > 0 ? `, refused ${refused.length}` : "") +
      (elsewhere.length > 0 ? `, on other shards ${elsewhere.length}` : ""),
    ...accepted.map((a) => `  ${a.agent} ${a.sid}`),
    ...refused.map((f) => `  ${f.agent} refused (${f.code}): ${f.reason}`),
    ...elsewhere.map(
      (e) => `  ${e.agent} NOT recorded here: owned by shard ${e.shard} (send it to that shard's gateway)`,
    ),
  ].join("\n");
}

/** `fleet validate [FILE]`: compile a fleet.toml without touching the fleet; 1 with the error's location. */
export async function cmdValidate(cli: Cli, file: string | undefined): Promise<number> {
  const path = resolve(file ?? cli.configPath);
  const [{ loadSpec, SpecError }, { checkConfigs, commandSpawnOptions, configProblemsError, typesToCheck }] =
    await Promise.all([specs(), import("../episode/index.ts")]);
  const [{ versionOf }, { HOST_MODULES }] = await Promise.all([
    import("../code/index.ts"),
    import("../../agents/host/index.ts"),
  ]);
  try {
    const sv = await loadSpec(path);
    const types = Object.keys(sv.spec.agents);
    // The agents' own config schemas, in the sandbox episodes run in.
    const spawn = commandSpawnOptions(
      sv.spec.fleet.sandbox,
      { allowWeak: sv.spec.fleet.allow_weak_sandbox },
      "fleet validate",
    );
    // The version as the gateway would store it: the text's hash with its modules' bundles.
    // No module may bundle a file of the data dir: the one this command runs on too, if it names one.
    const dataDir = await cli.dataDir().catch(() => undefined);
    const version = await versionOf(sv, HOST_MODULES, dataDir);
    // A module that does not bundle (a syntax error, say) would also throw when loaded: its bundle error,
    // which names file:line:column, is the one reported below, in the `unbundled` shape.
    const unbundledTypes = new Set(version.unbundled.map((u) => u.type));
    const problems = await checkConfigs(
      typesToCheck(sv.spec, null).filter((t) => !unbundledTypes.has(t.name)),
      spawn,
    );
    if (problems.length > 0) throw configProblemsError(sv, problems);
    // A running gateway refuses a deploy whose module does not bundle (gateway/code/pin.ts).
    const unbundled = version.unbundled.map((u) => `agents.${u.type}.module cannot be bundled: ${u.error}`);
    const ok = unbundled.length === 0;
    cli.print({ ok, file: path, hash: version.sv.hash, agent_types: types, unbundled: version.unbundled }, () =>
      ok
        ? `${path}: OK (${types.length} agent type(s): ${types.join(", ")}; spec ${version.sv.hash.slice(0, 12)})`
        : unbundled.map((line) => `${path}: ${line}`).join("\n"),
    );
    return ok ? 0 : 1;
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    cli.print(
      { ok: false, file: err.file, line: err.line, column: err.column, key_path: err.keyPath, error: err.message },
      () => err.message,
    );
    return 1;
  }
}
