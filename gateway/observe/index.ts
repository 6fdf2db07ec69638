export * from "./dashboard/index.ts";
export * from "./log.ts";
export * from "./metrics.ts";
export * from "./queries.ts";
export * from "./rates.ts";
export * from "./sse.ts";
export * from "./status-topics.ts";
export * from "./views.ts";
