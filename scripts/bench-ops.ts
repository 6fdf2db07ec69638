/**
 * Operating a big fleet: what an operator's tools cost once the fleet is large.
 *
 *   bun scripts/bench-ops.ts [--quick] [--json FILE]
 *
 *   http  p50/p99 of GET /metrics and GET /api/agents (pages spread over the whole range,
 *         ?q= search, ?status= and ?type= filters) on a real gateway process serving 10,000
 *         agents (deployed as fleet.toml `instances`: real rows), against GET /healthz on
 *         the same server as the baseline. Sequential requests from this process.
 *   gc    retention throughput (records collected per second) on a store filled with
 *         100,000 committed episodes through the gateway's commit path (test/helpers/ops.ts,
 *         the same fill test/gc.test.ts uses): first bounded background passes (the batch of
 *         the gateway's background rounds, BACKGROUND_GC) at the end of the run, then `fleet gc`'s gcAll once
 *         the clock is past every retention window.
 *
 * `--quick`: 2,000 agents, 50 requests per endpoint, 20,000 episodes. Exports `benchOps`
 * for scripts/bench.ts. Progress on stderr; the tables on stdout, then the rows as JSON.
 */
import { statSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { BACKGROUND_GC, gcAll, gcPass, gcTotal, type GcReport } from "../gateway/ops/index.ts";
import { verifyStore } from "../gateway/ops/index.ts";
import { DAY, SyntheticFleet } from "../test/helpers/ops.ts";
import { scriptArgs } from "./bench/cli.ts";
import { cleanupAll, deltaRow, fmt, quantile, table, tempDir, type BenchOptions, type Row } from "./bench/harness.ts";
import { NOOP_AGENT, startGateway } from "./bench/procs.ts";

/** Options of this bench (the `window` of BenchOptions is unused here). */
export type OpsOptions = Pick<BenchOptions, "quick" | "log">;

function fleetToml(keysPerType: number): string {
  const type = (name: string) => `[agents.${name}]
module = ${JSON.stringify(NOOP_AGENT)}
subscribe = ["${name}/+/t"]
key = "{1}"
instances = [${Array.from({ length: keysPerType }, (_, i) => JSON.stringify(`${name}-${i}`)).join(", ")}]
`;
  return `[fleet]
name = "bench-ops"

[broker]
host = "127.0.0.1"

[http]
host = "127.0.0.1"

${type("meter")}
${type("valve")}`;
}

/** Time `n` sequential GETs of `path(i)` after a short warm-up; milliseconds per request. */
async function timeGets(
  base: string,
  headers: Record<string, string>,
  n: number,
  path: (i: number) => string,
): Promise<number[]> {
  const get = async (p: string) => {
    const res = await fetch(base + p, { headers });
    if (!res.ok) throw new Error(`GET ${p}: HTTP ${res.status}`);
    await res.arrayBuffer();
  };
  for (let i = 0; i < Math.min(20, n); i++) await get(path(i));
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await get(path(i));
    ms.push(performance.now() - t);
  }
  return ms;
}

/** HTTP latency with many agents. */
async function benchHttp(o: OpsOptions): Promise<Row[]> {
  const agents = o.quick ? 2_000 : 10_000;
  const n = o.quick ? 50 : 200;
  const limit = 50;
  o.log(`http: starting a gateway with ${agents} agents (fleet.toml instances)`);
  const gw = await startGateway("ops-http", fleetToml(agents / 2));
  try {
    const fleet = await gw.api<{ agents: { total: number } }>("/api/fleet");
    if (fleet.agents.total !== agents)
      throw new Error(`http: expected ${agents} agents, /api/fleet says ${fleet.agents.total}`);
    // Some variety for the filters: every 50th agent paused by an operator.
    for (let i = 0; i < agents / 2; i += 50) await gw.api(`/api/agents/meter/meter-${i}/pause`, "POST");
    const paused = agents / 2 / 50;
    const base = `http://127.0.0.1:${gw.httpPort}`;
    const pages = agents / limit;
    // a stride prime to the page count: every part of the range
    const spread = (i: number) => 1 + Math.floor((i * 7919) % pages);

    const check = (await (
      await fetch(`${base}/api/agents?status=paused&limit=${limit}`, { headers: gw.headers })
    ).json()) as { total: number };
    if (check.total !== paused) throw new Error(`http: expected ${paused} paused agents, got ${check.total}`);

    const cases: [string, (i: number) => string][] = [
      ["GET /healthz (baseline)", () => "/healthz"],
      ["GET /metrics", () => "/metrics"],
      [
        `GET /api/agents?page=N&limit=${limit} (N over 1..${pages})`,
        (i) => `/api/agents?page=${spread(i)}&limit=${limit}`,
      ],
      [
        `GET /api/agents?q=…&limit=${limit}`,
        (i) => `/api/agents?q=${i % 2 ? "meter" : "valve"}-${(i * 37) % 1000}&limit=${limit}`,
      ],
      [`GET /api/agents?status=paused&limit=${limit}`, () => `/api/agents?status=paused&limit=${limit}`],
      [
        `GET /api/agents?type=valve&page=N&limit=${limit}`,
        (i) => `/api/agents?type=valve&page=${1 + ((i * 13) % (pages / 2))}&limit=${limit}`,
      ],
    ];
    const results: { name: string; p50: number; p99: number }[] = [];
    for (const [name, path] of cases) {
      const ms = await timeGets(base, gw.headers, n, path);
      results.push({ name, p50: quantile(ms, 0.5), p99: quantile(ms, 0.99) });
      o.log(`  ${name}: p50 ${fmt(quantile(ms, 0.5))} ms, p99 ${fmt(quantile(ms, 0.99))} ms`);
    }
    const baseline = results[0]!;
    return results
      .slice(1)
      .flatMap((r) => [
        deltaRow("ops-http", `${r.name} p50, ${fmt(agents)} agents`, "ms", r.p50, baseline.p50, null),
        deltaRow("ops-http", `${r.name} p99, ${fmt(agents)} agents`, "ms", r.p99, baseline.p99, null),
      ]);
  } finally {
    await gw.stop();
  }
}

/** GC throughput on a store of many committed episodes. */
async function benchGc(o: OpsOptions): Promise<Row[]> {
  const episodes = o.quick ? 20_000 : 100_000;
  const dir = tempDir("ops-gc");
  const fleet = await SyntheticFleet.create(dir, {
    types: [
      { name: "meter", keys: ["m1", "m2"] },
      { name: "valve", keys: ["v1", "v2"] },
    ],
    keep: 10,
    episodesDays: 1,
    dedupDays: 1,
  });
  try {
    o.log(`gc: committing ${fmt(episodes)} episodes over 4 days on 4 agents (keep = 10, 1-day retention)`);
    const t0 = Date.UTC(2025, 0, 6);
    const fillStart = performance.now();
    const { last } = await fleet.commit(episodes, t0, (4 * DAY) / episodes);
    const fillSecs = (performance.now() - fillStart) / 1000;
    await fleet.checkpointWal();
    const filledMb = statSync(fleet.dbPath).size / 1e6;
    o.log(
      `  filled in ${fillSecs.toFixed(1)} s (${fmt(episodes / fillSecs)} ` +
        `commits/s); ${JSON.stringify(await fleet.counts())}`,
    );

    // Background passes at the end of the run: most checkpoints tombstoned, older days collected.
    const passMs: number[] = [];
    let background = 0;
    let started = performance.now();
    for (;;) {
      const r = await gcPass(fleet.store, fleet.spec.spec, { now: last + 1, batch: BACKGROUND_GC.batch });
      if (gcTotal(r) === 0) break;
      passMs.push(r.ms);
      background += gcTotal(r);
    }
    const backgroundSecs = (performance.now() - started) / 1000;
    o.log(
      `  ${passMs.length} background passes: ${fmt(background)} records in ${backgroundSecs.toFixed(1)} ` +
        `s; pass p50 ${fmt(quantile(passMs, 0.5))} ms, max ${fmt(Math.max(...passMs))} ms`,
    );

    // `fleet gc` once everything is past retention.
    started = performance.now();
    const all: GcReport = await gcAll(fleet.store, fleet.spec.spec, { now: last + 2 * DAY });
    const allSecs = (performance.now() - started) / 1000;
    o.log(`  gcAll past retention: ${fmt(gcTotal(all))} records in ${allSecs.toFixed(1)} s ${JSON.stringify(all)}`);
    const report = await verifyStore(fleet.store);
    if (report.problems.length > 0)
      throw new Error(
        `gc: verify found ${report.problems.length} problem(s) after ` +
          `collection: ${JSON.stringify(report.problems.slice(0, 3))}`,
      );

    const info = (metric: string, unit: string, value: number, note?: string): Row => ({
      section: "ops-gc",
      metric,
      unit,
      gateway: value,
      baseline: null,
      ratio: null,
      ratioKind: "x",
      target: "-",
      ok: null,
      ...(note ? { note } : {}),
    });
    return [
      info(`store fill through Store.commitEpisode, ${fmt(episodes)} episodes`, "commits/s", episodes / fillSecs),
      info("DB file after the fill", "MB", filledMb),
      info(
        `GC background passes (batch ${BACKGROUND_GC.batch}), records collected`,
        "records/s",
        background / backgroundSecs,
        `${fmt(background)} records in ${passMs.length} passes`,
      ),
      info("GC background pass duration p50", "ms", quantile(passMs, 0.5)),
      info("GC background pass duration max", "ms", Math.max(...passMs)),
      info(
        "GC `fleet gc` (gcAll) past retention, records collected",
        "records/s",
        gcTotal(all) / allSecs,
        `${fmt(gcTotal(all))} records`,
      ),
    ];
  } finally {
    await fleet.close();
  }
}

/** Both sections; rows in scripts/bench.ts's format. */
export async function benchOps(o: OpsOptions): Promise<Row[]> {
  return [...(await benchHttp(o)), ...(await benchGc(o))];
}

if (import.meta.main) {
  const usage = `usage: bun scripts/bench-ops.ts [--quick] [--json FILE]
  p50/p99 of GET /metrics and GET /api/agents with 10,000 agents (--quick: 2,000), and retention throughput;
  --json FILE: the rows as JSON too`;
  const { values: flags } = scriptArgs(usage, {
    options: { quick: { type: "boolean", default: false }, json: { type: "string" } },
  });
  const started = performance.now();
  const log = (line: string) => console.error(`[${((performance.now() - started) / 1000).toFixed(1)}s] ${line}`);
  let code = 0;
  try {
    const rows = await benchOps({ quick: flags.quick === true, log });
    const cells = rows.map((r) => [
      r.metric,
      `${fmt(r.gateway)} ${r.unit}`,
      r.baseline === null ? "-" : `${fmt(r.baseline)} ${r.unit}`,
      r.ratio === null ? "-" : `+${fmt(r.ratio)} ${r.unit}`,
    ]);
    console.log(
      `\n## ops (${flags.quick ? "quick" : "full"} run, ${cpus().length} CPUs, Bun ` +
        `${Bun.version})\n${table(["metric", "gateway", "baseline (/healthz)", "extra"], cells)}`,
    );
    for (const r of rows.filter((r) => r.note)) console.log(`  ${r.metric}: ${r.note}`);
    const result = { quick: flags.quick, rows };
    if (flags.json) writeFileSync(flags.json, `${JSON.stringify(result, null, 2)}\n`);
    else console.log(JSON.stringify(result));
  } catch (err) {
    console.error(`bench-ops: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    code = 1;
  } finally {
    await cleanupAll();
  }
  process.exit(code);
}
