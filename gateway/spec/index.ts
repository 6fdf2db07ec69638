export * from "./central-url.ts";
export * from "./duration.ts";
export * from "./key-path.ts";
export * from "./load.ts";
export * from "./locate.ts";
export * from "./types.ts";
export * from "./reference.ts";
export * from "./restart.ts";
export { DEFAULT_WARM_SPARES } from "./schema.ts";
