export * from "./tables.ts";
export * from "./batch.ts";
export { BatchReader } from "./reader.ts";
export * from "./identity.ts";
export * from "./replicator.ts";
export * from "./central.ts";
export * from "./cursor.ts";
export * from "./server.ts";
