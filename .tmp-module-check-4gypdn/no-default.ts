import { defineAgent } from "/work/main/agents/sdk/index.ts";
export const agent = defineAgent({
  init: () => ({ n: 0 }),
  onStimulus(_s, ctx) {
    ctx.decide("code", CODE);
  },
});
