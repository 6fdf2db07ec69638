/**
 * A campaign of crash trials (test/helpers/trial.ts): readings, webhooks, sends between agents and
 * wake-ups with a durable broker and a subscriber that keeps a session, the gateway killed with
 * SIGKILL one to three times per trial; after each, every guarantee is checked. Seeds run in
 * order from --seed; a trial that finds a problem prints each and keeps its directory.
 *
 * Usage: bun scripts/crash-trials.ts [--trials 20] [--seed 1] [--ops 160] [--kills N]
 * Exit 1 if any trial found a problem.
 */
import { parseArgs } from "node:util";
import { cleanupAll } from "../test/helpers/gateway.ts";
import { crashTrial, type TrialReport } from "../test/helpers/trial.ts";

const { values } = parseArgs({
  options: {
    trials: { type: "string", default: "20" },
    seed: { type: "string", default: "1" },
    ops: { type: "string", default: "160" },
    kills: { type: "string" },
  },
});
const trials = Number(values.trials);
const first = Number(values.seed);
const began = performance.now();
const reports: TrialReport[] = [];
try {
  for (let seed = first; seed < first + trials; seed++) {
    const r = await crashTrial({
      seed,
      ops: Number(values.ops),
      ...(values.kills === undefined ? {} : { kills: Number(values.kills) }),
      keep: true,
      log: (line) => console.log(line),
    });
    reports.push(r);
    console.log(
      `seed ${seed}: ${r.problems.length === 0 ? "held" : `${r.problems.length} PROBLEM(S)`}: ${r.kills} kills ` +
        `(${r.recoveryKills} in recovery), ${r.ops} operations (${r.resent} sent again), ${r.committed} episodes ` +
        `committed, ${r.sends} sends, ${r.wakes} wake-ups, ${r.seconds.toFixed(1)} s`,
    );
    for (const p of r.problems) console.log(`  ${p}`);
  }
} finally {
  await cleanupAll();
}
const failed = reports.filter((r) => r.problems.length > 0);
const sum = (f: (r: TrialReport) => number) => reports.reduce((n, r) => n + f(r), 0);
console.log(
  `\n${reports.length} trials (seeds ${first}-${first + reports.length - 1}) in ` +
    `${((performance.now() - began) / 1000).toFixed(0)} s: ${sum((r) => r.kills)} kills ` +
    `(${sum((r) => r.recoveryKills)} during recovery), ${sum((r) => r.ops)} operations acknowledged ` +
    `(${sum((r) => r.resent)} sent again), ${sum((r) => r.committed)} episodes committed; ` +
    (failed.length === 0
      ? "every trial held"
      : `${failed.length} found problems: seeds ${failed.map((r) => r.seed).join(", ")}`),
);
process.exit(failed.length === 0 ? 0 : 1);
