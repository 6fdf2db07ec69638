/**
 * Where an episode's CPU goes, without the gateway: the runner (gateway/episode/runner.ts
 * `runEpisode`, warm spares and all) driven straight from the bench process, and one episode
 * child's own CPU. Set beside the gateway and the bare loops, they split the episodes rows:
 *  - gateway vs runner alone: the gateway's own work (intake, SQL, scheduling, publishes) and what
 *    running both in one process adds;
 *  - runner alone vs bare loop (wrapped): the runner's process handling and the host runtime's
 *    work in the child (reading its start, importing the agent module, the turn, the records).
 * The runner here loads the bench agent's module file where the gateway loads its stored bundle;
 * a child's CPU was the same for both (13.07 vs 12.98 ms, medians of 30, unwrapped).
 */
import type { ParentMessage } from "../../agents/protocol.ts";
import { DEFAULT_WARM_SPARES } from "../../gateway/spec/index.ts";
import {
  CHILD_ENV,
  CHILD_LIMITS,
  hostScript,
  ProcessTable,
  type RunLimits,
  runEpisode,
  SparePool,
} from "../../gateway/episode/index.ts";
import { bareRoundTrip, spawnedCpuMs, spawnOptions } from "./bare.ts";
import { defer } from "./harness.ts";
import { NOOP_AGENT } from "./procs.ts";

/** The runner's limits for a bench fleet episode (procs.ts benchFleet, records.ts runLimitsFor). */
const LIMITS: RunLimits = {
  timeoutMs: 10_000,
  memoryMb: 128,
  maxOpenFiles: 256,
  maxProcesses: 4096,
  maxRecords: CHILD_LIMITS.max_records,
  maxRecordBytes: CHILD_LIMITS.max_record_bytes,
};
/** Spares the pool keeps: the default `[fleet] warm_spares`. */
const SPARES = DEFAULT_WARM_SPARES;

let pool: SparePool | null = null;
defer(async () => {
  await pool?.close();
});

function startOf(n: number, key: string): Extract<ParentMessage, { t: "start" }> {
  return {
    t: "start",
    episode: `0190f000-0000-7000-8000-${String(n).padStart(12, "0")}`,
    agent: { type: "bench", key, id: `bench/${key}` },
    module: NOOP_AGENT,
    config: {},
    state: null,
    fresh: true,
    stimulus: { id: `id:${n}`, kind: "mqtt", payload: { n }, received_at: Date.now() },
    replay: null,
    limits: CHILD_LIMITS,
    wakes: { pending: [], max: 100 },
  };
}

let episodes = 0;

/** `total` episodes of the bench agent through `runEpisode`, `concurrency` at a time; resolves with episodes/s. */
export async function runnerRate(total: number, concurrency: number): Promise<number> {
  pool ??= new SparePool(SPARES, spawnOptions(), new ProcessTable());
  const spares = pool;
  let left = total;
  const began = performance.now();
  const worker = async () => {
    while (left-- > 0) {
      const n = episodes++;
      const r = await runEpisode(startOf(n, `k${n % 64}`), LIMITS, noTools, spawnOptions(), spares);
      if (!r.ok) throw new Error(`runner alone: episode ${n} failed (${r.kind}): ${r.message}`);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return total / ((performance.now() - began) / 1000);
}

const noTools = async () => ({ ok: false, result: { error: "denied", reason: "no tools in the bench" } });

/** Medians of one child's own CPU (user + system, from wait4), ms, unwrapped so no bwrap or prlimit is in it. */
export async function childCpu(samples: number): Promise<{ host: number; bare: number }> {
  const script = hostScript(process.execPath);
  const host: number[] = [];
  const bare: number[] = [];
  for (let i = 0; i < samples; i++) {
    host.push(await hostChild(script, i));
    bare.push((await bareRoundTrip("plain")).cpuMs);
  }
  const median = (v: number[]) => v.sort((a, b) => a - b)[v.length >> 1]!;
  return { host: median(host), bare: median(bare) };
}

/** The host runtime: "ready", then one episode of the bench agent to "done", then SIGKILL (as the runner ends it). */
async function hostChild(script: string, n: number): Promise<number> {
  const p = Bun.spawn([process.execPath, script], {
    env: { ...CHILD_ENV },
    cwd: "/",
    stdio: ["pipe", "ignore", "ignore", "pipe"],
  });
  const out = Bun.file(p.stdio[3] as unknown as number)
    .stream()
    .getReader();
  const decoder = new TextDecoder();
  let seen = "";
  const until = async (t: string) => {
    while (!seen.includes(`"t":"${t}"`)) {
      const { value, done } = await out.read();
      if (done) throw new Error(`host child ended before "${t}": ${seen.slice(0, 300)}`);
      seen += decoder.decode(value);
    }
  };
  await until("ready");
  const stdin = p.stdin as import("bun").FileSink;
  stdin.write(`${JSON.stringify(startOf(n, "child"))}\n`);
  await stdin.flush();
  await until("done");
  p.kill("SIGKILL");
  await p.exited;
  await out.cancel().catch(() => undefined);
  return spawnedCpuMs(p);
}
