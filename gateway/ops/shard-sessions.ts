/**
 * `fleet reshard --to N --create-sessions` (docs/shards.md#changing-the-number-of-shards): before
 * the gateways stop for a reshard, give the broker the persistent sessions the new layout uses
 * that the running one does not have (a new shard index when growing; `<client_id>` when going
 * back to one gateway), each subscribed to every filter of the fleet. Without them, what devices
 * publish for those shards' agents between the stop and each new gateway's first connection is
 * queued for nobody, so lost.
 */
import { readFileSync } from "node:fs";
import type { PreparedSession, SessionBrokerOptions } from "../../broker/index.ts";
import { topics } from "../protocol.ts";
import { MAX_SHARDS, shardClientId, type ShardSpec } from "../shard.ts";
import type { FleetSpec } from "../spec/index.ts";
import { OperatorError } from "../errors.ts";

/**
 * Every topic a stimulus can come from, for a gateway of `spec`'s fleet that is `shard` (the spec's own
 * by default): the types' `subscribe` filters and the agents' inboxes (and, sharded, the sends other
 * shards forward). A gateway on an external broker subscribes to exactly these.
 */
export function intakeFilters(spec: FleetSpec, shard: ShardSpec | null = spec.fleet.shard): string[] {
  const filters = new Set<string>([topics.inbox("+", "+")]);
  if (shard) filters.add(topics.sends);
  for (const t of Object.values(spec.agents)) for (const f of t.subscribe) filters.add(f);
  return [...filters];
}

/** The sessions a layout of `count` shards uses (shard indexes): one shard is run unsharded (`<client_id>`, 0). */
export function layoutSessions(count: number): number[] {
  return count === 1 ? [0] : Array.from({ length: count }, (_, i) => i + 1);
}

/**
 * The broker sessions the old layout had (shard indexes; 0 for the unsharded `<client_id>`). Those the
 * new one does not use would go on queueing every message of the fleet, and a later layout with that
 * index would run its stale queue again: the first start of new shard 1 ends them.
 */
export function hadSessions(old: readonly ShardSpec[], unsharded: boolean): Set<number> {
  const had = new Set<number>(unsharded ? [0] : []);
  for (const s of old) for (let i = 1; i <= s.count; i++) had.add(i);
  return had;
}

/** The sessions a layout of `count` shards uses that `had` (shard indexes, as `hadSessions` gives them) lacks. */
export function sessionsAdded(had: ReadonlySet<number>, count: number): number[] {
  return layoutSessions(count).filter((i) => !had.has(i));
}

/**
 * How recent a gateway's retained health (published every 10 s) must be for `--create-sessions` to count
 * its layout as running: a few missed ticks, and clocks a little apart between hosts.
 */
export const LIVE_HEALTH_MS = 60_000;

/**
 * The shard counts of the layouts whose gateways publish health now, from the retained messages on
 * `fleet/health` and `fleet/health/<i>-of-<N>`: a body whose `at` is within `windowMs` of `now` (an
 * unsharded gateway's `shard` is null: a layout of 1). Each count with the topics that show it.
 * Bodies without `at` (a gateway from before it) or not JSON say nothing.
 */
export function liveLayouts(
  retained: readonly { topic: string; payload: Buffer }[],
  now: number,
  windowMs = LIVE_HEALTH_MS,
): Map<number, string[]> {
  const live = new Map<number, string[]>();
  for (const { topic, payload } of retained) {
    let body: { at?: unknown; shard?: unknown };
    try {
      body = JSON.parse(payload.toString("utf8")) as typeof body;
    } catch {
      continue;
    }
    if (typeof body !== "object" || body === null || typeof body.at !== "number") continue;
    if (Math.abs(now - body.at) > windowMs) continue;
    const of = /^(\d+)\/(\d+)$/.exec(typeof body.shard === "string" ? body.shard : "");
    const count = body.shard === null ? 1 : of ? Number(of[2]) : null;
    if (count === null) continue;
    live.set(count, [...(live.get(count) ?? []), topic]);
  }
  return live;
}

/** `--create-sessions` cannot run: no external broker, a password not in the environment, a bad count. */
export class ShardSessionsError extends OperatorError {
  override readonly name = "ShardSessionsError";
}

/** What `--create-sessions` did. */
export interface ShardSessionsReport {
  /**
   * The shard count of the running layout (1 when unsharded): fleet.toml's `[fleet] shard`, which the
   * gateways' recent retained health agrees with (another layout there is refused).
   */
  readonly from: number;
  /**
   * The retained health topics of the running gateways that showed `from`; empty when none published in
   * the last 60 s (the gateways are down, or an ACL hides it): then `from` is fleet.toml's word alone.
   */
  readonly seen: readonly string[];
  readonly to: number;
  /** Each session the new layout uses that the running one does not, in index order (0: `<client_id>`). */
  readonly sessions: readonly (PreparedSession & { readonly index: number })[];
  /** The filters each was subscribed to. */
  readonly filters: readonly string[];
}

/**
 * Create the sessions a layout of `to` shards needs that the layout `spec` runs in lacks, on the
 * broker `spec` names, with the password from `env` (`[broker] password_env`). Sessions the running
 * layout uses are never touched: connecting with a running gateway's client id would take its
 * session over. The gateways' retained health is read first, whatever `to` is: a fleet.toml already
 * edited to the new count would otherwise find nothing to create, or the wrong sessions.
 */
export async function createShardSessions(
  spec: FleetSpec,
  to: number,
  env: Readonly<Record<string, string | undefined>>,
): Promise<ShardSessionsReport> {
  if (!Number.isInteger(to) || to < 1 || to > MAX_SHARDS)
    throw new ShardSessionsError(`--to must be a shard count from 1 to ${MAX_SHARDS}`);
  const ext = spec.broker.external;
  if (!ext)
    throw new ShardSessionsError(
      "fleet.toml names no external broker ([broker] url): only gateways on an external broker have " +
        "broker sessions to prepare (shards need one)",
    );
  const password = ext.password_env === null ? null : (env[ext.password_env] ?? null);
  if (ext.password_env !== null && password === null)
    throw new ShardSessionsError(
      `[broker] password_env names ${ext.password_env}, which is not set in the environment`,
    );
  const broker = {
    url: ext.url,
    username: ext.username,
    password,
    ca: ext.ca_file === null ? null : readFileSync(ext.ca_file, "utf8"),
    protocolVersion: ext.protocol_version,
  };
  const from = spec.fleet.shard?.count ?? 1;
  const seen = await runningLayoutSeen(broker, from);
  // The sessions the gateways of this layout use now (a "1/1" shard uses `-shard-1`).
  const shard = spec.fleet.shard;
  const fresh = sessionsAdded(hadSessions(shard ? [shard] : [], shard === null), to);
  const filters = intakeFilters(spec, to > 1 ? { index: 1, count: to } : null);
  if (fresh.length === 0) return { from, seen, to, sessions: [], filters };
  const ids = fresh.map((i) => shardClientId(ext.client_id, i === 0 ? null : { index: i, count: to }));
  const { prepareSessions } = await import("../../broker/index.ts");
  const made = await prepareSessions(broker, ids, filters);
  return { from, seen, to, sessions: made.map((s, k) => ({ ...s, index: fresh[k]! })), filters };
}

/**
 * The retained health topics showing that gateways of `from` shards (fleet.toml's layout) run. A
 * fleet.toml that is not the one the gateways run (one already edited to the new count) would have a
 * running gateway's session taken over as if it were new, or a new one not made: health of another
 * layout is refused.
 */
async function runningLayoutSeen(broker: SessionBrokerOptions, from: number): Promise<string[]> {
  const { readRetained } = await import("../../broker/index.ts");
  const live = liveLayouts(await readRetained(broker, [topics.health, `${topics.health}/+`]), Date.now());
  const other = [...live].find(([count]) => count !== from);
  if (other)
    throw new ShardSessionsError(
      `fleet.toml says the running layout is ${layoutName(from)}, but gateways of ${layoutName(other[0])} ` +
        `published their health in the last ${LIVE_HEALTH_MS / 1000} s (${other[1].join(", ")}): run ` +
        "--create-sessions with the fleet.toml the running gateways use, before changing its shard",
    );
  return live.get(from) ?? [];
}

/** "2 shards", or "1 gateway (unsharded)". */
function layoutName(count: number): string {
  return count === 1 ? "1 gateway (unsharded)" : `${count} shards`;
}
