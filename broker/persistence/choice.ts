/** Which persistence an embedded broker runs on (`[broker] persistence`). */
import type { Logger } from "pino";
import { LibsqlPersistence, type PersistenceStats } from "./libsql.ts";
import { memoryPersistence } from "./memory.ts";

/**
 * "libsql": sessions, offline queues, retained messages, wills and QoS 2 packets in a file
 * of their own, surviving restarts and `kill -9`. "memory": aedes' default, lost on any restart.
 */
export type PersistenceChoice =
  | {
      readonly kind: "memory";
      /** Most messages kept per client (queued + in flight); past it new ones are dropped and counted. */
      readonly maxOfflineMessages: number;
    }
  | {
      readonly kind: "libsql";
      readonly path: string;
      readonly synchronous: "full" | "normal";
      /** Most messages kept per client (queued + in flight); past it new ones are dropped and counted. */
      readonly maxOfflineMessages: number;
    };

/** A persistence as the embedded broker holds it: what aedes is given, its counts, its close. */
export interface BrokerPersistence {
  readonly aedes: object;
  stats(): PersistenceStats;
  destroy(): Promise<void>;
}

/** The persistence chosen; null (no choice given): aedes' own in-memory default, unbounded. */
export function persistenceFor(choice: PersistenceChoice | undefined, logger: Logger): BrokerPersistence | null {
  if (!choice) return null;
  if (choice.kind === "memory") return memoryPersistence({ maxOfflineMessages: choice.maxOfflineMessages, logger });
  const libsql = new LibsqlPersistence({
    path: choice.path,
    synchronous: choice.synchronous,
    maxOfflineMessages: choice.maxOfflineMessages,
    logger,
  });
  return { aedes: libsql, stats: () => libsql.stats(), destroy: () => libsql.destroy() };
}
