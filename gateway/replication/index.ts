export * from "./tables.ts";
export * from "./batch.ts";
export * from "./replicator.ts";
export * from "./central.ts";
export * from "./server.ts";
