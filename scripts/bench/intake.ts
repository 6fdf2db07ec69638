/**
 * (a) intake: QoS 1 stimuli per second accepted durably by the gateway vs bare brokers,
 * with the same mqtt.js publisher, topics, payloads and in-flight window.
 *
 * All three targets run as subprocesses at once and are measured in interleaved rounds
 * (median per target), so load from elsewhere on the machine hits them alike:
 *  - plain aedes + node:net (the "bare aedes" baseline);
 *  - createEmbeddedBroker with an intake that resolves at once (our broker layer alone);
 *  - the gateway (`fleet start`), whose 200 `bench` agents are declared as instances and
 *    paused over HTTP before publishing, so intake (route, dedup id, group-committed
 *    insert, then PUBACK) is measured without episodes competing for the CPU.
 * Afterwards /api/fleet must count every acked stimulus as queued.
 */
import type { MqttClient } from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { cpuMs, mainThreadMs, quantile, rateRow, threadsMs } from "./harness.ts";
import { connect, publishWindowed } from "./mqttkit.ts";
import { benchFleet, perfRecording, startBareBroker, startGateway } from "./procs.ts";

const TOPICS = 200;
/** Five, not three: the ratio's spread between runs (about ±0.1) was as wide as its margin to the target. */
const ROUNDS = 5;
type Target = "aedes" | "embedded" | "gateway";
const TARGETS: readonly Target[] = ["aedes", "embedded", "gateway"];

function message(run: string) {
  return (i: number) => ({
    topic: `bench/k${i % TOPICS}/t`,
    payload: JSON.stringify({ id: `${run}-${i}`, n: i, value: 20 + (i % 50) }),
  });
}

/** Publish `count` messages; resolves with accepted messages per second (first publish -> last PUBACK). */
async function rate(client: MqttClient, count: number, window: number, run: string): Promise<number> {
  const r = await publishWindowed(client, count, window, message(run));
  return count / ((r.lastAckAt - r.firstAt) / 1000);
}

/** Run section (a). */
export async function benchIntake(o: BenchOptions): Promise<Row[]> {
  // Rounds long enough for every target to reach its steady state: with 7,000-message rounds after
  // 2,000 warm-up messages, bare aedes was still speeding up (42k -> 98k msg/s across the rounds of
  // one run on a 2-core box) and the ratio moved 0.28x-0.51x between runs; with these it is within a
  // few hundredths (0.29x-0.33x in three runs).
  // The warm-up is the same for every target and long enough for the gateway's JIT to be done: after
  // 10,000 messages its compiler threads still took 6 and then 3 us a message (on the publisher's
  // core) through the next 60,000, and about 1 us from then on. The JIT row below shows what is left.
  const count = o.quick ? 6_000 : 150_000;
  const warmup = o.quick ? 500 : 70_000;
  const perRound = Math.round(count / ROUNDS);
  o.log(
    `intake: ${ROUNDS} interleaved rounds of ${perRound} QoS 1 messages over ` +
      `${TOPICS} topics per target, window ${o.window}, after ${warmup} warm-up`,
  );

  const keys = Array.from({ length: TOPICS }, (_, i) => `k${i}`);
  const gw = await startGateway("intake", benchFleet({ maxConcurrent: 1, instances: keys }));
  await Promise.all(keys.map((k) => gw.api(`/api/agents/bench/${k}/pause`, "POST")));
  const aedes = await startBareBroker("aedes");
  const embedded = await startBareBroker("embedded");
  const ports: Record<Target, number> = { aedes: aedes.port, embedded: embedded.port, gateway: gw.mqttPort };
  const pids: Record<Target, number> = { aedes: aedes.pid, embedded: embedded.pid, gateway: gw.pid };
  // CPU the broker process itself spent per accepted message (less noisy than wall time), its main
  // thread's share, and the publisher's (this process): all three share the machine's cores.
  const cpu: Record<Target, number> = { aedes: 0, embedded: 0, gateway: 0 };
  const mainCpu: Record<Target, number> = { aedes: 0, embedded: 0, gateway: 0 };
  const publisherCpu: Record<Target, number> = { aedes: 0, embedded: 0, gateway: 0 };
  const jitCpu: Record<Target, number> = { aedes: 0, embedded: 0, gateway: 0 };

  const clients = {} as Record<Target, MqttClient>;
  const rates: Record<Target, number[]> = { aedes: [], embedded: [], gateway: [] };
  for (const t of TARGETS) {
    clients[t] = await connect(ports[t], `bench-${t}`);
    await rate(clients[t], warmup, o.window, `${t}-warm`);
  }
  // BENCH_PERF_DIR: the gateway's CPU by JS function over the rounds (it is idle in the others').
  const perf = perfRecording("intake", gw.pid);
  for (let round = 0; round < ROUNDS; round++) {
    // Rotate the order so no target always runs first (or right after the gateway's fsyncs).
    for (let j = 0; j < TARGETS.length; j++) {
      const t = TARGETS[(round + j) % TARGETS.length]!;
      const before = {
        self: cpuMs(pids[t]).self,
        main: mainThreadMs(pids[t]),
        jit: threadsMs(pids[t], "JITWorker"),
        publisher: process.cpuUsage(),
      };
      rates[t].push(await rate(clients[t], perRound, o.window, `${t}-r${round}`));
      cpu[t] += cpuMs(pids[t]).self - before.self;
      mainCpu[t] += mainThreadMs(pids[t]) - before.main;
      jitCpu[t] += threadsMs(pids[t], "JITWorker") - before.jit;
      const pub = process.cpuUsage(before.publisher);
      publisherCpu[t] += (pub.user + pub.system) / 1000;
    }
    o.log(`  round ${round + 1}: ${TARGETS.map((t) => `${t} ${rates[t].at(-1)!.toFixed(0)}`).join(", ")} msg/s`);
  }

  await perf?.finish();
  const health = await gw.api<{ queued_stimuli: number; running_episodes: number }>("/api/fleet");
  await gw.stop();
  const expected = warmup + perRound * ROUNDS;
  o.log(
    `  gateway queued after: ${health.queued_stimuli} (expected ` +
      `${expected}), running episodes: ${health.running_episodes}`,
  );
  if (health.queued_stimuli !== expected)
    throw new Error(`intake: gateway acked ${expected} stimuli but reports ${health.queued_stimuli} queued`);

  const med = (t: Target) => quantile(rates[t], 0.5);
  const perMsg = (ms: number) => (ms * 1000) / (perRound * ROUNDS);
  const usPerMsg = (t: Target) => perMsg(cpu[t]);
  return [
    rateRow(
      "intake",
      "QoS1 intake vs plain aedes",
      "msg/s",
      med("gateway"),
      med("aedes"),
      0.5,
      "median of rounds; agents paused; each PUBACK follows a committed row",
    ),
    rateRow(
      "intake",
      "QoS1 intake vs embedded broker, no-op intake",
      "msg/s",
      med("gateway"),
      med("embedded"),
      0.5,
      "isolates routing + durable commit",
    ),
    rateRow(
      "intake",
      "embedded broker (no-op intake) vs plain aedes",
      "msg/s",
      med("embedded"),
      med("aedes"),
      null,
      "cost of packet guard + hooks + ordered acks",
    ),
    rateRow(
      "intake",
      "broker process CPU per message: gateway vs plain aedes",
      "us",
      usPerMsg("gateway"),
      usPerMsg("aedes"),
      null,
      "from /proc/<pid>/stat utime+stime",
    ),
    rateRow(
      "intake",
      "broker process CPU per message: embedded vs plain aedes",
      "us",
      usPerMsg("embedded"),
      usPerMsg("aedes"),
      null,
    ),
    rateRow(
      "intake",
      "broker main thread CPU per message: gateway vs plain aedes",
      "us",
      perMsg(mainCpu.gateway),
      perMsg(mainCpu.aedes),
      null,
      "/proc/<pid>/task/<pid>/stat; the rest of the process is JIT, GC and pool threads",
    ),
    rateRow(
      "intake",
      "broker JIT threads CPU per message: gateway vs plain aedes",
      "us",
      perMsg(jitCpu.gateway),
      perMsg(jitCpu.aedes),
      null,
      "JavaScriptCore's compiler threads during the rounds: near 0 once warm (the warm-up's purpose)",
    ),
    rateRow(
      "intake",
      "publisher CPU per message: gateway rounds vs plain aedes rounds",
      "us",
      perMsg(publisherCpu.gateway),
      perMsg(publisherCpu.aedes),
      null,
      "the bench process's own CPU, on the same cores as the broker",
    ),
  ];
}
