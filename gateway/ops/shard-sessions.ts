/**
 * `fleet reshard --to N --create-sessions` (docs/shards.md#changing-the-number-of-shards): before
 * the gateways stop for a reshard, give the broker the persistent sessions the new layout uses
 * that the running one does not have (a new shard index when growing; `<client_id>` when going
 * back to one gateway), each subscribed to every filter of the fleet. Without them, what devices
 * publish for those shards' agents between the stop and each new gateway's first connection is
 * queued for nobody, so lost.
 */
import { readFileSync } from "node:fs";
import { prepareSessions, type PreparedSession } from "../../broker/index.ts";
import { topics } from "../protocol.ts";
import { MAX_SHARDS, shardClientId, type ShardSpec } from "../shard.ts";
import type { FleetSpec } from "../spec/index.ts";

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

/** `--create-sessions` cannot run: no external broker, a password not in the environment, a bad count. */
export class ShardSessionsError extends Error {
  override readonly name = "ShardSessionsError";
}

/** What `--create-sessions` did. */
export interface ShardSessionsReport {
  /** The shard count of the running layout (fleet.toml's `[fleet] shard`; 1 when unsharded). */
  readonly from: number;
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
 * session over. A `to` that needs no new session connects to nothing.
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
  const from = spec.fleet.shard?.count ?? 1;
  // The sessions the gateways of this fleet.toml's layout use now (a "1/1" shard uses `-shard-1`).
  const shard = spec.fleet.shard;
  const fresh = sessionsAdded(hadSessions(shard ? [shard] : [], shard === null), to);
  const filters = intakeFilters(spec, to > 1 ? { index: 1, count: to } : null);
  if (fresh.length === 0) return { from, to, sessions: [], filters };
  const password = ext.password_env === null ? null : (env[ext.password_env] ?? null);
  if (ext.password_env !== null && password === null)
    throw new ShardSessionsError(
      `[broker] password_env names ${ext.password_env}, which is not set in the environment`,
    );
  const ids = fresh.map((i) => shardClientId(ext.client_id, i === 0 ? null : { index: i, count: to }));
  const made = await prepareSessions(
    {
      url: ext.url,
      username: ext.username,
      password,
      ca: ext.ca_file === null ? null : readFileSync(ext.ca_file, "utf8"),
      protocolVersion: ext.protocol_version,
    },
    ids,
    filters,
  );
  return { from, to, sessions: made.map((s, k) => ({ ...s, index: fresh[k]! })), filters };
}
