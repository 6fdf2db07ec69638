/**
 * (b) episodes per second and (c) stimulus -> out latency, each against the bare spawn
 * baseline of ./bare.ts (plain, and with the runner's wrapping), interleaved with the
 * gateway's own measurements so background load hits both alike.
 *
 * (b) queues K stimuli for K distinct agents through MQTT (concurrency = the fleet's
 * max_concurrent_episodes = 4) and times first publish -> K-th committed summary on
 * `fleet/episodes`; median over rounds. (c) sends one stimulus at a time to one agent and
 * times the PUBLISH -> its `fleet/agents/bench/lat/out` message; each gateway sample sits
 * between a plain and a wrapped bare sample.
 *
 * (b) also runs the runner alone (./runner-alone.ts: `runEpisode` and its spares driven from the
 * bench, no gateway) in the same rounds, and measures one episode child's own CPU: rows that
 * split the gateway's cost per episode into its own work, the runner's and the child's.
 */
import type { MqttClient } from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { cpuMs, deltaRow, machineBusyMs, mainThreadMs, quantile, rateRow, threadsMs } from "./harness.ts";
import { bareOnce, bareRate, wrappingNote } from "./bare.ts";
import { collect, connect, json, publishWindowed, type Collector } from "./mqttkit.ts";
import { benchFleet, perfRecording, startGateway } from "./procs.ts";
import { childCpu, runnerRate } from "./runner-alone.ts";
import { DEFAULT_WARM_SPARES } from "../../gateway/spec/index.ts";

const CONCURRENCY = 4;
/** Interleaved rounds per target; the rows take the median. Five, not three: one round that meets a busy spell
 *  of the box (it happens: 0.54x once, 0.68-0.73x around it) must not decide the row. */
const ROUNDS = 5;
/** Issue 13's target for the gateway's own CPU per episode (utime + stime of its process), ms. */
const GATEWAY_CPU_TARGET_MS = 1.5;
/**
 * The same target as a ratio to the bare wrapped loop's own CPU per episode, measured in the same run:
 * 1.5 ms beside the 0.5 ms the loop took when the target was set. The ms figure moves ~2x with the
 * speed of the (virtual) box between runs; the ratio does not.
 */
const GATEWAY_CPU_TARGET_RATIO = 3;
/** Gateway episodes run before a full run measures anything, in phases of WARM_PHASE (see benchEpisodes). */
const WARM_EPISODES = 1200;
const WARM_PHASE = 300;

export type Summary = { episode: string; agent: string; status: string; ms: number };

/**
 * Publish one stimulus each to `bench/<prefix><i>/t`; resolves once every one of those
 * agents has a committed episode (summaries are at least once: count agents, not messages).
 */
export async function gatewayBatch(
  client: MqttClient,
  summaries: Collector<Summary>,
  prefix: string,
  k: number,
  window: number,
): Promise<{ rate: number; failed: number }> {
  // Tallied as summaries arrive: the bench shares the cores with the gateway, so it must not
  // rescan every summary so far on a timer while the gateway works.
  const agents = { committed: new Set<string>(), failed: new Set<string>() };
  let seen = summaries.matched.length;
  const tally = () => {
    for (; seen < summaries.matched.length; seen++) {
      const s = summaries.matched[seen]!;
      if (s.agent.startsWith(`bench/${prefix}`) && (s.status === "committed" || s.status === "failed"))
        agents[s.status].add(s.agent);
    }
    return agents.committed.size >= k;
  };
  const began = performance.now();
  await publishWindowed(client, k, window, (i) => ({
    topic: `bench/${prefix}${i}/t`,
    payload: JSON.stringify({ id: `${prefix}${i}`, n: i }),
  }));
  await summaries.when(`${k} committed episodes for bench/${prefix}*`, tally, 120_000);
  return { rate: k / ((performance.now() - began) / 1000), failed: agents.failed.size };
}

/** Run section (b). */
export async function benchEpisodes(o: BenchOptions): Promise<Row[]> {
  const k = o.quick ? 60 : 100 * ROUNDS;
  const perRound = Math.round(k / ROUNDS);
  o.log(
    `episodes: ${ROUNDS} interleaved rounds of ${perRound} stimuli ` +
      `for distinct agents per target, concurrency ${CONCURRENCY}`,
  );

  const gw = await startGateway("episodes", benchFleet({ maxConcurrent: CONCURRENCY }));
  const client = await connect(gw.mqttPort, "bench-episodes");
  const summaries = await collect(client, "fleet/episodes", (_t, p) => json<Summary>(p));
  // Warm-up, measured apart: JSC compiles the gateway's code in tiers over its first thousand or so
  // episodes, while the bare loop is a few lines that are hot at once. Measured on a 2-core box in
  // phases of 400: 5.9, 4.7, 4.1, 4.1, 4.0 ms per episode, the JIT threads' share falling from 0.9
  // to 0.3 ms (big FTL compiles, 30-100 ms each, still come now and then after 3,000). A gateway runs
  // for days, so the rows compare steady states; each warm-up phase is logged: a run shows its curve.
  const warm = o.quick ? 8 : WARM_EPISODES;
  const phases: string[] = [];
  for (let done = 0, phase = 0; done < warm; phase++) {
    const n = Math.min(WARM_PHASE, warm - done);
    const before = { cpu: cpuMs(gw.pid).self, jit: threadsMs(gw.pid, "JITWorker") };
    await gatewayBatch(client, summaries, `w${phase}e`, n, o.window);
    done += n;
    const cpu = (cpuMs(gw.pid).self - before.cpu) / n;
    phases.push(`${cpu.toFixed(1)} (JIT ${((threadsMs(gw.pid, "JITWorker") - before.jit) / n).toFixed(1)})`);
  }
  const warmPer = phases.join(", ");
  o.log(`  warm-up: ${warm} episodes in phases of ${WARM_PHASE}, gateway CPU ms per episode: ${warmPer}`);
  await bareRate("plain", 8, CONCURRENCY);
  await bareRate("wrapped", 8, CONCURRENCY);
  // The runner alone warms up in this process as the gateway did in its own.
  await runnerRate(o.quick ? 8 : 100, CONCURRENCY);

  const rates = { plain: [] as number[], wrapped: [] as number[], gateway: [] as number[], runner: [] as number[] };
  // CPU the spawning process itself spends per episode, ms. (Children's CPU is not comparable:
  // bwrap's inner processes are reaped outside the gateway, so cutime misses them.)
  const cpu = { plain: 0, wrapped: 0, gateway: 0, runner: 0 };
  // And what the whole machine spent per episode: episode children, bwrap, the kernel, the bench.
  const machine = { plain: 0, wrapped: 0, gateway: 0, runner: 0 };
  // The spawning process's main thread (its JS: the gateway's, or the runner's in this process) and
  // JavaScriptCore's compiler threads: where the rest of its CPU goes is GC, the allocator and pools.
  // By thread name (/proc/<pid>/task/*/comm, a 60 s window of this section), the gateway's were: main
  // 3.31 s, mi-scavenger 0.53 s (mimalloc returning pages to the kernel, mostly system time),
  // JITWorker 0.38 s, HeapHelper 0.19 s. Keeping the pages longer (MIMALLOC_PURGE_DELAY=1000, with and
  // without MIMALLOC_PURGE_HOLES=0; the default delay is 100 ms) did not move the gateway's CPU per
  // episode: 5.70 and 5.48 ms against 5.52 and 5.78 ms with the defaults, alternating runs. Nor did
  // 10000 or MIMALLOC_PURGE_DECOMMITS=0 (2026-12-07). Never purging (MIMALLOC_PURGE_DELAY=-1) stops the
  // scavenger and saved 1.3 ms an episode on average over four pairs of runs, and costs RSS:
  // docs/performance.md has the trade.
  const main = { plain: 0, wrapped: 0, gateway: 0, runner: 0 };
  const jit = { plain: 0, wrapped: 0, gateway: 0, runner: 0 };
  // mimalloc's scavenger thread (it returns freed pages to the kernel).
  const scavenger = { plain: 0, wrapped: 0, gateway: 0, runner: 0 };
  const measured = async <T>(t: keyof typeof cpu, pid: number | "self", run: () => Promise<T>): Promise<T> => {
    const id = pid === "self" ? process.pid : pid;
    const before = {
      cpu: cpuMs(pid).self,
      main: mainThreadMs(id),
      jit: threadsMs(id, "JITWorker"),
      scavenger: threadsMs(id, "mi-scavenger"),
    };
    const busy = machineBusyMs();
    const r = await run();
    cpu[t] += cpuMs(pid).self - before.cpu;
    main[t] += mainThreadMs(id) - before.main;
    jit[t] += threadsMs(id, "JITWorker") - before.jit;
    scavenger[t] += threadsMs(id, "mi-scavenger") - before.scavenger;
    machine[t] += machineBusyMs() - busy;
    return r;
  };
  let failed = 0;
  const runs: Record<keyof typeof rates, (round: number) => Promise<number>> = {
    plain: () => measured("plain", "self", () => bareRate("plain", perRound, CONCURRENCY)),
    wrapped: () => measured("wrapped", "self", () => bareRate("wrapped", perRound, CONCURRENCY)),
    runner: () => measured("runner", "self", () => runnerRate(perRound, CONCURRENCY)),
    gateway: async (round) => {
      const r = await measured("gateway", gw.pid, () =>
        gatewayBatch(client, summaries, `r${round}e`, perRound, o.window),
      );
      failed += r.failed;
      return r.rate;
    },
  };
  const order = ["gateway", "wrapped", "runner", "plain"] as const;
  // BENCH_PERF_DIR: the gateway's CPU by JS function over the measured rounds (it is idle in the others).
  const perf = perfRecording("episodes", gw.pid);
  for (let round = 0; round < ROUNDS; round++) {
    for (let j = 0; j < order.length; j++) {
      const t = order[(round + j) % order.length]!;
      rates[t].push(await runs[t](round));
    }
    o.log(
      `  round ${round + 1}: gateway ${rates.gateway.at(-1)!.toFixed(1)}/s, bare wrapped ` +
        `${rates.wrapped.at(-1)!.toFixed(1)}/s, runner alone ${rates.runner.at(-1)!.toFixed(1)}/s, ` +
        `bare plain ${rates.plain.at(-1)!.toFixed(1)}/s`,
    );
  }
  await perf?.finish();
  summaries.close();
  await gw.stop();
  const child = await childCpu(o.quick ? 5 : 30);
  if (failed > 0) o.log(`  warning: ${failed} episode attempts failed (retried until committed); see the gateway log`);

  const med = (t: keyof typeof rates) => quantile(rates[t], 0.5);
  const per = (t: keyof typeof cpu) => cpu[t] / (perRound * ROUNDS);
  const perMain = (t: keyof typeof main) => main[t] / (perRound * ROUNDS);
  const perJit = (t: keyof typeof jit) => jit[t] / (perRound * ROUNDS);
  const perScavenger = (t: keyof typeof scavenger) => scavenger[t] / (perRound * ROUNDS);
  const perMachine = (t: keyof typeof machine) => machine[t] / (perRound * ROUNDS);
  o.log(
    `  own CPU ms per episode: gateway ${per("gateway").toFixed(1)}, bare spawn ` +
      `loop ${per("wrapped").toFixed(1)} (wrapped), ${per("plain").toFixed(1)} (plain)`,
  );
  return [
    rateRow(
      "episodes",
      "episodes/s vs bare spawn (wrapped like runner)",
      "/s",
      med("gateway"),
      med("wrapped"),
      0.7,
      `median of rounds; wrapping: ${wrappingNote()}`,
    ),
    rateRow(
      "episodes",
      "episodes/s vs bare spawn (plain)",
      "/s",
      med("gateway"),
      med("plain"),
      null,
      "what the sandbox costs: the loop spawns bun with no bwrap or prlimit (the target is the wrapped row's)",
    ),
    {
      ...deltaRow(
        "episodes",
        "CPU/episode, spawning process: gateway vs bare loop (wrapped)",
        "ms",
        per("gateway"),
        per("wrapped"),
        null,
        `utime+stime of the gateway vs of the bench's spawn loop, after ${warm} warm-up episodes ` +
          `(by phase of ${WARM_PHASE}: ${warmPer} ms); the target (issue 13) is the gateway's own figure`,
      ),
      target: `<= ${GATEWAY_CPU_TARGET_MS} ms`,
      ok: per("gateway") <= GATEWAY_CPU_TARGET_MS,
    },
    {
      ...rateRow(
        "episodes",
        "CPU/episode, spawning process: gateway / bare loop (wrapped)",
        "ms",
        per("gateway"),
        per("wrapped"),
        null,
        `the row above as a ratio: issue 13's 1.5 ms was set beside a 0.5 ms loop (before the loop joined a ` +
          "memory cgroup per round trip as the runner does)",
      ),
      target: `<= ${GATEWAY_CPU_TARGET_RATIO}x`,
      ok: per("gateway") <= GATEWAY_CPU_TARGET_RATIO * per("wrapped"),
    },
    deltaRow(
      "episodes",
      "CPU/episode, whole machine: gateway vs bare loop (wrapped)",
      "ms",
      perMachine("gateway"),
      perMachine("wrapped"),
      null,
      "busy time of every CPU (/proc/stat) over the rounds: beyond the spawning process's own, the episode " +
        "children, bwrap and the kernel; episodes/s is this ratio on a box whose cores are all busy",
    ),
    rateRow(
      "episodes",
      "episodes/s: runner alone (no gateway) vs bare spawn (wrapped)",
      "/s",
      med("runner"),
      med("wrapped"),
      null,
      `runEpisode with ${DEFAULT_WARM_SPARES} warm spares (the default), driven from the bench in the same rounds: ` +
        "no intake, SQL or scheduling",
    ),
    deltaRow(
      "episodes",
      "CPU/episode, spawning process: runner alone vs bare loop (wrapped)",
      "ms",
      per("runner"),
      per("wrapped"),
      null,
      "the runner measured apart; the gateway's row less this is its own work (intake, SQL, scheduling, " +
        "publishes) and what running both in one process adds",
    ),
    deltaRow(
      "episodes",
      "CPU/episode, whole machine: runner alone vs bare loop (wrapped)",
      "ms",
      perMachine("runner"),
      perMachine("wrapped"),
      null,
      "as the gateway's whole-machine row, for the runner alone",
    ),
    deltaRow(
      "episodes",
      "CPU/episode, main thread: gateway vs runner alone",
      "ms",
      perMain("gateway"),
      perMain("runner"),
      null,
      `the thread that runs the JS (and spawns); JIT compiler threads beside it: gateway ` +
        `${perJit("gateway").toFixed(2)} ms, runner alone ${perJit("runner").toFixed(2)} ms; mimalloc's scavenger: ` +
        `gateway ${perScavenger("gateway").toFixed(2)} ms, runner alone ${perScavenger("runner").toFixed(2)} ms; ` +
        "the rest of each process's row is GC, the allocator's other work and thread pools",
    ),
    deltaRow(
      "episodes",
      "CPU of one episode child: host runtime, one turn vs bare child",
      "ms",
      child.host,
      child.bare,
      null,
      "medians, user+system from wait4, unwrapped (no bwrap or prlimit): the host reads its start, imports the " +
        "agent module, runs the turn and sends its records; the bare child answers one message",
    ),
  ];
}

/** Run section (c). */
export async function benchLatency(o: BenchOptions): Promise<Row[]> {
  const samples = o.quick ? 30 : 100;
  const warm = 5;
  o.log(`latency: ${samples} samples, one stimulus at a time, interleaved with bare round trips`);

  const gw = await startGateway("latency", benchFleet({ maxConcurrent: CONCURRENCY }));
  const client = await connect(gw.mqttPort, "bench-latency");
  const outs = await collect(
    client,
    "fleet/agents/bench/lat/out",
    (_t, p) => json<{ data?: { n?: number } }>(p)?.data?.n ?? null,
  );
  // The summary's `ms` is runEpisode's own clock (spawn -> "done"): the rest is gateway overhead.
  const runs = await collect(client, "fleet/episodes", (_t, p) => {
    const e = json<Summary>(p);
    return e?.agent === "bench/lat" && e.status === "committed" ? e.ms : null;
  });

  const lat = { gateway: [] as number[], plain: [] as number[], wrapped: [] as number[] };
  for (let i = 0; i < warm + samples; i++) {
    const plain = await bareOnce("plain");
    const sent = performance.now();
    await publishWindowed(client, 1, 1, () => ({
      topic: "bench/lat/t",
      payload: JSON.stringify({ id: `lat-${i}`, n: i }),
    }));
    const arrived = await outs.waitFor(i + 1, 30_000);
    if (outs.matched[i] !== i) throw new Error(`latency: expected out n=${i}, got ${outs.matched[i]}`);
    await Bun.sleep(20); // let the gateway finish its post-commit work before the next bare sample
    const wrapped = await bareOnce("wrapped");
    if (i < warm) continue;
    lat.gateway.push(arrived - sent);
    lat.plain.push(plain);
    lat.wrapped.push(wrapped);
  }
  await runs.waitFor(warm + samples, 10_000);
  outs.close();
  runs.close();
  await gw.stop();

  const p = (a: number[], q: number) => quantile(a, q);
  const inRunner = p(runs.matched.slice(warm), 0.5);
  o.log(
    `  gateway p50 ${p(lat.gateway, 0.5).toFixed(1)} ms (runEpisode ${inRunner.toFixed(1)}), ` +
      `bare wrapped ${p(lat.wrapped, 0.5).toFixed(1)}, bare plain ${p(lat.plain, 0.5).toFixed(1)}`,
  );
  return [
    deltaRow(
      "latency",
      "p50 stimulus->out vs bare (wrapped like runner)",
      "ms",
      p(lat.gateway, 0.5),
      p(lat.wrapped, 0.5),
      5,
    ),
    deltaRow("latency", "p50 stimulus->out vs bare (plain)", "ms", p(lat.gateway, 0.5), p(lat.plain, 0.5), 5),
    deltaRow(
      "latency",
      "p99 stimulus->out vs bare (wrapped like runner)",
      "ms",
      p(lat.gateway, 0.99),
      p(lat.wrapped, 0.99),
      null,
    ),
    deltaRow("latency", "p99 stimulus->out vs bare (plain)", "ms", p(lat.gateway, 0.99), p(lat.plain, 0.99), null),
    deltaRow(
      "latency",
      "p50 inside runEpisode (its own ms) vs bare (wrapped)",
      "ms",
      inRunner,
      p(lat.wrapped, 0.5),
      null,
      "spawn -> done: host.ts + agent module load and run",
    ),
  ];
}
