/**
 * `fleet reshard --from DIR1,DIR2 --to N --out PREFIX` (docs/shards.md): offline, every gateway
 * of the fleet stopped. Moves each agent's chain into the data dir of its owner under N shards
 * (`PREFIX1` … `PREFIXN`) and verifies every chain there; exit 1 when one does not verify.
 */
import { existsSync } from "node:fs";
import {
  createShardSessions,
  LIVE_HEALTH_MS,
  repeatedDir,
  type ReshardReport,
  reshard,
  type ShardSessionsReport,
} from "../ops/index.ts";
import { loadSpec } from "../spec/index.ts";
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
    ...(r.left_out.length > 0
      ? [`partial: ${r.left_out.join(", ")} of the old layout were not among --from; their agents are not here.`]
      : []),
    ...(r.ended_sessions.length > 0
      ? [
          `the first start of shard 1 ends the broker sessions the old layout had and the new one does not use ` +
            `(${sessionNames(r.ended_sessions)}).`,
        ]
      : []),
    ...(r.new_sessions.length > 0
      ? [
          `the broker has no session ${sessionNames(r.new_sessions)} yet: readings published for ` +
            "those agents before that gateway first connects are queued for nobody. Keep the publishers stopped " +
            "until it runs, or create the session now with every filter of the fleet (docs/shards.md; " +
            "`fleet reshard --to N --create-sessions` does it while the gateways still run).",
        ]
      : []),
    ...(r.moved_without_dedup.length > 0
      ? [
          `warning: ${r.moved_without_dedup.map((m) => `${m.agents} ${m.type} agent(s)`).join(", ")} now read ` +
            "another broker session than before, and their type has no `dedup` key: a reading their old shard " +
            "recorded while the new session queued it too (its gateway had stopped, or --create-sessions made it) " +
            "runs again. Nothing doubles when the old gateways stopped together, or after the devices paused " +
            "(docs/shards.md).",
        ]
      : []),
    r.verified
      ? r.to === 1
        ? "every chain verifies. Start the gateway unsharded (no [fleet] shard) on that data dir."
        : `every chain verifies. Start shard i with [fleet] shard = "i/${r.to}" and its data dir.`
      : "some chains do NOT verify: keep the source data dirs and do not start these.",
  ].join("\n");
}

/** Broker sessions by shard index, as the broker knows them (0: the unsharded gateway's). */
function sessionNames(indexes: readonly number[]): string {
  return indexes.map((i) => (i === 0 ? "<client_id>" : `<client_id>-shard-${i}`)).join(", ");
}

function describeSessions(r: ShardSessionsReport): string {
  const layout = (n: number) => (n === 1 ? "one unsharded gateway" : `${n} shards`);
  // Where the running layout is known from: the gateways' own health, or fleet.toml alone when none spoke.
  const running =
    r.seen.length > 0
      ? `the running one (${layout(r.from)}, as their health on ${r.seen.join(", ")} says)`
      : `the running one (${layout(r.from)} by fleet.toml: no gateway published its health in the last ` +
        `${LIVE_HEALTH_MS / 1000} s)`;
  if (r.sessions.length === 0)
    return `the layout of ${layout(r.to)} uses no broker session that ${running} lacks: nothing to create.`;
  return [
    `broker sessions the layout of ${layout(r.to)} needs and ${running} lacks, ` +
      `each subscribed to the fleet's ${r.filters.length} filter(s):`,
    ...r.sessions.map((s) => `  ${s.clientId}  ${s.created ? "created" : "existed already (subscriptions renewed)"}`),
    "the broker queues every message of the fleet for them from now on, until their gateways first connect. " +
      `Now stop every gateway of the fleet and run fleet reshard --from … --to ${r.to} --out ….`,
  ].join("\n");
}

/** `fleet reshard --to N --create-sessions`: reads fleet.toml (`-c`) for the broker and the running layout. */
async function cmdCreateSessions(cli: Cli, to: number): Promise<number> {
  if (!existsSync(cli.configPath))
    throw new UsageError(`--create-sessions reads the fleet's fleet.toml: ${cli.configPath} does not exist`);
  const spec = (await loadSpec(cli.configPath)).spec;
  const report = await createShardSessions(spec, to, process.env);
  cli.print(report, () => describeSessions(report));
  return 0;
}

/** `fleet reshard --from DIR1,DIR2,… --to N --out PREFIX [--partial]`, or `--to N --create-sessions`. */
export async function cmdReshard(cli: Cli): Promise<number> {
  const { from, to, out } = cli.flags;
  if (cli.flags["create-sessions"] === true) {
    if (from || out || cli.flags.partial === true)
      throw new UsageError(
        "--create-sessions takes only --to N (and -c FILE): run it while the gateways still run, " +
          "before the reshard itself",
      );
    if (!to) throw new UsageError("reshard --create-sessions needs --to N");
    return cmdCreateSessions(cli, intArg("--to", to, 1, { min: 1, max: 64 }));
  }
  if (!from || !to || !out) throw new UsageError("reshard needs --from DIR1,DIR2,… --to N --out PREFIX");
  const dirs = from
    .split(",")
    .map((d) => d.trim())
    .filter((d) => d.length > 0);
  const twice = repeatedDir(dirs);
  if (twice !== undefined) throw new UsageError(`--from names ${twice} twice (each data dir once)`);
  const count = intArg("--to", to, 1, { min: 1, max: 64 });
  const report = await reshard(dirs, count, out, { partial: cli.flags.partial === true });
  cli.print(report, () => describe(report));
  return report.verified ? 0 : 1;
}
