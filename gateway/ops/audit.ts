/**
 * The audit record of an operator action taken on a stopped gateway's data dir (the CLI is then its
 * only writer): the same action names and targets the running gateway records for its HTTP routes
 * (http/access.ts), by `local:<user>`, as `fleet token` records its offline changes (docs/access.md).
 */
import { userInfo } from "node:os";
import { appendAudit, type Store } from "../store/index.ts";

/** One offline action: e.g. `agent.pause` on `type/key`, `quarantine.retry` on `stimulus 12`, `gc`. */
export interface LocalAction {
  readonly action: string;
  readonly target: string | null;
  /** As the HTTP route would answer: 200 done, 404 not found, 409 refused in this state. */
  readonly status: number;
  readonly detail?: string | null;
}

/** Append the action to the data dir's audit log as done by `local:<user>`; durable when it resolves. */
export function auditLocal(store: Store, a: LocalAction, now = Date.now()): Promise<void> {
  return appendAudit(store, {
    at: now,
    actor: `local:${userInfo().username}`,
    action: a.action,
    target: a.target,
    status: a.status,
    detail: a.detail ?? null,
  });
}
