import { defineAgent } from "/work/main/agents/sdk/index.ts";
export default defineAgent({
  version: 0,
  init: () => ({ n: 0 }),
  onStimulus(_s, ctx) {
    ctx.decide("code", CODE);
  },
});
