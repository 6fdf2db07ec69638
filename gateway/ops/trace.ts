/**
 * `fleet trace`: the lineage of an episode as a tree. Upstream it walks from the episode
 * to its stimulus (source, topic, payload hash, received at) and, for an inbox message
 * from another agent, to the episode that sent it, up to the root cause. Downstream it
 * lists every output, tool call, publish and send of the episode, and the episodes those
 * sends caused, across agents. Wake-ups are followed the same way: a `wake` episode's
 * cause is the episode that set it, and an episode's wake-ups list the episodes they woke.
 * Everything comes from the sealed event logs and the
 * episodes table, so a trace is as old as retention allows.
 */
import { idOfSql, STATUS_COMMITTED, type EpisodeRow, type EventRow, type Store } from "../store/index.ts";
import { blake3Hex } from "../hash.ts";
import { topics } from "../protocol.ts";
import { parseAgentId, sentBy, setBy } from "../types.ts";
import { readEventLog } from "./events.ts";

/** What started an episode. */
export interface TraceStimulus {
  readonly id: string;
  readonly kind: string;
  readonly topic: string | null;
  readonly payload_hash: string;
  readonly received_at: number;
  /** The episode whose `ctx.send` delivered this inbox message, when one did. */
  readonly sent_by: string | null;
  /** The episode that set this wake-up, for a `wake` stimulus. */
  readonly set_by: string | null;
}

/**
 * One thing an episode did that left the episode. What a failed episode recorded is shown but never
 * took effect: its emits and publishes have no `seq` (nothing was published), its sends are not
 * `sent`, its wake-ups `not_scheduled`.
 */
export type TraceEffect =
  | { readonly kind: "decide"; readonly name: string; readonly data: unknown }
  | { readonly kind: "emit"; readonly topic: string; readonly seq: number | null; readonly data: unknown }
  | { readonly kind: "publish"; readonly topic: string; readonly seq: number | null; readonly ok: boolean }
  | {
      readonly kind: "send";
      readonly to: string;
      /** The call was allowed. */
      readonly ok: boolean;
      /** The message was written: allowed, and the episode committed. */
      readonly sent: boolean;
      readonly episodes: readonly TraceNode[];
    }
  | { readonly kind: "tool"; readonly tool: string; readonly ok: boolean }
  | {
      readonly kind: "wake";
      readonly id: string;
      readonly due_at: number;
      /** pending, fired, cancelled, dropped; `not_scheduled` when the episode did not commit. */
      readonly state: string;
      readonly episodes: readonly TraceNode[];
    }
  | { readonly kind: "cancel_wake"; readonly id: string };

/** One episode in a trace, with what it caused below it. */
export interface TraceNode {
  readonly episode: string;
  readonly agent: string;
  readonly status: string;
  readonly started_at: number;
  readonly ms: number;
  readonly checkpoint: string | null;
  readonly stimulus: TraceStimulus | null;
  readonly effects: readonly TraceEffect[];
}

/** A whole trace: the causes above the episode (root first), the episode and its consequences. */
export interface Trace {
  readonly upstream: readonly TraceNode[];
  readonly episode: TraceNode;
}

/** Why a trace could not be built. */
export type TraceMiss = { readonly code: "not_found" | "ambiguous"; readonly message: string };

const MAX_DEPTH = 32;
/** The beginning of a UUID's text: hex digits, with a dash exactly where the UUID has one. */
const UUID_PREFIX = /^(?=.{1,36}$)[0-9a-f]{1,8}(-[0-9a-f]{0,4}(-[0-9a-f]{0,4}(-[0-9a-f]{0,4}(-[0-9a-f]{0,12})?)?)?)?$/;

/** An episode by full id or unique prefix (at least 4 characters). */
export async function findEpisode(store: Store, idOrPrefix: string): Promise<EpisodeRow | TraceMiss> {
  const exact = await store.getEpisode(idOrPrefix);
  if (exact) return exact;
  if (/^[0-9a-f-]{1,3}$/.test(idOrPrefix))
    return { code: "ambiguous", message: `an episode id prefix needs at least 4 characters, got "${idOrPrefix}"` };
  if (!/^[0-9a-f-]{4,}$/.test(idOrPrefix)) {
    // A common slip: an agent's id where an episode's is wanted.
    const agent = parseAgentId(idOrPrefix)
      ? ` (${idOrPrefix} is an agent's id: \`fleet episodes ${idOrPrefix}\` lists its episodes)`
      : "";
    return { code: "not_found", message: `no episode ${idOrPrefix}${agent}` };
  }
  // UUIDs are stored as their 16 bytes (store/hashes.ts): a prefix of one is a range of bytes; other ids are text.
  const hex = UUID_PREFIX.test(idOrPrefix) ? idOrPrefix.replaceAll("-", "") : null;
  const rows = await store.client.execute({
    sql: `SELECT ${idOfSql("id")} AS id FROM episodes WHERE (id >= ? AND id < ?) OR (id >= ? AND id <= ?)
      ORDER BY id LIMIT 2`,
    args: [
      idOrPrefix,
      `${idOrPrefix}\uffff`,
      hex === null ? null : Buffer.from(hex.padEnd(32, "0"), "hex"),
      hex === null ? null : Buffer.from(hex.padEnd(32, "f"), "hex"),
    ],
  });
  if (rows.rows.length === 0) return { code: "not_found", message: `no episode starts with ${idOrPrefix}` };
  if (rows.rows.length > 1) return { code: "ambiguous", message: `more than one episode starts with ${idOrPrefix}` };
  const id = String(rows.rows[0]!.id);
  // Found in a form the lookup by id does not read (an id an older release stored as text): not a row to trust.
  return (await store.getEpisode(id)) ?? { code: "not_found", message: `episode ${id} cannot be read by its id` };
}

function parse(row: EventRow): Record<string, unknown> {
  try {
    return JSON.parse(row.data) as Record<string, unknown>;
  } catch {
    return {};
  }
}

async function stimulusOf(events: readonly EventRow[]): Promise<TraceStimulus | null> {
  const first = events.find((e) => e.kind === "stimulus");
  if (!first) return null;
  const s = parse(first) as { id?: string; kind?: string; topic?: string; payload?: unknown; received_at?: number };
  const id = String(s.id ?? "");
  return {
    id,
    kind: String(s.kind ?? "unknown"),
    topic: s.topic ?? null,
    payload_hash: await blake3Hex(JSON.stringify(s.payload ?? null)),
    received_at: Number(s.received_at ?? 0),
    sent_by: sentBy(id) ?? null,
    set_by: setBy(id) ?? null,
  };
}

/** Committed (or last failed) episodes that ran the inbox messages `episode` sent. */
async function caused(store: Store, episode: string): Promise<Map<number, EpisodeRow[]>> {
  const rows = await store.client.execute({
    sql: `SELECT ${idOfSql("id")} AS id, stimulus_id FROM episodes WHERE stimulus_id >= ? AND stimulus_id < ?
      ORDER BY started_at`,
    args: [`inbox:${episode}:`, `inbox:${episode}:\uffff`],
  });
  const bySend = new Map<number, EpisodeRow[]>();
  for (const r of rows.rows) {
    const n = Number(String(r.stimulus_id).split(":").at(-1));
    const ep = await store.getEpisode(String(r.id));
    if (ep) bySend.set(n, [...(bySend.get(n) ?? []), ep]);
  }
  return bySend;
}

/** Episodes that ran the wake-ups `episode` set, by wake-up id. */
async function woken(store: Store, episode: string): Promise<Map<string, EpisodeRow[]>> {
  const rows = await store.client.execute({
    sql: `SELECT ${idOfSql("id")} AS id, stimulus_id FROM episodes WHERE stimulus_id >= ? AND stimulus_id < ?
      ORDER BY started_at`,
    args: [`wake:${episode}.w`, `wake:${episode}.w\uffff`],
  });
  const byWake = new Map<string, EpisodeRow[]>();
  for (const r of rows.rows) {
    const id = String(r.stimulus_id).slice("wake:".length);
    const ep = await store.getEpisode(String(r.id));
    if (ep) byWake.set(id, [...(byWake.get(id) ?? []), ep]);
  }
  return byWake;
}

async function node(store: Store, ep: EpisodeRow, depth: number, seen: Set<string>): Promise<TraceNode> {
  seen.add(ep.id);
  const events = await readEventLog(store, ep.id);
  const effects: TraceEffect[] = [];
  const ref = parseAgentId(ep.agent);
  const outTopic = ref ? topics.out(ref.type, ref.key) : `fleet/agents/${ep.agent}/out`;
  const committed = ep.status === "committed";
  let emits = 0;
  for (const e of events) if (e.kind === "emit") emits++;
  let emitSeq = 0;
  let publishSeq = emits;
  let sendIndex = 0;
  const children = depth < MAX_DEPTH ? await caused(store, ep.id) : new Map<number, EpisodeRow[]>();
  const wokenBy = depth < MAX_DEPTH ? await woken(store, ep.id) : new Map<string, EpisodeRow[]>();
  const wakeRows = new Map((await store.wakesSetBy(ep.id)).map((w) => [w.id, w]));
  for (const e of events) {
    const d = parse(e);
    if (e.kind === "decide") effects.push({ kind: "decide", name: String(d.name), data: d.data ?? null });
    else if (e.kind === "emit") {
      effects.push({ kind: "emit", topic: outTopic, seq: committed ? emitSeq++ : null, data: d.data ?? null });
    } else if (e.kind === "tool") {
      const tool = String(d.tool);
      const ok = d.ok === true;
      const args = Array.isArray(d.args) ? d.args : [];
      if (tool === "publish") {
        effects.push({ kind: "publish", topic: String(args[0]), seq: ok && committed ? publishSeq++ : null, ok });
      } else if (tool === "send") {
        const mine = ok ? (children.get(sendIndex++) ?? []) : [];
        const below: TraceNode[] = [];
        for (const child of mine) if (!seen.has(child.id)) below.push(await node(store, child, depth + 1, seen));
        effects.push({ kind: "send", to: String(args[0]), ok, sent: ok && committed, episodes: below });
      } else effects.push({ kind: "tool", tool, ok });
    } else if (e.kind === "wake") {
      const id = String(d.id);
      const below: TraceNode[] = [];
      for (const child of wokenBy.get(id) ?? [])
        if (!seen.has(child.id)) below.push(await node(store, child, depth + 1, seen));
      const row = wakeRows.get(id);
      effects.push({
        kind: "wake",
        id,
        due_at: Number(d.at),
        state: row?.state ?? (committed ? "collected" : "not_scheduled"),
        episodes: below,
      });
    } else if (e.kind === "cancel_wake") effects.push({ kind: "cancel_wake", id: String(d.id) });
  }
  return {
    episode: ep.id,
    agent: ep.agent,
    status: ep.status,
    started_at: ep.startedAt,
    ms: ep.endedAt - ep.startedAt,
    checkpoint: ep.checkpoint,
    stimulus: await stimulusOf(events),
    effects,
  };
}

/** The trace of one episode (full id or unique prefix). */
export async function traceEpisode(store: Store, idOrPrefix: string): Promise<Trace | TraceMiss> {
  const found = await findEpisode(store, idOrPrefix);
  if ("code" in found) return found;
  const episode = await node(store, found, 0, new Set());
  const upstream: TraceNode[] = [];
  const causeOf = (n: TraceNode) => n.stimulus?.sent_by ?? n.stimulus?.set_by ?? null;
  let parent = causeOf(episode);
  const seen = new Set([episode.episode]);
  while (parent && upstream.length < MAX_DEPTH && !seen.has(parent)) {
    seen.add(parent);
    const ep = await store.getEpisode(parent);
    if (!ep) break; // collected by retention: the trace starts here
    const n = await node(store, ep, MAX_DEPTH, new Set(seen)); // no children: they are below
    upstream.unshift(n);
    parent = causeOf(n);
  }
  return { upstream, episode };
}

/**
 * The committed episode behind the newest message on `topic` at or before `at` (default
 * now): a publish-tool call, or an emit on an agent's `out` topic. Outputs are published at
 * commit, so episodes are chosen by when they ended, not when they started: a slow episode
 * publishes after one that started later, and one still running at `at` had published nothing.
 */
export async function episodeForTopic(store: Store, topic: string, at?: number): Promise<EpisodeRow | TraceMiss> {
  const before = at ?? Number.MAX_SAFE_INTEGER;
  const out = /^fleet\/agents\/([^/]+)\/([^/]+)\/out$/.exec(topic);
  // `started_at <= ?` too (implied) keeps the index on started_at in use.
  const rows = out
    ? await store.client.execute({
        // One agent's episodes run one at a time: they end in the order they start.
        sql: `SELECT ${idOfSql("ep.id")} AS id FROM episodes ep
              WHERE ep.agent = ? AND ep.status = ${STATUS_COMMITTED} AND ep.started_at <= ? AND ep.ended_at <= ?
              AND EXISTS (SELECT 1 FROM events e WHERE e.episode = ep.id AND e.kind = 'emit')
              ORDER BY ep.started_at DESC LIMIT 1`,
        args: [`${out[1]}/${out[2]}`, before, before],
      })
    : await store.client.execute({
        sql: `SELECT ${idOfSql("ep.id")} AS id FROM events e JOIN episodes ep ON ep.id = e.episode
              WHERE e.kind = 'tool' AND json_extract(e.data, '$.tool') = 'publish'
              AND json_extract(e.data, '$.ok') = 1 AND json_extract(e.data, '$.args[0]') = ?
              AND ep.status = ${STATUS_COMMITTED} AND ep.started_at <= ? AND ep.ended_at <= ?
              ORDER BY ep.ended_at DESC LIMIT 1`,
        args: [topic, before, before],
      });
  const id = rows.rows[0]?.id;
  if (id === undefined) return { code: "not_found", message: `no committed episode published to ${topic}` };
  return (await store.getEpisode(String(id)))!;
}
