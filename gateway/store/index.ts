export * from "./store.ts";
export * from "./checkpoint.ts";
export * from "./migrate.ts";
export * from "./files.ts";
export * from "./audit.ts";
export { hexOfSql, EPISODE_HASH_COLUMNS } from "./hashes.ts";
