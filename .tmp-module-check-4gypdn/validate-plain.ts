const CODE = 1;
export default {
  init: () => ({ n: 0 }),
  onStimulus(_s, ctx) {
    ctx.decide("code", CODE);
  },
};
