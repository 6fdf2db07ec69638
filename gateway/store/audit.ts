/**
 * The audit log of operator actions: appended through the group committer (durable before
 * the HTTP response goes out), read newest first in pages.
 */
import { desc, lt } from "drizzle-orm";
import * as t from "./schema.ts";
import type { Store } from "./store.ts";

/** One operator action to record. */
export interface NewAuditRecord {
  readonly at: number;
  readonly actor: string;
  readonly action: string;
  readonly target: string | null;
  readonly status: number;
  readonly detail: string | null;
}

/** Append one record; resolves once it is committed. */
export async function appendAudit(store: Store, r: NewAuditRecord): Promise<void> {
  await store.writer.write([store.db.insert(t.audit).values({ ...r, gateway: store.gatewayId })]);
}

/**
 * Append `records` and set meta `key` to `value` in one transaction: what a record was written for
 * (e.g. the tokens file as audited, `tokens.audited`) moves with it, so a crash neither loses nor
 * doubles it.
 */
export async function appendAuditWithMeta(
  store: Store,
  records: readonly NewAuditRecord[],
  key: string,
  value: string,
): Promise<void> {
  await store.writer.write([
    ...records.map((r) => store.db.insert(t.audit).values({ ...r, gateway: store.gatewayId })),
    store.db.insert(t.meta).values({ key, value }).onConflictDoUpdate({ target: t.meta.key, set: { value } }),
  ]);
}

/** Records newest first: `limit` of them with `seq` below `before` (when given). */
export function listAudit(store: Store, opts: { limit: number; before?: number }): Promise<t.AuditRow[]> {
  const q = store.db.select().from(t.audit);
  return (opts.before === undefined ? q : q.where(lt(t.audit.seq, opts.before)))
    .orderBy(desc(t.audit.seq))
    .limit(opts.limit)
    .all();
}

/** An audit record as the API and `fleet audit` show it. */
export function auditView(r: t.AuditRow) {
  return {
    seq: r.seq,
    at: r.at,
    actor: r.actor,
    action: r.action,
    target: r.target,
    status: r.status,
    result: r.status < 400 ? "ok" : "refused",
    detail: r.detail,
  };
}
