/**
 * Episodes per second running an agent from its stored code bundle (docs/upgrading.md) vs
 * from its module file (the way episodes ran before code was pinned), through the gateway's own
 * runner and sandbox (`runEpisode`, fresh subprocess per episode), interleaved rounds, medians.
 * Target >= 1.0x: a bundle is one pre-transpiled file, where the module is TypeScript and the
 * files it imports, each transpiled and bound into the sandbox one by one.
 *
 *   bun scripts/bench-bundles.ts [--episodes N] [--rounds R] [--spares N] [--module FILE]
 *
 * Bundles are materialised in a folder under /var/tmp (a staging root cannot show /tmp, so warm
 * spares serve both sides alike). Prints one table and the JSON result on its last line.
 */
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { HOST_MODULES } from "../agents/host/index.ts";
import { BundleFiles, buildBundle } from "../gateway/code/index.ts";
import {
  CHILD_LIMITS,
  defaultSpawnOptions,
  describeSandbox,
  ProcessTable,
  runEpisode,
  runLimitsFor,
  SparePool,
} from "../gateway/episode/index.ts";
import { DEFAULT_BUDGET } from "../gateway/spec/index.ts";
import { scriptArgs, wholeFlag } from "./bench/cli.ts";

const USAGE = `usage: bun scripts/bench-bundles.ts [--episodes 120] [--rounds 5] [--spares 0] [--concurrency 4]
       [--module FILE]
  episodes per second from the agent's stored code bundle vs from its module file, interleaved rounds
  (--module: the agent, default agents/examples/anomaly.ts)`;
const { values } = scriptArgs(USAGE, {
  options: {
    episodes: { type: "string", default: "120" },
    rounds: { type: "string", default: "5" },
    spares: { type: "string", default: "0" },
    concurrency: { type: "string", default: "4" },
    module: { type: "string", default: join(import.meta.dir, "../agents/examples/anomaly.ts") },
  },
});
const perRound = wholeFlag(USAGE, "episodes", values.episodes);
const rounds = wholeFlag(USAGE, "rounds", values.rounds);
const concurrency = wholeFlag(USAGE, "concurrency", values.concurrency);
wholeFlag(USAGE, "spares", values.spares, 0);
const module = resolve(values.module);

const dir = mkdtempSync("/var/tmp/fleet-bench-bundles-");
// Agents run as other uids when this runs as root: they must be able to enter the folder.
chmodSync(dir, 0o755);
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const built = await buildBundle(module, HOST_MODULES, { roots: [dirname(module)], refused: [] });
if (!built.ok) throw new Error(built.error);
const files = new BundleFiles(dir, async () => built.code);
const bundlePath = await files.file(built.hash);

const spawn = defaultSpawnOptions();
const procs = new ProcessTable();
const pool = Number(values.spares) > 0 ? new SparePool(Number(values.spares), spawn, procs) : undefined;
const limits = runLimitsFor(DEFAULT_BUDGET);

let seq = 0;
async function one(path: string): Promise<boolean> {
  const n = seq++;
  const r = await runEpisode(
    {
      t: "start",
      episode: `bench-${n}`,
      agent: { type: "bench", key: `k${n % 16}`, id: `bench/k${n % 16}` },
      module: path,
      config: {},
      state: null,
      fresh: true,
      stimulus: { id: `s${n}`, kind: "manual", payload: { value: 20 + (n % 7) }, received_at: Date.now() },
      replay: null,
      limits: CHILD_LIMITS,
      wakes: { pending: [], max: 10 },
    },
    limits,
    async () => ({ ok: true, result: { queued: true } }),
    spawn,
    pool,
    procs,
  );
  return r.ok;
}

/** Episodes/s of `perRound` episodes, `concurrency` at a time. */
async function round(path: string): Promise<number> {
  let next = 0;
  let failed = 0;
  const began = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < perRound) {
        next++;
        if (!(await one(path))) failed++;
      }
    }),
  );
  if (failed > 0) throw new Error(`${failed} episode(s) failed running ${path}`);
  return perRound / ((performance.now() - began) / 1000);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
await round(module); // warm both sides' caches (Bun's transpiler cache, the page cache)
await round(bundlePath);
const fromFile: number[] = [];
const fromBundle: number[] = [];
for (let i = 0; i < rounds; i++) {
  // Alternate which side goes first so a trend in machine load does not favour one.
  if (i % 2 === 0) {
    fromFile.push(await round(module));
    fromBundle.push(await round(bundlePath));
  } else {
    fromBundle.push(await round(bundlePath));
    fromFile.push(await round(module));
  }
  process.stderr.write(
    `round ${i + 1}/${rounds}: file ${fromFile.at(-1)!.toFixed(1)}/s, bundle ${fromBundle.at(-1)!.toFixed(1)}/s\n`,
  );
}
await pool?.close();
procs.killAll();
const result = {
  module,
  bundle_bytes: built.code.length,
  sandbox: describeSandbox(spawn),
  spares: Number(values.spares),
  concurrency,
  episodes_per_round: perRound,
  rounds,
  file_eps: median(fromFile),
  bundle_eps: median(fromBundle),
  ratio: median(fromBundle) / median(fromFile),
};
console.log(`| runs from | episodes/s (median of ${rounds}) |\n|---|---|`);
console.log(`| module file (${module}) | ${result.file_eps.toFixed(1)} |`);
console.log(`| stored bundle (${result.bundle_bytes} B) | ${result.bundle_eps.toFixed(1)} |`);
console.log(`ratio ${result.ratio.toFixed(2)}x (target >= 1.0x)`);
console.log(JSON.stringify(result));
