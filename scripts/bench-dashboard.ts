/**
 * What the dashboard's read models cost on a busy store:
 *
 *   bun scripts/bench-dashboard.ts [--quick]
 *
 * Fills a store with 100,000 committed episodes (20,000 with --quick) through the gateway's
 * commit path (test/helpers/ops.ts), all within the last hour on 100 agents, each with an emit
 * (so every episode is an output), then times in-process, 30 times each after a warm-up:
 *   activity  60 minutes of buckets (GET /api/activity), whole fleet and one type: the first call
 *             (every minute read) and refreshes (settled minutes remembered), and the longest
 *             stretch the event loop was blocked during a first call
 *   outputs   recentOutputs, the newest 30 (GET /api/outputs), fleet-wide and for one agent
 *   episodes  episodesPage with ?kind=mqtt (GET /api/agents/<t>/<k>/episodes?kind=), newest 25
 * Prints p50/p99 in ms. Progress on stderr.
 */
import { ActivityHistory, recentOutputs } from "../gateway/observe/index.ts";
import { episodesPage } from "../gateway/store/index.ts";
import { SyntheticFleet } from "../test/helpers/ops.ts";
import { scriptArgs } from "./bench/cli.ts";
import { cleanupAll, fmt, quantile, tempDir } from "./bench/harness.ts";

const USAGE = `usage: bun scripts/bench-dashboard.ts [--quick]
  p50/p99 of the dashboard's read models on a store of 100,000 episodes (--quick: 20,000)`;
const { values } = scriptArgs(USAGE, { options: { quick: { type: "boolean", default: false } } });
const episodes = values.quick ? 20_000 : 100_000;
const keys = (p: string) => Array.from({ length: 50 }, (_, i) => `${p}${i}`);
const fleet = await SyntheticFleet.create(tempDir("dashboard"), {
  types: [
    { name: "meter", keys: keys("m") },
    { name: "valve", keys: keys("v") },
  ],
  keep: 10,
  episodesDays: 30,
  dedupDays: 7,
});

async function time(name: string, fn: () => Promise<unknown>): Promise<void> {
  for (let i = 0; i < 3; i++) await fn();
  const ms: number[] = [];
  for (let i = 0; i < 30; i++) {
    const t = performance.now();
    await fn();
    ms.push(performance.now() - t);
  }
  console.log(`${name.padEnd(44)} p50 ${quantile(ms, 0.5).toFixed(2)} ms   p99 ${quantile(ms, 0.99).toFixed(2)} ms`);
}

try {
  const now = Date.now();
  console.error(`filling ${fmt(episodes)} episodes over the last hour on 100 agents…`);
  await fleet.commit(episodes, now - 3_590_000, Math.floor(3_580_000 / episodes));
  await fleet.checkpointWal();
  const s = fleet.store;
  const agent = fleet.agents[0]!;
  console.log(`${fmt(episodes)} committed episodes in the last hour, 100 agents`);
  await time("activity: 60 minutes, first call", () => new ActivityHistory(s).buckets({ now, minutes: 60 }));
  await time("activity: 60 minutes, one type, first call", () =>
    new ActivityHistory(s).buckets({ now, minutes: 60, type: "meter" }),
  );
  const warm = new ActivityHistory(s);
  await time("activity: 60 minutes, refresh", () => warm.buckets({ now, minutes: 60 }));
  let gap = 0;
  let last = performance.now();
  const tick = setInterval(() => {
    gap = Math.max(gap, performance.now() - last);
    last = performance.now();
  }, 1);
  await new ActivityHistory(s).buckets({ now, minutes: 60 });
  clearInterval(tick);
  console.log(`${"activity: longest event-loop block, first call".padEnd(44)} ${gap.toFixed(1)} ms`);
  await time("outputs: newest 30, whole fleet", () => recentOutputs(s, { limit: 30 }));
  await time("outputs: newest 30, one agent", () => recentOutputs(s, { limit: 30, agent }));
  await time("episodes: newest 25 of kind mqtt, one agent", () => episodesPage(s, agent, { limit: 25, kind: "mqtt" }));
} finally {
  await fleet.close();
  await cleanupAll();
}
