/**
 * Read models of recent activity for the dashboard: the output feed (what committed episodes
 * emitted or published, newest first) and per-minute buckets of episodes, failures and lag.
 * Both read the sealed records (episodes and their event logs), so they need no extra writes
 * on the commit path; both are bounded (a page of outputs, at most a day of minutes).
 */
import type { InValue } from "@libsql/client";
import { topics } from "../protocol.ts";
import { idOfSql, STATUS_COMMITTED, STATUS_FAILED, type Store } from "../store/index.ts";
import { parseAgentId } from "../types.ts";

/** One output of a committed episode: an `emit` on the agent's out topic, or a publish-tool message. */
export interface OutputItem {
  readonly episode: string;
  readonly agent: string;
  readonly kind: "emit" | "publish";
  readonly topic: string;
  readonly data: unknown;
  /** The episode's start (the paging key) and end (when its outputs were committed). */
  readonly started_at: number;
  readonly at: number;
}

/** Emits and successful publish-tool calls, the events that leave the fleet as messages. */
const OUTPUT_EVENT = `(ev.kind = 'emit' OR (ev.kind = 'tool' AND json_extract(ev.data, '$.tool') = 'publish'
  AND json_extract(ev.data, '$.ok') = 1))`;

/**
 * The newest outputs of committed episodes (all agents, or one), newest first, before `before` (start ms);
 * with `at`, all those of the episodes that started at that ms (the rest of a page's last ms).
 */
export async function recentOutputs(
  store: Store,
  f: { limit: number; before?: number; at?: number; agent?: string },
): Promise<OutputItem[]> {
  const args: InValue[] = [f.at ?? f.before ?? Number.MAX_SAFE_INTEGER];
  if (f.agent !== undefined) args.push(f.agent);
  args.push(f.limit);
  // Walks episodes newest first (episodes_time, or episodes_agent for one agent) and reads each
  // one's log by primary key, so a page costs the episodes it spans, not the whole table.
  const rs = await store.client.execute({
    sql: `SELECT ${idOfSql("ep.id")} AS episode, ep.agent AS agent, ep.started_at AS started_at,
            ep.ended_at AS ended_at, ev.kind AS kind, ev.data AS data
          FROM episodes ep JOIN events ev ON ev.episode = ep.id
          WHERE ep.status = ${STATUS_COMMITTED} AND ep.started_at ${f.at === undefined ? "<" : "="} ?
            ${f.agent !== undefined ? "AND ep.agent = ?" : ""}
            AND ${OUTPUT_EVENT}
          ORDER BY ep.started_at DESC, ep.id DESC, ev.seq DESC LIMIT ?`,
    args,
  });
  return rs.rows.map((r) => {
    const d = JSON.parse(String(r.data)) as { data?: unknown; args?: unknown[] };
    const agent = String(r.agent);
    const base = { episode: String(r.episode), agent, started_at: Number(r.started_at), at: Number(r.ended_at) };
    if (r.kind === "emit") {
      const ref = parseAgentId(agent);
      const topic = ref ? topics.out(ref.type, ref.key) : `fleet/agents/${agent}/out`;
      return { ...base, kind: "emit", topic, data: d.data ?? null };
    }
    const a = Array.isArray(d.args) ? d.args : [];
    return { ...base, kind: "publish", topic: String(a[0]), data: a[1] ?? null };
  });
}

/** One minute of activity. */
export interface MinuteBucket {
  /** The minute's start (epoch ms, a multiple of 60,000). */
  readonly t: number;
  /** Episode attempts that started in the minute, failed ones included. */
  readonly episodes: number;
  readonly failures: number;
  /** Longest and mean wait from a stimulus's receipt to the start of its episode; null without episodes. */
  readonly lag_ms_max: number | null;
  readonly lag_ms_avg: number | null;
}

const MINUTE = 60_000;

/** Yield to the event loop: a local libSQL query runs on it, so long reads go in slices. */
const yieldLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * One minute of activity, `[t, t + 1 min)` by episode start, optionally one agent type. Lag comes
 * from the stimulus row, else (dedup memory already forgotten) from the `received_at` of the
 * stimulus event the episode's log begins with.
 */
async function oneMinute(store: Store, t: number, type: string | undefined): Promise<MinuteBucket> {
  const args: InValue[] = [t, t + MINUTE];
  if (type !== undefined) args.push(`${type}/`, `${type}/\uffff`);
  const lag = `ep.started_at - COALESCE(s.received_at,
    (SELECT json_extract(data, '$.received_at') FROM events WHERE episode = ep.id AND seq = 0))`;
  const rs = await store.client.execute({
    sql: `SELECT count(*) AS episodes, sum(ep.status = ${STATUS_FAILED}) AS failures, max(${lag}) AS lag_max,
            avg(${lag}) AS lag_avg
          FROM episodes ep LEFT JOIN stimuli s ON s.seq = ep.stimulus_seq
          WHERE ep.started_at >= ? AND ep.started_at < ?
            ${type !== undefined ? "AND ep.agent >= ? AND ep.agent < ?" : ""}`,
    args,
  });
  const r = rs.rows[0];
  const num = (v: unknown) => (v === null || v === undefined ? null : Math.max(0, Math.round(Number(v))));
  return {
    t,
    episodes: Number(r?.episodes ?? 0),
    failures: Number(r?.failures ?? 0),
    lag_ms_max: num(r?.lag_max),
    lag_ms_avg: num(r?.lag_avg),
  };
}

/**
 * Per-minute activity for the charts (`GET /api/activity`). An episode counts in the minute it
 * started. Each minute is its own small query with the event loop free in between (a local
 * libSQL read blocks it: one query over a busy hour took ~0.3 s), and minutes older than
 * `settleMs` (by then every episode started in them has ended) are remembered, so a refresh
 * reads only the last few minutes.
 */
export class ActivityHistory {
  /** Settled minutes by type ("" = the whole fleet), for at most `MAX_KEYS` types. */
  private readonly settled = new Map<string, Map<number, MinuteBucket>>();

  constructor(
    private readonly store: Store,
    private readonly settleMs = 10 * MINUTE,
  ) {}

  /** The last `minutes` whole minutes up to and including the current one, oldest first, zero-filled. */
  async buckets(f: { now: number; minutes: number; type?: string }): Promise<MinuteBucket[]> {
    const from = Math.floor(f.now / MINUTE) * MINUTE - (f.minutes - 1) * MINUTE;
    const key = f.type ?? "";
    let known = this.settled.get(key);
    if (!known) {
      known = new Map();
      this.settled.set(key, known);
      // Bounded: a caller may name any type; the oldest key goes first.
      if (this.settled.size > MAX_KEYS) this.settled.delete(this.settled.keys().next().value ?? "");
    }
    const out: MinuteBucket[] = [];
    for (let i = 0; i < f.minutes; i++) {
      const t = from + i * MINUTE;
      const cached = known.get(t);
      if (cached) {
        out.push(cached);
        continue;
      }
      const b = await oneMinute(this.store, t, f.type);
      if (t + MINUTE <= f.now - this.settleMs) known.set(t, b);
      out.push(b);
      await yieldLoop();
    }
    for (const t of known.keys()) if (t < f.now - MAX_MINUTES * MINUTE - this.settleMs) known.delete(t);
    return out;
  }
}

/** Types with settled minutes kept, and how far back minutes are asked for (a day). */
const MAX_KEYS = 32;
export const MAX_MINUTES = 1440;
