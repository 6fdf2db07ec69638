/**
 * `fleet reshard --from DIR1,DIR2 --to N --out PREFIX` (docs/shards.md): offline, every gateway
 * of the fleet stopped. Moves each agent's chain into the data dir of its owner under N shards
 * (`PREFIX1` … `PREFIXN`) and verifies every chain there; exit 1 when one does not verify.
 */
import { type ReshardReport, reshard } from "../ops/index.ts";
import { type Cli, intArg, UsageError } from "./context.ts";

function describe(r: ReshardReport): string {
  const lines = r.targets.map(
    (t) =>
      `  shard ${t.shard}  ${t.dir}  ${t.agents} agent(s), ${t.checkpoints} checkpoint(s), ` +
      `${t.episodes} episode(s), ${t.stimuli} stimuli ${t.problems.length === 0 ? "verified" : "BROKEN"}`,
  );
  const broken = r.targets.flatMap((t) => t.problems.map((p) => `  BROKEN ${t.shard} ${p.record}: ${p.problem}`));
  return [
    `resharded ${r.agents} agent(s) from ${r.from.length} data dir(s) into ${r.to} shard(s):`,
    ...lines,
    ...broken,
    r.verified
      ? r.to === 1
        ? "every chain verifies. Start the gateway unsharded (no [fleet] shard) on that data dir."
        : `every chain verifies. Start shard i with [fleet] shard = "i/${r.to}" and its data dir.`
      : "some chains do NOT verify: keep the source data dirs and do not start these.",
  ].join("\n");
}

/** `fleet reshard`. */
export async function cmdReshard(cli: Cli): Promise<number> {
  const { from, to, out } = cli.flags;
  if (!from || !to || !out) throw new UsageError("reshard needs --from DIR1,DIR2,… --to N --out PREFIX");
  const dirs = from
    .split(",")
    .map((d) => d.trim())
    .filter((d) => d.length > 0);
  const report = await reshard(dirs, intArg("--to", to, 1, { min: 1, max: 64 }), out);
  cli.print(report, () => describe(report));
  return report.verified ? 0 : 1;
}
