/**
 * The audit record of an operator action taken on a stopped gateway's data dir (the CLI is then its
 * only writer): the same action names and targets the running gateway records for its HTTP routes
 * (http/access.ts), by `local:<user>`, as `fleet token` records its offline changes (docs/access.md).
 */
import { readFileSync } from "node:fs";
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
    actor: localActor(),
    action: a.action,
    target: a.target,
    status: a.status,
    detail: a.detail ?? null,
  });
}

/**
 * `local:<user>`, who runs this command: the name /etc/passwd gives its uid (Bun's os.userInfo() reads $USER and
 * says "unknown" when it is unset, as for root in a container or a cron job), else os.userInfo()'s, else the uid.
 */
export function localActor(
  uid: number | undefined = process.getuid?.(),
  passwd: () => string = () => readFileSync("/etc/passwd", "utf8"),
): string {
  if (uid !== undefined) {
    try {
      const entry = passwd()
        .split("\n")
        .map((line) => line.split(":"))
        .find((fields) => fields[2] === String(uid) && fields[0]);
      if (entry) return `local:${entry[0]}`;
    } catch {
      // no /etc/passwd: the process's own idea below
    }
  }
  let name = "";
  try {
    name = userInfo().username;
  } catch {
    // Node throws for a uid with no passwd entry
  }
  return `local:${name && name !== "unknown" ? name : (uid ?? "unknown")}`;
}
