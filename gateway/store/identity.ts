/**
 * A restored data dir replicates as a gateway of its own (docs/replication.md, "Restoring a backup").
 * The backup holds the gateway id and the local sequence numbers (audit, stimuli, the queue) as they
 * were when it was taken, while the center may already hold what the lost copy went on to push under
 * that id with the same numbers: rows the center keeps once would silently keep the lost copy's, and
 * a chain would fork under one id. So `fleet restore` mints the data dir a new gateway id, notes the
 * ones it supersedes, and clears the replication cursor: with `[replication]`, the next start queues
 * the whole restored history under the new id, and its pushes mark the old id superseded at the center
 * (its rows stay there, as the record of what the lost copy had pushed; reads leave them out).
 */
import type { Client } from "@libsql/client";

/**
 * Local `meta` key: the gateway ids a restored data dir supersedes at the center, oldest first, as a JSON
 * array. A backup of a restored data dir that never pushed still owes the center its ancestors' marks, so
 * each restore adds the id it replaces to the list instead of overwriting it. Releases before the list
 * kept one bare id here; `supersededIds` reads both.
 */
export const SUPERSEDES_META = "replication.supersedes";

/** The ids `replication.supersedes` holds (a JSON array, or one bare id as earlier releases wrote it). */
export function supersededIds(value: string | null): string[] {
  if (value === null || value === "") return [];
  if (!value.startsWith("[")) return [value];
  const ids: unknown = JSON.parse(value);
  return Array.isArray(ids) ? ids.filter((id): id is string => typeof id === "string" && id !== "") : [];
}

/**
 * Give the fleet database `db` (a restored copy, no gateway on it) a new gateway id and a fresh
 * replication cursor, in one transaction. Returns the new id and every one it supersedes, oldest first.
 */
export async function forkGatewayIdentity(db: Client): Promise<{ gateway: string; supersedes: string[] }> {
  const read = async (key: string) => {
    const rs = await db.execute({ sql: "SELECT value FROM meta WHERE key = ?", args: [key] });
    return rs.rows[0] ? String(rs.rows[0][0]) : null;
  };
  const previous = await read("gateway_id");
  const earlier = supersededIds(await read(SUPERSEDES_META));
  const supersedes = previous === null || earlier.includes(previous) ? earlier : [...earlier, previous];
  const gateway = Bun.randomUUIDv7();
  const meta = `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value`;
  await db.batch(
    [
      { sql: meta, args: ["gateway_id", gateway] },
      ...(supersedes.length > 0 ? [{ sql: meta, args: [SUPERSEDES_META, JSON.stringify(supersedes)] }] : []),
      // Replication off with an empty queue: the next start with [replication] queues everything again.
      "DELETE FROM repl_pending",
      `DELETE FROM meta WHERE key IN ('replication', 'replication.url', 'replication.confirmed_seq',
        'replication.last_push_at', 'replication.lost_rows', 'replication.over_backlog_at')`,
    ],
    "write",
  );
  return { gateway, supersedes };
}
