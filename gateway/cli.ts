#!/usr/bin/env bun
/**
 * `fleet <command>` (SPEC §2, §7). Read commands open the data dir read-only and work
 * whether the gateway runs or not; commands that change the fleet go through the running
 * gateway's HTTP API (it is the only writer), or to the file when it is stopped.
 */
import { parseArgs } from "node:util";
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { Gateway } from "./gateway.ts";
import { loadSpec } from "./spec/load.ts";
import { SpecError } from "./spec/types.ts";
import { Store } from "./store/index.ts";
import { verifyStore } from "./verify.ts";
import { agentView, episodeView } from "./views.ts";
import { parseAgentId } from "./types.ts";
import { createLogger } from "./log.ts";
import { replayAgent, replayEpisode, type ReplayResult } from "./replay.ts";
import { defaultSpawnOptions } from "./runner.ts";
import { gcAll, type GcReport } from "./gc.ts";
import { DEVICE_USAGE, deviceCommand, quarantineCommand, type CliContext } from "./cli-devices.ts";
import { DevicesError } from "./devices.ts";

const USAGE = `usage: fleet <command> [args] [--json]

  start [--config FILE] [--data-dir DIR] [--mqtt-port N] [--http-port N]
  status                      fleet health, spec version, reload errors
  agents [--type T] [--status S] [--limit N] [--page N]
  episodes <type/key> [--limit N]
  show <episode>              one episode with its event log
  verify [--agent type/key]   recompute every hash chain; exit 1 on mismatch
  replay <episode> [--module FILE]          re-run an episode on its recorded inputs: MATCH or first divergence
  replay --agent <type/key> [--module FILE] replay an agent's whole history (regression test for new code)
  pause|resume|retire <type/key>
  gc [--dry-run] [--now MS]   apply retention now (checkpoint.keep, episodes_days, dedup_days)
  send <topic> <json> [--id ID]
  validate [FILE]             check a fleet.toml without touching the fleet
${DEVICE_USAGE}

  Common: --config FILE (env FLEET_CONFIG, default ./fleet.toml), --data-dir DIR (env FLEET_DATA_DIR)`;

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  strict: true,
  options: {
    config: { type: "string" },
    "data-dir": { type: "string" },
    "mqtt-port": { type: "string" },
    "http-port": { type: "string" },
    json: { type: "boolean", default: false },
    agent: { type: "string" },
    type: { type: "string" },
    status: { type: "string" },
    limit: { type: "string" },
    page: { type: "string" },
    id: { type: "string" },
    module: { type: "string" },
    "dry-run": { type: "boolean", default: false },
    now: { type: "string" },
    publish: { type: "string", multiple: true },
    subscribe: { type: "string", multiple: true },
    "client-id": { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});

class UsageError extends Error {}

const configPath = () => resolve(flags.config ?? process.env.FLEET_CONFIG ?? "fleet.toml");

async function dataDir(): Promise<string> {
  if (flags["data-dir"]) return resolve(flags["data-dir"]);
  if (process.env.FLEET_DATA_DIR) return resolve(process.env.FLEET_DATA_DIR);
  try {
    return resolve((await loadSpec(configPath())).spec.fleet.data_dir);
  } catch {
    return resolve(".fleet");
  }
}

/** The running gateway's ports, if its pid is alive. */
async function running(): Promise<{ http: string; mqtt_port: number } | null> {
  const file = join(await dataDir(), "gateway.json");
  if (!existsSync(file)) return null;
  try {
    const g = JSON.parse(readFileSync(file, "utf8")) as { http_port: number; mqtt_port: number; pid: number };
    process.kill(g.pid, 0);
    return { http: `http://127.0.0.1:${g.http_port}`, mqtt_port: g.mqtt_port };
  } catch {
    return null;
  }
}

async function openReadonly(): Promise<Store> {
  const dir = await dataDir();
  const file = join(dir, "fleet.db");
  if (!existsSync(file)) throw new UsageError(`no fleet data in ${dir} (start the gateway first, or pass --data-dir)`);
  return Store.open(file, { synchronous: "normal", readonly: true });
}

function print(data: unknown, human: () => string): void {
  console.log(flags.json ? JSON.stringify(data, null, 2) : human());
}

function table(rows: Record<string, unknown>[], cols: string[]): string {
  if (rows.length === 0) return "(none)";
  const cell = (v: unknown) => (v === null || v === undefined ? "-" : String(v));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(cols.map((c) => c.toUpperCase())), ...rows.map((r) => line(cols.map((c) => cell(r[c]))))].join("\n");
}

const when = (ms: number | null) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "-");

async function cmdStart(): Promise<void> {
  const log = createLogger();
  const gw = new Gateway({
    configPath: configPath(),
    dataDir: flags["data-dir"] ?? process.env.FLEET_DATA_DIR,
    mqttPort: flags["mqtt-port"] !== undefined ? Number(flags["mqtt-port"]) : undefined,
    httpPort: flags["http-port"] !== undefined ? Number(flags["http-port"]) : undefined,
    logger: log,
  });
  const stop = async (signal: string) => {
    log.info({ signal }, "shutting down");
    await gw.stop();
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));
  process.on("SIGHUP", () => void gw.reload("SIGHUP"));
  await gw.start();
  console.log(`fleet running: mqtt on port ${gw.broker.port}, http on port ${gw.http.port}, data in ${gw.dataDir}`);
}

async function cmdStatus(): Promise<number> {
  const live = await running();
  if (live) {
    const health = await (await fetch(`${live.http}/api/fleet`)).json();
    print(health, () => Object.entries(health as Record<string, unknown>).map(([k, v]) => `${k.padEnd(18)} ${typeof v === "object" ? JSON.stringify(v) : String(v)}`).join("\n"));
    return 0;
  }
  const store = await openReadonly();
  const counts = await store.agentCounts();
  const specs = await store.listSpecVersions(1);
  const data = { state: "stopped", spec_version: specs[0]?.hash ?? null, agents: counts };
  print(data, () => `gateway stopped\nspec_version ${data.spec_version}\n${table(counts, ["type", "status", "n"])}`);
  return 0;
}

async function cmdAgents(): Promise<number> {
  const store = await openReadonly();
  const limit = Number(flags.limit ?? 100);
  const page = Number(flags.page ?? 1);
  // Agents show as `idle`; the store calls that `active`.
  const status = flags.status === "idle" ? "active" : flags.status;
  const { rows, total } = await store.listAgents({ type: flags.type, status, limit, offset: (page - 1) * limit });
  const views = rows.map((a) => agentView(a, 0));
  print({ agents: views, total, page, limit }, () => `${table(views.map((v) => ({ ...v, checkpoint: v.checkpoint?.slice(0, 12) ?? null, last_episode: when(v.last_episode_at) })), ["id", "status", "episodes", "failures", "seq", "checkpoint", "last_episode", "reason"])}\n${total} agent(s)`);
  return 0;
}

async function cmdEpisodes(agent: string | undefined): Promise<number> {
  if (!agent || !parseAgentId(agent)) throw new UsageError("episodes needs an agent <type>/<key>");
  const store = await openReadonly();
  const rows = (await store.listEpisodes(agent, Number(flags.limit ?? 50))).map(episodeView);
  print({ agent, episodes: rows }, () => table(rows.map((e) => ({ ...e, started: when(e.started_at), checkpoint: e.checkpoint?.slice(0, 12) ?? null, error: e.error_kind })), ["id", "status", "started", "ms", "attempt", "stimulus", "checkpoint", "error"]));
  return 0;
}

async function cmdShow(id: string | undefined): Promise<number> {
  if (!id) throw new UsageError("show needs an episode id");
  const store = await openReadonly();
  const ep = await store.getEpisode(id);
  if (!ep) {
    console.error(`no episode ${id}`);
    return 1;
  }
  const events = (await store.listEvents(id)).map((e) => ({ seq: e.seq, kind: e.kind, data: JSON.parse(e.data) }));
  const view = { ...episodeView(ep), events };
  print(view, () => [
    `episode    ${ep.id}`,
    `agent      ${ep.agent}`,
    `status     ${ep.status}${ep.errorKind ? ` (${ep.errorKind}: ${ep.error?.split("\n")[0]})` : ""}`,
    `stimulus   ${ep.stimulusId}`,
    `started    ${when(ep.startedAt)} (${ep.endedAt - ep.startedAt} ms, attempt ${ep.attempt})`,
    `spec       ${ep.specVersion}`,
    `checkpoint ${ep.checkpoint ?? "-"} (parent ${ep.parent ?? "-"})`,
    "events:",
    ...events.map((e) => `  ${String(e.seq).padStart(3)} ${e.kind.padEnd(9)} ${JSON.stringify(e.data).slice(0, 160)}`),
  ].join("\n"));
  return 0;
}

async function cmdVerify(): Promise<number> {
  const store = await openReadonly();
  const report = await verifyStore(store, flags.agent ? [flags.agent] : undefined);
  print(report, () => {
    const head = `verified ${report.agents} agent(s), ${report.checkpoints} checkpoint(s), ${report.episodes} episode(s)`;
    if (report.problems.length === 0) return `${head}: OK`;
    return `${head}: ${report.problems.length} problem(s)\n${report.problems.map((p) => `  BROKEN ${p.record}: ${p.problem}`).join("\n")}`;
  });
  return report.problems.length === 0 ? 0 : 1;
}

function describeReplay(r: ReplayResult): string {
  if (r.verdict === "MATCH") return `MATCH     ${r.episode} ${r.agent}`;
  if (r.verdict === "UNREPLAYABLE") return `SKIPPED   ${r.episode} ${r.agent}: ${r.reason}`;
  const d = r.divergence;
  return `DIVERGED  ${r.episode} ${r.agent} at ${d.at}\n  expected ${JSON.stringify(d.expected)}\n  actual   ${JSON.stringify(d.actual)}`;
}

async function cmdReplay(episode: string | undefined): Promise<number> {
  const store = await openReadonly();
  const module = flags.module ? resolve(flags.module) : undefined;
  const spawn = defaultSpawnOptions();
  if (flags.agent) {
    const results = await replayAgent(store, flags.agent, spawn, module);
    const diverged = results.filter((r) => r.verdict === "DIVERGED").length;
    const summary = { agent: flags.agent, episodes: results.length, matched: results.filter((r) => r.verdict === "MATCH").length, diverged, results };
    print(summary, () => [...results.filter((r) => r.verdict !== "MATCH").map(describeReplay), `${summary.matched}/${results.length} episode(s) MATCH, ${diverged} DIVERGED`].join("\n"));
    return diverged === 0 && results.length > 0 ? 0 : 1;
  }
  if (!episode) throw new UsageError("replay needs an episode id or --agent <type/key>");
  const r = await replayEpisode(store, episode, spawn, module);
  print(r, () => describeReplay(r));
  return r.verdict === "MATCH" ? 0 : 1;
}

async function cmdGc(): Promise<number> {
  const dryRun = flags["dry-run"] === true;
  const now = flags.now !== undefined ? Number(flags.now) : undefined;
  const live = await running();
  let report: GcReport;
  if (live) {
    const q = new URLSearchParams({ ...(dryRun ? { dry_run: "1" } : {}), ...(now !== undefined ? { now: String(now) } : {}) });
    report = (await (await fetch(`${live.http}/api/gc?${q}`, { method: "POST" })).json()) as GcReport;
  } else {
    const store = await Store.open(join(await dataDir(), "fleet.db"), { synchronous: "full" });
    report = await gcAll(store, (await loadSpec(configPath())).spec, { now: now ?? Date.now(), dryRun });
    await store.close();
  }
  print(report, () => `${dryRun ? "would collect" : "collected"}: ${report.tombstoned} checkpoint state(s) tombstoned, ${report.checkpointsDeleted} tombstone(s), ${report.episodesDeleted} episode(s) with ${report.eventsDeleted} event(s), ${report.stimuliForgotten} dedup record(s), ${report.usageRowsDeleted} budget row(s) in ${Math.round(report.ms)} ms`);
  return 0;
}

async function cmdLifecycle(action: "pause" | "resume" | "retire", agent: string | undefined): Promise<number> {
  const a = agent ? parseAgentId(agent) : null;
  if (!a) throw new UsageError(`${action} needs an agent <type>/<key>`);
  const live = await running();
  if (live) {
    const res = await fetch(`${live.http}/api/agents/${a.type}/${a.key}/${action}`, { method: "POST" });
    const body = await res.json();
    print(body, () => (res.ok ? `${action}d ${a.id}` : `error: ${(body as { error: { message: string } }).error.message}`));
    return res.ok ? 0 : 1;
  }
  // Stopped: we are the only writer now.
  const dir = await dataDir();
  const store = await Store.open(join(dir, "fleet.db"), { synchronous: "full" });
  const row = await store.getAgent(a.id);
  if (!row) {
    console.error(`no agent ${a.id}`);
    return 1;
  }
  if (row.status === "retired" && action !== "retire") {
    await store.close();
    console.error(`${a.id} is retired`);
    return 1;
  }
  const status = action === "pause" ? "paused" : action === "resume" ? "active" : "retired";
  await store.setAgentStatus(a.id, status, action === "resume" ? null : `${action}d by operator`);
  await store.close();
  print({ ok: true, agent: a.id, action }, () => `${action}d ${a.id} (gateway stopped; takes effect at next start)`);
  return 0;
}

async function cmdSend(topic: string | undefined, payload: string | undefined): Promise<number> {
  if (!topic || payload === undefined) throw new UsageError("send needs <topic> <json>");
  let value: unknown;
  try {
    value = JSON.parse(payload);
  } catch (err) {
    throw new UsageError(`payload is not JSON: ${(err as Error).message}`);
  }
  const live = await running();
  if (!live) {
    console.error("the gateway is not running (start it with `fleet start`)");
    return 1;
  }
  const res = await fetch(`${live.http}/api/send`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ topic, payload: value, ...(flags.id ? { id: flags.id } : {}) }) });
  const body = (await res.json()) as { accepted?: { agent: string; sid: string }[]; duplicates?: unknown[]; error?: { message: string } };
  print(body, () => (res.ok ? `accepted ${body.accepted?.length ?? 0}, duplicates ${body.duplicates?.length ?? 0}${body.accepted?.map((a) => `\n  ${a.agent} ${a.sid}`).join("") ?? ""}` : `error: ${body.error?.message}`));
  return res.ok ? 0 : 1;
}

async function cmdValidate(file: string | undefined): Promise<number> {
  const path = resolve(file ?? configPath());
  try {
    const sv = await loadSpec(path);
    const types = Object.keys(sv.spec.agents);
    print({ ok: true, file: path, hash: sv.hash, agent_types: types }, () => `${path}: OK (${types.length} agent type(s): ${types.join(", ")}; spec ${sv.hash.slice(0, 12)})`);
    return 0;
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    print({ ok: false, file: err.file, line: err.line, column: err.column, key_path: err.keyPath, error: err.message }, () => err.message);
    return 1;
  }
}

async function main(): Promise<number> {
  const [cmd, a1, a2] = positionals;
  if (flags.help || !cmd) {
    console.log(USAGE);
    return cmd || flags.help ? 0 : 2;
  }
  switch (cmd) {
    case "start":
      await cmdStart();
      return -1; // keep running
    case "status":
      return cmdStatus();
    case "agents":
      return cmdAgents();
    case "episodes":
      return cmdEpisodes(a1);
    case "show":
      return cmdShow(a1);
    case "verify":
      return cmdVerify();
    case "replay":
      return cmdReplay(a1);
    case "gc":
      return cmdGc();
    case "pause":
    case "resume":
    case "retire":
      return cmdLifecycle(cmd, a1);
    case "send":
      return cmdSend(a1, a2);
    case "validate":
      return cmdValidate(a1);
    case "device":
    case "quarantine": {
      const ctx: CliContext = { json: flags.json, configPath: configPath(), dataDir, running };
      if (cmd === "quarantine") return quarantineCommand(positionals.slice(1), Number(flags.limit ?? 100), ctx);
      return deviceCommand(positionals.slice(1), { publish: flags.publish, subscribe: flags.subscribe, clientId: flags["client-id"] }, ctx);
    }
    default:
      throw new UsageError(`unknown command "${cmd}"`);
  }
}

main().then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      console.error(`fleet: ${err.message}\n\n${USAGE}`);
      process.exit(2);
    }
    if (err instanceof SpecError) {
      console.error(`fleet: invalid fleet spec: ${err.message}`);
      process.exit(1);
    }
    if (err instanceof DevicesError) {
      console.error(`fleet: invalid devices file: ${err.message}`);
      process.exit(1);
    }
    console.error(`fleet: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    process.exit(1);
  },
);
