/**
 * `bun scripts/store-bytes.ts`: where a typical episode's bytes go in the store (issue 13).
 * Commits `--episodes` temp-monitor episodes over `--agents` agents through the gateway's own
 * commit path (test/helpers/ops.ts, no subprocesses, no retention), moves the WAL into the
 * file, and prints every table's and index's pages and bytes per episode from SQLite's
 * `dbstat`, largest first, with the sizes of one row of the big tables.
 *
 * `--bundle` makes every episode name a code bundle, as episodes of a gateway running pinned code
 * (the default, docs/upgrading.md) do: the hash's first 8 bytes on the row (gateway/store/hashes.ts
 * `bundleColumn`) and one more in the bundle's count (`bundle_uses`, migration 32).
 *
 *   bun scripts/store-bytes.ts [--episodes 5000] [--agents 100] [--keep 10] [--bundle]
 */
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SyntheticFleet } from "../test/helpers/ops.ts";
import { scriptArgs, wholeFlag } from "./bench/cli.ts";

const USAGE = `usage: bun scripts/store-bytes.ts [--episodes 5000] [--agents 100] [--keep 10] [--bundle]
  where a typical episode's bytes go in the store, per table and index (--bundle: episodes name a code bundle)`;
const { values: flags } = scriptArgs(USAGE, {
  options: {
    episodes: { type: "string", default: "5000" },
    agents: { type: "string", default: "100" },
    keep: { type: "string", default: "10" },
    bundle: { type: "boolean", default: false },
  },
});
const episodes = wholeFlag(USAGE, "episodes", flags.episodes);
const agents = wholeFlag(USAGE, "agents", flags.agents);
const keep = wholeFlag(USAGE, "keep", flags.keep, 0);

const dir = mkdtempSync(join(tmpdir(), "fleet-store-bytes-"));
try {
  const f = await SyntheticFleet.create(dir, {
    types: [{ name: "temp-monitor", keys: Array.from({ length: agents }, (_, i) => `dev-${i}`) }],
    keep,
    episodesDays: 30,
    dedupDays: 30,
    ...(flags.bundle ? { bundle: true } : {}),
  });
  await f.commit(episodes, Date.UTC(2026, 0, 5), 200, 200);
  await f.checkpointWal();
  const rs = await f.store.client.execute(
    "SELECT name, count(*) AS pages, sum(pgsize) AS bytes, sum(payload) AS payload FROM dbstat " +
      "GROUP BY name ORDER BY bytes DESC",
  );
  const per = (n: unknown) => (Number(n) / episodes).toFixed(0).padStart(6);
  console.log(
    `${episodes} temp-monitor episodes over ${agents} agents (keep ${keep}${flags.bundle ? ", with a bundle" : ""}), ` +
      "no retention:\n",
  );
  console.log(
    `${"table or index".padEnd(32)} ${"pages".padStart(7)} ${"B/episode".padStart(9)} ${"payload".padStart(8)}`,
  );
  let total = 0;
  for (const r of rs.rows) {
    total += Number(r.bytes);
    if (Number(r.bytes) / episodes < 1) continue;
    console.log(`${String(r.name).padEnd(32)} ${String(r.pages).padStart(7)} ${per(r.bytes)}    ${per(r.payload)}`);
  }
  console.log(`${"total".padEnd(32)} ${"".padStart(7)} ${per(total)}`);
  console.log(`file: ${(statSync(f.dbPath).size / episodes).toFixed(0)} B/episode\n`);
  for (const t of ["episodes", "events", "checkpoints", "stimuli"]) {
    const row = await f.store.client.execute(`SELECT * FROM ${t} LIMIT 1`);
    const sizes = row.columns.map((c, i) => {
      const v = row.rows[0]?.[i];
      const n = v === null || v === undefined ? 0 : v instanceof ArrayBuffer ? v.byteLength : String(v).length;
      return `${c}=${n}`;
    });
    console.log(`${t}: ${sizes.join(" ")}`);
  }
  await f.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
