/** Which persistence an embedded broker runs on (`[broker] persistence`). */
import type { Logger } from "pino";
import { LibsqlPersistence, type PersistenceStats } from "./libsql.ts";
import { memoryPersistence } from "./memory.ts";
import type { RetainedOrder } from "./retained-order.ts";
import type { SessionExpiry } from "./sessions.ts";

/**
 * "libsql": sessions, offline queues, retained messages, wills and QoS 2 packets in a file
 * of their own, surviving restarts and `kill -9`. "memory": aedes' default, lost on any restart.
 */
export type PersistenceChoice =
  | {
      readonly kind: "memory";
      /** Most messages kept per client (queued + in flight); past it new ones are dropped and counted. */
      readonly maxOfflineMessages: number;
      /** Most payload bytes kept per client, the same way; 0 or absent: no bound. */
      readonly maxOfflineBytes?: number;
      /** Most payload bytes kept in all clients' queues together, the same way; 0 or absent: no bound. */
      readonly maxOfflineBytesTotal?: number;
    }
  | {
      readonly kind: "libsql";
      readonly path: string;
      readonly synchronous: "full" | "normal";
      /** Most messages kept per client (queued + in flight); past it new ones are dropped and counted. */
      readonly maxOfflineMessages: number;
      /** Most payload bytes kept per client, the same way; 0 or absent: no bound. */
      readonly maxOfflineBytes?: number;
      /** Most payload bytes kept in all clients' queues together, the same way; 0 or absent: no bound. */
      readonly maxOfflineBytesTotal?: number;
    };

/** A persistence as the embedded broker holds it: what aedes is given, its counts, its close. */
export interface BrokerPersistence {
  readonly aedes: object;
  /** Its clean = false sessions' ages: `[broker] session_expiry_days`. */
  readonly sessions: SessionExpiry;
  /** Drops a retained copy older than a message of its topic already sent live (./retained-order.ts). */
  readonly retained: RetainedOrder;
  /** The subscriptions clean = false sessions hold, their clients connected or not. */
  subscriptions(): number;
  /** The retained messages held, `$SYS` ones included. */
  retainedCount(): number;
  stats(): PersistenceStats;
  destroy(): Promise<void>;
}

/**
 * In memory, as fleet.toml's defaults have it, when no persistence is chosen. Never aedes' own in-memory
 * persistence: its outgoing queues keep a copy per matching filter and close a client whose overlapping
 * filters matched a queued QoS 2 message (the fixes are in `memoryPersistence`'s queues).
 */
export const DEFAULT_PERSISTENCE: PersistenceChoice = { kind: "memory", maxOfflineMessages: 1000 };

/** The persistence chosen (DEFAULT_PERSISTENCE when none is). */
export function persistenceFor(choice: PersistenceChoice | undefined, logger: Logger): BrokerPersistence {
  choice ??= DEFAULT_PERSISTENCE;
  if (choice.kind === "memory")
    return memoryPersistence({
      maxOfflineMessages: choice.maxOfflineMessages,
      maxOfflineBytes: choice.maxOfflineBytes,
      maxOfflineBytesTotal: choice.maxOfflineBytesTotal,
      logger,
    });
  const libsql = new LibsqlPersistence({
    path: choice.path,
    synchronous: choice.synchronous,
    maxOfflineMessages: choice.maxOfflineMessages,
    maxOfflineBytes: choice.maxOfflineBytes,
    maxOfflineBytesTotal: choice.maxOfflineBytesTotal,
    logger,
  });
  return {
    aedes: libsql,
    sessions: libsql,
    retained: libsql.retained,
    subscriptions: () => libsql.subscriptionCount(),
    retainedCount: () => libsql.retainedCount(),
    stats: () => libsql.stats(),
    destroy: () => libsql.destroy(),
  };
}
