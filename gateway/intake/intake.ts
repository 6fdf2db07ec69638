/**
 * Intake: turns a message from any source into durable, deduplicated stimuli, one per
 * target agent. For MQTT it runs inside the broker's authorizePublish, so a QoS 1 PUBACK
 * goes out only after the stimuli are committed (aedes acks before its `published` hook runs).
 */
import type { Logger } from "pino";
import type { ClientInfo, IntakeVerdict, PublishedMessage } from "../../broker/index.ts";
import { blake3Hex } from "../hash.ts";
import { isWellFormed } from "../parse.ts";
import { RefusalLog } from "./refusals.ts";
import type { Route, Target } from "./router.ts";
import type { IntakeOutcome, Store } from "../store/index.ts";
import type { FleetEvents } from "../events.ts";
import type { Admission, AdmissionCode, AgentId, NewStimulus, StimulusId, StimulusKind } from "../types.ts";

/** What intake needs from the running gateway: routing and the queue book's admission. */
export interface IntakeView {
  /** Route a topic with the current spec. */
  route(topic: string): Route;
  /** Admit one stimulus (retired? queue full? a new agent past max_agents?) and reserve its place. */
  admit(agent: AgentId, maxQueue: number, maxAgents: number): Admission;
  /** An admitted stimulus of `kind` was written to the agent's queue as `seq`. */
  recorded(agent: AgentId, seq: number, receivedAt: number, kind: StimulusKind): void;
  /** Admitted places were not used (duplicates, a failed write). */
  released(agent: AgentId, n?: number): void;
  /** Why stimuli from outside the fleet are refused now (the data disk's reserve, observe/disk.ts), or null. */
  diskLow(): string | null;
}

/** Why intake refused a stimulus for an agent: the queue book's admission codes, or a data disk low on space. */
export type RefusalCode = AdmissionCode | "disk_low";

/** Stimuli from outside the fleet: refused while the data disk is low. Timers and wake-ups are the fleet's own. */
const OUTSIDE: ReadonlySet<StimulusKind> = new Set<StimulusKind>(["mqtt", "inbox", "webhook", "manual"]);

/** A refused target: `code` for callers to branch on, `reason` for people. */
export interface Refusal {
  readonly agent: AgentId;
  readonly code: RefusalCode;
  readonly reason: string;
}

/** Outcome per target of one intake. */
export interface IntakeReport {
  readonly accepted: { agent: AgentId; sid: string; seq: number }[];
  readonly duplicates: { agent: AgentId; sid: string }[];
  readonly refused: Refusal[];
}

const utf8 = new TextDecoder();

/** Parse a payload as JSON when it is JSON. */
function tryJson(bytes: Uint8Array): unknown {
  if (bytes.length === 0) return undefined;
  const first = bytes[0]!;
  // Cheap check before decoding: JSON objects/arrays/strings/numbers/literals.
  if (
    first !== 0x7b &&
    first !== 0x5b &&
    first !== 0x22 &&
    !(first >= 0x30 && first <= 0x39) &&
    first !== 0x2d &&
    first !== 0x74 &&
    first !== 0x66 &&
    first !== 0x6e
  )
    return undefined;
  try {
    return JSON.parse(utf8.decode(bytes));
  } catch {
    return undefined;
  }
}

/** A field of a JSON object, or undefined for anything else (arrays included). */
const field = (v: unknown, key: string): unknown =>
  typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>)[key] : undefined;

/** A payload value at a dotted path (`device.id`), or undefined. */
function at(parsed: unknown, path: string): unknown {
  // The common case (`dedup = "id"`) without splitting the path for every message.
  if (!path.includes(".")) return field(parsed, path);
  let v = parsed;
  for (const part of path.split(".")) v = field(v, part);
  return v;
}

const usable = (v: unknown): v is string | number =>
  (typeof v === "string" && v.length > 0 && v.length <= 256 && isWellFormed(v)) ||
  (typeof v === "number" && Number.isFinite(v));

/** A field of a `dedup` template (`{device}` in `"{device}:{seq}"`). */
const TEMPLATE_FIELD = /\{([^{}]+)\}/g;

/**
 * The id a type's `dedup` setting gives a payload, or null when the payload does not carry
 * it: a field path (`"id"`, `"device.id"`) or a template over fields (`"{device}:{seq}"`,
 * every field present).
 */
export function dedupKey(dedup: string, parsed: unknown): string | null {
  if (typeof parsed !== "object" || parsed === null) return null;
  if (!dedup.includes("{")) {
    const v = at(parsed, dedup);
    return usable(v) ? String(v) : null;
  }
  const t = template(dedup);
  let key = "";
  for (const part of t.parts) {
    if (typeof part === "string") {
      key += part;
      continue;
    }
    const v = at(parsed, part.path);
    if (!usable(v)) return null;
    key += String(v).replace(t.special, "\\$&");
  }
  return key.length > 512 ? null : key;
}

/** A `dedup` template split into literal text and fields, with what a field's value must escape. */
interface DedupTemplate {
  readonly parts: readonly (string | { readonly path: string })[];
  /** The backslash, every character of the literal text, and the separator of adjacent fields. */
  readonly special: RegExp;
}

/** Separates two fields with no literal text between them (`"{device}{seq}"`). */
const ADJACENT = "\u001f";
const templates = new Map<string, DedupTemplate>();

/**
 * A template compiled once. Each field's value escapes (with a backslash) the backslash and every
 * character of the template's literal text, and fields with nothing between them are separated:
 * different combinations then always make different ids (`{"device":"a:b","seq":1}` and
 * `{"device":"a","seq":"b:1"}` under `"{device}:{seq}"`; `d1`+`23` and `d12`+`3` under `"{device}{seq}"`).
 * A value without such characters, the common case, is as it was.
 */
function template(dedup: string): DedupTemplate {
  let t = templates.get(dedup);
  if (t) return t;
  const parts: (string | { path: string })[] = [];
  let last = 0;
  for (const m of dedup.matchAll(TEMPLATE_FIELD)) {
    const literal = dedup.slice(last, m.index);
    if (literal) parts.push(literal);
    else if (parts.length > 0) parts.push(ADJACENT);
    parts.push({ path: m[1]!.trim() });
    last = m.index + m[0].length;
  }
  if (last < dedup.length) parts.push(dedup.slice(last));
  const chars = new Set(["\\", ...parts.flatMap((p) => (typeof p === "string" ? [...p] : []))]);
  const special = new RegExp(`[${[...chars].map((c) => c.replace(/[\\\]^-]/g, "\\$&")).join("")}]`, "g");
  t = { parts, special };
  templates.set(dedup, t);
  return t;
}

/**
 * Why a payload's `dedup` fields cannot make an id although they are there (empty, over 256
 * characters, not a string or a finite number), or null: absent fields are not a problem here.
 */
export function dedupProblem(dedup: string, parsed: unknown): string | null {
  const paths = dedup.includes("{") ? [...dedup.matchAll(TEMPLATE_FIELD)].map((m) => m[1]!.trim()) : [dedup];
  for (const path of paths) {
    const v = at(parsed, path);
    if (v !== undefined && !usable(v))
      return (
        `body field "${path}" (the dedup id) must be a string of 1-256 characters (well-formed Unicode) ` +
        "or a finite number"
      );
  }
  return null;
}

/**
 * What a message repeats when MQTT redelivers it: the client id, the packet id and the
 * content. Only a QoS 1/2 retransmission has the same three; a new message that repeats a
 * value gets a new packet id, and QoS 0 is never redelivered (each one is new).
 */
export async function redeliveryId(
  client: string,
  messageId: number,
  topic: string,
  payload: Uint8Array,
): Promise<StimulusId> {
  const head = new TextEncoder().encode(`${topic}\n`);
  const buf = new Uint8Array(head.length + payload.length);
  buf.set(head, 0);
  buf.set(payload, head.length);
  return `r:${client}:${messageId}:${(await blake3Hex(buf)).slice(0, 32)}` as StimulusId;
}

/** A stimulus id no other message shares: nothing can be a duplicate of it. */
export function uniqueId(): StimulusId {
  return `u:${Bun.randomUUIDv7()}` as StimulusId;
}

/**
 * The stimulus id: the type's `dedup` key when the payload carries it, else `fallback`
 * (a redelivery id for QoS 1/2 MQTT, else a fresh unique id: a message that merely repeats
 * a value is a new stimulus, never a silent duplicate).
 */
export function stimulusId(dedup: string | null, parsed: unknown, fallback: StimulusId | null): StimulusId {
  const key = dedup ? dedupKey(dedup, parsed) : null;
  return key !== null ? (`id:${key}` as StimulusId) : (fallback ?? uniqueId());
}

/** The verdict when every target refused a message. */
function refusal(report: IntakeReport): IntakeVerdict {
  return {
    ok: false,
    reason: report.refused.map((r) => `${r.agent}: ${r.reason}`).join("; "),
    // Retired and draining agents never take it; a full queue drains (the sender retries).
    permanent: report.refused.every((r) => r.code === "retired" || r.code === "draining"),
  };
}

const NO_TYPES: readonly string[] = [];
/** Rejected messages are logged once per this long at most, with how many there were. */
const REJECTED_LOG_EVERY_MS = 10_000;

/** Intake for all sources. */
export class Intake {
  private readonly refusals: RefusalLog;

  constructor(
    private readonly store: Store,
    private readonly view: IntakeView,
    private readonly events: FleetEvents,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
  ) {
    this.refusals = new RefusalLog(log, events, now);
  }

  /** A `ctx.send` to `agent` the send tool refused (a full queue, a retired agent, a loop): counted and logged. */
  sendRefused(agent: AgentId, code: AdmissionCode | "send_hops", reason: string): void {
    this.refusals.note([{ agent, code, reason }], "inbox", null);
  }

  /**
   * The broker hook: route, record, then let aedes ack. A message that matched a
   * subscription but yields no valid agent (bad key) is recorded as a rejected message with
   * the reason before the ack, never acked and dropped; an inbox topic naming no agent is
   * refused (no ack).
   */
  async mqtt(msg: PublishedMessage, client: ClientInfo | null = null): Promise<IntakeVerdict> {
    const route = this.view.route(msg.topic);
    if (route.inbox && route.targets.length === 0 && route.elsewhere.length === 0) {
      // Logged by the broker with its other permanent refusals: one line per 10 s at most.
      return { ok: false, reason: route.problems[0] ?? "unknown inbox", permanent: true };
    }
    // A data disk low on space takes nothing from outside, a rejected message's row included.
    if (route.targets.length + route.problems.length > 0) {
      const low = this.view.diskLow();
      if (low !== null) {
        this.refuseLow(route.targets, route.inbox ? "inbox" : "mqtt", msg.topic, low);
        return { ok: false, reason: low };
      }
    }
    const rejected = route.problems.length === 0 ? null : this.reject(msg, client?.id ?? null, route.problems);
    if (route.targets.length === 0) {
      // Every agent it is for belongs to another shard (or none could be named): nothing to record here.
      await rejected;
      return { ok: true };
    }
    const kind = route.inbox ? "inbox" : "mqtt";
    if (route.forwarded) {
      // A send from another shard: the id and topic a send within one gateway has.
      const { sid, topic } = route.forwarded;
      const report = await this.record(route.targets, kind, topic, msg.payload, sid, { hops: msg.hops ?? null });
      return report.refused.length > 0 && report.accepted.length + report.duplicates.length === 0
        ? refusal(report)
        : { ok: true };
    }
    const parsed = tryJson(msg.payload);
    // The redelivery id is a hash of the whole message: only worth it when some target's
    // `dedup` rule finds no id in the payload.
    const needsRedelivery = route.targets.some((t) => !t.type.dedup || dedupKey(t.type.dedup, parsed) === null);
    const redelivery =
      needsRedelivery && msg.qos > 0 && msg.messageId !== undefined && client
        ? await redeliveryId(client.id, msg.messageId, msg.topic, msg.payload)
        : null;
    // MQTT 5: the interval left when it reached us; its episode must start before then.
    const expiresAt = msg.expirySeconds === undefined ? null : this.now() + msg.expirySeconds * 1000;
    const recording = this.record(route.targets, kind, msg.topic, msg.payload, null, { redelivery, expiresAt, parsed });
    const report = rejected === null ? await recording : (await Promise.all([recording, rejected]))[0];
    // A sender that sets DUP on every redelivery (an external broker) says this is a first
    // delivery: a redelivery-id hit is an older message that reused the packet id, not this one.
    const reused = msg.dup === false ? report.duplicates.filter((d) => d.sid === redelivery) : [];
    let outcome = report;
    if (reused.length > 0) {
      const agents = new Set(reused.map((d) => d.agent));
      const again = route.targets.filter((t) => agents.has(t.agent));
      const second = await this.record(again, kind, msg.topic, msg.payload, uniqueId(), { expiresAt });
      // Those targets' outcome is the second recording's (a full queue refuses it), not a duplicate.
      outcome = {
        ...report,
        accepted: [...report.accepted, ...second.accepted],
        duplicates: [...report.duplicates.filter((d) => d.sid !== redelivery), ...second.duplicates],
        refused: [...report.refused, ...second.refused],
      };
    }
    if (outcome.refused.length > 0 && outcome.accepted.length + outcome.duplicates.length === 0)
      return refusal(outcome);
    return { ok: true };
  }

  /** Refuse every target for the data disk's reserve (counted; the reserve logs it, once). */
  private refuseLow(targets: readonly Target[], kind: StimulusKind, topic: string | null, reason: string): Refusal[] {
    const refused = targets.map((t) => ({ agent: t.agent, code: "disk_low" as const, reason }));
    this.refusals.note(refused, kind, topic);
    return refused;
  }

  /** When a rejected message was last logged, and how many since (one line per 10 s at most). */
  private readonly rejectedLog = { at: Number.NEGATIVE_INFINITY, since: 0 };

  /** Record a message that could not become a stimulus, one row per reason (resolves after commit). */
  private async reject(msg: PublishedMessage, client: string | null, reasons: readonly string[]): Promise<void> {
    const at = this.now();
    const l = this.rejectedLog;
    l.since += reasons.length;
    if (at - l.at >= REJECTED_LOG_EVERY_MS) {
      // Each one is in /api/rejected; the log gets a sample, its topic cut short (a device chooses it).
      const topic = msg.topic.length > 200 ? `${msg.topic.slice(0, 200)}…` : msg.topic;
      this.log.warn({ topic, client, rejected: l.since }, `intake: rejected message: ${reasons[0]}`);
      l.at = at;
      l.since = 0;
    }
    await this.store.recordRejected(
      reasons.map((reason) => ({
        kind: "mqtt",
        topic: msg.topic,
        payload: msg.payload,
        client,
        reason,
        receivedAt: at,
      })),
    );
    this.events.emit("rejectedMessage", { count: reasons.length });
  }

  /**
   * Record one message for its targets in one transaction. `explicitId` (webhook
   * Idempotency-Key, timer fire id) overrides the per-type dedup rule.
   */
  async record(
    targets: readonly Target[],
    kind: StimulusKind,
    topic: string | null,
    payload: Uint8Array,
    explicitId: StimulusId | null,
    opts: {
      readonly redelivery?: StimulusId | null;
      readonly expiresAt?: number | null;
      /** A valid W3C traceparent to record with each stimulus. */
      readonly traceparent?: string | null;
      /** The payload as JSON, when the caller parsed it already (undefined: not JSON). */
      readonly parsed?: unknown;
      /** A forwarded send's count of the sends that led to it (`PublishedMessage.hops`). */
      readonly hops?: number | null;
    } = {},
  ): Promise<IntakeReport> {
    const low = OUTSIDE.has(kind) ? this.view.diskLow() : null;
    if (low !== null) return { accepted: [], duplicates: [], refused: this.refuseLow(targets, kind, topic, low) };
    const refused: Refusal[] = [];
    const items: NewStimulus[] = [];
    const parsed = explicitId ? undefined : "parsed" in opts ? opts.parsed : tryJson(payload);
    const at = this.now();
    /** Refused by admission, unless already recorded (a retry of a stimulus taken before). */
    const turnedAway: { refusal: Refusal; sid: StimulusId }[] = [];
    for (const t of targets) {
      const sid = explicitId ?? stimulusId(t.type.dedup, parsed, opts.redelivery ?? null);
      // A full queue is backpressure: no PUBACK, the device keeps the message and retries later.
      // So is a new agent past its type's max_agents (a place frees when one retires).
      const admission = this.view.admit(t.agent, t.type.max_queue, t.type.max_agents);
      if (!admission.ok) {
        turnedAway.push({ refusal: { agent: t.agent, code: admission.code, reason: admission.message }, sid });
        continue;
      }
      items.push({
        agent: t.agent,
        type: t.type.name,
        key: t.key,
        sid,
        kind,
        topic,
        payload,
        receivedAt: at,
        expiresAt: opts.expiresAt ?? null,
        traceparent: opts.traceparent ?? null,
        ...(typeof opts.hops === "number" ? { hops: opts.hops } : {}),
      });
    }
    const accepted: IntakeReport["accepted"] = [];
    const duplicates: IntakeReport["duplicates"] = [];
    // The queue book (and so the scheduler) hears of the stimuli as soon as their transaction
    // commits, while the WAL syncs: the episode's own commit comes later in the WAL, so no
    // sync covers it without covering them, and nothing it does leaves before its own commit
    // is durable. The device is acknowledged only once they are durable (the await).
    let seen = false;
    // Declared wide: TypeScript does not see the listener's assignment and would narrow it to null.
    let failed = null as { err: unknown } | null;
    const committed = (outcomes: IntakeOutcome[]): void => {
      seen = true;
      try {
        for (const o of outcomes) {
          if (o.seq === null) {
            duplicates.push({ agent: o.agent, sid: o.sid });
            this.view.released(o.agent);
          } else {
            accepted.push({ agent: o.agent, sid: o.sid, seq: o.seq });
            this.view.recorded(o.agent, o.seq, o.receivedAt, kind);
          }
        }
      } catch (err) {
        failed = { err }; // the caller's to see, after the sync, as before (the committer must not throw)
      }
    };
    try {
      // A retry of what was recorded before is a duplicate whatever the queue holds now: refusing it
      // would have the device (or client) send again and again what is already safe.
      for (const { refusal, sid } of turnedAway) {
        if (sid.startsWith("u:") || !(await this.store.findStimulus(refusal.agent, sid))) refused.push(refusal);
        else duplicates.push({ agent: refusal.agent, sid });
      }
      if (refused.length > 0) this.refusals.note(refused, kind, topic);
      await this.store.intake(items, committed);
    } catch (err) {
      // Not committed (or the store could not tell a turned-away retry from a new stimulus): the
      // admissions go back. Committed but not synced: the rows are in the queue all the same (the
      // device, unacknowledged, sends again and is told it is a duplicate).
      if (!seen) for (const s of items) this.view.released(s.agent);
      throw err;
    }
    if (failed) throw failed.err;
    for (const d of duplicates)
      this.log.debug({ agent: d.agent, sid: d.sid, source: kind }, "dedup hit: duplicate stimulus");
    this.events.emit("intake", {
      source: kind,
      accepted: accepted.length,
      duplicates: duplicates.length,
      duplicateTypes:
        duplicates.length === 0 ? NO_TYPES : duplicates.map((d) => d.agent.slice(0, d.agent.indexOf("/"))),
    });
    return { accepted, duplicates, refused };
  }
}
