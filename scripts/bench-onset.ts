#!/usr/bin/env bun
/**
 * Quiet agents' latency while the gateway takes a burst, many times over:
 *
 *   bun scripts/bench-onset.ts [--bursts N] [--label L] [--stages] [--warm-spares N]
 *
 * The flood row of `bun scripts/bench-policy.ts --flood` (a quiet agent's p99 while another agent is
 * flooded) is decided by the two or three pings sent during the one burst of its run, so it moves
 * from 1.3x to 4x between runs of unchanged code, and comparing an intake or scheduling lever on it
 * takes dozens of runs. This takes N bursts of 5,000 QoS 1 messages (./bench/flooder.ts, its own
 * process, as in the policy bench) to an agent that is paused (its stimuli stay queued, none of its
 * episodes runs), 1.5 s apart, while six quiet agents are pinged in turn every 80 ms (about 12
 * episodes a second, half of what two cores run), and compares the pings sent during a burst (from
 * the flooder's first packet to its last PUBACK) with those sent between bursts: ~100 of the first
 * kind in a default run of 15 bursts. Their p50 still moves between runs of unchanged code (59, 60,
 * 90, 93, 101 ms in five), so compare alternating runs, two or more a side, and look for a gap
 * larger than that.
 *
 * For an A/B, run it alternately on the two versions (environment variables reach the gateway).
 * It prints one line; it measures, it does not test. `--stages` adds two: where the pings' time
 * went (during bursts, and between), from the rows the gateway kept for each.
 */
import { TestFleet, cleanupAll, waitFor } from "../test/helpers/gateway.ts";
import { Pinger, agentBlock, fleetHeader, percentile, policyAgent } from "../test/helpers/policy.ts";
import { scriptArgs, wholeFlag } from "./bench/cli.ts";
import { runFlooder } from "./bench/procs.ts";

const BURST = 5000;
const QUIET_AGENTS = 6;
const PING_MS = 80;
const BETWEEN_MS = 1500;
/** The flooder process's own start-up before its first packet (a burst's window starts after it). */
const FLOODER_STARTUP_MS = 40;

const USAGE = `usage: bun scripts/bench-onset.ts [--bursts 15] [--label L] [--stages] [--warm-spares N]
  quiet agents' ping latency during bursts of 5,000 QoS 1 messages vs between them
  (--label: names the run's line; --stages: where the pings' time went; --warm-spares: [fleet] warm_spares)`;
const { values } = scriptArgs(USAGE, {
  options: {
    bursts: { type: "string", default: "15" },
    label: { type: "string", default: "run" },
    stages: { type: "boolean", default: false },
    /** `[fleet] warm_spares` of the gateway measured (default: the gateway's default). */
    "warm-spares": { type: "string" },
  },
});
const spares = values["warm-spares"];
if (spares !== undefined) wholeFlag(USAGE, "warm-spares", spares, 0);
const bursts = wholeFlag(USAGE, "bursts", values.bursts);

/** performance.now() here -> the wall clock the gateway stamps its rows with (same machine). */
const WALL_OFFSET = Date.now() - performance.now();

/**
 * Where the quiet pings `sentIn` selects spent their time, p50 of each stage in ms, from the rows
 * the gateway kept: sent -> recorded (the gateway read the PUBLISH: `stimuli.received_at`) ->
 * started (committed, scheduled, a process taken: `episodes.started_at`) -> ended (the turn ran:
 * `ended_at`) -> arrived (the episode committed, its output published and delivered).
 */
async function stageLine(pingers: Pinger[], sentIn: (at: number) => boolean): Promise<string> {
  const rows = await fleet.query<{
    payload: Uint8Array | null;
    received_at: number;
    started_at: number;
    ended_at: number;
  }>(
    `SELECT s.payload, s.received_at, e.started_at, e.ended_at FROM stimuli s
       JOIN episodes e ON e.stimulus_seq = s.seq WHERE s.agent LIKE 'quiet/%' AND e.status = 1`,
  );
  const stages: number[][] = [[], [], [], []];
  for (const r of rows) {
    if (r.payload === null) continue; // collected
    const id = (JSON.parse(Buffer.from(r.payload).toString()) as { id: string }).id;
    const p = pingers.find((q) => q.sent.has(id));
    const sent = p?.sent.get(id);
    const arrived = p?.arrived.get(id);
    if (sent === undefined || arrived === undefined || !sentIn(sent)) continue;
    const marks = [sent + WALL_OFFSET, r.received_at, r.started_at, r.ended_at, arrived + WALL_OFFSET];
    for (let i = 0; i < 4; i++) stages[i]!.push(marks[i + 1]! - marks[i]!);
  }
  const p50 = (xs: number[]) => percentile(xs, 0.5).toFixed(1);
  const p90 = (xs: number[]) => percentile(xs, 0.9).toFixed(1);
  const names = ["sent->recorded", "recorded->started", "started->ended", "ended->arrived"];
  const each = names.map((n, i) => `${n} ${p50(stages[i]!)}/${p90(stages[i]!)}`);
  return `n=${stages[0]!.length}, p50/p90 ms: ${each.join(", ")}`;
}

/** One burst from its own process; resolves with how long its PUBACKs took (the flooder's figure). */
async function burst(port: number, topic: string): Promise<number> {
  return Number(/acked in (\d+) ms/.exec(await runFlooder(port, topic, BURST))?.[1] ?? Number.NaN);
}

const fleet = new TestFleet(
  fleetHeader("bench-onset", {
    maxConcurrent: 4,
    ...(spares === undefined ? {} : { fleet: `warm_spares = ${spares}` }),
  }) +
    agentBlock("quiet", policyAgent("steady")) +
    agentBlock("sink", policyAgent("steady")),
);
try {
  await fleet.start();
  const client = await fleet.mqtt();
  const sub = await fleet.mqtt();
  sub.setMaxListeners(32); // a message listener per quiet agent, beside mqtt.js's own
  const quiet: Pinger[] = [];
  for (let i = 0; i < QUIET_AGENTS; i++) quiet.push(await Pinger.create(client, sub, `quiet/q${i}`, `q${i}-`));
  for (const p of quiet) p.ping();
  for (const p of quiet) await p.settle();
  // The bursts' agent exists (one episode), then is paused: its stimuli are recorded and stay queued.
  await client.publishAsync("sink/s/in", JSON.stringify({ id: "first" }), { qos: 1 });
  await waitFor(
    async () =>
      ((await fleet.query<{ n: number }>("SELECT count(*) AS n FROM episodes WHERE agent = 'sink/s'"))[0]?.n ?? 0) > 0,
    60_000,
    "the first episode of sink/s",
  );
  const paused = await fleet.fetch("/api/agents/sink/s/pause", { method: "POST" });
  if (paused.status !== 200) throw new Error(`pausing sink/s: HTTP ${paused.status} ${await paused.text()}`);

  let pinging = true;
  const pings = (async () => {
    for (let k = 0; pinging; k++) {
      quiet[k % QUIET_AGENTS]!.ping();
      await Bun.sleep(PING_MS);
    }
  })();
  const windows: { burst: boolean; from: number; to: number }[] = [];
  const acks: number[] = [];
  await Bun.sleep(BETWEEN_MS);
  for (let b = 0; b < bursts; b++) {
    const calm = performance.now();
    await Bun.sleep(BETWEEN_MS);
    windows.push({ burst: false, from: calm, to: performance.now() });
    const began = performance.now();
    acks.push(await burst(fleet.mqttPort, "sink/s/in"));
    windows.push({ burst: true, from: began + FLOODER_STARTUP_MS, to: performance.now() });
    // The last burst's stragglers settle before the next calm window starts.
    await Bun.sleep(BETWEEN_MS / 2);
  }
  pinging = false;
  await pings;
  for (const p of quiet) await p.settle(60_000);

  const latencies = (burst: boolean) =>
    quiet.flatMap((p) => windows.filter((w) => w.burst === burst).flatMap((w) => p.latencies(w.from, w.to)));
  const show = (xs: number[]) =>
    `n=${xs.length} p50 ${percentile(xs, 0.5).toFixed(1)} p90 ${percentile(xs, 0.9).toFixed(1)} ` +
    `max ${Math.max(...xs).toFixed(0)} ms`;
  const calm = latencies(false);
  const during = latencies(true);
  console.log(
    `${values.label}: pings between bursts ${show(calm)} | during bursts ${show(during)} | ` +
      `p50 ${(percentile(during, 0.5) / percentile(calm, 0.5)).toFixed(2)}x | ` +
      `${BURST} acked in ${percentile(acks, 0.5).toFixed(0)} ms (median of ${acks.length})`,
  );
  if (values.stages) {
    const inBurst = (at: number) => windows.some((w) => w.burst && at >= w.from && at < w.to);
    console.log(`${values.label}: during bursts, ${await stageLine(quiet, inBurst)}`);
    console.log(`${values.label}: between bursts, ${await stageLine(quiet, (at) => !inBurst(at))}`);
  }
} finally {
  await fleet.dispose();
  await cleanupAll();
}
process.exit(0);
