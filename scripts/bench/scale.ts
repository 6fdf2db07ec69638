/**
 * (scale) one box with 100,000 agents (issue 13): agents deployed as fleet.toml instances,
 * none of them running.
 *
 *   RSS        gateway RSS with 100,000 agents deployed, 0 episode processes   (target <= 400 MB)
 *   HTTP       `/api/agents?page=` (first and a deep page), the deep page as `?after=` (keyset) and
 *              `/metrics`, p99 (target <= 20 ms); baseline: `/healthz` p99 of the same gateway,
 *              interleaved request by request (the machine's load and the gateway's GC pauses)
 *   restart    the gateway stopped, 1,000,000 episodes of history seeded into its store with
 *              batched INSERTs (episodes, their stimuli, checkpoints, two events each), then
 *              started again on it: spawn to ready (gateway.json written)        (target <= 3 s)
 *
 * Times are wall clock and so include whatever else loads the machine; the restart row's note
 * gives the gateway's own CPU seconds to ready too. `--quick`: 10,000 agents, 100,000 episodes.
 */
import { createClient } from "@libsql/client";
import { dirname, join } from "node:path";
import {
  cpuMs,
  deltaRow,
  descendantPids,
  fmt,
  procStatusKb,
  quantile,
  type BenchOptions,
  type Row,
} from "./harness.ts";
import { pgidOf } from "./agents.ts";
import { benchFleet, startGateway, type GatewayProc } from "./procs.ts";
import { STATUS_COMMITTED, stimulusKind } from "../../gateway/store/index.ts";

const SETTLE_MS = 2000;

/** RSS once three samples 2 s apart agree within 1% (at most two minutes), MB. */
async function steadyRssMb(gw: GatewayProc): Promise<number> {
  const samples: number[] = [];
  const deadline = performance.now() + 120_000;
  for (;;) {
    await Bun.sleep(SETTLE_MS);
    samples.push((gw.rssKb() ?? 0) / 1024);
    const last = samples.slice(-3);
    if (last.length === 3 && Math.max(...last) <= Math.min(...last) * 1.01) return last[2]!;
    if (performance.now() > deadline) return samples.at(-1)!;
  }
}

/**
 * p99 of `n` sequential GETs of `path` and, interleaved with them, of `GET /healthz` on the same
 * gateway (ms): the baseline is what the machine's load and the gateway's own pauses (GC) cost
 * any request in the same moments, so the row shows what the route itself adds.
 */
async function p99(gw: GatewayProc, path: string, n: number): Promise<HttpTimes> {
  const base = `http://127.0.0.1:${gw.httpPort}`;
  const get = async (p: string) => {
    const t = performance.now();
    const res = await fetch(base + p, { headers: gw.headers });
    await res.arrayBuffer();
    if (!res.ok) throw new Error(`scale: GET ${p}: HTTP ${res.status}`);
    return performance.now() - t;
  };
  const route: number[] = [];
  const healthz: number[] = [];
  let cpu0 = 0;
  for (let i = 0; i < n + 5; i++) {
    if (i === 5) cpu0 = cpuMs(gw.pid).self; // the first few warm the connection and caches
    const r = await get(path);
    const h = await get("/healthz");
    if (i < 5) continue;
    route.push(r);
    healthz.push(h);
  }
  const cpu = (cpuMs(gw.pid).self - cpu0) / n;
  return { route: quantile(route, 0.99), healthz: quantile(healthz, 0.99), cpu };
}

/** p99 of a route and of /healthz in the same rounds (ms), and the gateway's CPU per round (ms). */
interface HttpTimes {
  readonly route: number;
  readonly healthz: number;
  /** Gateway CPU time per GET of the route plus its /healthz: what load and GC noise hardly move. */
  readonly cpu: number;
}

/**
 * Seed `episodes` committed episodes over `agents` agents into a stopped gateway's store, as
 * batched INSERT … SELECT over a counter (no episode runs): each with its stimulus (done),
 * its checkpoint and two events. Hashes are random: this history is for load, not for verify.
 */
export async function seedHistory(dbPath: string, agents: number, episodes: number, t0: number): Promise<void> {
  const c = createClient({ url: `file:${dbPath}` });
  try {
    await c.execute("PRAGMA journal_mode = WAL");
    await c.execute("PRAGMA synchronous = NORMAL");
    const spec = String((await c.execute("SELECT hash FROM spec_versions LIMIT 1")).rows[0]?.[0] ?? "spec");
    const step = 50_000;
    for (let from = 0; from < episodes; from += step) {
      const to = Math.min(episodes, from + step) - 1;
      const n = `WITH RECURSIVE n(i) AS (SELECT ${from} UNION ALL SELECT i + 1 FROM n WHERE i < ${to})`;
      const id = "printf('%08x-0000-7000-8000-%012x', i / 4096, i)";
      const agent = `'bench/a' || (i % ${agents})`;
      const at = `${t0} + i * 100`;
      await c.batch(
        [
          `${n} INSERT INTO stimuli (agent, sid, kind, topic, payload, received_at, state, attempts, episode,
            done_at) SELECT ${agent}, 's:' || i, 'mqtt', 'bench/a' || (i % ${agents}) || '/t',
            CAST('{"n":1}' AS BLOB), ${at} - 5, 'done', 1, ${id}, ${at} FROM n`,
          `${n} INSERT INTO checkpoints (hash, agent, seq, parent, episode, spec_version, state, created_at)
            SELECT lower(hex(randomblob(32))), ${agent}, i / ${agents} + 1, NULL, ${id}, '${spec}',
            '{"count":1}', ${at} FROM n`,
          `${n} INSERT INTO episodes (id, agent, stimulus_seq, stimulus_id, spec_version, status, attempt,
            started_at, ended_at, checkpoint, parent, events_hash, event_count, stimulus_kind, log)
            SELECT ${id}, ${agent}, i + 1, 's:' || i, '${spec}', ${STATUS_COMMITTED}, 1, ${at} - 2, ${at},
            lower(hex(randomblob(32))), NULL, lower(hex(randomblob(32))), 2, ${stimulusKind.sql("mqtt")},
            jsonb('[["stimulus",{"kind":"mqtt"}],["end",{"k":"end"}]]') FROM n`,
        ],
        "write",
      );
    }
    await c.execute("PRAGMA wal_checkpoint(TRUNCATE)");
  } finally {
    c.close();
  }
}

/** Run the scale section. */
export async function benchScale(o: BenchOptions): Promise<Row[]> {
  const agents = o.quick ? 10_000 : 100_000;
  const history = o.quick ? 100_000 : 1_000_000;
  const requests = o.quick ? 50 : 200;
  const keys = Array.from({ length: agents }, (_, i) => `a${i}`);
  const toml = benchFleet({ maxConcurrent: 4, instances: keys });

  o.log(`scale: deploying ${fmt(agents)} agents as fleet.toml instances`);
  let began = performance.now();
  const gw = await startGateway("scale", toml);
  const deployS = (performance.now() - began) / 1000;
  // The gateway re-publishes every agent's status in the background after it is up: measure
  // once that is over (RSS steady), and its peak too.
  const rssMb = await steadyRssMb(gw);
  const peakMb = (procStatusKb(gw.pid, "VmHWM") ?? 0) / 1024;
  // Idle warm spares (a fixed pool per type, listed by /api/fleet) are not agents' processes.
  const spares = new Set((await gw.api<{ spares?: number[] }>("/api/fleet")).spares ?? []);
  const procs = descendantPids(gw.pid).filter((p) => !spares.has(pgidOf(p))).length;
  o.log(`  deployed in ${deployS.toFixed(1)} s; RSS ${rssMb.toFixed(0)} MB; ${procs} processes under the gateway`);
  const deep = Math.max(2, Math.floor(agents / 100 / 2));
  // The same deep page as a keyset page: after the last agent of the page before it.
  const after = (await gw.api<{ next_after: string | null }>(`/api/agents?page=${deep - 1}`)).next_after ?? "";
  const first = await p99(gw, "/api/agents?page=1", requests);
  const deepMs = await p99(gw, `/api/agents?page=${deep}`, requests);
  const keyset = await p99(gw, `/api/agents?after=${encodeURIComponent(after)}`, requests);
  const metrics = await p99(gw, "/metrics", requests);
  const ms = (p: HttpTimes) =>
    `${p.route.toFixed(1)} ms (/healthz ${p.healthz.toFixed(1)}; CPU ${p.cpu.toFixed(2)} ms/request)`;
  o.log(
    `  p99: /api/agents page 1 ${ms(first)}, page ${deep} ${ms(deepMs)}, after= ${ms(keyset)}, ` +
      `/metrics ${ms(metrics)}`,
  );
  const dataDir = gw.dataDir;
  await gw.stop();

  o.log(`scale: seeding ${fmt(history)} episodes of history with batched INSERTs`);
  began = performance.now();
  await seedHistory(join(dataDir, "fleet.db"), agents, history, Date.now() - history * 100);
  o.log(`  seeded in ${((performance.now() - began) / 1000).toFixed(1)} s`);

  began = performance.now();
  const again = await startGateway("scale", toml, { dir: dirname(dataDir) });
  const readyS = (performance.now() - began) / 1000;
  const readyCpuS = cpuMs(again.pid).self / 1000;
  await Bun.sleep(SETTLE_MS);
  const rssAfterMb = (again.rssKb() ?? 0) / 1024;
  o.log(
    `  restarted: ready in ${readyS.toFixed(2)} s (${readyCpuS.toFixed(2)} s CPU); RSS ${rssAfterMb.toFixed(0)} MB`,
  );
  await again.stop();

  const a = fmt(agents);
  const row = (metric: string, unit: string, value: number, target: number, note?: string): Row => ({
    section: "scale",
    metric,
    unit,
    gateway: value,
    baseline: null,
    ratio: null,
    ratioKind: "+",
    target: `<= ${fmt(target)}${unit ? ` ${unit}` : ""}`,
    ok: value <= target,
    ...(note ? { note } : {}),
  });
  // Baseline: /healthz p99 in the same rounds; ok still reads the route's own p99 against 20 ms.
  const httpRow = (metric: string, p: HttpTimes): Row => ({
    ...deltaRow("scale", metric, "ms", p.route, p.healthz, null, `gateway CPU ${p.cpu.toFixed(2)} ms per request`),
    target: "<= 20.0 ms",
    ok: p.route <= 20,
  });
  return [
    row(
      `gateway RSS, ${a} agents deployed, statuses re-published`,
      "MB",
      rssMb,
      400,
      `peak ${peakMb.toFixed(0)} MB; first deploy ${deployS.toFixed(1)} s`,
    ),
    row(`processes under the gateway with ${a} agents idle (warm spares aside)`, "", procs, 0),
    httpRow(`/api/agents?page=1 p99, ${a} agents`, first),
    httpRow(`/api/agents?page=${deep} p99, ${a} agents`, deepMs),
    httpRow(`/api/agents?after= (page ${deep}) p99, ${a} agents`, keyset),
    httpRow(`/metrics p99, ${a} agents`, metrics),
    row(
      `restart to ready, ${a} agents + ${fmt(history)} episodes`,
      "s",
      readyS,
      3,
      `${readyCpuS.toFixed(2)} s of gateway CPU; RSS after ${rssAfterMb.toFixed(0)} MB`,
    ),
  ];
}
