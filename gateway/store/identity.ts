/**
 * A restored data dir replicates as a gateway of its own (docs/replication.md, "Restoring a backup").
 * The backup holds the gateway id and the local sequence numbers (audit, stimuli, the queue) as they
 * were when it was taken, while the center may already hold what the lost copy went on to push under
 * that id with the same numbers: rows the center keeps once would silently keep the lost copy's, and
 * a chain would fork under one id. So `fleet restore` mints the data dir a new gateway id, notes the
 * one it supersedes, and clears the replication cursor: with `[replication]`, the next start queues
 * the whole restored history under the new id, and its pushes mark the old id superseded at the center
 * (its rows stay there, as the record of what the lost copy had pushed; reads leave them out).
 */
import type { Client } from "@libsql/client";

/** Local `meta` key: the gateway id a restored data dir supersedes at the center. */
export const SUPERSEDES_META = "replication.supersedes";

/**
 * Give the fleet database `db` (a restored copy, no gateway on it) a new gateway id and a fresh
 * replication cursor, in one transaction. Returns the new id and the one it replaces.
 */
export async function forkGatewayIdentity(db: Client): Promise<{ gateway: string; previous: string | null }> {
  const rs = await db.execute("SELECT value FROM meta WHERE key = 'gateway_id'");
  const previous = rs.rows[0] ? String(rs.rows[0][0]) : null;
  const gateway = Bun.randomUUIDv7();
  const meta = `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value`;
  await db.batch(
    [
      { sql: meta, args: ["gateway_id", gateway] },
      ...(previous ? [{ sql: meta, args: [SUPERSEDES_META, previous] }] : []),
      // Replication off with an empty queue: the next start with [replication] queues everything again.
      "DELETE FROM repl_pending",
      `DELETE FROM meta WHERE key IN ('replication', 'replication.url', 'replication.confirmed_seq',
        'replication.last_push_at', 'replication.lost_rows', 'replication.over_backlog_at')`,
    ],
    "write",
  );
  return { gateway, previous };
}
