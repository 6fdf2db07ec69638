export * from "./store.ts";
export type { EpisodeCommit, EpisodeUsage, SentStimulus } from "./episodes.ts";
export * from "./checkpoint.ts";
export * from "./migrate.ts";
export * from "./files.ts";
export * from "./audit.ts";
export * from "./identity.ts";
export { episodeStatus, STATUS_COMMITTED, STATUS_FAILED, stimulusKind } from "./codes.ts";
export {
  hexOfSql,
  HASH_COLUMNS,
  isHashColumn,
  idBytesSql,
  idOfSql,
  idToDriver,
  ID_COLUMNS,
  checkpointHashIs,
  knowSpecVersion,
  knowBundle,
  bundleOfSql,
  bundleStoredSql,
  bundleToDriver,
  specOfSql,
  wireSql,
} from "./hashes.ts";
export * from "./views.ts";
