/**
 * (busy) Devices first: durable QoS 1 intake while episodes run flat out, against the same
 * gateway's intake while its agents are paused (so no episode competes for the CPU). One
 * gateway, 200 agents, interleaved rounds: pause all, measure; resume all (the backlog keeps
 * every episode slot busy), measure. Target: intake keeps >= 0.6x of its quiet rate.
 */
import type { MqttClient } from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { cpuMs, machineBusyMs, quantile, rateRow } from "./harness.ts";
import { readFileSync } from "node:fs";
import { connect, publishWindowed } from "./mqttkit.ts";
import { benchFleet, type GatewayProc, startGateway } from "./procs.ts";

const TOPICS = 200;
const ROUNDS = 3;

async function rate(client: MqttClient, count: number, window: number, run: string): Promise<number> {
  const r = await publishWindowed(client, count, window, (i) => ({
    topic: `bench/k${i % TOPICS}/t`,
    payload: JSON.stringify({ id: `${run}-${i}`, n: i }),
  }));
  return count / ((r.lastAckAt - r.firstAt) / 1000);
}

async function setAll(gw: GatewayProc, keys: readonly string[], action: "pause" | "resume"): Promise<void> {
  for (let i = 0; i < keys.length; i += 50)
    await Promise.all(keys.slice(i, i + 50).map((k) => gw.api(`/api/agents/bench/${k}/${action}`, "POST")));
}

/** Run the section. */
export async function benchIntakeBusy(o: BenchOptions): Promise<Row[]> {
  const perRound = o.quick ? 1_500 : 4_000;
  const keys = Array.from({ length: TOPICS }, (_, i) => `k${i}`);
  o.log(`intake-busy: ${ROUNDS} rounds of ${perRound} QoS 1 messages, agents paused vs episodes running`);
  const gw = await startGateway("intake-busy", benchFleet({ maxConcurrent: 4, instances: keys }));
  const client = await connect(gw.mqttPort, "bench-busy");
  const quiet: number[] = [];
  const busy: number[] = [];
  let episodes = 0;
  let busyMs = 0;
  // Per phase: the gateway's CPU, and how long its main thread waited for a CPU while runnable.
  // Per phase: the gateway's CPU, its episodes' (reaped children), everything else on the machine
  // (this process, kernel workers, other load), and how long the gateway's main thread waited for a
  // CPU while runnable.
  const zero = () => ({ cpu: 0, children: 0, other: 0, wait: 0, msgs: 0 });
  const spent = { quiet: zero(), busy: zero() };
  const measured = async (phase: keyof typeof spent, run: () => Promise<number>): Promise<number> => {
    const gw0 = cpuMs(gw.pid);
    const all0 = machineBusyMs();
    const wait0 = runQueueWaitMs(gw.pid);
    const r = await run();
    const gw1 = cpuMs(gw.pid);
    const p = spent[phase];
    p.cpu += gw1.self - gw0.self;
    p.children += gw1.children - gw0.children;
    p.other += machineBusyMs() - all0 - (gw1.self - gw0.self) - (gw1.children - gw0.children);
    p.wait += runQueueWaitMs(gw.pid) - wait0;
    p.msgs += perRound;
    return r;
  };
  try {
    await setAll(gw, keys, "pause");
    await rate(client, 500, o.window, "warm");
    for (let round = 0; round < ROUNDS; round++) {
      await setAll(gw, keys, "pause");
      quiet.push(await measured("quiet", () => rate(client, perRound, o.window, `quiet-${round}`)));
      await setAll(gw, keys, "resume");
      // The backlog just queued keeps every episode slot busy while this round publishes.
      const before = await committedEpisodes(gw);
      const began = performance.now();
      busy.push(await measured("busy", () => rate(client, perRound, o.window, `busy-${round}`)));
      busyMs += performance.now() - began;
      const ran = (await committedEpisodes(gw)) - before;
      if (ran === 0) o.log("  warning: no episode committed during the busy round");
      episodes += ran;
      o.log(`  round ${round + 1}: paused ${quiet.at(-1)!.toFixed(0)}, busy ${busy.at(-1)!.toFixed(0)} msg/s`);
    }
  } finally {
    client.end(true);
    await gw.stop();
  }
  // Microseconds per message of one of the phase counters, episodes running vs paused.
  const perMessage = (metric: string, of: "cpu" | "other" | "wait", note: string) =>
    rateRow(
      "intake-busy",
      `${metric} per message, running vs paused`,
      "us",
      (spent.busy[of] * 1000) / spent.busy.msgs,
      (spent.quiet[of] * 1000) / spent.quiet.msgs,
      null,
      note,
    );
  const episodeUs = (spent.busy.children * 1000) / spent.busy.msgs;
  return [
    rateRow(
      "intake-busy",
      "QoS1 intake while episodes run vs agents paused",
      "msg/s",
      quantile(busy, 0.5),
      quantile(quiet, 0.5),
      0.6,
      `same gateway; ${(episodes / (busyMs / 1000)).toFixed(0)} episodes/s ran meanwhile`,
    ),
    perMessage("gateway CPU", "cpu", "all the gateway's own work (episodes' too) over the messages of the phase"),
    perMessage(
      "CPU outside the gateway and its episodes",
      "other",
      `publisher, kernel workers, other load (/proc/stat); episodes took ${episodeUs.toFixed(0)} us/msg`,
    ),
    perMessage("gateway main thread run-queue wait", "wait", "runnable but waiting for a CPU (/proc/<pid>/schedstat)"),
  ];
}

/** How long the process's main thread has waited on a run queue, in ms (0 where schedstat is missing). */
function runQueueWaitMs(pid: number): number {
  try {
    return Number(readFileSync(`/proc/${pid}/schedstat`, "utf8").split(" ")[1]) / 1e6;
  } catch {
    return 0;
  }
}

/** Committed episodes so far, from `fleet_episodes_total` in /metrics. */
async function committedEpisodes(gw: GatewayProc): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`, { headers: gw.headers })).text();
  let n = 0;
  for (const line of text.split("\n"))
    if (line.startsWith("fleet_episodes_total{") && line.includes('outcome="committed"'))
      n += Number(line.split(" ").at(-1));
  return n;
}
