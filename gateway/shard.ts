/**
 * Agent shards (docs/shards.md): several gateways share one fleet on an external broker, each
 * owning the agents that rendezvous (highest-random-weight) hashing gives its index. Pure
 * functions over plain values, used by the spec, routing, the send tool and `fleet reshard`.
 */
import { createHash } from "node:crypto";

/** `[fleet] shard = "i/N"`: this gateway is shard `index` (1-based) of `count`. */
export interface ShardSpec {
  readonly index: number;
  readonly count: number;
}

/** Most shards a fleet may have (ownership costs one hash per shard per agent looked up). */
export const MAX_SHARDS = 64;

/** Parse `"i/N"`; a string says what is wrong with it. */
export function parseShard(raw: string): ShardSpec | string {
  const m = /^(\d{1,3})\/(\d{1,3})$/.exec(raw.trim());
  if (!m) return 'must be "i/N" (this gateway\'s shard index and the shard count, e.g. "2/4")';
  const index = Number(m[1]);
  const count = Number(m[2]);
  if (count < 1 || count > MAX_SHARDS) return `must have a shard count N from 1 to ${MAX_SHARDS}`;
  if (index < 1 || index > count) return `must have an index i from 1 to N (${count})`;
  return { index, count };
}

/**
 * The weight of shard `index` for `agent`: the first 6 bytes of SHA-256(`<agent id>\n<index>`)
 * as an integer. Stable across releases and machines, so ownership can be computed anywhere.
 */
function weight(agent: string, index: number): number {
  return createHash("sha256").update(`${agent}\n${index}`).digest().readUIntBE(0, 6);
}

/**
 * The shard (1..count) that owns `agent`: the index with the highest weight. Changing the count
 * from N to M moves only the agents whose winner changes (about 1 - N/M of them when growing).
 */
export function ownerShard(agent: string, count: number): number {
  const key = `${count}\n${agent}`;
  const known = owners.get(key);
  if (known !== undefined) return known;
  let best = 1;
  let bestWeight = -1;
  for (let i = 1; i <= count; i++) {
    const w = weight(agent, i);
    if (w > bestWeight) {
      best = i;
      bestWeight = w;
    }
  }
  // Bounded: a fleet with more agents than this recomputes (a few µs per shard).
  if (owners.size >= OWNERS_CACHED) owners.clear();
  owners.set(key, best);
  return best;
}

/** Owners looked up recently (every message is routed, so each delivery asks). */
const owners = new Map<string, number>();
const OWNERS_CACHED = 100_000;

/** Whether this gateway owns `agent` (always, when the fleet is not sharded). */
export function ownsAgent(shard: ShardSpec | null, agent: string): boolean {
  return shard === null || shard.count === 1 || ownerShard(agent, shard.count) === shard.index;
}

/** `"i/N"`. */
export function shardLabel(s: ShardSpec): string {
  return `${s.index}/${s.count}`;
}

/** The fleet id a shard replicates under: `<fleet>-shard-<i>-of-<N>`. */
export function shardFleetName(fleet: string, s: ShardSpec | null): string {
  return s === null ? fleet : `${fleet}-shard-${s.index}-of-${s.count}`;
}

/** Split a shard fleet id back into the fleet's name and its shard; null for any other name. */
export function parseShardFleetName(name: string): { fleet: string; shard: ShardSpec } | null {
  const m = /^(.+)-shard-(\d{1,3})-of-(\d{1,3})$/.exec(name);
  if (!m) return null;
  const shard = parseShard(`${m[2]}/${m[3]}`);
  return typeof shard === "string" ? null : { fleet: m[1]!, shard };
}

/**
 * The client id of a shard's persistent session: the configured one suffixed with the index
 * (not the count, so a session survives `fleet reshard` for the indexes both counts have).
 */
export function shardClientId(clientId: string, s: ShardSpec | null): string {
  return s === null ? clientId : `${clientId}-shard-${s.index}`;
}
