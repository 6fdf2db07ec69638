/**
 * What an episode's run becomes in the store: the stimulus as the agent sees it, the event
 * log, the outbox rows (outputs, publish tool calls, the fleet/episodes summary) and the
 * inbox stimuli of its sends. Plain functions over plain values.
 */
import { type EpisodeRecord, type Stimulus, wakeIdOf } from "../../agents/protocol.ts";
import { topics } from "../protocol.ts";
import type { BudgetSpec } from "../spec/index.ts";
import type { StimulusRow } from "../store/index.ts";
import { type AgentId, decodePayload, type NewStimulus, type StimulusId } from "../types.ts";
import type { RunLimits, RunResult } from "./runner.ts";
import type { PendingPublish, PendingSend } from "./tools/index.ts";

/** Record limits the subprocess enforces on itself (the gateway checks them too). */
export const CHILD_LIMITS = { max_records: 10_000, max_record_bytes: 8 * 1024 * 1024 } as const;

/**
 * The sandbox limits of an episode of a type with this budget; `maxPacketBytes` (`[broker]
 * max_packet_bytes`) bounds its emits, where given.
 */
export function runLimitsFor(budget: BudgetSpec, minTimeoutMs = 0, maxPacketBytes?: number): RunLimits {
  return {
    ...(maxPacketBytes === undefined ? {} : { maxPacketBytes }),
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
  if (row.kind === "wake") return wakeStimulus(row);
  return {
    id: row.sid,
    kind: row.kind,
    ...(row.topic !== null ? { topic: row.topic } : {}),
    payload: decodePayload(row.payload),
    received_at: row.receivedAt,
  };
}

/** A stored `wake` stimulus's payload: the agent's payload and what the gateway knows of the wake-up. */
interface WakeEnvelope {
  readonly data: unknown;
  readonly due_at: number;
  readonly set_by: string;
}

/** The payload bytes of the stimulus a due wake-up becomes. */
export function wakeStimulusPayload(w: { payload: string; dueAt: number; setBy: string }): Uint8Array {
  return new TextEncoder().encode(`{"data":${w.payload},"due_at":${w.dueAt},"set_by":${JSON.stringify(w.setBy)}}`);
}

/** The wake-up a `wake` stimulus row came from, unwrapped for the agent. */
function wakeStimulus(row: StimulusRow): Stimulus {
  const env = decodePayload(row.payload) as WakeEnvelope;
  return {
    id: row.sid,
    kind: "wake",
    payload: env.data ?? null,
    wake: { id: row.sid.slice("wake:".length), due_at: env.due_at, set_by: env.set_by },
    received_at: row.receivedAt,
  };
}

/** What an episode's wake-up records commit: new rows, and cancellations of pending ones. */
export type WakeEffects =
  | {
      readonly ok: true;
      readonly wakes: {
        id: string;
        gateway: string;
        agent: AgentId;
        dueAt: number;
        payload: string;
        setBy: string;
        createdAt: number;
      }[];
      readonly cancels: string[];
    }
  | { readonly ok: false; readonly message: string };

/**
 * The wake-ups an episode set and cancelled, checked again here (the subprocess is not
 * trusted): ids are `<episode>.w<n>` in order, and none is set while `max` are pending.
 */
export function buildWakes(
  episode: string,
  gateway: string,
  agent: AgentId,
  records: readonly EpisodeRecord[],
  pending: readonly string[],
  max: number,
  at: number,
): WakeEffects {
  const wakes: Extract<WakeEffects, { ok: true }>["wakes"] = [];
  const live = new Set(pending);
  const cancels: string[] = [];
  let issued = 0;
  for (const r of records) {
    if (r.k === "wake") {
      if (r.id !== wakeIdOf(episode, ++issued))
        return { ok: false, message: `wake-up id "${r.id.slice(0, 80)}" was not issued by this episode` };
      // The cap bounds setting a wake-up, as ctx.wakeAt checks it; over it after a reload lowered
      // it, the agent still runs and cancels.
      if (live.size >= max)
        return { ok: false, message: `a wake-up was set with max_wakeups (${max}) already pending` };
      wakes.push({
        id: r.id,
        gateway,
        agent,
        dueAt: r.at,
        payload: JSON.stringify(r.data),
        setBy: episode,
        createdAt: at,
      });
      live.add(r.id);
    } else if (r.k === "cancel_wake" && live.delete(r.id)) {
      const own = wakes.findIndex((w) => w.id === r.id);
      if (own >= 0) wakes.splice(own, 1);
      else cancels.push(r.id);
    }
  }
  return { ok: true, wakes, cancels };
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

/**
 * The outbox rows of sends to agents another shard owns: QoS 1 publishes of
 * `fleet/sends/<type>/<key>/<episode>/<n>`, which the owner records as the stimulus
 * `inbox:<episode>:<n>` (the id `buildInbox` gives a local send), so a re-sent row is a duplicate.
 */
export function buildForwards(
  episode: string,
  sends: readonly PendingSend[],
  at: number,
  firstSeq: number,
): OutboxRowInput[] {
  const rows: OutboxRowInput[] = [];
  sends.forEach((s, n) => {
    if (!s.forward) return;
    rows.push({
      episode,
      seq: firstSeq + rows.length,
      topic: topics.send(s.to.type, s.to.key, episode, n),
      payload: s.payload,
      qos: 1,
      retain: false,
      createdAt: at,
    });
  });
  return rows;
}

/** The inbox stimuli of an episode's sends, deduplicated by episode + position. */
export function buildInbox(episode: string, sends: readonly PendingSend[], at: number): NewStimulus[] {
  return sends.flatMap((s, i) => (s.forward ? [] : [inboxStimulus(episode, s, i, at)]));
}

function inboxStimulus(episode: string, s: PendingSend, i: number, at: number): NewStimulus {
  return {
    agent: s.to.id,
    type: s.to.type,
    key: s.to.key,
    sid: `inbox:${episode}:${i}` as StimulusId,
    kind: "inbox",
    topic: topics.inbox(s.to.type, s.to.key),
    payload: new TextEncoder().encode(s.payload),
    receivedAt: at,
  };
}

/** The level of a ctx.log line. */
type LogLevel = Extract<EpisodeRecord, { k: "log" }>["level"];

/**
 * What of an episode's ctx.log lines the gateway's own log gets: the first 100 lines and 16 KiB
 * of text (all of them stay in the episode's event log). A chatty agent must not flood ours:
 * 100 lines of 4096 characters put 430 KB in it per episode.
 */
export const LOG_COPY = { lines: 100, chars: 16 * 1024 } as const;

/** The ctx.log lines copied to the gateway's log (LOG_COPY), the last one cut to fit. */
export function logCopy(records: readonly EpisodeRecord[]): [LogLevel, string][] {
  const out: [LogLevel, string][] = [];
  let chars = 0;
  for (const r of records) {
    if (r.k !== "log") continue;
    if (out.length === LOG_COPY.lines || chars === LOG_COPY.chars) break;
    const room = LOG_COPY.chars - chars;
    out.push([
      r.level,
      r.msg.length <= room ? r.msg : `${r.msg.slice(0, room)}... (cut: the episode's log has it all)`,
    ]);
    chars += Math.min(r.msg.length, room);
  }
  return out;
}
