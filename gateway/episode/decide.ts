/**
 * The pure decision step of a turn: from what the store holds for one agent (its row, the
 * head of its queue, its budget use, an operator's budget override, its head checkpoint)
 * and the clock, what the turn does. No I/O: the executor reads the inputs once, asks
 * here, then acts on the answer (gateway/episode/executor.ts).
 */
import type { AgentTypeSpec, FleetSpec } from "../spec/index.ts";
import type { AgentRow, CheckpointRow, StimulusRow, TurnInputs, UsageRow } from "../store/index.ts";

export type { TurnInputs };

/** Budget windows an episode's usage is booked in. */
export interface BudgetWindows {
  readonly hourWindow: string;
  readonly dayWindow: string;
  readonly hourEnds: number;
  readonly dayEnds: number;
}

/** The hour and day windows that contain `at`. */
export function budgetWindows(at: number): BudgetWindows {
  const hour = Math.floor(at / 3_600_000);
  const day = Math.floor(at / 86_400_000);
  return {
    hourWindow: `h:${hour}`,
    dayWindow: `d:${day}`,
    hourEnds: (hour + 1) * 3_600_000,
    dayEnds: (day + 1) * 86_400_000,
  };
}

/** How long an operator pause (no end of its own) waits before the turn looks again, ms. */
export const OPERATOR_PAUSE_RECHECK_MS = 3_600_000;

/** What one turn does. */
export type TurnDecision =
  /** Nothing is queued (or the agent does not exist). */
  | { readonly kind: "empty" }
  /** A budget pause whose window is over, or whose budget was raised past the usage: active again; decide again. */
  | { readonly kind: "reactivate"; readonly reason: string }
  /** The agent is retired: refuse everything still queued for it, with this reason. */
  | { readonly kind: "refuse_retired"; readonly reason: string }
  /** The agent cannot run (failed); an operator action wakes it. */
  | { readonly kind: "parked" }
  /**
   * Skip the head and decide again: its message expired (MQTT 5 message expiry) before its episode
   * ran, or (`dropped`) it is a wake-up that was cancelled after it was recorded.
   */
  | { readonly kind: "expire"; readonly seq: number; readonly reason: string; readonly state?: "dropped" }
  /** Not before `until`: an operator or budget pause, or the head's retry backoff. */
  | { readonly kind: "wait"; readonly until: number }
  /** Its type is gone from the spec: retire it with this reason. */
  | { readonly kind: "retire"; readonly reason: string }
  /** Over a budget: pause it until the window ends. */
  | { readonly kind: "pause"; readonly budget: string; readonly reason: string; readonly until: number }
  /** Run the head of the queue. */
  | {
      readonly kind: "run";
      readonly agent: AgentRow;
      readonly head: StimulusRow;
      readonly type: AgentTypeSpec;
      /** The head checkpoint to verify and load (null for a fresh agent; undefined when its row is missing). */
      readonly checkpoint: CheckpointRow | null | undefined;
      readonly attempt: number;
      /** Tokens left today before this episode. */
      readonly tokensLeft: number;
      /** Cost (`tool_costs`) left today before this episode. */
      readonly costLeft: number;
      readonly windows: BudgetWindows;
      /** Ids of the agent's pending wake-ups. */
      readonly pendingWakes: readonly string[];
    };

/** Decide one turn. Pure: same inputs, same answer. */
export function decideTurn(inputs: TurnInputs, spec: FleetSpec, now: number): TurnDecision {
  const { agent, head } = inputs;
  if (!agent) return { kind: "empty" };
  switch (agent.status) {
    case "paused":
      if (agent.pausedUntil !== null && agent.pausedUntil <= now)
        return { kind: "reactivate", reason: "budget window reset" };
      if (budgetRaised(inputs, spec, now)) return { kind: "reactivate", reason: "budget raised" };
      return { kind: "wait", until: agent.pausedUntil ?? now + OPERATOR_PAUSE_RECHECK_MS };
    case "retired":
      // Whatever still waits for a retired agent (queued before the retirement, or sent by an
      // episode that committed just after it) is refused with a recorded reason, not left forever.
      return { kind: "refuse_retired", reason: `agent is retired${agent.reason ? ` (${agent.reason})` : ""}` };
    case "failed":
      return { kind: "parked" };
    case "active":
    // Draining (`fleet retire --drain`): takes no new stimuli but runs those already queued.
    case "draining":
      break;
    default: {
      const never: never = agent.status;
      return never;
    }
  }
  if (!head) return { kind: "empty" };
  if (inputs.headCancelledBy !== null)
    return {
      kind: "expire",
      seq: head.seq,
      reason: `its wake-up was cancelled${inputs.headCancelledBy ? ` by episode ${inputs.headCancelledBy}` : ""}`,
      state: "dropped",
    };
  if (head.expiresAt !== null && head.expiresAt <= now)
    return {
      kind: "expire",
      seq: head.seq,
      reason: `message expired ${now - head.expiresAt} ms before its episode could start (MQTT 5 message expiry)`,
    };
  if (head.notBefore > now) return { kind: "wait", until: head.notBefore };
  const type = spec.agents[agent.type];
  if (!type) return { kind: "retire", reason: `type ${agent.type} is not in the fleet spec` };
  const windows = budgetWindows(now);
  // An operator's `fleet resume` of a budget pause lifts that budget (only) until its window ends.
  const lifted = inputs.budgetOverride.until > now ? inputs.budgetOverride.budget : undefined;
  const over = overBudget(type, windows, inputs.usage, lifted);
  if (over)
    // A draining agent keeps its status (it retires when its queue is empty): it only waits.
    return agent.status === "draining" ? { kind: "wait", until: over.until } : { kind: "pause", ...over };
  const day = inputs.usage.find((u) => u.window === windows.dayWindow);
  return {
    kind: "run",
    agent,
    head,
    type,
    checkpoint: agent.headHash === null ? null : inputs.checkpoint,
    attempt: head.attempts + 1,
    // A lifted tokens_per_day lets the llm tool spend past it until the day ends, as the operator chose.
    tokensLeft:
      lifted === null || lifted === "tokens_per_day"
        ? Number.MAX_SAFE_INTEGER
        : type.budget.tokens_per_day - (day?.tokens ?? 0),
    // cost_per_day = 0: no cost budget.
    costLeft:
      lifted === null || lifted === "cost_per_day" || type.budget.cost_per_day === 0
        ? Number.MAX_SAFE_INTEGER
        : type.budget.cost_per_day - (day?.cost ?? 0),
    windows,
    pendingWakes: inputs.pendingWakes,
  };
}

/**
 * A budget pause ("budget episodes_per_hour (20) reached") whose budget the running spec has
 * since raised past the agent's usage: a reload that raises a budget releases the agents it paused.
 */
function budgetRaised(inputs: TurnInputs, spec: FleetSpec, now: number): boolean {
  const { agent } = inputs;
  const budget = budgetOfPause(agent?.reason ?? null);
  const type = agent && spec.agents[agent.type];
  if (!budget || !type || agent.pausedUntil === null) return false;
  const lifted = inputs.budgetOverride.until > now ? inputs.budgetOverride.budget : undefined;
  return overBudget(type, budgetWindows(now), inputs.usage, lifted)?.budget !== budget;
}

/** The budget a budget pause's reason names ("budget cost_per_day (5) reached"), else null. */
export function budgetOfPause(reason: string | null): string | null {
  return /^budget (\w+) \(/.exec(reason ?? "")?.[1] ?? null;
}

/**
 * The first budget the agent's usage has reached, with when its window ends; null when none.
 * `lifted`: a budget an operator's resume lifted (null: all of them, an older release's override).
 */
export function overBudget(
  type: AgentTypeSpec,
  win: BudgetWindows,
  rows: readonly Pick<UsageRow, "window" | "episodes" | "tokens" | "cost" | "bytes">[],
  lifted?: string | null,
): { budget: string; reason: string; until: number } | null {
  if (lifted === null) return null;
  const hour = rows.find((r) => r.window === win.hourWindow);
  const day = rows.find((r) => r.window === win.dayWindow);
  const b = type.budget;
  if (hour && hour.episodes >= b.episodes_per_hour && lifted !== "episodes_per_hour")
    return {
      budget: "episodes_per_hour",
      reason: `budget episodes_per_hour (${b.episodes_per_hour}) reached`,
      until: win.hourEnds,
    };
  if (day && day.tokens >= b.tokens_per_day && lifted !== "tokens_per_day")
    return {
      budget: "tokens_per_day",
      reason: `budget tokens_per_day (${b.tokens_per_day}) reached`,
      until: win.dayEnds,
    };
  if (day && b.cost_per_day > 0 && day.cost >= b.cost_per_day && lifted !== "cost_per_day")
    return { budget: "cost_per_day", reason: `budget cost_per_day (${b.cost_per_day}) reached`, until: win.dayEnds };
  // Checked before the next episode, not during one: the episode that crosses it is committed whole.
  if (day && b.bytes_per_day > 0 && day.bytes >= b.bytes_per_day && lifted !== "bytes_per_day")
    return { budget: "bytes_per_day", reason: `budget bytes_per_day (${b.bytes_per_day}) reached`, until: win.dayEnds };
  return null;
}

/**
 * Exponential retry backoff: when attempt `attempt` (1-based) may be retried, or null to
 * quarantine. A `terminal` failure (the agent threw TerminalError) is never retried.
 */
export function retryAt(type: AgentTypeSpec, attempt: number, endedAt: number, kind?: string): number | null {
  if (kind === "terminal" || attempt >= type.retry.max_attempts) return null;
  return endedAt + type.retry.backoff_ms * 2 ** (attempt - 1);
}
