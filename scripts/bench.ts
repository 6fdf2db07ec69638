/**
 * `bun run bench`: the gateway against baselines measured in the same run, so the ratios
 * hold on any machine.
 *
 *   bun scripts/bench.ts [intake] [episodes] [latency] [agents] [--quick] [--json FILE]
 *     [--window N] [--all-episodes]
 *
 *   intake    QoS 1 stimuli/s accepted durably vs bare aedes           (target >= 0.5x)
 *             gateway agents are paused so episodes do not compete with intake
 *   busy      QoS 1 intake while episodes run flat out vs the same gateway with agents paused (target >= 0.6x),
 *             with flooded agents' backlog running and with quiet agents' episodes running; episodes/s beside it
 *   external  QoS 1 intake through an external Mosquitto into a gateway vs Mosquitto alone (same publisher)
 *   episodes  episodes/s, fresh subprocess each, vs bare Bun.spawn+IPC  (target >= 0.7x); CPU per
 *             episode split three ways: the gateway (target <= 1.5 ms), the runner alone (no gateway),
 *             one child's own
 *   latency   stimulus -> out p50/p99 vs the bare spawn round trip     (target p50 <= +5 ms)
 *   agents    gateway RSS with 10,000 agents (fleet.toml instances; 1,000 of them run an
 *             episode, --all-episodes: all) vs idle; no subprocess left behind
 *   sessions  episodes/s with durable broker sessions (libsql) vs in-memory persistence,
 *             one clean = false subscriber online (target >= 0.9x); RSS with 10,000 agents
 *   timers    1,000 agents with every = "1s": timer stimuli/s vs expected, gateway CPU
 *   policy    episodes/s with tools + budgets vs without; a quiet agent's latency under a flood
 *   ops       /metrics and /api/agents?page= with 10,000 agents vs /healthz; GC records/s
 *   replication  backlog drain rows/s into a real sqld vs raw batched INSERTs (target >= 0.5x);
 *             commit-path episodes/s with replication on vs off (target >= 0.9x); real episodes
 *             (subprocesses) of two gateways, one replicating, in interleaved rounds (target >= 0.9x)
 *   logins    a device's first login (argon2id) while 16 clients guess logins vs on a quiet broker (target <= 3x)
 *   redeploy  an edit of fleet.toml -> the new version live, while episodes run (<= 2,000 ms), vs the
 *             same edit applied by SIGHUP (no wait for the file to settle)
 *   cli       CPU per `fleet` call (--help, agents, episodes, status, verify) on a stopped data dir vs the
 *             same call with the whole gateway preloaded (target <= 0.6x); beside it, x an empty bun process
 *   scale     100,000 agents deployed: gateway RSS (<= 400 MB), /api/agents pages and /metrics p99
 *             (<= 20 ms), restart to ready with 1,000,000 episodes of history (<= 3 s)
 *
 * Every gateway runs as its own process (`bun gateway/cli/main.ts start`), as do the baseline
 * brokers; bare spawn baselines run in this process like the gateway's runner does. Gateway
 * and baseline are measured in interleaved rounds (medians), so load from elsewhere on the
 * machine hits both. BENCH_PROFILE_DIR=DIR makes each gateway write DIR/<section>.cpuprofile
 * (the policy section's: DIR/<fleet name>.cpuprofile, e.g. bench-policy-flood.cpuprofile;
 * BENCH_PROFILE_INTERVAL_US=N samples every N µs instead of every 1000: more samples per run);
 * `bun scripts/profile-summary.ts DIR/<section>.cpuprofile` summarises it by sample counts. That
 * sampler counts time, also time blocked in a system call; for CPU, BENCH_PERF_DIR=DIR records the
 * episodes section's gateway with `perf` (cpu-clock, call stacks) and writes DIR/episodes.perf.txt:
 * its CPU by thread and by JS function, named through the JIT dump it writes there (perf-summary.ts).
 *
 * Progress goes to stderr; stdout gets one table per section, the summary, and (unless
 * --json FILE is given) the results as JSON on its last line. Exit code 0 even when a
 * target is missed (it is a measurement, not a test); 1 when a section could not run.
 */
import { writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { benchAgents } from "./bench/agents.ts";
import { scriptArgs, usageError, wholeFlag } from "./bench/cli.ts";
import { benchEpisodes, benchLatency } from "./bench/episodes.ts";
import { beginShutdown, cleanupAll, rowCells, table, type BenchOptions, type Row } from "./bench/harness.ts";
import { benchIntake } from "./bench/intake.ts";
import { benchIntakeBusy } from "./bench/intake-busy.ts";
import { benchExternal } from "./bench/external.ts";
import { benchSessions } from "./bench/sessions.ts";
import { benchTimers } from "./bench-timers.ts";
import { benchPolicy } from "./bench-policy.ts";
import { benchOps } from "./bench-ops.ts";
import { benchReplication, benchReplicationReal } from "./bench-replication.ts";
import { benchLogins } from "./bench/logins.ts";
import { benchScale } from "./bench/scale.ts";
import { benchRedeploy } from "./bench/redeploy.ts";
import { benchCli } from "./bench/cli-calls.ts";

const SECTIONS = [
  "intake",
  "busy",
  "external",
  "episodes",
  "latency",
  "agents",
  "sessions",
  "timers",
  "policy",
  "ops",
  "replication",
  "logins",
  "redeploy",
  "cli",
  "scale",
] as const;
type Section = (typeof SECTIONS)[number];

const USAGE =
  `usage: bun scripts/bench.ts [${SECTIONS.join("] [")}] [--quick] [--json FILE] [--window N] [--all-episodes]\n` +
  "  the sections named (default: all), each against a baseline measured in the same run";
const { values: flags, positionals } = scriptArgs(USAGE, {
  allowPositionals: true,
  options: {
    quick: { type: "boolean", default: false },
    json: { type: "string" },
    window: { type: "string", default: "1000" },
    "all-episodes": { type: "boolean", default: false },
  },
});
const unknown = positionals.filter((p) => !(SECTIONS as readonly string[]).includes(p));
if (unknown.length > 0) usageError(USAGE, `unknown section(s) ${unknown.join(", ")}`);
const chosen: Section[] = positionals.length > 0 ? SECTIONS.filter((s) => positionals.includes(s)) : [...SECTIONS];

const started = performance.now();
const elapsed = () => `${((performance.now() - started) / 1000).toFixed(1)}s`;
const opts: BenchOptions & { allEpisodes: boolean } = {
  quick: flags.quick,
  window: wholeFlag(USAGE, "window", flags.window),
  allEpisodes: flags["all-episodes"],
  log: (line) => console.error(`[${elapsed()}] ${line}`),
};

const run: Record<Section, () => Promise<Row[]>> = {
  intake: () => benchIntake(opts),
  busy: () => benchIntakeBusy(opts),
  external: () => benchExternal(opts),
  episodes: () => benchEpisodes(opts),
  latency: () => benchLatency(opts),
  agents: () => benchAgents(opts),
  sessions: () => benchSessions(opts),
  timers: () => benchTimers(opts),
  policy: async () =>
    (await benchPolicy(opts)).map((r) => ({
      section: "policy",
      metric: `${r.metric} (${r.measuredLabel} vs ${r.baselineLabel})`,
      unit: r.unit,
      gateway: r.measured,
      baseline: r.baseline,
      ratio: r.ratio,
      ratioKind: "x" as const,
      target: r.maxRatio === undefined ? "-" : `<= ${r.maxRatio}x`,
      ok: r.maxRatio === undefined ? null : r.ratio <= r.maxRatio,
    })),
  ops: () => benchOps(opts),
  replication: async () => [...(await benchReplication(opts)), ...(await benchReplicationReal(opts))],
  logins: () => benchLogins(opts),
  redeploy: () => benchRedeploy(opts),
  cli: () => benchCli(opts),
  scale: () => benchScale(opts),
};

let interrupted = false;
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.on(sig, () => {
    if (interrupted) return;
    interrupted = true;
    beginShutdown();
    console.error(`bench: ${sig}, cleaning up`);
    void cleanupAll().finally(() => process.exit(130));
  });
}

const HEAD = ["metric", "gateway", "baseline", "ratio", "target", "ok"];
const rows: Row[] = [];
const errors: { section: Section; error: string }[] = [];
for (const section of chosen) {
  if (interrupted) break;
  try {
    const got = await run[section]();
    rows.push(...got);
    console.log(`\n## ${section}\n${table(HEAD, got.map(rowCells))}`);
    for (const r of got.filter((r) => r.note)) console.log(`  ${r.metric}: ${r.note}`);
  } catch (err) {
    const error = err instanceof Error ? err.message : String(err);
    errors.push({ section, error });
    console.log(`\n## ${section}\nFAILED: ${error}`);
  } finally {
    await cleanupAll();
  }
}

console.log(
  `\n## summary (${flags.quick ? "quick" : "full"} run, ${cpus().length} ` +
    `CPUs, Bun ${Bun.version}, ${elapsed()})\n${table(HEAD, rows.map(rowCells))}`,
);
for (const e of errors) console.log(`FAILED ${e.section}: ${e.error}`);

const result = {
  quick: flags.quick,
  sections: chosen,
  machine: { cpus: cpus().length, bun: Bun.version, platform: process.platform },
  seconds: Number(((performance.now() - started) / 1000).toFixed(1)),
  rows,
  errors,
};
if (flags.json) writeFileSync(flags.json, `${JSON.stringify(result, null, 2)}\n`);
else console.log(JSON.stringify(result));
// Idle keep-alive sockets (fetch, mqtt.js) would hold the process open for a while.
process.exit(errors.length > 0 ? 1 : 0);
