/**
 * The gateway's side of its MQTT broker: which broker (the embedded one, or a client of the one
 * `[broker] url` names), who may log in to it and publish where (the anonymous policy and the devices
 * file, re-read when it changes), and the `[broker]` keys a reload applies live. The gateway starts and
 * stops the broker; this decides what it is told.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import {
  type AuthChange,
  type Broker,
  type BrokerAuth,
  type ClientInfo,
  createEmbeddedBroker,
  createExternalBroker,
  type IntakeVerdict,
  type PublishedMessage,
} from "../broker/index.ts";
import { CrlWatch, DeviceRegistry, deviceBrokerHooks } from "./devices/index.ts";
import { intakeFilters, sessionsDropped } from "./ops/index.ts";
import type { FleetSpec } from "./spec/index.ts";
import { SCHEMA_VERSION, type Store } from "./store/index.ts";
import { shardClientId } from "./shard.ts";

/** A listener's PEM files, read. */
export interface TlsPem {
  readonly cert: string;
  readonly key: string;
  readonly ca: string | null;
  readonly crl: string | null;
}

/** What the broker link needs from the gateway. */
export interface BrokerLinkDeps {
  readonly log: Logger;
  readonly dataDir: string;
  /** `--mqtt-port`, over `[broker] mqtt_port` (the embedded broker's). */
  readonly mqttPort: number | undefined;
  /** Where `[broker] password_env` is looked up. */
  readonly secrets: Readonly<Record<string, string | undefined>>;
  readonly store: Store;
  /** A device's PUBLISH, to record (the broker acknowledges it once this says it is durable). */
  readonly intake: (msg: PublishedMessage, client: ClientInfo) => Promise<IntakeVerdict>;
  /** The external broker is reachable again after an outage. */
  readonly outputsReconnected: () => void;
}

/** One gateway's broker, its device auth, and what a reload changes of them. */
export class BrokerLink {
  private broker: Broker | null = null;
  private devices: DeviceRegistry | null = null;
  /** The auth in force (the newest a pass of `applyAuth` applies). */
  private auth: BrokerAuth | null = null;
  private rechecks: Promise<void> = Promise.resolve();
  private stopDeviceWatch: (() => void) | null = null;
  private crlWatch: CrlWatch | null = null;

  constructor(private readonly d: BrokerLinkDeps) {}

  /**
   * The embedded broker, or a client of the external one (`[broker] url`). `dropSessions`: sessions of
   * shards a reshard left out, for the external broker to end; `pem`: the TLS listener's files, read.
   */
  create(spec: FleetSpec, dropSessions: readonly string[], pem: TlsPem | null): Broker {
    this.broker = spec.broker.external ? this.external(spec, dropSessions) : this.embedded(spec, pem);
    return this.broker;
  }

  /** Watch the TLS listener's revocation list (once the broker listens). */
  async startWatches(): Promise<void> {
    await this.crlWatch?.start();
  }

  /** Stop watching the devices file and the revocation list. */
  stopWatches(): void {
    this.stopDeviceWatch?.();
    this.crlWatch?.stop();
  }

  /** The [broker] keys a reload applies live: connection and keep alive limits, anonymous policy, devices file. */
  async applyLive(current: FleetSpec, next: FleetSpec): Promise<string | null> {
    const broker = this.broker;
    if (!broker) return null;
    const [a, b] = [current.broker, next.broker];
    const done: string[] = [];
    if (a.max_connections !== b.max_connections) {
      broker.setMaxConnections(b.max_connections);
      done.push(`max_connections ${b.max_connections}`);
    }
    if (a.max_keepalive !== b.max_keepalive) {
      broker.setMaxKeepalive(b.max_keepalive);
      done.push(`max_keepalive ${b.max_keepalive} (new connections)`);
    }
    if (a.connection_messages !== b.connection_messages) {
      broker.setConnectionMessages(b.connection_messages);
      done.push(`connection_messages ${b.connection_messages}`);
    }
    if (a.allow_anonymous !== b.allow_anonymous || a.devices_file !== b.devices_file) {
      const previous = this.devices;
      let auth: BrokerAuth;
      try {
        auth = this.authFor(next);
      } catch (err) {
        this.devices = previous;
        throw err;
      }
      const { disconnected } = await this.applyAuth(auth);
      done.push(`broker auth applied live, ${disconnected} session(s) closed`);
    }
    return done.length > 0 ? done.join("; ") : null;
  }

  private external(spec: FleetSpec, dropSessions: readonly string[]): Broker {
    const ext = spec.broker.external!;
    const password = ext.password_env === null ? null : (this.d.secrets[ext.password_env] ?? null);
    if (ext.password_env !== null && password === null)
      throw new Error(`[broker] password_env names ${ext.password_env}, which is not set in the environment`);
    if (this.d.mqttPort !== undefined) this.d.log.info("--mqtt-port is ignored: [broker] url names the broker");
    return createExternalBroker({
      url: ext.url,
      username: ext.username,
      password,
      // Each shard has its own persistent session: `<client_id>-shard-<i>`.
      clientId: shardClientId(ext.client_id, spec.fleet.shard),
      ca: ext.ca_file === null ? null : readFileSync(ext.ca_file, "utf8"),
      protocolVersion: ext.protocol_version,
      filters: intakeFilters(spec),
      subscriptionsFile: join(this.d.dataDir, "broker-subscriptions.json"),
      dropSessions,
      onSessionsDropped: () =>
        void sessionsDropped(this.d.store).catch((err: unknown) =>
          this.d.log.warn({ err }, "recording ended sessions"),
        ),
      intake: this.d.intake,
      onOutputsReconnected: this.d.outputsReconnected,
      logger: this.d.log.child({ mod: "broker" }),
    });
  }

  private embedded(spec: FleetSpec, pem: TlsPem | null): Broker {
    const files = spec.broker.tls;
    if (files?.crl && pem?.crl != null)
      this.crlWatch = new CrlWatch(
        files.crl,
        pem.crl,
        (crl) => this.broker!.setTlsCrl(crl),
        this.d.log.child({ mod: "broker" }),
      );
    // Anonymous policy + device credentials and topic ACLs from the devices file (re-read when it changes).
    this.auth = this.authFor(spec);
    return createEmbeddedBroker({
      host: spec.broker.host,
      port: this.d.mqttPort ?? spec.broker.mqtt_port,
      wsPort: spec.broker.ws_port,
      tls: pem
        ? {
            port: spec.broker.tls_port,
            wssPort: spec.broker.wss_port,
            ...pem,
            useIdentityAsUsername: spec.broker.use_identity_as_username,
          }
        : null,
      maxPacketBytes: spec.broker.max_packet_bytes,
      maxConnections: spec.broker.max_connections,
      maxKeepaliveSeconds: spec.broker.max_keepalive,
      connectionMessages: spec.broker.connection_messages,
      trustDup: spec.broker.trust_dup,
      sessionExpiryMs: spec.broker.session_expiry_days * 86_400_000,
      sysIntervalMs: spec.broker.sys_interval * 1000,
      version: productVersion(),
      ...this.auth,
      intake: this.d.intake,
      logger: this.d.log.child({ mod: "broker" }),
      persistence:
        spec.broker.persistence === "libsql"
          ? {
              kind: "libsql",
              path: join(this.d.dataDir, "broker.db"),
              synchronous: spec.fleet.synchronous,
              maxOfflineMessages: spec.broker.max_offline_messages,
              maxOfflineBytes: spec.broker.max_offline_bytes,
              maxOfflineBytesTotal: spec.broker.max_offline_bytes_total,
            }
          : {
              kind: "memory",
              maxOfflineMessages: spec.broker.max_offline_messages,
              maxOfflineBytes: spec.broker.max_offline_bytes,
              maxOfflineBytesTotal: spec.broker.max_offline_bytes_total,
            },
    });
  }

  /** Broker auth for a spec: anonymous policy plus the devices file's hooks (throws DevicesError on a bad file). */
  private authFor(spec: FleetSpec): BrokerAuth {
    // An external broker authenticates devices itself (`fleet device export --mosquitto`).
    const file = spec.broker.external ? null : spec.broker.devices_file;
    // Same file: keep the registry, so the sessions it verified can stay.
    if (file !== this.devices?.file) {
      const registry =
        file === null
          ? null
          : new DeviceRegistry(file, {
              log: this.d.log.child({ mod: "devices" }),
              // An edit of the devices file closes the sessions it no longer allows.
              onChange: () => {
                if (this.devices === registry) this.recheckSessions();
              },
            });
      this.stopDeviceWatch?.();
      this.stopDeviceWatch = registry?.watch() ?? null;
      this.devices = registry;
    }
    return { allowAnonymous: spec.broker.allow_anonymous, ...(this.devices ? deviceBrokerHooks(this.devices) : {}) };
  }

  /** Apply broker auth; passes run one at a time, each with the newest auth. */
  private applyAuth(auth: BrokerAuth): Promise<AuthChange> {
    this.auth = auth;
    const broker = this.broker!;
    const run = this.rechecks.then(() => broker.setAuth(this.auth ?? auth));
    this.rechecks = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** Re-check every session against the auth in force (the devices file changed). */
  private recheckSessions(): void {
    if (!this.broker || !this.auth) return;
    this.applyAuth(this.auth).then(
      ({ disconnected }) => {
        if (disconnected > 0)
          this.d.log.info({ disconnected }, "devices file changed: sessions it no longer allows closed");
      },
      (err: unknown) => this.d.log.error({ err }, "re-checking sessions failed"),
    );
  }
}

let version: string | null = null;
/** `agent-fleets <package version> (schema <fleet.db schema>)`: what `$SYS/broker/version` says. */
function productVersion(): string {
  if (version === null) {
    let pkg = "unknown";
    try {
      const parsed = JSON.parse(readFileSync(join(import.meta.dir, "..", "package.json"), "utf8")) as {
        version?: unknown;
      };
      if (typeof parsed.version === "string") pkg = parsed.version;
    } catch {
      // a copy of the gateway without its package.json: the version stays "unknown"
    }
    version = `agent-fleets ${pkg} (schema ${SCHEMA_VERSION})`;
  }
  return version;
}
