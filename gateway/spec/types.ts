/**
 * The compiled fleet spec: what `loadSpec` produces from fleet.toml after validation,
 * defaults and cross-checks. Deeply frozen; nothing downstream re-validates it.
 */

import type { Blake3Hex } from "../types.ts";

export type { Blake3Hex };

import type { ShardSpec } from "../shard.ts";
import { ConfigFileError } from "../errors.ts";

export { ConfigFileError };

/** Budget limits of one agent type (docs/fleet-toml.md `[agents.<type>.budget]`). */
export interface BudgetSpec {
  readonly episodes_per_hour: number;
  readonly tool_calls_per_episode: number;
  readonly tokens_per_day: number;
  readonly episode_timeout_ms: number;
  readonly memory_mb: number;
  /** Optional cost units charged per tool call, by tool name; limited by `cost_per_day`. */
  readonly tool_costs: Readonly<Record<string, number>>;
  /** 0 = unlimited. */
  readonly cost_per_day: number;
  /** Bytes an agent's episodes may store per day window (event log, checkpoint state, outputs); 0 = unlimited. */
  readonly bytes_per_day: number;
}

/** Retry policy for a failing stimulus before it is quarantined. */
export interface RetrySpec {
  readonly max_attempts: number;
  readonly backoff_ms: number;
}

/** What a timer does with fires missed while the gateway was down. */
export type CatchUp = "none" | "one" | "all";

/** A compiled timer: interval or cron, never both. */
export type TimerSpec =
  | { readonly kind: "every"; readonly ms: number; readonly catch_up: CatchUp }
  | { readonly kind: "cron"; readonly expr: string; readonly catch_up: CatchUp };

/** `[agents.<type>.rollout]`: how a change to the type is deployed. */
export interface RolloutSpec {
  /** A hot reload that changes the type's module or config applies only when `fleet deploy --check` passes. */
  readonly require_check: boolean;
  /** Share of the type's agents (0-1, chosen by agent id hash) that run new code first; 0 = all at once. */
  readonly canary: number;
  /** Canary episodes needed before new code is promoted. */
  readonly min_episodes: number;
  /** Failed share of canary episodes past which new code is rolled back. */
  readonly max_failure_rate: number;
  /** How long new code runs on the canaries (at least) before it is promoted, ms. */
  readonly bake_ms: number;
}

/** One agent type (docs/fleet-toml.md `[agents.<type>]`). */
export interface AgentTypeSpec {
  readonly name: string;
  /** Module path as written in fleet.toml. */
  readonly module: string;
  /** Module path resolved against the fleet.toml directory. */
  readonly module_path: string;
  readonly subscribe: readonly string[];
  /** Key template, e.g. "{1}"; "{n}" is the n-th wildcard capture of the matching pattern. */
  readonly key: string;
  readonly instances: readonly string[];
  readonly timer: TimerSpec | null;
  /** Payload JSON field carrying the stimulus id; null means content hash. */
  readonly dedup: string | null;
  readonly tools: readonly string[];
  readonly publish: readonly string[];
  readonly http_hosts: readonly string[];
  readonly secrets: readonly string[];
  readonly config: Readonly<Record<string, unknown>>;
  readonly budget: BudgetSpec;
  readonly checkpoint: { readonly keep: number };
  readonly retry: RetrySpec;
  /** How changes to this type are deployed (docs/upgrading.md). */
  readonly rollout: RolloutSpec;
  /** Most stimuli that may wait for one agent; past it intake refuses (MQTT: connection closed, no PUBACK). */
  readonly max_queue: number;
  /**
   * Most agents of this type that may exist (not retired), instances included; 0: no limit. A stimulus
   * that would create one more is refused like a full queue's.
   */
  readonly max_agents: number;
  /** Wake-ups an agent may have pending at once (`ctx.wakeIn` / `ctx.wakeAt`). */
  readonly max_wakeups: number;
}

/** A webhook (`[hooks.<name>]`): routes `POST /hooks/<name>` to one agent or to a type by a payload field. */
export interface HookSpec {
  readonly name: string;
  /** Fixed target "type/key", or null when routed by `type` + `key_field`. */
  readonly agent: string | null;
  readonly type: string | null;
  readonly key_field: string | null;
  /** Payload field carrying the dedup id when no Idempotency-Key header is sent. */
  readonly dedup: string | null;
  /**
   * Env name of a shared secret; requests must carry `X-Fleet-Signature: sha256=<hmac>` or `Authorization: Bearer
   * <secret>`.
   */
  readonly secret_env: string | null;
  readonly max_body_bytes: number;
}

/** Certificate files of a TLS listener, resolved against the fleet.toml directory. */
export interface TlsFiles {
  readonly cert: string;
  readonly key: string;
  /** CA bundle: when set, clients must present a certificate it signed. */
  readonly ca: string | null;
  /** With `ca`: CRLs (PEM) of revoked client certificates; re-read when the file changes. */
  readonly crl?: string | null;
}

/** The whole compiled fleet. */
export interface FleetSpec {
  readonly fleet: {
    readonly name: string;
    readonly data_dir: string;
    readonly max_concurrent_episodes: number;
    /** libSQL `synchronous`: "full" survives power loss, "normal" survives process crashes. */
    readonly synchronous: "full" | "normal";
    readonly drain_timeout_ms: number;
    /**
     * Most `ctx.send`s in a row from a stimulus that came from outside (a device, timer, webhook, the
     * CLI) to the one an episode runs: a send past it is denied, which stops a loop between agents
     * (docs/fleet-toml.md). 0 = no limit.
     */
    readonly max_send_hops: number;
    /**
     * Free space (MB) the data dir's disk keeps: below it, stimuli from outside the fleet are refused until
     * space is freed (gateway/observe/disk.ts). 0 = no reserve.
     */
    readonly disk_free_limit_mb: number;
    /**
     * How episode subprocesses are isolated: "uid" (root only: a uid of its own per process, `sandbox_uids`), "bwrap"
     * (bubblewrap namespaces: own pid/net/ipc, read-only root; plus "uid" when root),
     * "none", or "auto" (bwrap when it works, else uid when root, else none).
     */
    readonly sandbox: "auto" | "bwrap" | "uid" | "none";
    /**
     * "uid" and "none" leave an agent the network, the HTTP API, the file system and detached
     * children (README "What an agent subprocess can see"): where bubblewrap works they are
     * refused unless this is true.
     */
    readonly allow_weak_sandbox: boolean;
    /**
     * Host processes kept started ahead of need (sandboxed, no agent code or state loaded),
     * so an episode skips process start-up. Each still serves one episode. 0 = off.
     */
    readonly warm_spares: number;
    /**
     * `shard = "i/N"`: this gateway owns only the agents rendezvous hashing gives index i of N
     * (docs/shards.md); null when it owns the whole fleet. Needs an external broker.
     */
    readonly shard: ShardSpec | null;
    /** The uids episode processes run as, one each, when the gateway is root (`DEFAULT_SANDBOX_UIDS`). */
    readonly sandbox_uids: UidRange;
  };
  readonly broker: {
    /** Listen address of the embedded broker. */
    readonly host: string;
    /** True when fleet.toml sets no host, so `host` is the default that follows `allow_anonymous`. */
    readonly host_default?: true;
    readonly mqtt_port: number;
    readonly ws_port: number | null;
    readonly max_packet_bytes: number;
    /** Most open MQTT connections (TCP, TLS, WebSocket); past it CONNACK 3. 0 = no limit. */
    readonly max_connections: number;
    /** Largest keep alive a CONNECT may ask for, seconds; a larger one or 0 gets CONNACK 2. 0: any. */
    readonly max_keepalive: number;
    /** Log each client's connect and disconnect at info (Mosquitto's connection_messages). */
    readonly connection_messages: boolean;
    readonly allow_anonymous: boolean;
    /** Anonymous clients may connect on a non-loopback host (otherwise such a spec is refused). */
    readonly allow_anonymous_network: boolean;
    /** Devices file (credentials + ACL), resolved against the fleet.toml directory; null when none. */
    readonly devices_file: string | null;
    /** MQTT over TLS (`mqtts`) port, or null when not configured. */
    readonly tls_port: number | null;
    /** MQTT over secure WebSocket (`wss`) port, or null when not configured. */
    readonly wss_port: number | null;
    /**
     * PEM files (resolved against the fleet.toml directory) for `tls_port`/`wss_port`; `ca` asks clients for a
     * certificate it signed.
     */
    readonly tls: TlsFiles | null;
    /**
     * On the `mqtts` listener, the client certificate's subject CN is the device id and no secret is asked
     * (Mosquitto's use_identity_as_username); needs `tls_ca`, `tls_port` and a devices file.
     */
    readonly use_identity_as_username: boolean;
    /**
     * Where the broker keeps clean = false sessions, offline queues, retained messages, wills
     * and QoS 2 packets: "libsql" (`<data-dir>/broker.db`, survives restarts and kill -9) or
     * "memory" (aedes' default, lost on any restart).
     */
    readonly persistence: "libsql" | "memory";
    /** Most messages kept per client session (queued + in flight); past it new ones are dropped, counted, logged. */
    readonly max_offline_messages: number;
    /** Most payload bytes per client session (queued + in flight), the same way; 0: no bound but the count. */
    readonly max_offline_bytes: number;
    /** Most payload bytes in all sessions' queues together, the same way; 0: no bound but each session's. */
    readonly max_offline_bytes_total: number;
    /**
     * The embedded broker ends a clean = false session whose client has been away this many days (counted while
     * the gateway runs), as a clean = true CONNECT would; 0: never (the default).
     */
    readonly session_expiry_days: number;
    /** Seconds between refreshes of the `$SYS/broker/` tree (Mosquitto's sys_interval); 0: no tree. */
    readonly sys_interval: number;
    /**
     * Devices set DUP on every retransmission (MQTT-3.3.1-1): a QoS 1/2 message with DUP = 0 is
     * always new. False: one repeating a client id, packet id and payload is taken for a resend.
     */
    readonly trust_dup: boolean;
    /** An existing broker the gateway is a client of (`[broker] url`); null: the embedded broker. */
    readonly external: ExternalBrokerSpec | null;
  };
  readonly http: {
    readonly host: string;
    readonly port: number;
    /** HTTPS instead of HTTP when set. */
    readonly tls: TlsFiles | null;
    /** Host names (besides IP literals and localhost) the API answers to: DNS-rebinding guard. */
    readonly allowed_hosts: readonly string[];
    /** `/healthz`, `/readyz`, `/metrics` answer any peer without a token (default: loopback only). */
    readonly open_metrics: boolean;
    /** No token needed for the API and dashboard (for a proxy that authenticates). */
    readonly allow_unauthenticated: boolean;
    /** Requests handled at once (an HTTP/1.1 connection carries one at a time); past it 503. */
    readonly max_concurrent_requests: number;
    /** Request body bytes held at once across all requests; past it 503. */
    readonly max_body_bytes_in_flight: number;
  };
  readonly llm: {
    readonly url: string;
    readonly model: string;
    readonly api_key_env: string | null;
    readonly timeout_ms: number;
  };
  readonly telemetry: {
    /** OTLP/HTTP collector base URL (traces go to `<url>/v1/traces`); null: no export. */
    readonly otlp_endpoint: string | null;
    /** `service.name` of the spans (default: the fleet's name). */
    readonly service_name: string;
  };
  readonly agents: Readonly<Record<string, AgentTypeSpec>>;
  readonly hooks: Readonly<Record<string, HookSpec>>;
  readonly retention: {
    readonly episodes_days: number;
    readonly dedup_days: number;
    /** Days a stimulus stays quarantined before retention drops it; 0: until an operator retries or drops it. */
    readonly quarantine_days: number;
    /** How long an MQTT redelivery id (no `dedup` key) is remembered, in minutes. */
    readonly redelivery_minutes: number;
  };
  /** `[replication]`: push every record to a central libSQL server; null when the table is absent. */
  readonly replication: ReplicationSpec | null;
}

/** `[replication]` (docs/replication.md, docs/replication.md). */
export interface ReplicationSpec {
  /** The central libSQL server (sqld), e.g. `http://central:8080`. */
  readonly url: string;
  /** Env name holding the server's auth token (a JWT); null: no token. */
  readonly auth_token_env: string | null;
  /** How often an idle replicator looks for new rows (and the least time between push rounds while busy), ms. */
  readonly interval_ms: number;
  /** Most queued rows per pushed batch. */
  readonly batch_rows: number;
  /** Retention keeps every row the center has not confirmed (until the backlog passes max_backlog_mb). */
  readonly required: boolean;
  /** Past this backlog, retention stops waiting for the center (rows it then deletes are counted as lost). */
  readonly max_backlog_mb: number;
}

/** A spec as accepted: the compiled value plus its identity. */
export interface SpecVersion {
  /**
   * Its identity: BLAKE3 of the fleet.toml text alone while no code is pinned, else over that and
   * `bundles` (gateway/code/pin.ts), so new code under the same fleet.toml is a new version.
   */
  readonly hash: Blake3Hex;
  /** BLAKE3 of the fleet.toml text. */
  readonly textHash: Blake3Hex;
  /** Agent type -> hash of the code bundle its episodes run (docs/upgrading.md); empty until pinned. */
  readonly bundles: Readonly<Record<string, Blake3Hex>>;
  readonly path: string;
  readonly text: string;
  readonly spec: FleetSpec;
}

/** Where in fleet.toml an error is: line/column for syntax, key path for schema. */
export class SpecError extends ConfigFileError {
  override readonly name = "SpecError";
  override readonly subject = "fleet spec";
}

/** `[broker] url` and its keys: the gateway embeds no broker and connects to this one. */
export interface ExternalBrokerSpec {
  /** `mqtt://host:port` or `mqtts://host:port`. */
  readonly url: string;
  readonly username: string | null;
  /** Environment variable holding the password (read at start). */
  readonly password_env: string | null;
  /** The gateway's client id: its persistent session on the broker. */
  readonly client_id: string;
  /** PEM CA bundle (resolved against the fleet.toml directory) that signs the broker's certificate. */
  readonly ca_file: string | null;
  /** Protocol spoken to the broker: 4 (MQTT 3.1.1) or 5. */
  readonly protocol_version: 4 | 5;
}

/** `[fleet] sandbox_uids = "first:count"`: `count` uids from `first`, none of them anyone else's. */
export interface UidRange {
  readonly first: number;
  readonly count: number;
}

/**
 * The uids sandboxed processes run as by default: 65,536 from 0x70000000 (1879048192), above the
 * ranges systemd gives users, dynamic service users and nspawn containers and below its foreign
 * range (systemd.io/UIDS-GIDS).
 */
export const DEFAULT_SANDBOX_UIDS: UidRange = Object.freeze({ first: 0x7000_0000, count: 65_536 });

/** Parse `"first:count"` (the form of /etc/subuid); a string says what is wrong with it. */
export function parseUidRange(raw: string): UidRange | string {
  const m = /^(\d{1,10}):(\d{1,10})$/.exec(raw.trim());
  if (!m) return 'must be "first:count" (the first uid and how many, e.g. "1879048192:65536")';
  const first = Number(m[1]);
  const count = Number(m[2]);
  if (first < 1) return "must not include uid 0 (root)";
  if (count < 1) return "must hold at least one uid";
  // 4294967295 is (uid_t)-1, which setuid reads as "no change".
  if (first + count - 1 > 4_294_967_294) return "must end at or below uid 4294967294";
  return { first, count };
}
