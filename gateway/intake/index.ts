export * from "./intake.ts";
export * from "./router.ts";
export * from "./timers.ts";
export * from "./wakeups.ts";
