/**
 * A campaign of crash trials (test/helpers/trial.ts): readings, webhooks, sends between agents and
 * wake-ups with a durable broker and a subscriber that keeps a session, the gateway killed with
 * SIGKILL one to three times per trial; after each, every guarantee is checked. Seeds run in
 * order from --seed; a trial that finds a problem prints each and keeps its directory.
 *
 * Usage: `bun scripts/crash-trials.ts --help`.
 */
import { cleanupAll } from "../test/helpers/gateway.ts";
import { crashTrial, type TrialReport } from "../test/helpers/trial.ts";
import { scriptArgs, usageError, wholeFlag } from "./bench/cli.ts";

const USAGE = `usage: bun scripts/crash-trials.ts [--trials 20] [--seed 1] [--ops 160] [--kills N]
       [--broker embedded|mosquitto] [--replicate] [--shards N]
  --trials N     trials to run, seeds --seed, --seed + 1, ...
  --ops N        operations (readings, webhooks) per trial
  --kills N      lives ended per trial (default: one to three, seeded)
  --broker B     "embedded" (its libSQL persistence) or "mosquitto" (a real Mosquitto, up through the kills)
  --replicate    replicate to a real sqld, itself killed once per trial; central must equal local
  --shards N     N gateways share the fleet (needs --broker mosquitto); one of them ends each life
Exit 1 if any trial found a problem (its directories are kept), 2 for a flag it cannot use.`;

const { values } = scriptArgs(USAGE, {
  options: {
    trials: { type: "string", default: "20" },
    seed: { type: "string", default: "1" },
    ops: { type: "string", default: "160" },
    kills: { type: "string" },
    broker: { type: "string", default: "embedded" },
    replicate: { type: "boolean", default: false },
    shards: { type: "string", default: "1" },
  },
});
const trials = wholeFlag(USAGE, "trials", values.trials);
const ops = wholeFlag(USAGE, "ops", values.ops);
const shards = wholeFlag(USAGE, "shards", values.shards);
const kills = values.kills === undefined ? undefined : wholeFlag(USAGE, "kills", values.kills);
if (values.broker !== "embedded" && values.broker !== "mosquitto") {
  usageError(USAGE, `--broker is "embedded" or "mosquitto", not ${JSON.stringify(values.broker)}`);
}
if (shards > 1 && values.broker !== "mosquitto") {
  usageError(USAGE, "--shards needs --broker mosquitto (shards share an external broker)");
}
const first = wholeFlag(USAGE, "seed", values.seed, 0);
const began = performance.now();
const reports: TrialReport[] = [];
try {
  for (let seed = first; seed < first + trials; seed++) {
    const r = await crashTrial({
      seed,
      ops,
      ...(kills === undefined ? {} : { kills }),
      keep: true,
      broker: values.broker === "mosquitto" ? "mosquitto" : "embedded",
      replicate: values.replicate,
      shards,
      log: (line) => console.log(line),
    });
    reports.push(r);
    console.log(
      `seed ${seed}: ${r.problems.length === 0 ? "held" : `${r.problems.length} PROBLEM(S)`}: ${r.kills} kills ` +
        `(${r.recoveryKills} in recovery), ${r.stops} graceful stops, ` +
        `${r.reloads} reloads${r.upgraded ? " (an upgrade)" : ""}, ${r.pauses} pauses, ` +
        `${r.ops} operations (${r.resent} sent again), ${r.committed} episodes committed, ${r.sends} sends, ` +
        `${r.wakes} wake-ups, ${r.seconds.toFixed(1)} s`,
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
    `(${sum((r) => r.recoveryKills)} during recovery), ${sum((r) => r.stops)} graceful stops, ` +
    `${sum((r) => r.reloads)} reloads (${sum((r) => Number(r.upgraded))} upgrades), ${sum((r) => r.pauses)} pauses, ` +
    `${sum((r) => r.ops)} operations acknowledged ` +
    `(${sum((r) => r.resent)} sent again), ${sum((r) => r.committed)} episodes committed; ` +
    (failed.length === 0
      ? "every trial held"
      : `${failed.length} found problems: seeds ${failed.map((r) => r.seed).join(", ")}`),
);
process.exit(failed.length === 0 ? 0 : 1);
