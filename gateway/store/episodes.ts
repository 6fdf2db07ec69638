/**
 * The statements of an episode's end, the store's hottest write: a commit (log, checkpoint,
 * outbox, inbox sends, budget use, dedup mark) or a failed attempt. Raw SQL through the
 * schema codecs (./sql.ts): one multi-row INSERT per table and one upsert for both budget
 * windows, so a commit is 7 statements (9 with inbox sends) and nothing is built by drizzle.
 */
import type { InValue, ResultSet } from "@libsql/client";
import type { AgentId, NewStimulus } from "../types.ts";
import type { RawStatement } from "./db.ts";
import type * as t from "./schema.ts";
import { hashToDriver, idToDriver } from "./hashes.ts";
import { chunks, codecs, insertRows } from "./sql.ts";

/** Budget use booked with an episode, in its hour and day windows. */
export interface EpisodeUsage {
  readonly hourWindow: string;
  readonly dayWindow: string;
  readonly toolCalls: number;
  readonly tokens: number;
  readonly cost: number;
}

/**
 * A row as the episode executor builds it. A `gateway` on it is not stored: every row of a data
 * dir is its own gateway's (`meta.gateway_id`, migration 16 of ./migrate.ts).
 */
export type WithGateway<T> = T & { readonly gateway?: string };

/** Everything one committed episode writes, atomically. */
export interface EpisodeCommit {
  readonly episode: WithGateway<typeof t.episodes.$inferInsert>;
  readonly events: readonly t.EventRow[];
  readonly checkpoint: WithGateway<typeof t.checkpoints.$inferInsert>;
  readonly outbox: readonly (typeof t.outbox.$inferInsert)[];
  /** Inbox stimuli for other agents (ctx.send), deduplicated by episode + seq. */
  readonly inbox: readonly NewStimulus[];
  readonly usage: EpisodeUsage;
  /** Wake-ups the episode set (`ctx.wakeIn` / `ctx.wakeAt`). */
  readonly wakes?: readonly (typeof t.wakeups.$inferInsert)[];
  /** Ids of the agent's pending wake-ups the episode cancelled. */
  readonly cancels?: readonly string[];
}

/** A failed episode attempt and what happens to its stimulus. */
export interface EpisodeFailure {
  readonly episode: WithGateway<typeof t.episodes.$inferInsert>;
  readonly events: readonly t.EventRow[];
  /** Retry not before this time, or quarantine when null. */
  readonly retryAt: number | null;
  readonly usage: EpisodeUsage;
}

/**
 * Book one episode in both budget windows, with the `bytes` its statements store; `excluded` lets
 * one statement carry both rows.
 */
function usageStatement(agent: AgentId, u: EpisodeUsage, bytes: number): RawStatement {
  const row = (window: string) => ({
    agent,
    window,
    episodes: 1,
    toolCalls: u.toolCalls,
    tokens: u.tokens,
    cost: u.cost,
    bytes,
  });
  return insertRows(
    codecs.budgetUsage,
    [row(u.hourWindow), row(u.dayWindow)],
    `ON CONFLICT (agent, "window") DO UPDATE SET episodes = episodes + excluded.episodes,
      tool_calls = tool_calls + excluded.tool_calls, tokens = tokens + excluded.tokens, cost = cost + excluded.cost,
      bytes = bytes + excluded.bytes`,
  );
}

const utf8Bytes = (s: string | null | undefined) => (s ? Buffer.byteLength(s, "utf8") : 0);

/**
 * The bytes an episode's statements store for `bytes_per_day` (docs/fleet-toml.md): its event log
 * as the JSON text inserted, its checkpoint state, outgoing payloads, inbox sends and wake-ups.
 * The rows' fixed overhead (ids, hashes, indexes) is left out: it is bounded by the episode count.
 */
function storedBytes(log: string, c: EpisodeCommit | null): number {
  let n = utf8Bytes(log);
  if (c === null) return n;
  n += utf8Bytes(c.checkpoint.state);
  for (const o of c.outbox) n += utf8Bytes(o.payload);
  for (const s of c.inbox) n += s.payload.byteLength;
  for (const w of c.wakes ?? []) n += utf8Bytes(w.payload);
  return n;
}

/**
 * An event log as the JSON text of the episode row's `log` column (./migrate.ts, migrations 18
 * and 22): one element per event in seq order, `[kind, data]` with the data (JSON text) embedded
 * as is, or the data alone when it is an object whose first key is `k` with the kind as value (a
 * record: the view reads the kind from there). Seqs must be 0, 1, 2, ...: an event's position is
 * its seq.
 */
export function logText(events: readonly t.EventRow[]): string {
  let out = "[";
  for (const [i, e] of events.entries()) {
    if (e.seq !== i) throw new Error(`event log of ${e.episode}: seq ${e.seq} at position ${i}`);
    const head = `{"k":${JSON.stringify(e.kind)}`;
    const implied = e.data.startsWith(head) && (e.data[head.length] === "," || e.data[head.length] === "}");
    out += `${i === 0 ? "" : ","}${implied ? e.data : `[${JSON.stringify(e.kind)},${e.data}]`}`;
  }
  return `${out}]`;
}

/** The episode row of an attempt with its event log (`logText`), stored as JSONB by SQLite (invalid JSON aborts it). */
function logStatements(episode: typeof t.episodes.$inferInsert, log: string): RawStatement[] {
  const row = insertRows(codecs.episodes, [episode]);
  const values = codecs.episodes.tuple.slice(1, -1);
  return [
    {
      sql: `INSERT INTO episodes (${codecs.episodes.columns}, "log") VALUES (${values}, jsonb(?))`,
      args: [...(row.args as InValue[]), log],
    },
  ];
}

/** How an inbox send's insert ends: a duplicate is skipped, and each stimulus written says its seq. */
const SENT = "ON CONFLICT DO NOTHING RETURNING agent, seq, received_at";

/** How the statement dropping the queued stimuli of cancelled wake-ups begins. */
const DROP_CANCELLED = "UPDATE stimuli SET state = 'dropped',";

/** The queued `wake` stimuli an episode's commit dropped with the wake-ups it cancelled. */
export function droppedWakeRuns(stmts: readonly RawStatement[], results: readonly ResultSet[]): number[] {
  const seqs: number[] = [];
  for (const [i, st] of stmts.entries())
    if (st.sql.startsWith(DROP_CANCELLED)) for (const r of results[i]?.rows ?? []) seqs.push(Number(r[0]));
  return seqs;
}

/** The inbox sends an episode's commit wrote (its duplicates are not among them), in order. */
export function sentStimuli(stmts: readonly RawStatement[], results: readonly ResultSet[]): SentStimulus[] {
  const sent: SentStimulus[] = [];
  for (const [i, st] of stmts.entries())
    if (st.sql.endsWith(SENT))
      for (const r of results[i]?.rows ?? [])
        sent.push({ agent: r[0] as AgentId, seq: Number(r[1]), receivedAt: Number(r[2]) });
  return sent;
}

/** An inbox stimulus an episode's commit wrote. */
export interface SentStimulus {
  readonly agent: AgentId;
  readonly seq: number;
  readonly receivedAt: number;
}

/** The statements that commit an episode whole; `gatewayId` stamps the inbox rows. */
export function commitStatements(gatewayId: string, c: EpisodeCommit): RawStatement[] {
  const ep = c.episode;
  const now = ep.endedAt;
  const log = logText(c.events);
  const out = logStatements(ep, log);
  out.push(insertRows(codecs.checkpoints, [c.checkpoint]));
  for (const rows of chunks(c.outbox)) out.push(insertRows(codecs.outbox, rows));
  // Inbox sends: their target agents first (created on first sight), then the stimuli.
  for (const rows of chunks(c.inbox)) {
    out.push(
      insertRows(
        codecs.agents,
        rows.map((s) => ({
          id: s.agent,
          type: s.type,
          key: s.key,
          gateway: gatewayId,
          createdAt: now,
          updatedAt: now,
        })),
        "ON CONFLICT DO NOTHING",
      ),
    );
  }
  for (const rows of chunks(c.inbox)) {
    const stimuli = rows.map((s) => ({
      agent: s.agent,
      sid: s.sid,
      kind: s.kind,
      topic: s.topic,
      payload: Buffer.from(s.payload),
      receivedAt: s.receivedAt,
    }));
    out.push(insertRows(codecs.stimuli, stimuli, SENT));
  }
  for (const rows of chunks(c.wakes ?? [])) out.push(insertRows(codecs.wakeups, rows, "ON CONFLICT DO NOTHING"));
  // A cancel also catches a wake-up that fell due while the episode ran: its `wake` stimulus,
  // queued behind this episode, is dropped with it, so cancelWake's `true` means it never runs.
  for (const ids of chunks(c.cancels ?? [])) {
    const list = ids.map(() => "?").join(",");
    out.push(
      {
        sql: `UPDATE wakeups SET state = 'cancelled', done_at = ?, done_by = ?
        WHERE agent = ? AND id IN (${list}) AND (state = 'pending' OR state = 'fired' AND EXISTS (
          SELECT 1 FROM stimuli s WHERE s.sid = 'wake:' || wakeups.id AND s.agent = wakeups.agent
            AND s.state = 'queued' AND s.seq != ?))`,
        args: [now, ep.id, ep.agent, ...ids, ep.stimulusSeq],
      },
      {
        sql: `${DROP_CANCELLED} last_error = ?, done_at = ?
        WHERE agent = ? AND state = 'queued' AND seq != ? AND sid IN (${list}) RETURNING seq`,
        args: [
          `its wake-up was cancelled by episode ${ep.id}`,
          now,
          ep.agent,
          ep.stimulusSeq,
          ...ids.map((id) => `wake:${id}`),
        ],
      },
    );
  }
  out.push(
    {
      sql: "UPDATE stimuli SET state = 'done', episode = ?, done_at = ?, attempts = ? WHERE seq = ?",
      args: [idToDriver(ep.id), now, ep.attempt, ep.stimulusSeq],
    },
    {
      sql:
        "UPDATE agents SET head_seq = ?, head_hash = ?, episodes = " +
        "episodes + 1, last_episode_at = ?, updated_at = ? WHERE id = ?",
      args: [c.checkpoint.seq, hashToDriver(c.checkpoint.hash), now, now, ep.agent],
    },
    usageStatement(ep.agent, c.usage, storedBytes(log, c)),
  );
  return out;
}

/**
 * The statements that book an attempt aborted by a shutdown: its budget use only (the episode,
 * its tool calls, tokens and cost). Nothing else is recorded: its stimulus stays queued, its
 * attempts untouched, and it runs again after the restart.
 */
export function abortedStatements(agent: AgentId, usage: EpisodeUsage): RawStatement[] {
  return [usageStatement(agent, usage, 0)];
}

/** The statements that record a failed attempt: the stimulus is retried later or quarantined. */
export function failureStatements(f: EpisodeFailure): RawStatement[] {
  const ep = f.episode;
  const log = logText(f.events);
  const out = logStatements(ep, log);
  // An unset error leaves last_error as it was (drizzle's .set() skipped undefined too).
  const [setError, error] = ep.error === undefined ? ["", []] : [", last_error = ?", [ep.error]];
  out.push(
    f.retryAt === null
      ? {
          sql:
            `UPDATE stimuli SET state = 'quarantined', attempts = ` +
            `?, episode = ?, done_at = ?${setError} WHERE seq = ?`,
          args: [ep.attempt, idToDriver(ep.id), ep.endedAt, ...error, ep.stimulusSeq],
        }
      : {
          sql: `UPDATE stimuli SET attempts = ?, not_before = ?${setError} WHERE seq = ?`,
          args: [ep.attempt, f.retryAt, ...error, ep.stimulusSeq],
        },
    {
      sql: "UPDATE agents SET failures = failures + 1, last_episode_at = ?, updated_at = ? WHERE id = ?",
      args: [ep.endedAt, ep.endedAt, ep.agent],
    },
    // Failed attempts still count against episodes_per_hour, the tools they used and the log they stored.
    usageStatement(ep.agent, f.usage, storedBytes(log, null)),
  );
  return out;
}
