/**
 * The bench's agent: counts its stimuli and emits the payload's `n` back, so the bench can
 * match each `fleet/agents/bench/<key>/out` message to the stimulus that caused it.
 */
import { defineAgent } from "../../agents/sdk/index.ts";

export default defineAgent<{ count: number }>({
  init: () => ({ count: 0 }),
  onStimulus(stimulus, ctx) {
    ctx.state.count += 1;
    const p = stimulus.payload as { n?: unknown } | null;
    ctx.emit({ n: p?.n ?? null, count: ctx.state.count });
  },
});
