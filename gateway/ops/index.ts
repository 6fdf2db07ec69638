export * from "./gc.ts";
export * from "./quarantine.ts";
export * from "./replay.ts";
export * from "./verify.ts";
export * from "./backup.ts";
export * from "./state.ts";
export * from "./trace.ts";
export * from "./deploy-check.ts";
