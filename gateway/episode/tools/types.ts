/**
 * What every tool shares: the outcome sent back to the subprocess, the effects that wait
 * for the episode to commit, the gateway resources a tool may use, and argument parsing
 * (zod at the edge; a bad argument is a denial that names it).
 */
import type { z } from "zod";
import type { AgentRef } from "../../../agents/protocol.ts";
import { describeZodError } from "../../parse.ts";
import type { AgentTypeSpec, FleetSpec, TOOL_NAMES } from "../../spec/index.ts";
import type { Admission, AdmissionCode, AgentId } from "../../types.ts";

/** A built-in tool's name. */
export type ToolName = (typeof TOOL_NAMES)[number];

/** A publish waiting for the episode to commit. */
export interface PendingPublish {
  readonly topic: string;
  readonly payload: string;
  readonly qos: 0 | 1;
  readonly retain: boolean;
}

/** An inbox message waiting for the episode to commit. */
export interface PendingSend {
  readonly to: { type: string; key: string; id: AgentId };
  readonly payload: string;
  /**
   * Another shard owns the target (`[fleet] shard`): the send is published to the broker after
   * the commit (`fleet/sends/...`) instead of written to a local queue; nothing was reserved.
   */
  readonly forward?: boolean;
}

/** What a tool call returns to the subprocess. */
export type ToolOutcome =
  | { ok: true; result: unknown }
  | { ok: false; result: { error: "denied" | "failed"; reason: string } };

/** Outside resources the gate needs; injected for tests. */
export interface ToolEnv {
  /** Secret values by env name (the gateway's environment). */
  readonly secrets: Readonly<Record<string, string | undefined>>;
  readonly fetch: typeof fetch;
  /**
   * The queue book's admission for a send (retired? queue full?); an admitted send holds a
   * reserved place until the episode commits or not (the executor settles it). A refusal is
   * a denied call, recorded in the episode's log.
   */
  readonly admit?: (agent: AgentId, maxQueue: number, maxAgents: number) => Admission;
  /** How many sends in a row led to the stimulus `sid` (store `sendHops`); without it no send is counted. */
  readonly sendHops?: (sid: string, maxSteps: number) => Promise<number>;
  /** A send the tool refused, for the metric and the (throttled) log: `fleet_intake_refused_total{source="inbox"}`. */
  readonly sendRefused?: (agent: AgentId, code: AdmissionCode | "send_hops", reason: string) => void;
}

/** What one tool call sees of its episode: who calls, under which spec, and what it has queued or spent. */
export interface ToolContext {
  readonly agent: AgentRef;
  readonly type: AgentTypeSpec;
  readonly spec: FleetSpec;
  readonly env: ToolEnv;
  readonly publishes: PendingPublish[];
  readonly sends: PendingSend[];
  /** Aborted when the episode ends: a call still in flight then is cancelled with it. */
  readonly signal: AbortSignal;
  /** How many sends in a row led to this episode's stimulus (0: it came from outside the fleet). */
  sendHops(): Promise<number>;
  /** Tokens of the day's budget not yet spent, this episode's calls included. */
  tokensLeft(): number;
  /** Meter tokens an llm call used. */
  spendTokens(n: number): void;
}

/** The call was refused; nothing happened. */
export const deny = (reason: string): ToolOutcome => ({ ok: false, result: { error: "denied", reason } });
/** The call was allowed and went wrong (endpoint down, too large). */
export const failed = (reason: string): ToolOutcome => ({ ok: false, result: { error: "failed", reason } });

/** Encode a payload the way outputs are published: strings as-is, everything else JSON. */
export function encodePayload(payload: unknown): string {
  return typeof payload === "string" ? payload : (JSON.stringify(payload) ?? "null");
}

/** A tool's positional arguments, parsed with `schema`; a denial naming the bad argument otherwise. */
export function parseToolArgs<S extends z.ZodType>(
  tool: ToolName,
  names: readonly string[],
  schema: S,
  args: readonly unknown[],
): { ok: true; args: z.output<S> } | { ok: false; outcome: ToolOutcome } {
  const r = schema.safeParse(args);
  if (r.success) return { ok: true, args: r.data };
  return { ok: false, outcome: deny(describeZodError(tool, r.error, names)) };
}

/** The error option of a tool's argument tuple: how many arguments it takes, by name. */
export function arity(names: readonly string[]) {
  return {
    error: (iss: { input?: unknown }) =>
      `takes (${names.join(", ")}), got ${Array.isArray(iss.input) ? iss.input.length : "no"} argument(s)`,
  };
}
