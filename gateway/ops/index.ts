/**
 * The operator library: replay, verify, retention, quarantine, the audit log, backup, reshard, the deploy
 * check. The CLI's reads import it too (`fleet show`, `verify`, `state`), so what only replay, the deploy
 * check, a restore or `--create-sessions` needs (the episode runner, the spec compiler, the code bundler,
 * the broker client) is imported inside the functions that use it, when they first run.
 */
export * from "./gc.ts";
export * from "./quarantine.ts";
export * from "./replay.ts";
export * from "./verify.ts";
export * from "./events.ts";
export * from "./audit.ts";
export * from "./backup.ts";
export * from "./state.ts";
export * from "./trace.ts";
export * from "./deploy-check.ts";
export * from "./reshard.ts";
export * from "./shard-sessions.ts";
