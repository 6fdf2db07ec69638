/**
 * The SDK an agent author imports. An agent module's default export is
 * `defineAgent({ init, onStimulus })`; it runs in its own subprocess (agents/host/main.ts)
 * and reaches the outside world only through `ctx`.
 */
import type { AgentRef, Stimulus } from "../protocol.ts";

export type { AgentRef, Stimulus } from "../protocol.ts";

/** Options of the `publish` tool. */
export interface PublishOptions {
  readonly retain?: boolean;
  readonly qos?: 0 | 1;
}

/** What the `http` tool accepts: a subset of `RequestInit` that survives JSON. */
export interface HttpInit {
  readonly method?: string;
  /** Header values may contain `{{secret:NAME}}`; the gateway substitutes the type's secrets. */
  readonly headers?: Readonly<Record<string, string>>;
  readonly body?: string;
  readonly timeout_ms?: number;
}

/** What the `http` tool returns. */
export interface HttpResult {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  readonly body: string;
  /** Parsed body when the response was JSON. */
  readonly json?: unknown;
}

/** One chat message for the `llm` tool. */
export interface ChatMessage {
  readonly role: "system" | "user" | "assistant";
  readonly content: string;
}

/** What the `llm` tool returns. */
export interface LlmResult {
  readonly text: string;
  readonly usage: { readonly prompt_tokens: number; readonly completion_tokens: number; readonly total_tokens: number };
}

/** The built-in tools. Each call is gated by the type's `tools` allowlist and budget. */
export interface Tools {
  publish(
    topic: string,
    payload: unknown,
    options?: PublishOptions,
  ): Promise<{ readonly queued: true; readonly topic: string }>;
  http(url: string, init?: HttpInit): Promise<HttpResult>;
  llm(request: {
    readonly messages?: readonly ChatMessage[];
    readonly prompt?: string;
    readonly max_tokens?: number;
  }): Promise<LlmResult>;
  send(agentId: string, payload: unknown): Promise<{ readonly queued: true; readonly to: string }>;
}

/** Everything an episode may touch. */
export interface AgentContext<S, C = Record<string, unknown>> {
  readonly agent: AgentRef;
  /** Mutable state; whatever it holds when `onStimulus` resolves becomes the next checkpoint. */
  state: S;
  readonly config: C;
  readonly episode: string;
  /** Record a decision in the episode log. */
  decide(name: string, data?: unknown): void;
  /** Publish to `fleet/agents/<type>/<key>/out` after the episode commits. */
  emit(payload: unknown): void;
  /** Deliver to another agent's inbox after the episode commits (uses the `send` tool). */
  send(agentId: string, payload: unknown): Promise<{ readonly queued: true; readonly to: string }>;
  readonly tools: Tools;
  /** Wall-clock time in ms; recorded so replays see the same value. */
  now(): number;
  /** Uniform [0, 1); recorded so replays see the same value. */
  random(): number;
  /** Log a line into the episode log (and the gateway log). */
  log(...args: unknown[]): void;
}

/** An agent definition, as `defineAgent` returns it. */
export interface AgentDefinition<S, C = Record<string, unknown>> {
  /** State of a brand-new agent. */
  init(ctx: { readonly agent: AgentRef; readonly config: C }): S | Promise<S>;
  onStimulus(stimulus: Stimulus, ctx: AgentContext<S, C>): void | Promise<void>;
  readonly __fleetAgent: true;
}

/** Declare an agent. The state type `S` must be JSON-serialisable. */
export function defineAgent<S, C = Record<string, unknown>>(def: {
  init: (ctx: { readonly agent: AgentRef; readonly config: C }) => S | Promise<S>;
  onStimulus: (stimulus: Stimulus, ctx: AgentContext<S, C>) => void | Promise<void>;
}): AgentDefinition<S, C> {
  return { init: def.init, onStimulus: def.onStimulus, __fleetAgent: true };
}

/**
 * Thrown inside the agent when a tool call is refused (not allowlisted, topic or host not
 * allowed, budget exhausted). The agent may catch it and go on; the refusal is recorded.
 */
export class ToolDenied extends Error {
  override readonly name = "ToolDenied";
  constructor(
    readonly tool: string,
    readonly reason: string,
  ) {
    super(`tool ${tool} denied: ${reason}`);
  }
}

/** Thrown inside the agent when an allowed tool call failed (HTTP error, endpoint down). */
export class ToolFailed extends Error {
  override readonly name = "ToolFailed";
  constructor(
    readonly tool: string,
    readonly reason: string,
  ) {
    super(`tool ${tool} failed: ${reason}`);
  }
}
