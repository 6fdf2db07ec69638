/**
 * Core value types shared across the gateway. Identifiers that must not be mixed up are
 * branded; they are created only by the functions below or by parsing at the edge.
 */
import { jsonNestedDeeper, type Stimulus } from "../agents/protocol.ts";

/** Hex BLAKE3 digest (64 chars). */
export type Blake3Hex = string & { readonly __brand: "Blake3Hex" };

/** The gateway's lifecycle. */
export type GatewayState = "created" | "starting" | "running" | "draining" | "stopped";

/** What one scheduler turn for an agent did (the executor returns it, the scheduler acts on it). */
export type TurnResult =
  /** An episode ran (committed or failed); whether work is left is the queue book's count. */
  | { readonly kind: "ran" }
  /** Nothing queued after all. */
  | { readonly kind: "empty" }
  /** Head of queue must wait until `until` (retry backoff, budget window). */
  | { readonly kind: "wait"; readonly until: number }
  /** The agent cannot run now (paused, retired, failed); wake it with `wake()`. */
  | { readonly kind: "parked" };

/** `<type>/<key>` of one agent instance; made by `agentId()` / `parseAgentId()` only. */
export type AgentId = string & { readonly __brand: "AgentId" };
/** UUIDv7 of one episode attempt. */
export type EpisodeId = string & { readonly __brand: "EpisodeId" };
/** Dedup id of a stimulus (unique per agent). */
export type StimulusId = string & { readonly __brand: "StimulusId" };

export type { Stimulus };
export type StimulusKind = Stimulus["kind"];

/**
 * Every stimulus kind an episode can have, as filters accept them (`?kind=`, `--kind`). `wake`
 * (durable wake-ups) is listed ahead of its source. Timers and cron fires are `timer`;
 * `ctx.send` messages are `inbox`.
 */
export const STIMULUS_KINDS = ["mqtt", "timer", "webhook", "inbox", "manual", "wake"] as const;
// A new kind in the protocol must be added above (this fails to compile until it is).
const everyKindListed: readonly (typeof STIMULUS_KINDS)[number][] = [] as StimulusKind[];
void everyKindListed;

/** A stimulus kind as a filter names it, or null (with the reason worded for the caller). */
export function parseStimulusKind(raw: string): { ok: true; kind: string } | { ok: false; message: string } {
  if ((STIMULUS_KINDS as readonly string[]).includes(raw)) return { ok: true, kind: raw };
  const hint = raw === "cron" ? " (cron fires are kind timer)" : raw === "send" ? " (ctx.send messages are inbox)" : "";
  return { ok: false, message: `kind must be one of ${STIMULUS_KINDS.join(", ")}; got "${raw.slice(0, 40)}"${hint}` };
}

/** A type or key name; not `.` nor `..`, which a URL path drops (`/api/agents/t/../pause` is `/api/agents/pause`). */
const NAME = /^(?!\.\.?$)[A-Za-z0-9_.:@-]+$/;

/** Longest agent key (keys are ASCII, so characters = bytes): ids stay short in topics, rows and logs. */
export const MAX_KEY_BYTES = 128;

/**
 * The longest delay a timer holds (2^31 - 1 ms, ~24.8 days): setTimeout fires a longer one at once.
 * Waits beyond it are armed in steps; delays fleet.toml gives in milliseconds are refused beyond it.
 */
export const MAX_TIMER_MS = 2_147_483_647;

/** Why a string cannot be an agent key, or null when it can. */
export function keyProblem(key: string): string | null {
  if (key.length === 0) return "is empty";
  if (key.length > MAX_KEY_BYTES) return `is longer than ${MAX_KEY_BYTES} bytes (${key.length})`;
  if (key === "." || key === "..") return `may not be "${key}" (a URL cannot name it)`;
  if (!NAME.test(key)) return "may only hold A-Z a-z 0-9 _ . : @ -";
  return null;
}

/** Make an agent id from a type and key, or null when either is not a valid name. */
export function agentId(type: string, key: string): AgentId | null {
  if (!NAME.test(type) || keyProblem(key) !== null) return null;
  return `${type}/${key}` as AgentId;
}

/** Split `<type>/<key>`; null when it is not one. */
export function parseAgentId(id: string): { type: string; key: string; id: AgentId } | null {
  const slash = id.indexOf("/");
  if (slash < 0) return null;
  const type = id.slice(0, slash);
  const key = id.slice(slash + 1);
  const ok = agentId(type, key);
  return ok ? { type, key, id: ok } : null;
}

/** A new, time-ordered episode id. */
export function newEpisodeId(): EpisodeId {
  return Bun.randomUUIDv7() as EpisodeId;
}

const SENT_BY = /^inbox:([0-9a-f-]{36}):\d+$/;
const WOKEN_BY = /^wake:([0-9a-f-]{36})\.w\d+$/;

/** The episode whose `ctx.send` made the stimulus id `sid` (`inbox:<episode>:<n>`), if one did. */
export function sentBy(sid: string): string | undefined {
  return SENT_BY.exec(sid)?.[1];
}

/** The episode that set the wake-up the stimulus id `sid` is (`wake:<episode>.w<n>`), if it is one. */
export function setBy(sid: string): string | undefined {
  return WOKEN_BY.exec(sid)?.[1];
}

/** A stimulus addressed to one agent, before it is recorded. */
export interface NewStimulus {
  readonly agent: AgentId;
  readonly type: string;
  readonly key: string;
  readonly sid: StimulusId;
  readonly kind: StimulusKind;
  readonly topic: string | null;
  readonly payload: Uint8Array;
  readonly receivedAt: number;
  /** Epoch ms after which the stimulus is skipped instead of run (MQTT 5 message expiry); absent: never. */
  readonly expiresAt?: number | null;
  /** A valid W3C `traceparent` the stimulus arrived with. */
  readonly traceparent?: string | null;
  /** A send another shard forwarded: the sends that led to it, this one included (`stimuli.hops`). */
  readonly hops?: number | null;
}

const TRACEPARENT_RE = /^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$/;

/** A request's `traceparent` header, normalised, when it is valid; null otherwise (the trace starts here). */
export function traceparentOf(req: Request): string | null {
  const v = req.headers.get("traceparent");
  return parseTraceparent(v) ? v!.trim().toLowerCase() : null;
}

/** A W3C `traceparent` header's trace and parent span ids; null when absent, malformed or all zeros. */
export function parseTraceparent(v: string | null | undefined): { traceId: string; spanId: string } | null {
  const m = TRACEPARENT_RE.exec(v?.trim().toLowerCase() ?? "");
  if (!m || /^0+$/.test(m[1]!) || /^0+$/.test(m[2]!)) return null;
  return { traceId: m[1]!, spanId: m[2]! };
}

/**
 * Decode a stored payload: parsed JSON when it is JSON, else the UTF-8 string (agents/README.md).
 * JSON nested deeper than `MAX_JSON_DEPTH` is given as its text: it could not be kept in an event log.
 */
export function decodePayload(bytes: Uint8Array | null): unknown {
  if (!bytes || bytes.length === 0) return null;
  const text = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return text;
  }
  return typeof value === "object" && value !== null && jsonNestedDeeper(bytes) ? text : value;
}

/** Live agent status as published on `fleet/agents/<type>/<key>/status`. */
export type AgentStatus = "idle" | "running" | "paused" | "draining" | "retired" | "failed";

/** An agent's status as every view shows it (API, CLI, dashboard, topics, the center): stored `active` is `idle`. */
export function shownStatus<S extends string>(status: S): Exclude<S, "active"> | "idle" {
  return (status === "active" ? "idle" : status) as Exclude<S, "active"> | "idle";
}

/** An operator lifecycle action (`fleet pause|resume|retire`, POST /api/agents/.../<action>). */
export type LifecycleAction = "pause" | "resume" | "retire";

/** Why a lifecycle action was refused; callers branch on this, never on the message. */
export type LifecycleRefusal = "not_found" | "retired" | "draining" | "failed";

/** The reason a draining agent carries for its retirement by an operator. */
export const OPERATOR_DRAIN = "draining: retired by operator once its queued stimuli have run";

/**
 * Why an operator action does not apply to an agent in its stored status, or null when it does (the running
 * gateway's route and `fleet` on a stopped gateway judge alike). Pausing must not bring a retired agent back
 * (resume would then reactivate it), nor hide a failure (the reason names the bad checkpoint; a resume tries
 * the agent again, a retire ends it); a draining agent only retires.
 */
export function lifecycleRefusal(
  agent: { readonly id: string; readonly status: string; readonly reason: string | null },
  action: LifecycleAction,
): { readonly code: LifecycleRefusal; readonly message: string } | null {
  const id = agent.id;
  if (agent.status === "retired" && action !== "retire") return { code: "retired", message: `${id} is retired` };
  if (agent.status === "draining" && action !== "retire")
    return {
      code: "draining",
      message: `${id} is draining: it retires once its queue is empty (retire without drain retires it now)`,
    };
  if (agent.status === "failed" && action === "pause")
    return {
      code: "failed",
      message:
        `${id} failed (${agent.reason ?? "no reason recorded"}): it runs nothing to pause; ` +
        "resume tries it again, retire ends it",
    };
  return null;
}

/** Why a stimulus was not admitted to an agent's queue; callers branch on the code. */
export type AdmissionCode = "retired" | "draining" | "queue_full" | "max_agents";

/** The answer of the one admission every source goes through (intake, timers, sends, retries). */
export type Admission =
  | { readonly ok: true }
  | { readonly ok: false; readonly code: AdmissionCode; readonly message: string };
