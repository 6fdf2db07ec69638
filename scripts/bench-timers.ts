/**
 * Timer scale check: 1,000 agents of one type with `every = "1s"` on the real
 * gateway process. One scheduler must record 1,000 timer stimuli a second without waking
 * the gateway 1,000 times a second.
 *
 *   bun scripts/bench-timers.ts [--quick] [--agents N] [--seconds S]
 *
 * Phases, each on the gateway process (`bun gateway/cli/main.ts start`, its own data dir):
 *   baseline  the same 1,000 agents without a timer: the idle gateway's CPU and wake-ups
 *   running   timers firing while episodes run (a subprocess each; they lag far behind
 *             1,000/s, that is the episode rate, not the timer's)
 *   paused    every agent paused over HTTP: fires still record durably (paused stimuli
 *             wait), no episodes run, so CPU is intake + scheduler alone, split into the
 *             300 ms after each fire and the 300 ms before the next (idle)
 * Timer stimuli are counted in the store (`stimuli` rows of kind timer by scheduled time);
 * CPU is utime+stime of the gateway process from /proc/<pid>/stat (its episode
 * subprocesses not included); wake-ups are its threads' voluntary context switches.
 *
 * `benchTimers` is the section scripts/bench.ts can call; run directly it prints a table.
 */
import { Database } from "bun:sqlite";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { scriptArgs, wholeFlag } from "./bench/cli.ts";
import { cleanupAll, fmt, table, type BenchOptions, type Row } from "./bench/harness.ts";
import { NOOP_AGENT, startGateway, type GatewayProc } from "./bench/procs.ts";
import { STATUS_COMMITTED } from "../gateway/store/index.ts";

const CLK_TCK = 100; // getconf CLK_TCK on Linux
/** CPU in the first FIRE_WINDOW_MS of each second counts as fire work, in the last IDLE_WINDOW_MS as idle. */
const FIRE_WINDOW_MS = 300;
const IDLE_WINDOW_MS = 300;
const SECTION = "timers";

function fleetToml(agents: number, timer: boolean): string {
  const keys = Array.from({ length: agents }, (_, i) => JSON.stringify(`t${i}`)).join(", ");
  return `[fleet]
name = "bench-timers"
max_concurrent_episodes = 4
synchronous = "normal"
drain_timeout_ms = 2000

[broker]
host = "127.0.0.1"

[http]
host = "127.0.0.1"

[agents.tick]
module = ${JSON.stringify(NOOP_AGENT)}
instances = [${keys}]
${timer ? 'every = "1s"\ncatch_up = "none"\n' : ""}max_queue = 100000

[agents.tick.budget]
episodes_per_hour = 10000000
episode_timeout_ms = 10000
memory_mb = 128
`;
}

/** utime+stime of a process, in ms. */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
  return ((Number(f[11]) + Number(f[12])) * 1000) / CLK_TCK;
}

/** Voluntary context switches summed over the process's threads: how often it slept and woke. */
function wakeups(pid: number): number {
  let n = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const m = /voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/task/${tid}/status`, "utf8"));
      n += m ? Number(m[1]) : 0;
    } catch {
      // thread exited
    }
  }
  return n;
}

interface Sampled {
  readonly seconds: number;
  readonly cpuPct: number;
  readonly wakeupsPerS: number;
  /**
   * CPU in the FIRE_WINDOW_MS after each second boundary, and in the IDLE_WINDOW_MS before the next, as % of that time.
   */
  readonly firePct: number;
  readonly idlePct: number;
  readonly cpuMsPerSecond: number;
  readonly from: number;
  readonly to: number;
}

/** Sample the gateway's CPU every 50 ms for `seconds`, starting on a second boundary. */
async function sample(gw: GatewayProc, seconds: number): Promise<Sampled> {
  await Bun.sleep(1000 - (Date.now() % 1000) + 5);
  const from = Date.now();
  const cpu0 = cpuMs(gw.pid);
  const wake0 = wakeups(gw.pid);
  let prevT = from;
  let prevCpu = cpu0;
  let fireCpu = 0;
  let fireMs = 0;
  let idleCpu = 0;
  let idleMs = 0;
  while (Date.now() - from < seconds * 1000) {
    await Bun.sleep(50);
    const t = Date.now();
    const c = cpuMs(gw.pid);
    // Attribute the interval by where its midpoint lies relative to the last fire (second boundary).
    const phase = ((prevT + t) / 2) % 1000;
    if (phase < FIRE_WINDOW_MS) {
      fireCpu += c - prevCpu;
      fireMs += t - prevT;
    } else if (phase >= 1000 - IDLE_WINDOW_MS) {
      idleCpu += c - prevCpu;
      idleMs += t - prevT;
    }
    prevT = t;
    prevCpu = c;
  }
  const to = Date.now();
  const wall = (to - from) / 1000;
  return {
    seconds: wall,
    cpuPct: ((prevCpu - cpu0) / 1000 / wall) * 100,
    wakeupsPerS: (wakeups(gw.pid) - wake0) / wall,
    firePct: fireMs > 0 ? (fireCpu / fireMs) * 100 : 0,
    idlePct: idleMs > 0 ? (idleCpu / idleMs) * 100 : 0,
    cpuMsPerSecond: (prevCpu - cpu0) / wall,
    from,
    to,
  };
}

/**
 * What was recorded for the fire slots (whole seconds) in [from, to): stimuli, their lateness, and episodes committed
 * meanwhile.
 */
function recorded(
  gw: GatewayProc,
  from: number,
  to: number,
): { slots: number; stimuli: number; fires: number; latenessP50: number; latenessMax: number; episodes: number } {
  const db = new Database(join(gw.dataDir, "fleet.db"), { readonly: true });
  try {
    const first = Math.ceil(from / 1000) * 1000;
    const end = Math.ceil(to / 1000) * 1000;
    const lo = `timer:${first}`;
    const hi = `timer:${end}`;
    const rows = db
      .query<{ sid: string; n: number; at: number }, [string, string]>(
        "SELECT sid, count(*) AS n, max(received_at) AS at FROM stimuli " +
          "WHERE kind = 'timer' AND sid >= ? AND sid < ? GROUP BY sid",
      )
      .all(lo, hi);
    const late = rows.map((r) => r.at - Number(r.sid.slice(6))).sort((a, b) => a - b);
    const episodes =
      db
        .query<{ n: number }, [number, number]>(
          `SELECT count(*) AS n FROM episodes WHERE status = ${STATUS_COMMITTED} AND ended_at >= ? AND ended_at < ?`,
        )
        .get(from, to)?.n ?? 0;
    return {
      slots: (end - first) / 1000,
      stimuli: rows.reduce((s, r) => s + r.n, 0),
      fires: rows.length,
      latenessP50: late[Math.floor(late.length / 2)] ?? NaN,
      latenessMax: late.at(-1) ?? NaN,
      episodes,
    };
  } finally {
    db.close();
  }
}

async function waitFor(what: string, check: () => Promise<boolean> | boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timers: timed out waiting for ${what}`);
    await Bun.sleep(100);
  }
}

/** A rate against the expected rate ("x"), or a cost against the timer-less gateway ("+"). */
function row(
  kind: "x" | "+",
  metric: string,
  unit: string,
  gateway: number,
  baseline: number | null,
  target: string,
  ok: boolean | null,
  note?: string,
): Row {
  const ratio =
    baseline === null ? null : kind === "x" ? (baseline === 0 ? null : gateway / baseline) : gateway - baseline;
  return {
    section: SECTION,
    metric,
    unit,
    gateway,
    baseline,
    ratio,
    ratioKind: kind,
    target,
    ok,
    ...(note ? { note } : {}),
  };
}

/** The timer scale section: rows with the expected rate or the timer-less gateway as baseline. */
export async function benchTimers(o: BenchOptions & { agents?: number; seconds?: number }): Promise<Row[]> {
  const agents = o.agents ?? 1000;
  const seconds = o.seconds ?? (o.quick ? 5 : 10);

  o.log(`timers: baseline, ${agents} agents without a timer, ${seconds} s idle`);
  const idle = await startGateway("timers-idle", fleetToml(agents, false));
  await Bun.sleep(1500); // startup work (retained statuses, first health) out of the way
  const base = await sample(idle, seconds);
  await idle.stop();

  o.log(`timers: ${agents} agents with every = "1s", episodes running, ${seconds} s`);
  const gw = await startGateway("timers", fleetToml(agents, true));
  const countFires = () => {
    const db = new Database(join(gw.dataDir, "fleet.db"), { readonly: true });
    try {
      return (
        db.query<{ n: number }, []>("SELECT count(DISTINCT sid) AS n FROM stimuli WHERE kind = 'timer'").get()?.n ?? 0
      );
    } finally {
      db.close();
    }
  };
  await waitFor("the first fire", () => countFires() > 0, 30_000);
  const run = await sample(gw, seconds);
  await Bun.sleep(1500); // the window's last fire may still be committing
  const runRec = recorded(gw, run.from, run.to);

  o.log(`timers: pausing all ${agents} agents over HTTP`);
  for (let i = 0; i < agents; i += 50) {
    await Promise.all(
      Array.from({ length: Math.min(50, agents - i) }, (_, j) => gw.api(`/api/agents/tick/t${i + j}/pause`, "POST")),
    );
  }
  await waitFor(
    "running episodes to finish",
    async () => (await gw.api<{ running_episodes: number }>("/api/fleet")).running_episodes === 0,
    60_000,
  );
  await Bun.sleep(1000);
  o.log(`timers: paused, fires queue durably, ${seconds} s`);
  const paused = await sample(gw, seconds);
  await Bun.sleep(1500);
  const pausedRec = recorded(gw, paused.from, paused.to);
  const health = await gw.api<{ queued_stimuli: number }>("/api/fleet");
  await gw.stop();

  const expectedRate = agents;
  // Stimuli per scheduled second: each whole second in the window is one fire slot.
  const rate = (r: { stimuli: number; slots: number }) => r.stimuli / r.slots;
  const fullFires = (r: { stimuli: number; fires: number; slots: number }) =>
    `${r.fires} of ${r.slots} fire slots, ${r.stimuli} stimuli ` +
    `(${r.fires > 0 ? fmt(r.stimuli / r.fires) : "-"} per fire)`;
  return [
    row(
      "x",
      "timer stimuli/s recorded, episodes running",
      "/s",
      rate(runRec),
      expectedRate,
      ">= 0.95x expected",
      rate(runRec) >= 0.95 * expectedRate,
      fullFires(runRec),
    ),
    row(
      "x",
      "timer stimuli/s recorded, agents paused",
      "/s",
      rate(pausedRec),
      expectedRate,
      ">= 0.95x expected",
      rate(pausedRec) >= 0.95 * expectedRate,
      `${fullFires(pausedRec)}; ${health.queued_stimuli} stimuli waiting durably at the end`,
    ),
    row(
      "x",
      "episodes committed/s while firing",
      "/s",
      runRec.episodes / run.seconds,
      expectedRate,
      "- (subprocess-bound)",
      null,
      "one fresh Bun subprocess per episode: the backlog grows, the timer does not slow down",
    ),
    row(
      "x",
      "fire lateness p50 (recorded - scheduled)",
      "ms",
      runRec.latenessP50,
      null,
      "-",
      null,
      `max ${fmt(runRec.latenessMax)} ms running, p50 ` +
        `${fmt(pausedRec.latenessP50)} / max ${fmt(pausedRec.latenessMax)} ms paused`,
    ),
    row(
      "+",
      "gateway CPU, episodes running",
      "%",
      run.cpuPct,
      base.cpuPct,
      "-",
      null,
      "includes spawning, IPC and committing episodes; subprocess CPU not counted",
    ),
    row(
      "+",
      "gateway CPU, paused (intake + scheduler)",
      "%",
      paused.cpuPct,
      base.cpuPct,
      "-",
      null,
      `${fmt(paused.cpuMsPerSecond)} ms CPU per fire of ${agents} stimuli`,
    ),
    row(
      "+",
      `gateway CPU in the ${FIRE_WINDOW_MS} ms after each fire, paused`,
      "%",
      paused.firePct,
      base.firePct,
      "-",
      null,
    ),
    row(
      "+",
      `gateway CPU in the ${IDLE_WINDOW_MS} ms before each fire, paused (idle)`,
      "%",
      paused.idlePct,
      base.idlePct,
      "<= +5 %",
      paused.idlePct - base.idlePct <= 5,
    ),
    row(
      "+",
      "gateway wake-ups/s (voluntary context switches), paused",
      "/s",
      paused.wakeupsPerS,
      base.wakeupsPerS,
      `< ${agents}/s (one scheduler)`,
      paused.wakeupsPerS < agents,
    ),
  ];
}

if (import.meta.main) {
  const usage = `usage: bun scripts/bench-timers.ts [--quick] [--agents 1000] [--seconds S]
  1,000 agents (--agents) on a 1 s timer: stimuli recorded per second and the gateway's wake-ups`;
  const { values } = scriptArgs(usage, {
    options: { quick: { type: "boolean", default: false }, agents: { type: "string" }, seconds: { type: "string" } },
  });
  const num = (flag: "agents" | "seconds") => {
    const raw = values[flag];
    return raw === undefined ? undefined : wholeFlag(usage, flag, raw);
  };
  const started = performance.now();
  const log = (line: string) => console.error(`[${((performance.now() - started) / 1000).toFixed(1)}s] ${line}`);
  for (const sig of ["SIGINT", "SIGTERM"] as const)
    process.on(sig, () => void cleanupAll().finally(() => process.exit(130)));
  try {
    const rows = await benchTimers({
      quick: values.quick === true,
      window: 1000,
      log,
      agents: num("agents"),
      seconds: num("seconds"),
    });
    const cells = rows.map((r) => {
      const unit = r.unit === "%" ? "%" : r.unit ? ` ${r.unit}` : "";
      return [
        r.metric,
        `${fmt(r.gateway)}${unit}`,
        r.baseline === null ? "-" : `${fmt(r.baseline)}${unit}`,
        r.ratio === null
          ? "-"
          : r.ratioKind === "x"
            ? `${r.ratio.toFixed(2)}x`
            : `${r.ratio >= 0 ? "+" : ""}${fmt(r.ratio)}${unit}`,
        r.target,
        r.ok === null ? "-" : r.ok ? "yes" : "NO",
      ];
    });
    console.log(
      `\n## timers (1 s interval; baseline = expected rate, or the same gateway without a ` +
        `timer)\n${table(["metric", "gateway", "baseline/expected", "ratio", "target", "ok"], cells)}`,
    );
    for (const r of rows.filter((x) => x.note)) console.log(`  ${r.metric}: ${r.note}`);
  } finally {
    await cleanupAll();
  }
  process.exit(0);
}
