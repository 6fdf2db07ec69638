/**
 * Example agent: a threshold monitor with hysteresis, one instance per device.
 *
 * It alerts once when a reading rises above `threshold`, stays in alarm while readings are
 * high, and clears only once a reading drops below `threshold - hysteresis`, so a value
 * hovering around the threshold does not flap between alert and clear.
 */
import { defineAgent } from "../sdk/index.ts";
import { readingOf } from "./readings.ts";
import type { AgentContext, Stimulus } from "../sdk/index.ts";

/** Config of the `temp-monitor` type (`config = { threshold = 80.0 }` in fleet.toml). */
export interface TempMonitorConfig {
  readonly threshold: number;
  /** Degrees below the threshold a reading must fall to clear the alarm; default 2.0. */
  readonly hysteresis?: number;
  /** Payload field that carries the reading; default "value". */
  readonly field?: string;
}

/** Checkpointed state; plain JSON. */
export interface TempMonitorState {
  alarm: boolean;
  /** Readings seen, numeric or not. */
  count: number;
  /** Last numeric reading. */
  last?: number;
  /** `ctx.now()` when the current alarm was raised; absent when not in alarm. */
  since?: number;
  /** Highest reading of the current alarm; absent when not in alarm. */
  max?: number;
}

type Ctx = AgentContext<TempMonitorState, TempMonitorConfig>;

async function onReading(value: number, ctx: Ctx): Promise<void> {
  const { threshold } = ctx.config;
  const hysteresis = ctx.config.hysteresis ?? 2.0;
  const s = ctx.state;
  s.last = value;

  if (!s.alarm && value > threshold) {
    s.alarm = true;
    s.since = ctx.now();
    s.max = value;
    ctx.decide("alert", { value, threshold });
    await ctx.tools.publish(`alerts/${ctx.agent.key}`, { level: "alert", value, threshold, agent: ctx.agent.id });
  } else if (s.alarm && value < threshold - hysteresis) {
    const since = s.since;
    const max = s.max;
    s.alarm = false;
    // Delete rather than set undefined: the state is JSON, and a clean shape hashes stably.
    delete s.since;
    delete s.max;
    const duration_ms = since === undefined ? undefined : ctx.now() - since;
    ctx.decide("clear", { value, threshold, hysteresis, max, duration_ms });
    await ctx.tools.publish(`alerts/${ctx.agent.key}`, {
      level: "clear",
      value,
      threshold,
      max,
      duration_ms,
      agent: ctx.agent.id,
    });
  } else if (s.alarm) {
    // Still high (or inside the hysteresis band): track the peak, but never re-alert.
    s.max = Math.max(s.max ?? value, value);
  }

  ctx.emit({ value, alarm: s.alarm, count: s.count });
}

function heartbeat(ctx: Ctx): void {
  const { alarm, count, last } = ctx.state;
  ctx.emit({ heartbeat: true, alarm, count, last });
}

/** The `temp-monitor` agent. */
export default defineAgent<TempMonitorState, TempMonitorConfig>({
  init: () => ({ alarm: false, count: 0 }),

  async onStimulus(stimulus: Stimulus, ctx: Ctx) {
    // Fail the episode loudly: a monitor without a threshold would otherwise never alert.
    if (typeof ctx.config.threshold !== "number")
      throw new TypeError("temp-monitor: config.threshold must be a number");
    if (stimulus.kind === "timer") return heartbeat(ctx);

    const value = readingOf(stimulus.payload, ctx.config.field ?? "value");
    // An inbox message without a reading is a ping from an operator or another agent,
    // not a bad sensor message: answer with the summary instead of counting it.
    if (value === null && stimulus.kind === "inbox") return heartbeat(ctx);

    ctx.state.count += 1;
    if (value === null) {
      ctx.decide("ignored", {
        reason: "payload carries no numeric reading",
        field: ctx.config.field ?? "value",
        topic: stimulus.topic,
      });
      return;
    }
    await onReading(value, ctx);
  },
});
