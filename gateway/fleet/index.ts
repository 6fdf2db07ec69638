export * from "./background.ts";
export * from "./redeploy.ts";
export * from "./reload.ts";
export * from "./roster.ts";
export * from "./scheduler.ts";
export * from "./queue-book.ts";
export * from "./rollouts.ts";
export * from "./devices-first.ts";
