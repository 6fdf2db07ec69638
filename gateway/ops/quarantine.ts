/**
 * Quarantine: poison stimuli — those that failed `retry.max_attempts`
 * times — listed with their failures, put back in their agent's queue, or dropped.
 * Works on a Store, so the running gateway (HTTP) and the CLI on a stopped data dir share it.
 */
import { and, asc, eq, inArray } from "drizzle-orm";
import { tables, type Store, type StimulusRow } from "../store/index.ts";
import type { Admission, AdmissionCode, AgentId } from "../types.ts";

/** One quarantined stimulus as the API and CLI show it. */
export interface QuarantineItem {
  readonly seq: number;
  readonly agent: string;
  readonly sid: string;
  readonly kind: StimulusRow["kind"];
  readonly topic: string | null;
  readonly attempts: number;
  readonly last_error: string | null;
  readonly received_at: number;
  readonly quarantined_at: number | null;
  /** Ids of the failed episodes of this stimulus, oldest first. */
  readonly episodes: readonly string[];
}

/** Outcome of retry/drop: expected refusals are values. */
export type QuarantineAction =
  | { readonly ok: true; readonly seq: number; readonly agent: string; readonly state: "queued" | "dropped" }
  | { readonly ok: false; readonly code: "not_found" | "not_quarantined" | AdmissionCode; readonly message: string };

/** A running gateway's queue book: a retry goes through the same admission as any new stimulus. */
export interface RetryAdmission {
  admit(agent: AgentId): Admission;
  /** The stimulus `seq` is back in the agent's queue. */
  recorded(agent: AgentId, seq: number, receivedAt: number): void;
  released(agent: AgentId): void;
}

/** Quarantined stimuli, newest first, with their failed episodes. */
export async function listQuarantine(store: Store, limit = 100): Promise<QuarantineItem[]> {
  const rows = await store.listStimuli("quarantined", limit);
  if (rows.length === 0) return [];
  const failed = await store.db
    .select({ id: tables.episodes.id, seq: tables.episodes.stimulusSeq })
    .from(tables.episodes)
    .where(
      and(
        inArray(
          tables.episodes.stimulusSeq,
          rows.map((r) => r.seq),
        ),
        eq(tables.episodes.status, "failed"),
      ),
    )
    .orderBy(asc(tables.episodes.startedAt), asc(tables.episodes.id))
    .all();
  const bySeq = new Map<number, string[]>();
  for (const e of failed) {
    const list = bySeq.get(e.seq) ?? [];
    list.push(e.id);
    bySeq.set(e.seq, list);
  }
  return rows.map((r) => ({
    seq: r.seq,
    agent: r.agent,
    sid: r.sid,
    kind: r.kind,
    topic: r.topic,
    attempts: r.attempts,
    last_error: r.lastError,
    received_at: r.receivedAt,
    quarantined_at: r.doneAt,
    episodes: bySeq.get(r.seq) ?? [],
  }));
}

/**
 * Whether a stopped gateway's agent with this status may take a retried stimulus: refused as the running
 * gateway's queue book refuses it (fleet/queue-book.ts `admit`, same codes and messages). The queue limit
 * is not checked here: it bounds what arrives at a running gateway.
 */
function offlineAdmission(status: string | undefined): Admission {
  if (status === "retired") return { ok: false, code: "retired", message: "agent is retired" };
  if (status === "draining")
    return { ok: false, code: "draining", message: "agent is draining: it runs what is queued, then retires" };
  return { ok: true };
}

/**
 * Put a quarantined stimulus back in its agent's queue (state queued, attempts 0) or drop
 * it. With a running gateway's `queue`, a retry is admitted like a new stimulus (refused
 * for a retired agent or a full queue) and counted; without one (a stopped data dir) it is
 * refused for a retired or draining agent as the running gateway refuses it, and the next start loads it.
 */
export async function resolveQuarantined(
  store: Store,
  seq: number,
  action: "retry" | "drop",
  queue?: RetryAdmission,
  now = Date.now(),
): Promise<QuarantineAction> {
  const row = Number.isSafeInteger(seq) ? await store.getStimulus(seq) : undefined;
  if (!row) return { ok: false, code: "not_found", message: `no stimulus ${seq}` };
  const notQuarantined = (state: string): QuarantineAction => ({
    ok: false,
    code: "not_quarantined",
    message: `stimulus ${seq} is ${state}, not quarantined`,
  });
  if (row.state !== "quarantined") return notQuarantined(row.state);
  const state = action === "retry" ? "queued" : "dropped";
  const agent = row.agent as AgentId;
  const admitted = state === "queued" && queue !== undefined;
  if (admitted) {
    const a = queue.admit(agent);
    if (!a.ok) return { ok: false, code: a.code, message: `stimulus ${seq} not retried: ${a.message}` };
  } else if (state === "queued") {
    // A stopped data dir: the next start would refuse it (and it would be lost from the quarantine).
    const a = offlineAdmission((await store.getAgent(agent))?.status);
    if (!a.ok) return { ok: false, code: a.code, message: `stimulus ${seq} not retried: ${a.message}` };
  }
  let changed: boolean;
  try {
    changed = await store.resolveQuarantine(seq, state, now);
  } catch (err) {
    if (admitted) queue.released(agent);
    throw err;
  }
  if (!changed) {
    // Retried or dropped meanwhile (another operator, a rollback's retry).
    if (admitted) queue.released(agent);
    return notQuarantined((await store.getStimulus(seq))?.state ?? "gone");
  }
  if (admitted) queue.recorded(agent, seq, row.receivedAt);
  return { ok: true, seq, agent: row.agent, state };
}
