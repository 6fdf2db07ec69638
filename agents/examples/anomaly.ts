/**
 * Example agent: an anomaly detector, one instance per device (key from the topic).
 *
 * It keeps an exponentially weighted mean and variance of the readings and flags a reading
 * whose z-score against them exceeds `z`, once `warmup` readings have settled the estimate.
 *
 * Anomalous readings are still folded into the mean and variance. A detector that skipped
 * them would never follow a genuine level shift (every later reading would stay "anomalous"
 * against a frozen baseline); folding them in lets the baseline adapt, and the variance it
 * inflates decays again at rate `alpha`. The price is that a burst of spikes briefly dulls
 * detection of the next one, which is acceptable for a monitor that alerts, not one that gates.
 */
import { defineAgent, ToolDenied } from "../sdk/index.ts";
import { readingOf } from "./readings.ts";
import type { AgentContext, Stimulus } from "../sdk/index.ts";

/** Config of the `anomaly` type. */
export interface AnomalyConfig {
  /** EWMA smoothing factor in (0, 1]; default 0.1. */
  readonly alpha?: number;
  /** z-score above which a reading is an anomaly; default 3. */
  readonly z?: number;
  /** Readings to learn from before flagging anything; default 10. */
  readonly warmup?: number;
  /** Payload field that carries the reading; default "value". */
  readonly field?: string;
}

/** Checkpointed state; plain JSON. */
export interface AnomalyState {
  /** Numeric readings folded into the estimate. */
  n: number;
  mean: number;
  var: number;
  anomalies: number;
  last?: number;
}

type Ctx = AgentContext<AnomalyState, AnomalyConfig>;

async function onReading(x: number, ctx: Ctx): Promise<void> {
  const alpha = ctx.config.alpha ?? 0.1;
  const zLimit = ctx.config.z ?? 3;
  const warmup = ctx.config.warmup ?? 10;
  const s = ctx.state;

  // Score against the estimate *before* this reading, so a spike cannot mask itself.
  const std = Math.sqrt(s.var);
  const zscore = std > 0 ? Math.abs(x - s.mean) / std : 0;
  const anomalous = s.n >= warmup && std > 0 && zscore > zLimit;

  if (anomalous) {
    s.anomalies += 1;
    const report = { x, mean: s.mean, std, zscore };
    ctx.decide("anomaly", report);
    ctx.emit({ anomaly: true, ...report });
    try {
      await ctx.tools.publish(`alerts/anomaly/${ctx.agent.key}`, { level: "anomaly", ...report, agent: ctx.agent.id });
    } catch (err) {
      // The emit above already reports the anomaly; a type without the publish tool (or
      // without alerts/# in its topics) is a valid deployment, not a failed episode.
      if (!(err instanceof ToolDenied)) throw err;
      ctx.log("alert not published:", err.reason);
    }
  }

  if (s.n === 0) {
    s.mean = x;
    s.var = 0;
  } else {
    // Incremental EWMA mean and variance (Finch, "Incremental calculation of weighted mean and variance", 2009).
    const diff = x - s.mean;
    const incr = alpha * diff;
    s.mean += incr;
    s.var = (1 - alpha) * (s.var + diff * incr);
  }
  s.n += 1;
  s.last = x;

  if (!anomalous) ctx.emit({ x, mean: s.mean, std: Math.sqrt(s.var), z: zscore });
}

/** The `anomaly` agent. */
export default defineAgent<AnomalyState, AnomalyConfig>({
  init: () => ({ n: 0, mean: 0, var: 0, anomalies: 0 }),

  async onStimulus(stimulus: Stimulus, ctx: Ctx) {
    if (stimulus.kind === "timer") {
      const { n, mean, anomalies, last } = ctx.state;
      ctx.emit({ heartbeat: true, n, mean, std: Math.sqrt(ctx.state.var), anomalies, last });
      return;
    }
    const x = readingOf(stimulus.payload, ctx.config.field ?? "value");
    if (x === null) {
      ctx.decide("ignored", { reason: "payload carries no numeric reading", topic: stimulus.topic });
      return;
    }
    await onReading(x, ctx);
  },
});
