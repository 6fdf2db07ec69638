/**
 * The broker's persistence (issue 12): aedes sessions, offline queues, retained messages,
 * wills and QoS 2 packets on a libSQL file of its own, or in memory (aedes' in-memory persistence with
 * the outgoing queues of our own).
 */
export {
  BrokerStoreTooNew,
  LibsqlPersistence,
  type LibsqlPersistenceOptions,
  type PersistenceStats,
  type StoredSubscription,
} from "./libsql.ts";
export { type ClientRef, OutgoingQueues, type QueueEntry } from "./outgoing.ts";
export { SubscriptionTrie, type TopicSubscription } from "./trie.ts";
export { SerialWriter, type BatchRunner } from "./writer.ts";
export { persistenceFor, type BrokerPersistence, type PersistenceChoice } from "./choice.ts";
export { memoryPersistence, type MemoryPersistence } from "./memory.ts";
export { isSessionMark } from "./sessions.ts";
export { RetainedOrder } from "./retained-order.ts";
