export * from "./store.ts";
export * from "./checkpoint.ts";
export * from "./migrate.ts";
export * from "./files.ts";
export * from "./audit.ts";
export { hexOfSql, HASH_COLUMNS, isHashColumn } from "./hashes.ts";
