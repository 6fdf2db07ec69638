/**
 * The tool gate: every tool call of an episode arrives here from the subprocess. It checks
 * the type's allowlist and per-episode budget, then hands the call to its tool (one file
 * each), which parses the arguments and runs in the gateway (secrets are injected here,
 * never in the child). Deferred effects (publish, send) are committed with the episode.
 * Denials are results, not exceptions.
 */
import type { AgentRef } from "../../../agents/protocol.ts";
import type { AgentTypeSpec, FleetSpec } from "../../spec/index.ts";
import { TOOL_NAMES } from "../../spec/index.ts";
import { http } from "./http.ts";
import { llm } from "./llm.ts";
import { publish } from "./publish.ts";
import { send } from "./send.ts";
import {
  deny,
  type PendingPublish,
  type PendingSend,
  type ToolContext,
  type ToolEnv,
  type ToolName,
  type ToolOutcome,
} from "./types.ts";

export { encodePayload } from "./types.ts";
/** The publish tool by itself (agent-fleets/testing is held to its answers: test/sdk-parity.test.ts). */
export { publish as publishTool } from "./publish.ts";
export type { PendingPublish, PendingSend, ToolEnv, ToolName, ToolOutcome } from "./types.ts";

const isToolName = (tool: string): tool is ToolName => (TOOL_NAMES as readonly string[]).includes(tool);

/** Run one allowed call on its tool. */
function dispatch(ctx: ToolContext, tool: ToolName, args: readonly unknown[]): ToolOutcome | Promise<ToolOutcome> {
  switch (tool) {
    case "publish":
      return publish(ctx, args);
    case "send":
      return send(ctx, args);
    case "http":
      return http(ctx, args);
    case "llm":
      return llm(ctx, args);
    default: {
      const unknownTool: never = tool;
      return deny(`unknown tool "${String(unknownTool)}"`);
    }
  }
}

/** One episode's tool gate. */
export class ToolGate implements ToolContext {
  calls = 0;
  tokens = 0;
  cost = 0;
  readonly publishes: PendingPublish[] = [];
  readonly sends: PendingSend[] = [];
  private readonly ended = new AbortController();
  readonly signal = this.ended.signal;

  constructor(
    readonly agent: AgentRef,
    readonly type: AgentTypeSpec,
    readonly spec: FleetSpec,
    readonly env: ToolEnv,
    /** Tokens left today before this episode; the llm tool is denied past it. */
    private readonly tokensLeftToday: number,
    /** Cost (`tool_costs`) left today before this episode; a call that would pass it is denied. */
    private readonly costLeftToday = Number.MAX_SAFE_INTEGER,
    /** The id of the stimulus the episode runs (its chain of sends is counted from it). */
    private readonly stimulusId = "",
  ) {}

  private hops: Promise<number> | null = null;

  sendHops(): Promise<number> {
    // Walked once, at the first send: a few steps past the limit, wake-ups between sends included.
    this.hops ??= this.env.sendHops
      ? this.env.sendHops(this.stimulusId, 4 * (this.spec.fleet.max_send_hops + 1))
      : Promise.resolve(0);
    return this.hops;
  }

  tokensLeft(): number {
    return this.tokensLeftToday - this.tokens;
  }

  spendTokens(n: number): void {
    this.tokens += n;
  }

  /**
   * The episode ended (committed, failed or killed): calls still in flight are aborted, so the gateway
   * does not keep talking to a host for an episode that no longer exists, or overlap its retry.
   */
  end(): void {
    this.ended.abort(new Error("the episode ended"));
  }

  /** Handle one call from the subprocess. */
  async handle(_call: number, tool: string, args: readonly unknown[]): Promise<ToolOutcome> {
    this.calls += 1;
    if (!isToolName(tool)) return deny(`unknown tool "${tool}" (built-in tools: ${TOOL_NAMES.join(", ")})`);
    if (!this.type.tools.includes(tool)) return deny(`tool "${tool}" is not in agents.${this.type.name}.tools`);
    const limit = this.type.budget.tool_calls_per_episode;
    if (this.calls > limit) return deny(`budget tool_calls_per_episode (${limit}) exhausted`);
    const price = this.type.budget.tool_costs[tool] ?? 0;
    const costLeft = this.costLeftToday - this.cost;
    if (price > 0 && price > costLeft)
      return deny(
        `budget cost_per_day (${this.type.budget.cost_per_day}) exhausted: this call costs ${price}, ` +
          `${Math.max(0, costLeft)} left today`,
      );
    // Held now, so calls made at once share what is left; given back when the call is refused
    // (a bad argument, a host or topic not allowed, no tokens left): only calls that went out are charged.
    this.cost += price;
    const outcome = await dispatch(this, tool, args);
    if (!outcome.ok && outcome.result.error === "denied") this.cost -= price;
    return outcome;
  }
}
