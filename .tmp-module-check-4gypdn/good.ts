import { defineAgent } from "/work/main/agents/sdk/index.ts";
const CODE = "a";
export default defineAgent({
  init: () => ({ n: 0 }),
  onStimulus(_s, ctx) {
    ctx.decide("code", CODE);
  },
});
