/**
 * `bun scripts/soak.ts`: a day of a steady fleet on an injected clock, at high speed. Each
 * simulated hour commits `rate * 3600` temp-monitor episodes through the gateway's own
 * commit path (test/helpers/ops.ts: intake, event log, sealed checkpoint, one commit — no
 * subprocesses), runs the background retention round the gateway runs every minute (`gcTick`),
 * and prints one row per hour: episodes so far, rows kept, database + WAL bytes, RSS and
 * CPU. With retention shorter than the run, rows stop growing once the first records age out
 * (hour retention + 1), and the file an hour later: it holds the window plus the slice committed
 * before retention catches up, and reuses the pages retention frees. The last line checks that the
 * file grew by at most 3% from hour retention + 2 on, and that `fleet verify` still passes.
 * Stimulus ids are fixed-width here: with ids that gain a digit (1,000,000 stimuli in), every
 * episode's rows grow a byte or two, and the file grows with them until the window has turned over.
 *
 *   bun scripts/soak.ts [--hours 24] [--rate 50] [--agents 100] [--retention-hours 6] [--keep 10] [--tables]
 *                       [--bundle]
 *
 * `--tables` adds a line per hour: the free list and the eight biggest tables and indexes. `--bundle`
 * makes every episode name a code bundle, as a gateway running pinned code (the default) does: each
 * commit and each deletion by retention then also counts in `bundle_uses`.
 *
 * The defaults are issue 13's soak: a day at 50 episodes/s (4.3 million episodes). That is about
 * 25 minutes of CPU (committing ~0.3 ms an episode, retention ~0.1 ms an episode once it deletes):
 * for a shorter run, keep the rate and shorten the day and the retention, e.g.
 * `--hours 5 --retention-hours 1`.
 *
 * (The gateway itself adds a process per episode on top; the store and retention are what
 * grows, so they are what a day of simulated time exercises.)
 */
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BACKGROUND_GC, gcTick, verifyStore } from "../gateway/ops/index.ts";
import { HOUR, SyntheticFleet } from "../test/helpers/ops.ts";
import { scriptArgs, usageError } from "./bench/cli.ts";

const USAGE =
  "usage: bun scripts/soak.ts [--hours 24] [--rate 50] [--agents 100] [--retention-hours 6] [--keep 10] [--tables]" +
  " [--bundle]\n" +
  "  a simulated day (or --hours) of temp-monitor episodes at --rate per second through the commit path,\n" +
  "  with retention; prints disk, RSS and CPU per simulated hour and checks disk levels off";
const { values: flags } = scriptArgs(USAGE, {
  options: {
    hours: { type: "string", default: "24" },
    rate: { type: "string", default: "50" },
    agents: { type: "string", default: "100" },
    "retention-hours": { type: "string", default: "6" },
    keep: { type: "string", default: "10" },
    tables: { type: "boolean", default: false },
    bundle: { type: "boolean", default: false },
  },
});
const num = (name: Exclude<keyof typeof flags, "tables" | "bundle">) => {
  const v = Number(flags[name]);
  if (!Number.isFinite(v) || v <= 0)
    usageError(USAGE, `--${name} is a positive number, not ${JSON.stringify(flags[name])}`);
  return v;
};
const hours = num("hours");
const rate = num("rate");
const agents = Math.round(num("agents"));
const retentionDays = num("retention-hours") / 24;
const keep = Math.round(num("keep"));

const bytes = (path: string) => {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
};
const mb = (n: number) => (n / 1_048_576).toFixed(1);

const dir = mkdtempSync(join(tmpdir(), "fleet-soak-"));
const fleet = await SyntheticFleet.create(dir, {
  types: [{ name: "temp-monitor", keys: Array.from({ length: agents }, (_, i) => `dev-${i}`) }],
  keep,
  episodesDays: retentionDays,
  dedupDays: retentionDays,
  // Fixed-width stimulus ids: every episode the same size all day (test/helpers/ops.ts).
  sidDigits: 10,
  ...(flags.bundle ? { bundle: true } : {}),
});
const T0 = Date.UTC(2026, 0, 5);
const perHour = Math.round(rate * 3600);
const slices = 6; // commit in 10-minute slices, then the minute-by-minute retention passes of that slice
const spacing = HOUR / perHour;
const rows: string[] = [];
/** `--tables`: the free list and the biggest tables and indexes, in MB, from SQLite's dbstat. */
async function tableSizes(): Promise<string> {
  const c = fleet.store.client;
  const free = Number((await c.execute("PRAGMA freelist_count")).rows[0]![0]) * 4096;
  const top = await c.execute(
    "SELECT name, sum(pgsize) AS bytes, sum(unused) AS unused FROM dbstat GROUP BY name ORDER BY bytes DESC LIMIT 8",
  );
  const parts = top.rows.map(
    (r) => `${r[0]} ${mb(Number(r[1]))} (${Math.round((100 * Number(r[2])) / Number(r[1]))}% unused)`,
  );
  return `free ${mb(free)}; ${parts.join(", ")}`;
}
const dbBytes = () => bytes(fleet.dbPath) + bytes(`${fleet.dbPath}-wal`);
let total = 0;
let cpuBefore = process.cpuUsage();
const sizes: number[] = [];

console.log(
  `soak: ${hours} h simulated, ${rate} episodes/s over ${agents} agents, retention ${num("retention-hours")} h, ` +
    `keep ${keep} (${dir})`,
);
console.log(
  "| hour | episodes | kept episodes | checkpoint rows (with state) | db+wal MB | bytes/episode kept " +
    "| RSS MB | CPU s |",
);
console.log("|---|---|---|---|---|---|---|---|");
for (let h = 0; h < hours; h++) {
  for (let s = 0; s < slices; s++) {
    const start = T0 + h * HOUR + (s * HOUR) / slices;
    const n = Math.round(perHour / slices);
    await fleet.commit(n, start, spacing);
    total += n;
    // The gateway runs one background round a minute (passes of BACKGROUND_GC.batch): ten per slice.
    for (let m = 1; m <= 10; m++) {
      await gcTick(fleet.store, fleet.spec.spec, { ...BACKGROUND_GC, now: start + m * 60_000 });
    }
  }
  const counts = await fleet.counts();
  const size = dbBytes();
  sizes.push(size);
  const cpu = process.cpuUsage(cpuBefore);
  cpuBefore = process.cpuUsage();
  const row =
    `| ${h + 1} | ${total} | ${counts.episodes} | ${counts.checkpoints} (${counts.live}) | ${mb(size)} | ` +
    `${counts.episodes ? Math.round(size / counts.episodes) : 0} | ${mb(process.memoryUsage().rss)} | ` +
    `${((cpu.user + cpu.system) / 1e6).toFixed(1)} |`;
  rows.push(row);
  console.log(row);
  if (flags.tables) console.log(`  ${await tableSizes()}`);
}
const report = await verifyStore(fleet.store);
const settle = Math.ceil(num("retention-hours")) + 2;
const after = sizes.slice(settle - 1);
const flat = after.length < 2 || Math.max(...after) <= Math.min(...after) * 1.03;
console.log(
  `verify: ${report.problems.length === 0 ? "OK" : `${report.problems.length} problem(s)`}; ` +
    `disk from hour ${settle}: ${after.length ? `${mb(Math.min(...after))}–${mb(Math.max(...after))} MB` : "n/a"} ` +
    `(${flat ? "flat" : "STILL GROWING"})`,
);
for (const p of report.problems.slice(0, 5)) console.log(`  ${p.record}: ${p.problem}`);
await fleet.close();
rmSync(dir, { recursive: true, force: true });
process.exit(report.problems.length === 0 && flat ? 0 : 1);
