export * from "./duration.ts";
export * from "./load.ts";
export * from "./types.ts";
export * from "./reference.ts";
export * from "./restart.ts";
