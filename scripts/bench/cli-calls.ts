/**
 * (cli) The CPU one `fleet` call costs, on a stopped gateway's data dir with some history: `--help`, the
 * reads users' scripts poll (`agents`, `episodes`, `status`) and `verify`. The baseline of each is the same
 * call with the whole gateway imported first (`bun --preload gateway/gateway.ts`): what every call cost
 * while the CLI imported all its commands up front. The target is that a call costs at most 0.6x that (not
 * for `verify`, whose own work, hashing every chain, is most of its call); its ratio to a Bun process that
 * runs nothing (the floor of any call) is printed beside it. Calls are interleaved round by round; medians
 * of each process's own CPU (user + system).
 */
import { join } from "node:path";
import type { BenchOptions, Row } from "./harness.ts";
import { quantile, ROOT, until } from "./harness.ts";
import { connect } from "./mqttkit.ts";
import { benchFleet, startGateway } from "./procs.ts";

const ROUNDS = 7;
/** A call's CPU against the same call with the whole gateway loaded. */
const TARGET = 0.6;
/** Stimuli recorded before the gateway stops, so the reads page through some history. */
const HISTORY = 200;

/** Run a Bun process to its end; its own CPU in ms, or throw with what it printed when it failed. */
async function cpuMsOf(args: readonly string[], env: Record<string, string>, exit = 0): Promise<number> {
  const proc = Bun.spawn([process.execPath, ...args], { cwd: ROOT, env, stdout: "ignore", stderr: "pipe" });
  const [code, stderr] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  if (code !== exit) throw new Error(`bun ${args.join(" ")} exited ${code}: ${stderr.trim().slice(0, 300)}`);
  const usage = proc.resourceUsage();
  if (!usage) throw new Error(`no resource usage for bun ${args.join(" ")}`);
  return Number(usage.cpuTime.user + usage.cpuTime.system) / 1000;
}

/** Run the section. */
export async function benchCli(o: BenchOptions): Promise<Row[]> {
  const rounds = o.quick ? 3 : ROUNDS;
  o.log(`cli: ${HISTORY} stimuli of history, then ${rounds} interleaved rounds of each call`);
  const gw = await startGateway("cli", benchFleet({ maxConcurrent: 2 }));
  try {
    const c = await connect(gw.mqttPort, "cli-history");
    for (let i = 0; i < HISTORY; i++)
      await c.publishAsync(`bench/k${i % 8}/t`, JSON.stringify({ id: `h${i}` }), { qos: 1 });
    await c.endAsync();
    await until(
      `${HISTORY} episodes`,
      async () => {
        const { agents } = await gw.api<{ agents: { episodes: number }[] }>("/api/agents?limit=100");
        return agents.reduce((n, a) => n + a.episodes, 0) >= HISTORY ? true : null;
      },
      120_000,
      200,
    );
  } finally {
    await gw.stop();
  }
  const env = { PATH: process.env.PATH ?? "", FLEET_DATA_DIR: gw.dataDir, HOME: process.env.HOME ?? "/root" };
  const cli = join(ROOT, "gateway/cli/main.ts");
  const gateway = ["--preload", join(ROOT, "gateway/gateway.ts")];
  const commands: Record<string, readonly string[]> = {
    "fleet --help": ["--help"],
    "fleet agents": ["agents"],
    "fleet episodes <agent>": ["episodes", "bench/k1"],
    "fleet status": ["status"],
    "fleet verify": ["verify"],
  };
  const calls = new Map<string, readonly string[]>([["bun, an empty script", ["-e", "0"]]]);
  for (const [name, args] of Object.entries(commands)) {
    calls.set(name, [cli, ...args]);
    calls.set(`${name}, gateway loaded`, [...gateway, cli, ...args]);
  }
  const samples = new Map<string, number[]>([...calls.keys()].map((k) => [k, []]));
  for (let r = 0; r < rounds; r++) for (const [name, args] of calls) samples.get(name)!.push(await cpuMsOf(args, env));
  const median = (name: string) => quantile(samples.get(name)!, 0.5);
  const empty = median("bun, an empty script");
  o.log(`  an empty bun process: ${empty.toFixed(1)} ms of CPU`);
  return Object.keys(commands).map((name) => {
    const ms = median(name);
    const before = median(`${name}, gateway loaded`);
    const targeted = name !== "fleet verify";
    return {
      section: "cli",
      metric: `${name}: CPU per call (${(ms / empty).toFixed(1)}x an empty bun)`,
      unit: "ms",
      gateway: ms,
      baseline: before,
      ratio: ms / before,
      ratioKind: "x" as const,
      target: targeted ? `<= ${TARGET}x` : "-",
      ok: targeted ? ms / before <= TARGET : null,
      note: "baseline: the same call with gateway/gateway.ts preloaded (what it cost when the CLI loaded it all)",
    };
  });
}
