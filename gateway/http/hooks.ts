/**
 * Webhooks: `POST /hooks/<name>` as declared by `[hooks.<name>]`. The response is sent
 * only after the stimulus is durable: 202 with the stimulus id, 200 with the original id
 * for a duplicate. Bad JSON 400, too large 413, unknown hook 404, bad signature 401.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import type { HookSpec } from "../spec/index.ts";
import type { Target } from "../intake/index.ts";
import type { Intake, IntakeReport } from "../intake/index.ts";
import { type AgentId, agentId, keyProblem, type StimulusId, traceparentOf } from "../types.ts";
import { dedupProblem, stimulusId } from "../intake/index.ts";
import { httpError, json } from "./responses.ts";
import { readRequestBody } from "./limits.ts";
import type { FleetSpec } from "../spec/index.ts";
import { ownerShard, ownsAgent, shardLabel, type ShardSpec } from "../shard.ts";

/** What a hook needs from the gateway. */
export interface HookDeps {
  readonly spec: () => FleetSpec;
  readonly intake: Intake;
  readonly secrets: Readonly<Record<string, string | undefined>>;
  /** The body an earlier stimulus was recorded with, to tell a retry from a reused key. */
  readonly storedPayload?: (agent: AgentId, sid: string) => Promise<Uint8Array | null>;
}

function safeEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** The signature header of a signed request, or null. */
function signatureHeader(headers: Headers): string | null {
  return headers.get("x-fleet-signature") ?? headers.get("x-hub-signature-256");
}

/**
 * The check that needs no body, made before a byte of it is read: `Authorization: Bearer <secret>`
 * (the scheme in any case, RFC 9110 §11.1) matches or not; null when a signature header is there
 * (it covers the body, so it is checked once the body is read).
 */
export function checkBearer(secret: string, headers: Headers): boolean | null {
  if (signatureHeader(headers)) return null;
  const auth = headers.get("authorization")?.trim() ?? "";
  const scheme = /^bearer\s+/i.exec(auth);
  return scheme !== null && safeEqual(auth.slice(scheme[0].length), secret);
}

/** Check `X-Fleet-Signature: sha256=<hex HMAC of body>` or `Authorization: Bearer <secret>`. */
export function checkSignature(secret: string, body: Uint8Array, headers: Headers): boolean {
  const sig = signatureHeader(headers);
  if (!sig) return checkBearer(secret, headers) === true;
  const expected = `sha256=${createHmac("sha256", secret).update(body).digest("hex")}`;
  return safeEqual(sig.trim().toLowerCase(), expected);
}

function resolveTarget(hook: HookSpec, spec: FleetSpec, payload: unknown): Target | string {
  let typeName: string;
  let key: string;
  if (hook.agent) {
    const slash = hook.agent.indexOf("/");
    typeName = hook.agent.slice(0, slash);
    key = hook.agent.slice(slash + 1);
  } else {
    typeName = hook.type ?? "";
    const v =
      typeof payload === "object" && payload !== null
        ? (payload as Record<string, unknown>)[hook.key_field ?? ""]
        : undefined;
    if (v === undefined) return `payload field "${hook.key_field}" (the agent key) is missing`;
    if (typeof v !== "string" && typeof v !== "number") {
      const is = v === null ? "null" : Array.isArray(v) ? "an array" : `a ${typeof v}`;
      return `payload field "${hook.key_field}" (the agent key) is not a string or number (it is ${is})`;
    }
    key = String(v);
  }
  const type = spec.agents[typeName];
  if (!type) return `agent type "${typeName}" is not in the fleet`;
  const id = agentId(typeName, key);
  if (!id) return `"${key.slice(0, 160)}" is not a valid agent key: it ${keyProblem(key) ?? "is invalid"}`;
  return { agent: id, type, key };
}

/** Handle one webhook request. */
export async function handleHook(d: HookDeps, name: string, req: Request): Promise<Response> {
  const spec = d.spec();
  const hook = spec.hooks[name];
  if (!hook) return httpError(404, "unknown_hook", `no hook "${name}" in fleet.toml`);
  const secret = hook.secret_env ? d.secrets[hook.secret_env] : null;
  const badSignature = () => httpError(401, "bad_signature", "signature or bearer token does not match");
  // Refused before the body is read: a caller without the secret holds no body bytes and no time.
  // The variable's name is the operator's to read (in the gateway's log), not the caller's.
  if (secret === undefined || secret === "")
    return httpError(503, "hook_unconfigured", "this hook's secret is not configured on the gateway");
  if (secret !== null && checkBearer(secret, req.headers) === false) return badSignature();
  const read = await readRequestBody(req, hook.max_body_bytes);
  if (!read.ok) return read.res;
  const body = read.bytes;
  if (secret !== null && !checkSignature(secret, body, req.headers)) return badSignature();
  let payload: unknown;
  try {
    payload = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body));
  } catch (err) {
    return httpError(400, "bad_json", `body is not JSON: ${(err as Error).message}`);
  }
  const target = resolveTarget(hook, spec, payload);
  if (typeof target === "string") return httpError(400, "bad_target", target);
  const shard = spec.fleet.shard;
  if (!ownsAgent(shard, target.agent)) return otherShard([target.agent], shard);
  const idem = idempotencyKey(req);
  if (idem instanceof Response) return idem;
  // A dedup id that is there but unusable would make every retry a new stimulus: refused, not ignored.
  const badId = idem || !hook.dedup ? null : dedupProblem(hook.dedup, payload);
  if (badId) return httpError(400, "bad_dedup_id", badId);
  const sid = idem ?? stimulusId(hook.dedup, payload, null);
  // W3C trace context: a malformed header is ignored (the trace starts here), as the spec asks.
  const report = await d.intake.record([target], "webhook", `hooks/${name}`, body, sid, {
    traceparent: traceparentOf(req),
  });
  if (idem && d.storedPayload) {
    const reused = await reusedKey(d.storedPayload, report, target.agent, idem, body);
    if (reused) return reused;
  }
  return intakeResponse(report, target.agent);
}

/** The stimulus id an `Idempotency-Key` header names (null without one), or the 400 for a bad one. */
export function idempotencyKey(req: Request): StimulusId | null | Response {
  const idem = req.headers.get("idempotency-key");
  if (idem === null) return null;
  if (idem.length === 0 || idem.length > 256)
    return httpError(400, "bad_idempotency_key", "Idempotency-Key must be 1–256 characters");
  return `idem:${idem}` as StimulusId;
}

/**
 * The 422 for an `Idempotency-Key` already used with another body, or null. A retry repeats the
 * body (byte for byte) and is a duplicate; the same key with another body is a client bug, and
 * answering it as a duplicate would drop the new body without a word.
 */
export async function reusedKey(
  storedPayload: NonNullable<HookDeps["storedPayload"]>,
  report: IntakeReport,
  agent: AgentId,
  sid: StimulusId,
  body: Uint8Array,
): Promise<Response | null> {
  if (report.duplicates.length === 0) return null;
  const before = await storedPayload(agent, sid);
  if (before === null || Buffer.from(before).equals(Buffer.from(body))) return null;
  return httpError(422, "idempotency_key_reused", "Idempotency-Key was already used with a different body");
}

/**
 * 421 Misdirected Request: the agents are owned by other shards of the fleet (docs/shards.md);
 * the caller sends the request to the gateway of the shard named.
 */
export function otherShard(agents: readonly AgentId[], shard: ShardSpec | null): Response {
  const count = shard?.count ?? 1;
  const owners = agents.map((a) => `${a} is owned by shard ${ownerShard(a, count)}/${count}`);
  return httpError(
    421,
    "other_shard",
    `${owners.join("; ")}; this gateway is shard ${shard ? shardLabel(shard) : "1/1"}: send it to that shard's gateway`,
  );
}

/** Seconds a client waits before retrying a stimulus refused for a full queue. */
const QUEUE_FULL_RETRY_AFTER = "5";
/** Seconds before retrying a stimulus refused for a new agent past `max_agents` (a place frees when one retires). */
const MAX_AGENTS_RETRY_AFTER = "60";

/**
 * The HTTP answer to recording one stimulus for one agent (webhooks, manual stimuli): 202 with
 * the new stimulus id, 200 with the original id for a duplicate, 429 when its queue is full or
 * it would create an agent past `max_agents`, 409 when it was refused otherwise.
 */
export function intakeResponse(report: IntakeReport, agent: string): Response {
  const a = report.accepted[0];
  if (a) return json({ stimulus: a.sid, agent, seq: a.seq, duplicate: false }, 202);
  const dup = report.duplicates[0];
  if (dup) return json({ stimulus: dup.sid, agent, duplicate: true }, 200);
  return refusedResponse(report, report.refused[0]?.reason ?? "refused");
}

/**
 * Every target refused the stimulus; `message` says why, `extra` joins the error in the body.
 * A full queue drains, so while one is among the reasons the answer is 429 `queue_full` with
 * Retry-After (the client retries); so is a new agent past its type's `max_agents` (429
 * `max_agents`: a place frees when an agent retires or the cap is raised), and a data disk below
 * `[fleet] disk_free_limit_mb` (503 `storage_unavailable`, as a full disk). Only when every
 * refusal is permanent (retired, draining) is it 409 `refused`. MQTT intake tells transient
 * from permanent the same way.
 */
export function refusedResponse(report: IntakeReport, message: string, extra: Record<string, unknown> = {}): Response {
  // The data disk low on space: the answer a full disk gets (nothing recorded, try again later).
  if (report.refused.some((r) => r.code === "disk_low"))
    return json({ ...extra, error: { code: "storage_unavailable", message } }, 503, {
      "retry-after": QUEUE_FULL_RETRY_AFTER,
    });
  if (report.refused.some((r) => r.code === "queue_full"))
    return json({ ...extra, error: { code: "queue_full", message } }, 429, { "retry-after": QUEUE_FULL_RETRY_AFTER });
  if (report.refused.some((r) => r.code === "max_agents"))
    return json({ ...extra, error: { code: "max_agents", message } }, 429, { "retry-after": MAX_AGENTS_RETRY_AFTER });
  return json({ ...extra, error: { code: "refused", message } }, 409);
}
