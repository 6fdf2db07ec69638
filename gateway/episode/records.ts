/**
 * What an episode's run becomes in the store: the stimulus as the agent sees it, the event
 * log, the outbox rows (outputs, publish tool calls, the fleet/episodes summary) and the
 * inbox stimuli of its sends. Plain functions over plain values.
 */
import type { EpisodeRecord, Stimulus } from "../../agents/protocol.ts";
import { topics } from "../protocol.ts";
import type { BudgetSpec } from "../spec/index.ts";
import type { StimulusRow } from "../store/index.ts";
import { type AgentId, decodePayload, type NewStimulus, type StimulusId } from "../types.ts";
import type { RunLimits, RunResult } from "./runner.ts";
import type { PendingPublish, PendingSend } from "./tools/index.ts";

/** Record limits the subprocess enforces on itself (the gateway checks them too). */
export const CHILD_LIMITS = { max_records: 10_000, max_record_bytes: 8 * 1024 * 1024 } as const;

/** The sandbox limits of an episode of a type with this budget. */
export function runLimitsFor(budget: BudgetSpec, minTimeoutMs = 0): RunLimits {
  return {
    timeoutMs: Math.max(budget.episode_timeout_ms, minTimeoutMs),
    memoryMb: budget.memory_mb,
    maxRecords: CHILD_LIMITS.max_records,
    maxRecordBytes: CHILD_LIMITS.max_record_bytes,
    maxOpenFiles: 256,
    maxProcesses: 4096,
  };
}

/** Turn a stored stimulus row into what the agent sees. */
export function toStimulus(row: StimulusRow): Stimulus {
  return {
    id: row.sid,
    kind: row.kind,
    ...(row.topic !== null ? { topic: row.topic } : {}),
    payload: decodePayload(row.payload),
    received_at: row.receivedAt,
  };
}

/** One row of an episode's event log. */
export interface EventRowInput {
  episode: string;
  seq: number;
  kind: string;
  data: string;
}

/** The event log: the stimulus, every record in order, and how it ended. */
export function buildEvents(episode: string, stimulus: Stimulus, result: RunResult): EventRowInput[] {
  const out: EventRowInput[] = [];
  const push = (kind: string, data: unknown) =>
    out.push({ episode, seq: out.length, kind, data: JSON.stringify(data) });
  push("stimulus", stimulus);
  for (const r of result.records) push(r.k, r);
  if (result.ok) push("end", { ok: true, ms: Math.round(result.ms) });
  else push("failure", { kind: result.kind, message: result.message.slice(0, 4000), ms: Math.round(result.ms) });
  return out;
}

/** One outbox row of a committed episode. */
export interface OutboxRowInput {
  episode: string;
  seq: number;
  topic: string;
  payload: string;
  qos: number;
  retain: boolean;
  createdAt: number;
}

/** The outbox: each `emit` on the agent's out topic, then its publish tool calls. */
export function buildOutbox(
  episode: string,
  agent: { id: AgentId; type: string; key: string },
  records: readonly EpisodeRecord[],
  publishes: readonly PendingPublish[],
  at: number,
): OutboxRowInput[] {
  const rows: OutboxRowInput[] = [];
  const out = topics.out(agent.type, agent.key);
  for (const r of records) {
    if (r.k !== "emit") continue;
    const seq = rows.length;
    rows.push({
      episode,
      seq,
      topic: out,
      payload: JSON.stringify({ episode, seq, agent: agent.id, data: r.data }),
      qos: 1,
      retain: false,
      createdAt: at,
    });
  }
  for (const p of publishes)
    rows.push({
      episode,
      seq: rows.length,
      topic: p.topic,
      payload: p.payload,
      qos: p.qos,
      retain: p.retain,
      createdAt: at,
    });
  return rows;
}

/** The inbox stimuli of an episode's sends, deduplicated by episode + position. */
export function buildInbox(episode: string, sends: readonly PendingSend[], at: number): NewStimulus[] {
  return sends.map((s, i) => ({
    agent: s.to.id,
    type: s.to.type,
    key: s.to.key,
    sid: `inbox:${episode}:${i}` as StimulusId,
    kind: "inbox",
    topic: topics.inbox(s.to.type, s.to.key),
    payload: new TextEncoder().encode(s.payload),
    receivedAt: at,
  }));
}
