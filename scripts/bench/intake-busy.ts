/**
 * (busy) Devices first: durable QoS 1 intake while episodes run flat out, against the same
 * gateway's intake while its agents are paused (so no episode competes for the CPU), and the
 * episodes' own rate with devices publishing against without. One gateway, 200 agents,
 * interleaved rounds: pause all, publish (measured); resume all and let the backlog run every
 * episode slot for a spell with no intake (episodes alone, measured); publish again while they
 * run (measured, both rates). Target: intake keeps >= 0.6x of its quiet rate.
 *
 * Until s43 a round was 4,000 messages (~0.3 s) published right after the resume: the first
 * episodes had not started when it ended, so the row compared two quiet rounds ("0 episodes/s
 * ran meanwhile" in its note, s40-s42). A round is now long enough for the gateway's burst
 * detection (BURST_WINDOW_MS) to act on it, and starts only once episodes are committing.
 */
import type { MqttClient } from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { cpuMs, machineBusyMs, quantile, rateRow } from "./harness.ts";
import { readFileSync } from "node:fs";
import { connect, publishWindowed } from "./mqttkit.ts";
import { benchFleet, type GatewayProc, startGateway } from "./procs.ts";

const TOPICS = 200;
const ROUNDS = 3;
/** How long episodes run with no intake before each busy round: their rate without devices. */
const ALONE_MS = 2_000;
/** Agents that only take the steady rounds' bursts, paused throughout (their stimuli stay queued). */
const SINKS = 50;
/** Fresh agents per steady round, each given STEADY_EACH stimuli: below FLOOD_BACKLOG, so no flood. */
const STEADY_AGENTS = 150;
const STEADY_EACH = 4;

type Phase = "quiet" | "busy" | "sinkQuiet" | "steady";

async function rate(client: MqttClient, topics: readonly string[], count: number, window: number, run: string) {
  const r = await publishWindowed(client, count, window, (i) => ({
    topic: topics[i % topics.length]!,
    payload: JSON.stringify({ id: `${run}-${i}`, n: i }),
  }));
  return count / ((r.lastAckAt - r.firstAt) / 1000);
}

async function setAll(gw: GatewayProc, keys: readonly string[], action: "pause" | "resume"): Promise<void> {
  for (let i = 0; i < keys.length; i += 50)
    await Promise.all(keys.slice(i, i + 50).map((k) => gw.api(`/api/agents/bench/${k}/${action}`, "POST")));
}

const topicsOf = (keys: readonly string[]) => keys.map((k) => `bench/${k}/t`);

/** Run the section. */
export async function benchIntakeBusy(o: BenchOptions): Promise<Row[]> {
  const perRound = o.quick ? 5_000 : 15_000;
  const keys = Array.from({ length: TOPICS }, (_, i) => `k${i}`);
  const sinks = Array.from({ length: SINKS }, (_, i) => `z${i}`);
  o.log(
    `intake-busy: ${ROUNDS} rounds of ${perRound} QoS 1 messages, agents paused vs episodes running ` +
      "(flooded agents' backlog, and quiet agents')",
  );
  const gw = await startGateway("intake-busy", benchFleet({ maxConcurrent: 4, instances: [...keys, ...sinks] }));
  const client = await connect(gw.mqttPort, "bench-busy");
  const intake: Record<Phase, number[]> = { quiet: [], busy: [], sinkQuiet: [], steady: [] };
  /** Episodes/s while devices publish and in the spells with no intake before, by kind of round. */
  const episodes = {
    busy: [] as number[],
    busyAlone: [] as number[],
    steady: [] as number[],
    steadyAlone: [] as number[],
  };
  // Per phase: the gateway's CPU, its episodes' (reaped children), everything else on the machine
  // (this process, kernel workers, other load), and how long the gateway's main thread waited for a
  // CPU while runnable.
  const zero = () => ({ cpu: 0, children: 0, other: 0, wait: 0, msgs: 0 });
  const spent: Record<Phase, ReturnType<typeof zero>> = {
    quiet: zero(),
    busy: zero(),
    sinkQuiet: zero(),
    steady: zero(),
  };
  /** Publish a round to `topics` as phase `phase`: its intake rate, and what it cost whom. */
  const measured = async (phase: Phase, topics: readonly string[], run: string): Promise<void> => {
    const gw0 = cpuMs(gw.pid);
    const all0 = machineBusyMs();
    const wait0 = runQueueWaitMs(gw.pid);
    const r = await rate(client, topics, perRound, o.window, run);
    const gw1 = cpuMs(gw.pid);
    const p = spent[phase];
    p.cpu += gw1.self - gw0.self;
    p.children += gw1.children - gw0.children;
    p.other += machineBusyMs() - all0 - (gw1.self - gw0.self) - (gw1.children - gw0.children);
    p.wait += runQueueWaitMs(gw.pid) - wait0;
    p.msgs += perRound;
    intake[phase].push(r);
  };
  /** Episodes/s over `run` (or over ALONE_MS with nothing else going on). */
  const episodeRate = async (run: () => Promise<unknown> = () => Bun.sleep(ALONE_MS)): Promise<number> => {
    const before = await committedEpisodes(gw);
    const began = performance.now();
    await run();
    return ((await committedEpisodes(gw)) - before) / ((performance.now() - began) / 1000);
  };
  const line = (xs: number[]) => xs.at(-1)!.toFixed(1);
  try {
    await setAll(gw, [...keys, ...sinks], "pause");
    await rate(client, topicsOf(keys), 500, o.window, "warm");
    for (let round = 0; round < ROUNDS; round++) {
      // Flooded: the 200 agents' backlog (queued while paused) keeps every slot busy, first alone, then
      // while the next round publishes to them; devices first throttles them (flood.ts, devices-first.ts).
      await setAll(gw, keys, "pause");
      await measured("quiet", topicsOf(keys), `quiet-${round}`);
      await measured("sinkQuiet", topicsOf(sinks), `sink-quiet-${round}`);
      await setAll(gw, keys, "resume");
      episodes.busyAlone.push(await episodeRate());
      episodes.busy.push(await episodeRate(() => measured("busy", topicsOf(keys), `busy-${round}`)));
      await setAll(gw, keys, "pause");
      // Quiet agents: a few stimuli each, below a flood's backlog, keep every slot busy while the round
      // publishes to the paused sinks: devices first's throttling of floods does not apply to them.
      const steady = Array.from({ length: STEADY_AGENTS }, (_, i) => `s${round}x${i}`);
      await rate(client, topicsOf(steady), STEADY_AGENTS * STEADY_EACH, o.window, `steady-queue-${round}`);
      episodes.steadyAlone.push(await episodeRate());
      episodes.steady.push(await episodeRate(() => measured("steady", topicsOf(sinks), `steady-${round}`)));
      await setAll(gw, steady, "pause");
      for (const [kind, xs] of Object.entries(episodes))
        if (xs.at(-1) === 0) throw new Error(`no episode committed in round ${round + 1} (${kind})`);
      o.log(
        `  round ${round + 1}: intake paused ${line(intake.quiet)} / ${line(intake.sinkQuiet)} msg/s, ` +
          `flooded running ${line(intake.busy)}, quiet running ${line(intake.steady)}; episodes/s alone ` +
          `${line(episodes.busyAlone)} / ${line(episodes.steadyAlone)}, while devices publish ` +
          `${line(episodes.busy)} / ${line(episodes.steady)}`,
      );
    }
  } finally {
    client.end(true);
    await gw.stop();
  }
  // Microseconds per message of one of the phase counters, episodes running vs paused.
  const perMessage = (
    metric: string,
    of: "cpu" | "other" | "wait",
    note: string,
    [running, paused]: [Phase, Phase] = ["busy", "quiet"],
  ) =>
    rateRow(
      "intake-busy",
      `${metric} per message, ${running === "steady" ? "quiet agents " : ""}running vs paused`,
      "us",
      (spent[running][of] * 1000) / spent[running].msgs,
      (spent[paused][of] * 1000) / spent[paused].msgs,
      null,
      note,
    );
  const episodeUs = (phase: Phase) => ((spent[phase].children * 1000) / spent[phase].msgs).toFixed(0);
  const median = (xs: number[]) => quantile(xs, 0.5);
  return [
    rateRow(
      "intake-busy",
      "QoS1 intake while episodes run vs agents paused",
      "msg/s",
      median(intake.busy),
      median(intake.quiet),
      0.6,
      "same gateway, medians of the rounds; running: 200 agents' backlog keeps every slot busy, and each " +
        `round starts after episodes have committed for ${ALONE_MS / 1000} s with no intake`,
    ),
    rateRow(
      "intake-busy",
      "episodes/s while devices publish vs episodes alone",
      "/s",
      median(episodes.busy),
      median(episodes.busyAlone),
      null,
      "the same rounds: what devices first leaves a backlog (a burst caps flooded agents' episodes at " +
        "burstSlots, under SCHED_IDLE); their stimuli wait, durably",
    ),
    rateRow(
      "intake-busy",
      "QoS1 intake while quiet agents' episodes run vs agents paused",
      "msg/s",
      median(intake.steady),
      median(intake.sinkQuiet),
      0.6,
      `to ${SINKS} paused agents, while ${STEADY_AGENTS} others with ${STEADY_EACH} stimuli each (no flood: ` +
        "no throttling) keep every slot busy",
    ),
    rateRow(
      "intake-busy",
      "quiet agents' episodes/s while devices publish vs alone",
      "/s",
      median(episodes.steady),
      median(episodes.steadyAlone),
      null,
      "the same rounds",
    ),
    perMessage("gateway CPU", "cpu", "all the gateway's own work (episodes' too) over the messages of the phase"),
    perMessage(
      "CPU outside the gateway and its episodes",
      "other",
      `publisher, kernel workers, other load (/proc/stat); episodes took ${episodeUs("busy")} us/msg`,
    ),
    perMessage("gateway main thread run-queue wait", "wait", "runnable but waiting for a CPU (/proc/<pid>/schedstat)"),
    perMessage("gateway CPU", "cpu", "the same, in the quiet agents' rounds", ["steady", "sinkQuiet"]),
    perMessage(
      "CPU outside the gateway and its episodes",
      "other",
      `the same; episodes took ${episodeUs("steady")} us/msg`,
      ["steady", "sinkQuiet"],
    ),
    perMessage("gateway main thread run-queue wait", "wait", "the same", ["steady", "sinkQuiet"]),
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
