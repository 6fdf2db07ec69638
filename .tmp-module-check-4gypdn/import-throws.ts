import { defineAgent } from "/work/main/agents/sdk/index.ts";
throw new Error("lookup table missing at load");
export default defineAgent({
  init: () => ({ n: 0 }),
  onStimulus(_s, ctx) {
    ctx.decide("code", CODE);
  },
});
