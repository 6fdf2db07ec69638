/** Which persistence an embedded broker runs on (`[broker] persistence`). */
import type { Logger } from "pino";
import { LibsqlPersistence } from "./libsql.ts";

/**
 * "libsql": sessions, offline queues, retained messages, wills and QoS 2 packets in a file
 * of their own, surviving restarts and `kill -9`. "memory": aedes' default, lost on any restart.
 */
export type PersistenceChoice =
  | { readonly kind: "memory" }
  | {
      readonly kind: "libsql";
      readonly path: string;
      readonly synchronous: "full" | "normal";
      /** Most messages kept per client (queued + in flight); past it new ones are dropped and counted. */
      readonly maxOfflineMessages: number;
    };

/** The persistence object to hand aedes, or null for its in-memory default. */
export function persistenceFor(choice: PersistenceChoice | undefined, logger: Logger): LibsqlPersistence | null {
  if (!choice || choice.kind === "memory") return null;
  return new LibsqlPersistence({
    path: choice.path,
    synchronous: choice.synchronous,
    maxOfflineMessages: choice.maxOfflineMessages,
    logger,
  });
}
