/**
 * The pure decision step of a turn (gateway/episode/decide.ts): budgets, retirement,
 * pause windows, retry backoff. Plain values in, a decision out; no store, no clock.
 */
import { describe, expect, test } from "bun:test";
import {
  budgetWindows,
  decideTurn,
  OPERATOR_PAUSE_RECHECK_MS,
  retryAt,
  type TurnInputs,
} from "../gateway/episode/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import type { AgentRow, CheckpointRow, StimulusRow } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const spec = (
  await compileSpec(
    `
[agents.mon]
module = "mon.ts"

[agents.mon.budget]
episodes_per_hour = 2
tokens_per_day = 100
cost_per_day = 1.5
bytes_per_day = 1000

[agents.mon.retry]
max_attempts = 3
backoff_ms = 100
`,
    "/srv/fleet.toml",
  )
).spec;
const type = spec.agents.mon!;

const NOW = 1_700_000_123_456;
const win = budgetWindows(NOW);

function agent(over: Partial<AgentRow> = {}): AgentRow {
  return {
    id: "mon/a" as AgentId,
    type: "mon",
    key: "a",
    gateway: "g",
    status: "active",
    reason: null,
    pausedUntil: null,
    anchorSeq: 0,
    anchorHash: null,
    headSeq: 0,
    headHash: null,
    episodes: 0,
    failures: 0,
    lastEpisodeAt: null,
    createdAt: 0,
    updatedAt: 0,
    ...over,
  };
}

function head(over: Partial<StimulusRow> = {}): StimulusRow {
  return {
    seq: 7,
    agent: "mon/a" as AgentId,
    sid: "id:1",
    kind: "manual",
    topic: null,
    payload: null,
    receivedAt: 0,
    state: "queued",
    attempts: 0,
    notBefore: 0,
    lastError: null,
    episode: null,
    doneAt: null,
    expiresAt: null,
    traceparent: null,
    hops: null,
    ...over,
  };
}

function inputs(over: Partial<TurnInputs> = {}): TurnInputs {
  return {
    agent: agent(),
    head: head(),
    usage: [],
    budgetOverride: { budget: null, until: 0 },
    checkpoint: undefined,
    pendingWakes: [],
    headCancelledBy: null,
    ...over,
  };
}

const usage = (window: string, u: { episodes?: number; tokens?: number; cost?: number; bytes?: number }) => ({
  agent: "mon/a" as AgentId,
  window,
  episodes: u.episodes ?? 0,
  toolCalls: 0,
  tokens: u.tokens ?? 0,
  cost: u.cost ?? 0,
  bytes: u.bytes ?? 0,
});

describe("decideTurn", () => {
  test("an unknown agent or an empty queue is empty", () => {
    expect(decideTurn(inputs({ agent: undefined }), spec, NOW)).toEqual({ kind: "empty" });
    expect(decideTurn(inputs({ head: undefined }), spec, NOW)).toEqual({ kind: "empty" });
  });

  test("an active agent with a due head runs it, attempt counted from the stored attempts", () => {
    const d = decideTurn(inputs({ head: head({ attempts: 1 }) }), spec, NOW);
    expect(d).toMatchObject({ kind: "run", attempt: 2, tokensLeft: 100, checkpoint: null, windows: win });
  });

  test("a non-fresh agent runs with its head checkpoint; a missing checkpoint row is passed on as undefined", () => {
    const cp = { hash: "h1" } as CheckpointRow;
    const withCp = decideTurn(inputs({ agent: agent({ headHash: "h1", headSeq: 1 }), checkpoint: cp }), spec, NOW);
    expect(withCp).toMatchObject({ kind: "run", checkpoint: cp });
    const missing = decideTurn(inputs({ agent: agent({ headHash: "h1", headSeq: 1 }) }), spec, NOW);
    expect(missing.kind === "run" && missing.checkpoint).toBeUndefined();
  });

  test("the head's retry backoff makes the turn wait until it is over", () => {
    expect(decideTurn(inputs({ head: head({ notBefore: NOW + 500 }) }), spec, NOW)).toEqual({
      kind: "wait",
      until: NOW + 500,
    });
    expect(decideTurn(inputs({ head: head({ notBefore: NOW }) }), spec, NOW).kind).toBe("run");
  });

  test("a head whose message expired is skipped with the reason, not run; one still valid runs", () => {
    const d = decideTurn(inputs({ head: head({ expiresAt: NOW - 250 }) }), spec, NOW);
    expect(d).toMatchObject({ kind: "expire", seq: 7 });
    expect(d.kind === "expire" && d.reason).toContain("expired 250 ms before its episode could start");
    expect(decideTurn(inputs({ head: head({ expiresAt: NOW + 1 }) }), spec, NOW).kind).toBe("run");
    // A paused agent's expired head waits like any other: it is skipped when the agent runs again.
    const paused = inputs({ agent: agent({ status: "paused", pausedUntil: NOW + 10 }), head: head({ expiresAt: 0 }) });
    expect(decideTurn(paused, spec, NOW).kind).toBe("wait");
  });

  test("an operator pause waits (and looks again in an hour); a budget pause waits for its window", () => {
    expect(decideTurn(inputs({ agent: agent({ status: "paused" }) }), spec, NOW)).toEqual({
      kind: "wait",
      until: NOW + OPERATOR_PAUSE_RECHECK_MS,
    });
    expect(decideTurn(inputs({ agent: agent({ status: "paused", pausedUntil: NOW + 10 }) }), spec, NOW)).toEqual({
      kind: "wait",
      until: NOW + 10,
    });
  });

  test("a budget pause whose window is over reactivates the agent", () => {
    expect(decideTurn(inputs({ agent: agent({ status: "paused", pausedUntil: NOW }) }), spec, NOW)).toEqual({
      kind: "reactivate",
      reason: "budget window reset",
    });
  });

  test("a budget pause whose budget was raised past the usage reactivates it before its window ends", () => {
    const paused = agent({
      status: "paused",
      reason: "budget episodes_per_hour (1) reached",
      pausedUntil: win.hourEnds,
    });
    // The spec now allows 2 per hour: one used, so the agent may run again.
    expect(decideTurn(inputs({ agent: paused, usage: [usage(win.hourWindow, { episodes: 1 })] }), spec, NOW)).toEqual({
      kind: "reactivate",
      reason: "budget raised",
    });
    // Still at the (raised) budget: it waits for the window as before.
    const at = [usage(win.hourWindow, { episodes: 2 })];
    expect(decideTurn(inputs({ agent: paused, usage: at }), spec, NOW)).toEqual({ kind: "wait", until: win.hourEnds });
    // An operator's pause is not a budget's: it waits whatever the usage.
    const operator = agent({ status: "paused", reason: "paused by operator" });
    expect(decideTurn(inputs({ agent: operator }), spec, NOW).kind).toBe("wait");
  });

  test("a retired agent's queue is refused with its retirement reason; a failed agent is parked", () => {
    expect(
      decideTurn(inputs({ agent: agent({ status: "retired", reason: "retired by operator" }) }), spec, NOW),
    ).toEqual({ kind: "refuse_retired", reason: "agent is retired (retired by operator)" });
    expect(decideTurn(inputs({ agent: agent({ status: "retired" }), head: undefined }), spec, NOW).kind).toBe(
      "refuse_retired",
    );
    expect(decideTurn(inputs({ agent: agent({ status: "failed" }) }), spec, NOW)).toEqual({ kind: "parked" });
  });

  test("an agent whose type left the spec is retired", () => {
    expect(decideTurn(inputs({ agent: agent({ type: "gone", id: "gone/a" as AgentId }) }), spec, NOW)).toEqual({
      kind: "retire",
      reason: "type gone is not in the fleet spec",
    });
  });

  test("each budget pauses the agent until its window ends", () => {
    const cases = [
      [usage(win.hourWindow, { episodes: 2 }), "episodes_per_hour", win.hourEnds],
      [usage(win.dayWindow, { tokens: 100 }), "tokens_per_day", win.dayEnds],
      [usage(win.dayWindow, { cost: 1.5 }), "cost_per_day", win.dayEnds],
      [usage(win.dayWindow, { bytes: 1000 }), "bytes_per_day", win.dayEnds],
    ] as const;
    for (const [row, budget, until] of cases)
      expect(decideTurn(inputs({ usage: [row] }), spec, NOW)).toMatchObject({ kind: "pause", budget, until });
  });

  test("bytes_per_day pauses with its reason once the day's stored bytes reach it; 0 is no limit", () => {
    const stored = [usage(win.dayWindow, { bytes: 5000 })];
    expect(decideTurn(inputs({ usage: [usage(win.dayWindow, { bytes: 999 })] }), spec, NOW).kind).toBe("run");
    expect(decideTurn(inputs({ usage: stored }), spec, NOW)).toEqual({
      kind: "pause",
      budget: "bytes_per_day",
      reason: "budget bytes_per_day (1000) reached",
      until: win.dayEnds,
    });
    const unlimited = { ...spec, agents: { mon: { ...type, budget: { ...type.budget, bytes_per_day: 0 } } } };
    expect(decideTurn(inputs({ usage: stored }), unlimited, NOW).kind).toBe("run");
    // A reload that raises it past what was stored releases the agent it paused.
    const paused = agent({ status: "paused", reason: "budget bytes_per_day (500) reached", pausedUntil: win.dayEnds });
    expect(decideTurn(inputs({ agent: paused, usage: [usage(win.dayWindow, { bytes: 999 })] }), spec, NOW)).toEqual({
      kind: "reactivate",
      reason: "budget raised",
    });
    expect(decideTurn(inputs({ agent: paused, usage: stored }), spec, NOW).kind).toBe("wait");
  });

  test("a draining agent runs its queue; over a budget it waits for the window and stays draining", () => {
    const draining = agent({ status: "draining", reason: "draining: retired by operator" });
    expect(decideTurn(inputs({ agent: draining }), spec, NOW)).toMatchObject({ kind: "run", attempt: 1 });
    const over = [usage(win.hourWindow, { episodes: 2 })];
    expect(decideTurn(inputs({ agent: draining, usage: over }), spec, NOW)).toEqual({
      kind: "wait",
      until: win.hourEnds,
    });
    expect(decideTurn(inputs({ agent: draining, head: undefined }), spec, NOW)).toEqual({ kind: "empty" });
  });

  test("usage under every budget runs, with the tokens and cost left today", () => {
    const d = decideTurn(
      inputs({ usage: [usage(win.hourWindow, { episodes: 1 }), usage(win.dayWindow, { tokens: 30, cost: 1 })] }),
      spec,
      NOW,
    );
    expect(d).toMatchObject({ kind: "run", tokensLeft: 70, costLeft: 0.5 });
  });

  test("an operator's resume of a budget pause lifts that budget, and only it, until the override ends", () => {
    const hourly = [usage(win.hourWindow, { episodes: 5 })];
    const lift = (budget: string | null, until: number) => ({ budgetOverride: { budget, until } });
    expect(decideTurn(inputs({ usage: hourly, ...lift("episodes_per_hour", NOW + 1) }), spec, NOW).kind).toBe("run");
    expect(decideTurn(inputs({ usage: hourly, ...lift("episodes_per_hour", NOW) }), spec, NOW).kind).toBe("pause");
    // The other budgets still hold: past cost_per_day as well, it pauses for that one.
    const both = [usage(win.hourWindow, { episodes: 5 }), usage(win.dayWindow, { cost: 2 })];
    expect(decideTurn(inputs({ usage: both, ...lift("episodes_per_hour", NOW + 1) }), spec, NOW)).toMatchObject({
      kind: "pause",
      reason: "budget cost_per_day (1.5) reached",
    });
    // A lifted tokens_per_day lets the llm tool past it too; an unlifted one leaves what is left.
    const tokens = [usage(win.dayWindow, { tokens: 150 })];
    const run = decideTurn(inputs({ usage: tokens, ...lift("tokens_per_day", NOW + 1) }), spec, NOW);
    expect(run.kind === "run" && run.tokensLeft).toBeGreaterThan(1_000_000);
    // An override an older release stored (no budget named) lifts them all, as it did.
    expect(decideTurn(inputs({ usage: both, ...lift(null, NOW + 1) }), spec, NOW).kind).toBe("run");
  });

  test("the same inputs give the same decision", () => {
    const i = inputs({ usage: [usage(win.dayWindow, { tokens: 10 })] });
    expect(decideTurn(i, spec, NOW)).toEqual(decideTurn(i, spec, NOW));
  });
});

describe("retryAt", () => {
  test("backs off exponentially from backoff_ms, then quarantines at max_attempts", () => {
    expect(retryAt(type, 1, 1000)).toBe(1100);
    expect(retryAt(type, 2, 1000)).toBe(1200);
    expect(retryAt(type, 3, 1000)).toBeNull();
  });

  test("a terminal failure (TerminalError) is quarantined at the first attempt", () => {
    expect(retryAt(type, 1, 1000, "terminal")).toBeNull();
    expect(retryAt(type, 1, 1000, "threw")).toBe(1100);
  });
});
