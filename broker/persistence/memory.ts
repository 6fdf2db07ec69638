/**
 * `persistence = "memory"`: aedes' in-memory persistence, with each client's queue bounded by
 * `max_offline_messages` as broker.db's is (./libsql.ts). Unbounded, a clean = false subscriber that
 * never comes back would keep every QoS 1 output in the gateway's memory until it runs out. Queued
 * copies have RETAIN 0, as broker.db's (aedes' own keep the flag the message was published with).
 */
import memory from "aedes-persistence";
import type { Logger } from "pino";
import type { PersistenceStats } from "./libsql.ts";

/** The drop log's rate limit (one line per 10 s at most, with the count since the last one). */
const DROP_LOG_INTERVAL_MS = 10_000;

/** What the in-memory persistence is given. */
export interface MemoryPersistenceOptions {
  /** Most messages kept per client (queued + in flight); past it new ones are dropped. */
  readonly maxOfflineMessages: number;
  readonly logger?: Logger;
  /** Clock for the drop log's rate limit. */
  readonly now?: () => number;
}

type Memory = ReturnType<typeof memory>;
type Enqueue = (subs: { clientId: string }[], packet: { topic?: unknown; retain?: boolean }) => Promise<void>;
type Clear = (client: { id: string }, packet: unknown) => Promise<unknown>;

/** aedes' memory persistence, as aedes takes it, and the counts `stats()` reports. */
export interface MemoryPersistence {
  /** What to hand aedes as its `persistence`. */
  readonly aedes: Memory;
  stats(): PersistenceStats;
  destroy(): Promise<void>;
}

/**
 * aedes' memory persistence with bounded queues. A message is removed from a client's queue only by
 * `outgoingClearMessageId` (its PUBACK, or a clean-session CONNECT emptying the queue one by one), so
 * counting enqueues and clears per client follows the queue's length.
 */
export function memoryPersistence(opts: MemoryPersistenceOptions): MemoryPersistence {
  const max = opts.maxOfflineMessages;
  if (!Number.isInteger(max) || max < 1)
    throw new RangeError(`maxOfflineMessages must be a positive integer, got ${max}`);
  const now = opts.now ?? Date.now;
  const base = memory();
  const enqueue = (base.outgoingEnqueueCombi as unknown as Enqueue).bind(base);
  const clear = (base.outgoingClearMessageId as unknown as Clear).bind(base);
  const held = new Map<string, number>();
  let dropped = 0;
  let droppedSinceLog = 0;
  let lastDropLog = Number.NEGATIVE_INFINITY;

  const drop = (clientId: string, topic: string) => {
    dropped++;
    droppedSinceLog++;
    const t = now();
    if (t - lastDropLog < DROP_LOG_INTERVAL_MS) return;
    opts.logger?.warn(
      { client: clientId, topic, dropped: droppedSinceLog, total: dropped, max },
      "offline queue full (max_offline_messages); message dropped for this client",
    );
    lastDropLog = t;
    droppedSinceLog = 0;
  };

  // aedes 1.2.0 calls both without a callback (the async form).
  const capped: Enqueue = async (subs, packet) => {
    const kept = subs.filter(({ clientId }) => {
      const n = held.get(clientId) ?? 0;
      if (n >= max) {
        drop(clientId, String(packet.topic));
        return false;
      }
      held.set(clientId, n + 1);
      return true;
    });
    // MQTT-3.3.1-9: a queued message goes out because it matched an established subscription: RETAIN 0.
    if (kept.length > 0) await enqueue(kept, { ...packet, retain: false });
  };
  const cleared: Clear = async (client, packet) => {
    const removed = await clear(client, packet);
    if (removed) {
      const n = (held.get(client.id) ?? 1) - 1;
      if (n > 0) held.set(client.id, n);
      else held.delete(client.id);
    }
    return removed;
  };
  Object.assign(base, { outgoingEnqueueCombi: capped, outgoingClearMessageId: cleared });

  return {
    aedes: base,
    stats: () => ({ offlineDropped: dropped, queued: [...held.values()].reduce((a, b) => a + b, 0) }),
    // Nothing to write or close: it is memory, gone with the process.
    destroy: async () => {},
  };
}
