/**
 * `persistence = "memory"`: aedes' in-memory persistence for subscriptions, retained messages, wills
 * and incoming QoS 2 packets, with the outgoing queues broker.db's index keeps (./outgoing.ts), holding
 * the packets themselves. So each client's queue is bounded by `max_offline_messages` as broker.db's
 * is (unbounded, a clean = false subscriber that never comes back would keep every QoS 1 output in the
 * gateway's memory until it runs out), queued copies have RETAIN 0 (aedes' own keep the flag the
 * message was published with), and none of what aedes' own queues get wrong: a session coming back
 * while messages kept coming was dropped, a second pending QoS 2 PUBREL took the first one's place, a
 * new packet could take an identifier still in flight.
 */
import memory from "aedes-persistence";
import { Readable } from "node:stream";
import type { Logger } from "pino";
import { type QueuedFor, queuedPerClient, queuedRetained, type StoredPacket } from "./codec.ts";
import type { PersistenceStats, StoredSubscription } from "./libsql.ts";
import { type ClientRef, num, OutgoingQueues, payloadBytes } from "./outgoing.ts";
import { RetainedOrder } from "./retained-order.ts";
import { restoredSubscriptions, SessionAges, type SessionExpiry } from "./sessions.ts";

/** What the in-memory persistence is given. */
export interface MemoryPersistenceOptions {
  /** Most messages kept per client (queued + in flight); past it new ones are dropped. */
  readonly maxOfflineMessages: number;
  /** Most payload bytes kept per client (queued + in flight); past it new ones are dropped. 0 or absent: no bound. */
  readonly maxOfflineBytes?: number;
  /** Most payload bytes in all clients' queues together; past it new ones are dropped. 0 or absent: no bound. */
  readonly maxOfflineBytesTotal?: number;
  readonly logger?: Logger;
  /** Clock of the drop log's rate limit and of the sessions' ages (ms since the epoch). */
  readonly now?: () => number;
}

type Memory = ReturnType<typeof memory>;

/** aedes' memory persistence, as aedes takes it, and the counts `stats()` reports. */
export interface MemoryPersistence {
  /** What to hand aedes as its `persistence`. */
  readonly aedes: Memory;
  readonly sessions: SessionExpiry;
  readonly retained: RetainedOrder;
  /** The subscriptions clean = false sessions hold, their clients connected or not. */
  subscriptions(): number;
  /** The retained messages held, `$SYS` ones included. */
  retainedCount(): number;
  stats(): PersistenceStats;
  destroy(): Promise<void>;
}

/** aedes' memory persistence with the outgoing queues replaced. */
export function memoryPersistence(opts: MemoryPersistenceOptions): MemoryPersistence {
  const queues = new OutgoingQueues({
    max: opts.maxOfflineMessages,
    maxBytes: opts.maxOfflineBytes ?? 0,
    maxTotalBytes: opts.maxOfflineBytesTotal ?? 0,
    logger: opts.logger,
    now: opts.now,
  });

  // aedes 1.2.0 calls these without a callback (the async form).
  const outgoingEnqueueCombi = async (subs: readonly QueuedFor[], packet: StoredPacket) => {
    // aedes asks for every QoS > 0 publish; most match no clean = false session.
    if (subs.length === 0) return;
    const brokerId = (packet.brokerId as string | undefined) ?? null;
    const brokerCounter = num(packet.brokerCounter);
    for (const { copy, clientIds } of queuedPerClient(subs, packet))
      queues.enqueue(clientIds, String(packet.topic), {
        brokerId,
        brokerCounter,
        messageId: null,
        packet: copy,
        bytes: payloadBytes(copy),
      });
  };
  const outgoing = {
    outgoingEnqueueCombi,
    outgoingEnqueue: (sub: QueuedFor, packet: StoredPacket) => outgoingEnqueueCombi([sub], packet),
    /** deliveries.ts `RetainedQueue`. */
    queueRetained(clientId: string, packet: StoredPacket, qos: number): boolean {
      const entry = { brokerId: String(packet.brokerId), brokerCounter: num(packet.brokerCounter), messageId: null };
      const queued = queuedRetained(packet, qos);
      return queues.queueRetained(clientId, String(packet.topic), {
        ...entry,
        packet: queued,
        bytes: payloadBytes(queued),
      });
    },
    /** deliveries.ts `LiveClaims`. */
    claimLive: (client: ClientRef, brokerId: string, brokerCounter: number): boolean =>
      queues.claimLive(client, brokerId, brokerCounter),
    async outgoingUpdate(client: ClientRef, packet: StoredPacket): Promise<void> {
      const numbered = queues.number(client, packet);
      if (numbered?.replaces || numbered?.joined) numbered.entry.packet = packet;
    },
    async outgoingClearMessageId(client: ClientRef, packet: { messageId?: number }): Promise<unknown> {
      const entry = queues.clear(client.id, num(packet?.messageId));
      return entry ? (entry.inFlight ?? entry.packet) : undefined;
    },
    outgoingStream(client: ClientRef): Readable {
      const snapshot = queues.snapshot(client);
      return Readable.from(
        (function* () {
          for (const entry of snapshot.entries) {
            if (!snapshot.hands(entry)) continue;
            const packet: StoredPacket = { ...entry.packet, messageId: entry.messageId ?? undefined };
            queues.handedOver(packet);
            yield packet;
          }
        })(),
      );
    },
  };
  const base = memory();
  // Which clean = false sessions exist, subscriptions or not (./sessions.ts).
  const sessions = new Set<string>();
  const ages = new SessionAges();
  const now = opts.now ?? Date.now;
  // aedes-persistence's types say callbacks; aedes 1.2.0 calls the async form, as above.
  const sessionState = base as unknown as {
    subscriptionsByClient(client: ClientRef): Promise<StoredSubscription[]>;
    addSubscriptions(client: ClientRef, subs: readonly { topic: string }[]): Promise<unknown>;
    removeSubscriptions(client: ClientRef, topics: readonly string[]): Promise<unknown>;
    cleanSubscriptions(client: ClientRef): Promise<unknown>;
    cleanIncoming(client: ClientRef): Promise<unknown>;
  };
  const baseSubscriptions = sessionState.subscriptionsByClient.bind(base);
  const baseAdd = sessionState.addSubscriptions.bind(base);
  const baseRemove = sessionState.removeSubscriptions.bind(base);
  const cleanBase = sessionState.cleanSubscriptions.bind(base);
  // The topics each session subscribes to, counted as aedes' memory persistence keeps them ($SYS subscriptions).
  const topics = new Map<string, Set<string>>();
  let subscriptionCount = 0;
  const cleanCounted = (client: ClientRef): Promise<unknown> => {
    subscriptionCount -= topics.get(client.id)?.size ?? 0;
    topics.delete(client.id);
    return cleanBase(client);
  };
  const presence = {
    async addSubscriptions(client: ClientRef, subs: readonly { topic: string }[]): Promise<void> {
      let held = topics.get(client.id);
      if (!held) topics.set(client.id, (held = new Set()));
      for (const { topic } of subs) {
        if (held.has(topic)) continue;
        held.add(topic);
        subscriptionCount++;
      }
      await baseAdd(client, subs);
    },
    async removeSubscriptions(client: ClientRef, removed: readonly string[]): Promise<void> {
      const held = topics.get(client.id);
      for (const topic of removed) if (held?.delete(topic)) subscriptionCount--;
      if (held?.size === 0) topics.delete(client.id);
      await baseRemove(client, removed);
    },
    async subscriptionsByClient(client: ClientRef): Promise<StoredSubscription[]> {
      const existed = sessions.has(client.id);
      sessions.add(client.id);
      ages.touch(client.id, now());
      return restoredSubscriptions(await baseSubscriptions(client), existed);
    },
    async cleanSubscriptions(client: ClientRef): Promise<void> {
      sessions.delete(client.id);
      ages.forget(client.id);
      await cleanCounted(client);
    },
  };
  const expiry: SessionExpiry = {
    left(clientId, at) {
      if (sessions.has(clientId)) ages.touch(clientId, at);
    },
    async expire(at, maxAgeMs, connected) {
      const { due } = ages.sweep(sessions, connected, at, at - maxAgeMs);
      for (const id of due) {
        sessions.delete(id);
        ages.forget(id);
        queues.dropClient(id);
      }
      // Started together, in this turn: aedes' memory persistence does its work before its first await.
      await Promise.all(due.flatMap((id) => [cleanCounted({ id }), sessionState.cleanIncoming({ id })]));
      return due;
    },
    count: () => sessions.size,
  };
  // Retained copies sent to a new subscription, stamped to be dropped when older than a live message.
  const retained = new RetainedOrder();
  // aedes' store keeps its map private; the topics it holds, mirrored to count them.
  const retainedTopics = new Set<string>();
  const retainedBase = base as unknown as {
    storeRetained(packet: StoredPacket): Promise<void>;
    createRetainedStreamCombi(patterns: readonly string[]): Readable;
  };
  const baseStore = retainedBase.storeRetained.bind(base);
  const baseStream = retainedBase.createRetainedStreamCombi.bind(base);
  const retainedInOrder = {
    storeRetained(packet: StoredPacket): Promise<void> {
      const topic = String(packet.topic);
      retained.stored(topic);
      if (payloadBytes(packet) === 0) retainedTopics.delete(topic);
      else retainedTopics.add(topic);
      return baseStore(packet);
    },
    createRetainedStreamCombi: (patterns: readonly string[]) => retained.stream(baseStream(patterns)),
  };
  Object.assign(base, outgoing, presence, retainedInOrder);
  return {
    aedes: base,
    retained,
    subscriptions: () => subscriptionCount,
    retainedCount: () => retainedTopics.size,
    sessions: expiry,
    stats: () => ({ offlineDropped: queues.dropped, queued: queues.size, queuedBytes: queues.bytes }),
    // Nothing to write or close: it is memory, gone with the process.
    destroy: async () => {},
  };
}
