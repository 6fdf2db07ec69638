/**
 * (sessions) the cost of durable broker sessions (issue 12): episodes/s with
 * `[broker] persistence = "libsql"` (sessions, queues and retained messages in broker.db)
 * vs `"memory"` (aedes' default), each gateway with one online clean = false subscriber to
 * every output and status, so each output also goes through the persistence's queue
 * (enqueue, messageId update, PUBACK clear). Interleaved rounds, medians. Then gateway RSS
 * with 10,000 agents (their retained statuses on disk vs in aedes' memory).
 */
import { connectAsync, type MqttClient } from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { cpuMs, defer, deltaRow, quantile, rateRow, until } from "./harness.ts";
import { gatewayBatch, type Summary } from "./episodes.ts";
import { collect, connect, json, type Collector } from "./mqttkit.ts";
import { benchFleet, startGateway, type GatewayProc } from "./procs.ts";

const CONCURRENCY = 4;
const ROUNDS = 5;
/**
 * Episodes each gateway runs before the rounds. With 8, JSC was still compiling both gateways
 * through the rounds (JIT threads 1-4.7 ms per episode, rates rising 16 -> 35/s round by round),
 * and the libsql gateway, with more code to compile, paid more of it: the row measured warm-up.
 */
const WARM_EPISODES = 300;
type Persistence = "libsql" | "memory";

const fleetWith = (p: Persistence, o: { instances?: readonly string[] } = {}): string =>
  benchFleet({ maxConcurrent: CONCURRENCY, ...o }).replace(
    '[broker]\nhost = "127.0.0.1"\n',
    `[broker]\nhost = "127.0.0.1"\npersistence = "${p}"\n`,
  );

/** A device that keeps a session (clean = false) and takes every output and status at QoS 1. */
async function durableSubscriber(port: number, id: string): Promise<{ client: MqttClient; received: () => number }> {
  const client = await connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: `${id}-${process.pid}`,
    protocolVersion: 4,
    clean: false,
    reconnectPeriod: 0,
  });
  defer(() => new Promise<void>((resolve) => client.end(true, {}, () => resolve())));
  let n = 0;
  client.on("message", () => n++);
  await client.subscribeAsync(["fleet/agents/+/+/out", "fleet/agents/+/+/status"], { qos: 1 });
  return { client, received: () => n };
}

async function settledRssMb(gw: GatewayProc): Promise<number> {
  await Bun.sleep(2000);
  const kb = gw.rssKb();
  if (kb === null) throw new Error("sessions: the gateway is gone");
  return kb / 1024;
}

/** Run section (sessions). */
export async function benchSessions(o: BenchOptions): Promise<Row[]> {
  const k = o.quick ? 60 : 300;
  const perRound = Math.round(k / ROUNDS);
  o.log(`sessions: ${ROUNDS} interleaved rounds of ${perRound} episodes, libsql vs memory broker persistence`);
  const gws = {} as Record<Persistence, { gw: GatewayProc; client: MqttClient; summaries: Collector<Summary> }>;
  for (const p of ["libsql", "memory"] as const) {
    const gw = await startGateway(`sessions-${p}`, fleetWith(p));
    const client = await connect(gw.mqttPort, `bench-sessions-${p}`);
    const summaries = await collect(client, "fleet/episodes", (_t, pl) => json<Summary>(pl));
    await durableSubscriber(gw.mqttPort, `bench-durable-${p}`);
    const warm = o.quick ? 8 : WARM_EPISODES;
    const before = cpuMs(gw.pid).self;
    await gatewayBatch(client, summaries, "w", warm, o.window);
    o.log(
      `  ${p}: warm-up of ${warm} episodes, ${((cpuMs(gw.pid).self - before) / warm).toFixed(1)} ms CPU per episode`,
    );
    gws[p] = { gw, client, summaries };
  }
  const rates: Record<Persistence, number[]> = { libsql: [], memory: [] };
  // The gateway's own CPU per episode: steadier than wall-clock rates on a shared machine.
  const cpu: Record<Persistence, number> = { libsql: 0, memory: 0 };
  for (let round = 0; round < ROUNDS; round++) {
    const order: Persistence[] = round % 2 === 0 ? ["libsql", "memory"] : ["memory", "libsql"];
    for (const p of order) {
      const { gw, client, summaries } = gws[p];
      const before = cpuMs(gw.pid).self;
      rates[p].push((await gatewayBatch(client, summaries, `r${round}s`, perRound, o.window)).rate);
      cpu[p] += cpuMs(gw.pid).self - before;
    }
    o.log(
      `  round ${round + 1}: libsql ${rates.libsql.at(-1)!.toFixed(1)}/s, memory ${rates.memory.at(-1)!.toFixed(1)}/s`,
    );
  }
  for (const p of ["libsql", "memory"] as const) {
    gws[p].summaries.close();
    await gws[p].gw.stop();
  }

  const agents = o.quick ? 1_000 : 10_000;
  const keys = Array.from({ length: agents }, (_, i) => `a${i}`);
  const rss = {} as Record<Persistence, number>;
  for (const p of ["memory", "libsql"] as const) {
    const gw = await startGateway(`sessions-rss-${p}`, fleetWith(p, { instances: keys }));
    // Every agent's status is retained: wait until a subscriber to them all sees each one.
    const client = await connect(gw.mqttPort, `bench-sessions-rss-${p}`);
    const statuses = await collect(client, "fleet/agents/bench/+/status", (t) => t);
    await until(`${agents} retained statuses`, () => (new Set(statuses.matched).size >= agents ? true : null), 120_000);
    statuses.close();
    client.end(true);
    rss[p] = await settledRssMb(gw);
    o.log(`  ${agents} agents, persistence ${p}: ${rss[p].toFixed(1)} MB RSS`);
    await gw.stop();
  }
  return [
    rateRow(
      "sessions",
      "episodes/s, libsql broker persistence vs memory",
      "/s",
      quantile(rates.libsql, 0.5),
      quantile(rates.memory, 0.5),
      0.9,
      "one online clean = false subscriber to every out and status topic on each gateway; median of rounds",
    ),
    deltaRow(
      "sessions",
      "gateway CPU per episode, libsql vs memory",
      "ms",
      cpu.libsql / (perRound * ROUNDS),
      cpu.memory / (perRound * ROUNDS),
      null,
      "utime+stime of each gateway process over the measured rounds",
    ),
    deltaRow(
      "sessions",
      `gateway RSS with ${agents.toLocaleString("en")} agents, libsql vs memory`,
      "MB",
      rss.libsql,
      rss.memory,
      null,
      "retained statuses in broker.db vs in aedes' memory",
    ),
  ];
}
