/**
 * The broker boundary (docs/mqtt.md, §8): an MQTT broker behind the `Broker` interface, so an
 * external broker can replace the embedded one, plus the pure topic rules.
 */
export type {
  AuthChange,
  Broker,
  BrokerAuth,
  BrokerOptions,
  BrokerStats,
  ClientInfo,
  IntakeVerdict,
  PublishedMessage,
  PublishMeta,
} from "./types.ts";
export { BrokerBusy, PublishRefused } from "./types.ts";
export { createEmbeddedBroker, type EmbeddedBroker } from "./embedded.ts";
export { LoadAverages, SYS_PREFIX, type SysSnapshot, SysTree, sysMessages } from "./sys.ts";
export {
  createExternalBroker,
  type ExternalBrokerOptions,
  hopsOf,
  prepareSessions,
  readRetained,
  type PreparedSession,
  publishPacketSize,
  type SessionBrokerOptions,
  SessionPrepareError,
} from "./external.ts";
export {
  checkDevicePublishTopic,
  checkTopicName,
  checkDeviceSubscribeFilter,
  compileFilter,
  matchTopic,
  type CompiledFilter,
  type TopicCheck,
} from "./topics.ts";
export { PacketSizeGuard, type GuardVerdict } from "./guard.ts";
export { PARSE_SLICE_BYTES, parseInSlices, type SliceableClient } from "./connection.ts";
export {
  BrokerStoreTooNew,
  LibsqlPersistence,
  type LibsqlPersistenceOptions,
  memoryPersistence,
  persistenceFor,
  RetainedOrder,
  type MemoryPersistence,
  type PersistenceChoice,
  type PersistenceStats,
  SerialWriter,
  type BatchRunner,
} from "./persistence/index.ts";
