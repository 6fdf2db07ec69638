/**
 * `bun run bench replication`: edge replication against a real sqld started here.
 *
 *   drain     backlog drain rows/s (the Replicator: read the local queue, push, confirm) vs raw
 *             batched multi-row INSERTs of the same rows into the same sqld     (target >= 0.5x)
 *   commit    episodes/s through the gateway's commit path with replication on (triggers
 *             queueing + a Replicator pushing meanwhile at the default 2 s interval) vs off
 *             (target >= 0.9x): the same episodes in both modes, round-robin over 1,000 agents that
 *             all committed once before, on/off pairs back to back in alternating order, the
 *             median of the pairs' ratios (a shared box's drift moves both halves of a pair).
 *             Then what "on" left queued is drained and timed: the catch-up row and the
 *             CPU-with-replication row count the push's whole work per episode.
 *   push CPU  this process's CPU per queue entry the drain pushed (read, send, confirm).
 *             In-process commits (test/helpers/ops.ts), no subprocesses: the per-episode
 *             cost of replication is measured against the cheapest episode there is, so a real
 *             episode (a subprocess, ~10 ms) pays relatively less.
 *   queue     replication queue rows written per committed episode                  (target <= 1)
 *   real      episodes/s of real gateways (subprocess per episode, MQTT stimuli) with
 *             `[replication]` pointed at the sqld vs without, interleaved rounds     (target >= 0.9x)
 */
import type { InStatement } from "@libsql/client";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import {
  CENTRAL_MIGRATIONS,
  enableReplication,
  prepareCentral,
  REPLICATED,
  Replicator,
} from "../gateway/replication/index.ts";
import { Sqld } from "../test/helpers/sqld.ts";
import { SyntheticFleet } from "../test/helpers/ops.ts";
import type { BenchOptions, Row } from "./bench/harness.ts";
import { quantile, rateRow } from "./bench/harness.ts";
import { gatewayBatch, type Summary } from "./bench/episodes.ts";
import { collect, connect, json } from "./bench/mqttkit.ts";
import { benchFleet, startGateway } from "./bench/procs.ts";

const quiet = pino({ level: "silent" });

/** Agents the episodes go round-robin over: enough that each commit touches an agent with nothing pending. */
const AGENTS = 1000;

async function fleet(dirs: string[]): Promise<SyntheticFleet> {
  const dir = mkdtempSync(join(tmpdir(), "fleet-bench-repl-"));
  dirs.push(dir);
  return SyntheticFleet.create(dir, {
    types: [{ name: "t", keys: Array.from({ length: AGENTS }, (_, i) => `k${i}`) }],
    keep: 0,
    episodesDays: 30,
    dedupDays: 30,
  });
}

/** `interval_ms`: the default (2 s) for the commit path, as a gateway runs; drain() never waits on it. */
const spec = (url: string, intervalMs = 2000) => ({
  url,
  auth_token_env: null,
  interval_ms: intervalMs,
  batch_rows: 500,
  required: true,
  max_backlog_mb: 1024,
});

/** The same rows written the conventional way: multi-row VALUES, 200 rows a statement, one batch per 3,500 rows. */
async function rawInsert(sqld: Sqld, f: SyntheticFleet): Promise<{ rows: number; ms: number }> {
  const c = sqld.client();
  const ddl = CENTRAL_MIGRATIONS[0]!.statements.filter((s) =>
    /^CREATE TABLE IF NOT EXISTS (episodes|events|checkpoints) /.test(s),
  );
  for (const s of ddl) await c.execute(s.replace(/EXISTS (\w+)/, "EXISTS raw_$1"));
  // Columns later central migrations added to these tables (e.g. checkpoints.state_version).
  for (const m of CENTRAL_MIGRATIONS.slice(1))
    for (const s of m.statements)
      if (/^ALTER TABLE (episodes|events|checkpoints) /.test(s))
        await c.execute(s.replace(/^ALTER TABLE (\w+)/, "ALTER TABLE raw_$1"));
  const tables = [REPLICATED.episodes, REPLICATED.events, REPLICATED.checkpoints];
  const all: { t: (typeof tables)[number]; rows: unknown[][] }[] = [];
  for (const t of tables) {
    const rs = await f.store.client.execute(`SELECT ${t.columns.join(", ")} FROM ${t.name}`);
    all.push({ t, rows: rs.rows.map((r) => ["bench", f.store.gatewayId, ...t.columns.map((_, i) => r[i])]) });
  }
  const stmts: InStatement[] = [];
  for (const { t, rows } of all)
    for (let i = 0; i < rows.length; i += 200) {
      const part = rows.slice(i, i + 200);
      const one = `(${Array.from({ length: t.columns.length + 2 }, () => "?").join(",")})`;
      stmts.push({
        sql: `INSERT INTO raw_${t.name} (fleet, gateway, ${t.columns.join(", ")})
          VALUES ${part.map(() => one).join(",")} ON CONFLICT DO NOTHING`,
        args: part.flat() as never,
      });
    }
  const total = all.reduce((n, a) => n + a.rows.length, 0);
  const started = performance.now();
  const perBatch = 18; // ~3,500 rows
  for (let i = 0; i < stmts.length; i += perBatch) await c.batch(stmts.slice(i, i + perBatch), "write");
  const ms = performance.now() - started;
  c.close();
  return { rows: total, ms };
}

/** Both measurements; a fresh sqld for the run. */
export async function benchReplication(o: BenchOptions): Promise<Row[]> {
  const n = o.quick ? 1500 : 6000;
  const dirs: string[] = [];
  const sqld = await Sqld.start();
  try {
    // ---- drain vs raw ----
    o.log(`replication: ${n} episodes into a local store with the queue on`);
    const f = await fleet(dirs);
    await enableReplication(f.store, sqld.url);
    await f.commit(n, Date.now() - n * 1000, 1000);
    const c = sqld.client();
    await prepareCentral(c, sqld.url);
    c.close();
    o.log("replication: raw batched inserts of the same rows");
    const raw = await rawInsert(sqld, f);
    o.log("replication: draining the backlog");
    const r = new Replicator({ store: f.store, spec: spec(sqld.url), fleet: "bench", log: quiet });
    const drainedEntries = Number((await f.store.client.execute("SELECT count(*) FROM repl_pending")).rows[0]![0]);
    const started = performance.now();
    const drainCpu0 = process.cpuUsage();
    await r.drain();
    const drainMs = performance.now() - started;
    const drainCpu = process.cpuUsage(drainCpu0);
    const drained = r.status().pushed_rows;
    await f.close();
    const drainRate = drained / (drainMs / 1000);
    const rawRate = raw.rows / (raw.ms / 1000);

    // ---- commit path on vs off, interleaved rounds ----
    // Both modes commit the same episodes (same agents, values and clock) into a fresh store;
    // the order alternates per round (off/on, on/off, ...) so drift on a shared box cancels, and
    // the figure is the median round. "on" is measured from the first commit to the last, with
    // its replicator pushing beside them as a gateway's does; what it left for later (its
    // backlog) is then drained and timed too, so the catch-up row counts the whole replication.
    const rounds = o.quick ? 5 : 15;
    const per = o.quick ? 2000 : 12000;
    const on: number[] = [];
    const off: number[] = [];
    const withCatchUp: number[] = [];
    const entries: number[] = [];
    const cpuOn: number[] = [];
    const cpuOff: number[] = [];
    const cpuAll: number[] = [];
    const backlog: number[] = [];
    const t0Round = Date.now() - 4 * per * 1000;
    for (let i = 0; i < rounds; i++) {
      const order = i % 2 === 0 ? (["off", "on"] as const) : (["on", "off"] as const);
      for (const mode of order) {
        const g = await fleet(dirs);
        let rep: Replicator | null = null;
        if (mode === "on") {
          rep = new Replicator({ store: g.store, spec: spec(sqld.url), fleet: `bench-${i}`, log: quiet });
          await rep.start();
        }
        // Every agent exists and has committed once (agent creation queues entries of its own).
        await g.commit(AGENTS, t0Round, 1, 200);
        await rep?.drain();
        const queued = () =>
          g.store.client
            .execute("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'repl_pending'), 0)")
            .then((rs) => Number(rs.rows[0]![0]));
        const q0 = await queued();
        const t0 = performance.now();
        const c0 = process.cpuUsage();
        await g.commit(per, t0Round + 2 * per * 1000, 1000, 200);
        const ms = performance.now() - t0;
        const rate = per / (ms / 1000);
        const c = process.cpuUsage(c0);
        (mode === "on" ? cpuOn : cpuOff).push((c.user + c.system) / per);
        (mode === "on" ? on : off).push(rate);
        if (rep) {
          // Queue rows written per episode (an upsert of a pending entry burns a seq too).
          entries.push(((await queued()) - q0) / per);
          await rep.refresh();
          backlog.push(rep.status().backlog.rows);
          const d0 = performance.now();
          await rep.drain();
          withCatchUp.push(per / ((ms + performance.now() - d0) / 1000));
          const all = process.cpuUsage(c0);
          cpuAll.push((all.user + all.system) / per);
        }
        o.log(`replication: commit ${mode} round ${i + 1}: ${Math.round(rate)} episodes/s`);
        await rep?.stop();
        await g.close();
      }
    }
    // The middle value (the mean of the two middle ones for an even count).
    const median = (xs: number[]) => {
      const s = [...xs].sort((a, b) => a - b);
      const m = Math.floor(s.length / 2);
      return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
    };
    const onRate = median(on);
    const offRate = median(off);
    // Each round's on/off pair ran back to back: the ratio within a pair cancels the box's drift
    // better than a ratio of medians (other load on a shared box moves both halves of a pair alike).
    const pairs = on.map((x, i) => x / off[i]!);
    const pairsCatchUp = withCatchUp.map((x, i) => x / off[i]!);
    return [
      {
        section: "replication",
        metric: "backlog drain vs raw batched INSERTs (same rows, same sqld)",
        unit: "rows/s",
        gateway: drainRate,
        baseline: rawRate,
        ratio: drainRate / rawRate,
        ratioKind: "x",
        target: ">= 0.5x",
        ok: drainRate / rawRate >= 0.5,
        note: `${drained} rows drained in ${Math.round(drainMs)} ms; raw ${raw.rows} rows in ${Math.round(raw.ms)} ms`,
      },
      {
        section: "replication",
        metric: "this process's CPU per queue entry pushed (read locally, send, confirm)",
        unit: "µs",
        gateway: (drainCpu.user + drainCpu.system) / drainedEntries,
        baseline: null,
        ratio: null,
        ratioKind: "+",
        target: "-",
        ok: null,
        note: `the drain above: ${drainedEntries} entries (an episode entry brings ~8 rows); sqld's CPU is not in it`,
      },
      {
        section: "replication",
        metric: "episodes/s on the commit path, replication on vs off",
        unit: "episodes/s",
        gateway: onRate,
        baseline: offRate,
        ratio: median(pairs),
        ratioKind: "x",
        target: ">= 0.9x",
        ok: median(pairs) >= 0.9,
        note:
          `ratio: median of ${rounds} on/off pairs (${pairs.map((x) => x.toFixed(2)).join(", ")}), each pair ` +
          `${per} in-process commits per mode (no subprocess), order alternating; ` +
          `on: ${on.map(Math.round).join(", ")}, off: ${off.map(Math.round).join(", ")}; on = triggers queueing + ` +
          `a Replicator pushing meanwhile (backlog left at the end of a round: ${backlog.join(", ")} entries)`,
      },
      {
        section: "replication",
        metric: "episodes/s on vs off, counting the catch-up drain of what on left queued",
        unit: "episodes/s",
        gateway: median(withCatchUp),
        baseline: offRate,
        ratio: median(pairsCatchUp),
        ratioKind: "x",
        target: "-",
        ok: null,
        note:
          "on: commits + the time to drain the backlog they left (every committed row is at the center); " +
          `median of the pairs ${pairsCatchUp.map((x) => x.toFixed(2)).join(", ")}`,
      },
      {
        section: "replication",
        metric: "this process's CPU per committed episode, replication on vs off",
        unit: "µs",
        gateway: median(cpuOn),
        baseline: median(cpuOff),
        ratio: median(cpuOn) - median(cpuOff),
        ratioKind: "+",
        target: "-",
        ok: null,
        note: "CPU time is less sensitive than episodes/s to other load on the machine; sqld's own CPU is not in it",
      },
      {
        section: "replication",
        metric: "this process's CPU per episode with its replication done (commit + push, on) vs off",
        unit: "µs",
        gateway: median(cpuAll),
        baseline: median(cpuOff),
        ratio: median(cpuAll) - median(cpuOff),
        ratioKind: "+",
        target: "-",
        ok: null,
        note: "on includes the catch-up drain: the push's whole cost per row on the gateway side",
      },
      {
        section: "replication",
        metric: `replication queue rows written per committed episode (${AGENTS} agents)`,
        unit: "rows",
        gateway: median(entries),
        baseline: null,
        ratio: null,
        ratioKind: "+",
        target: "<= 1",
        ok: median(entries) <= 1,
      },
    ];
  } finally {
    await sqld.dispose();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
}

/**
 * Real episodes (a subprocess each, stimuli over MQTT), one gateway replicating to a sqld and
 * one not, in interleaved rounds (order alternating): what replication costs an episode as
 * operators run them, where the commit-path row above measures the cheapest episode there is.
 */
export async function benchReplicationReal(o: BenchOptions): Promise<Row[]> {
  const rounds = o.quick ? 4 : 6;
  const perRound = o.quick ? 20 : 60;
  o.log(`replication (real episodes): ${rounds} interleaved rounds of ${perRound} episodes, on vs off`);
  const sqld = await Sqld.start();
  const base = benchFleet({ maxConcurrent: 4 });
  const on = await startGateway("repl-real-on", `${base}\n[replication]\nurl = ${JSON.stringify(sqld.url)}\n`);
  const off = await startGateway("repl-real-off", base);
  try {
    const gws = { on, off };
    const ends = await Promise.all(
      (["on", "off"] as const).map(async (k) => {
        const client = await connect(gws[k].mqttPort, `bench-repl-${k}`);
        const summaries = await collect(client, "fleet/episodes", (_t, p) => json<Summary>(p));
        await gatewayBatch(client, summaries, "w", 8, o.window);
        return [k, { client, summaries }] as const;
      }),
    );
    const ends2 = Object.fromEntries(ends) as Record<"on" | "off", (typeof ends)[number][1]>;
    const rates = { on: [] as number[], off: [] as number[] };
    const ratios: number[] = [];
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? (["on", "off"] as const) : (["off", "on"] as const);
      for (const k of order) {
        const { client, summaries } = ends2[k];
        rates[k].push((await gatewayBatch(client, summaries, `r${r}`, perRound, o.window)).rate);
      }
      ratios.push(rates.on.at(-1)! / rates.off.at(-1)!);
      o.log(`  round ${r + 1}: on ${rates.on.at(-1)!.toFixed(1)}/s, off ${rates.off.at(-1)!.toFixed(1)}/s`);
    }
    for (const { client, summaries } of Object.values(ends2)) {
      summaries.close();
      client.end(true);
    }
    // The replicating gateway really pushed: its last push succeeded and the center holds its episodes.
    const metrics = await (await fetch(`http://127.0.0.1:${on.httpPort}/metrics`, { headers: on.headers })).text();
    if (!/^fleet_replication_up(\{[^}]*\})? 1$/m.test(metrics))
      throw new Error("the replicating gateway's last push did not succeed (fleet_replication_up is not 1)");
    const central = sqld.client();
    const held = Number((await central.execute("SELECT count(*) AS n FROM episodes")).rows[0]?.n ?? 0);
    central.close();
    if (held === 0) throw new Error("the central server holds no episode of the replicating gateway");
    o.log(`  the center holds ${held} episodes of the replicating gateway`);
    const row = rateRow(
      "replication",
      "episodes/s of real episodes (subprocess each), replication on vs off",
      "/s",
      quantile(rates.on, 0.5),
      quantile(rates.off, 0.5),
      0.9,
      `two gateways, one replicating to the sqld; ${rounds} interleaved rounds of ${perRound}; ` +
        `median of the rounds' ratios ${quantile(ratios, 0.5).toFixed(2)}x`,
    );
    return [row];
  } finally {
    await Promise.all([on.stop(), off.stop()]);
    await sqld.dispose();
  }
}

if (import.meta.main) {
  console.error("bench-replication: a section of the bench; run `bun scripts/bench.ts replication`");
  process.exit(2);
}
