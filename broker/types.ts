/**
 * The broker boundary as the rest of the fleet sees it (docs/replication.md: embedded now, an external
 * broker cluster later). Plain values only; nothing here names aedes.
 */
import type { Logger } from "pino";
import type { PersistenceChoice } from "./persistence/index.ts";

/** One PUBLISH as a device sent it. */
export interface PublishedMessage {
  readonly topic: string;
  readonly payload: Uint8Array;
  readonly qos: 0 | 1 | 2;
  readonly retain: boolean;
  /** The MQTT packet id of a QoS 1/2 publish (what a retransmission repeats); absent for QoS 0. */
  readonly messageId?: number;
  /**
   * The DUP flag, when the sender is known to set it on every redelivery (an external broker
   * delivering to the gateway's session, MQTT-3.3.1-1); absent from the embedded broker.
   */
  readonly dup?: boolean;
  /** MQTT 5 Message Expiry Interval as delivered (seconds left); absent when the message has none. */
  readonly expirySeconds?: number;
  /**
   * A forwarded `ctx.send`'s count of the sends that led to it, this one included (MQTT 5 user property
   * `hops`, docs/shards.md); absent when the sender did not say (MQTT 3.1.1, older releases).
   */
  readonly hops?: number;
}

/**
 * A gateway publish the broker will never take (a topic MQTT or the broker does not accept): sending it
 * again cannot succeed, unlike a publish that failed because the broker is out of reach.
 */
export class PublishRefused extends Error {
  constructor(
    readonly topic: string,
    readonly reason: string,
  ) {
    super(`publish to ${JSON.stringify(topic.slice(0, 200))} refused: ${reason}`);
    this.name = "PublishRefused";
  }
}

/**
 * Thrown (rejected) by an `authenticate` hook that cannot check a login now: the CONNECT is refused
 * with "server unavailable" (MQTT 3.1.1 return code 3), which a device retries, not "bad credentials".
 */
export class BrokerBusy extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = "BrokerBusy";
  }
}

/** What identifies a gateway output (carried as MQTT 5 user properties where MQTT 5 is spoken). */
export interface PublishMeta {
  readonly episode: string;
  readonly seq: number;
  readonly agent: string;
  /** A forwarded send's count of the sends that led to it, this one included (`PublishedMessage.hops`). */
  readonly hops?: number;
}

/** Who sent a packet. `id` is the MQTT client id; `username` is null for anonymous clients. */
export interface ClientInfo {
  readonly id: string;
  readonly username: string | null;
  /** Whether the connection has closed since (a login checked later need not be checked at all). */
  readonly gone?: () => boolean;
  /** The connection's peer address, at CONNECT (absent where the transport gives none). */
  readonly host?: string | undefined;
  /**
   * The user name is the CN of the client certificate the TLS listener verified (`useIdentityAsUsername`):
   * no password was asked, and none is checked.
   */
  readonly certified?: boolean;
}

/**
 * Intake result: ok -> the publish is accepted (PUBACK sent for QoS1 only after intake resolved); refused -> publish is
 * refused with reason.
 */
export type IntakeVerdict =
  | { readonly ok: true }
  | {
      readonly ok: false;
      readonly reason: string;
      /**
       * True when no retry can succeed (unknown inbox, retired agent): the message is
       * acknowledged and dropped. Absent/false: transient (queue full, intake stopped, commits
       * failing), no PUBACK, the sender retries.
       */
      readonly permanent?: boolean;
    };

/** Who may connect and what they may publish and subscribe; `Broker.setAuth` swaps it live. */
export interface BrokerAuth {
  /** Whether clients without a username may connect. */
  readonly allowAnonymous: boolean;
  /**
   * Optional device auth, asked for clients that present a username (false -> CONNACK 4).
   * Clients without one are refused when `allowAnonymous` is false; when it is true they are
   * asked too, with `username: null` (false -> CONNACK 5), so a hook can keep anonymous
   * clients off registered client ids. Without this hook, `allowAnonymous` decides for all.
   */
  authenticate?(client: ClientInfo, password: Uint8Array | null): Promise<boolean>;
  /** Optional per-client publish ACL; default allow (the device topic rules always apply first). */
  authorizePublishTopic?(client: ClientInfo, topic: string): boolean;
  /**
   * Optional per-client subscribe ACL; default allow. `$` filters are refused before it is asked, except
   * `$SYS/...` while the broker publishes its `$SYS/broker/` tree (`sysIntervalMs`).
   */
  authorizeSubscribeTopic?(client: ClientInfo, filter: string): boolean;
  /**
   * When auth changes live: may a connected client that logged in with a username keep its
   * session under these rules (without its password, which the broker does not keep)?
   * Absent -> such sessions are closed and must log in again.
   */
  sessionValid?(client: ClientInfo): boolean;
}

/** How to build and run a broker. */
export interface BrokerOptions extends BrokerAuth {
  readonly host: string;
  /** 0 = pick a free port (read it back from `Broker.port` after `start()`). */
  readonly port: number;
  /** Optional MQTT over WebSocket listener (subprotocol `mqtt`); 0 = pick a free port. */
  readonly wsPort?: number | null;
  /** Optional TLS listeners: `mqtts` on `port`, secure WebSocket on `wssPort` (either may be null). */
  readonly tls?: {
    readonly port: number | null;
    readonly wssPort: number | null;
    /** PEM contents (not paths); with `ca`, clients must present a certificate it signed. */
    readonly cert: string;
    readonly key: string;
    readonly ca: string | null;
    /** With `ca`: PEM CRLs; a client certificate they revoke is refused in the handshake (`setTlsCrl` swaps them). */
    readonly crl?: string | null;
    /**
     * With `ca`: on the `mqtts` listener the verified certificate's subject CN is the user name (Mosquitto's
     * `use_identity_as_username`), whatever the CONNECT says, and no password is asked; a certificate with no
     * single CN is refused (CONNACK 5). The secure WebSocket listener still asks user name and password (Bun's
     * WebSocket server does not show the client's certificate).
     */
    readonly useIdentityAsUsername?: boolean;
  } | null;
  /** Largest MQTT packet accepted (fixed header included); a larger one closes the connection. */
  readonly maxPacketBytes: number;
  /**
   * Most open client connections (TCP + WebSocket); past it a new connection gets CONNACK 3
   * (server unavailable) and is closed. 0 or absent = no limit.
   */
  readonly maxConnections?: number;
  /**
   * Largest keep alive a CONNECT may ask for, seconds (Mosquitto's `max_keepalive`): a larger one, or 0 (never
   * checked), gets CONNACK 2 (identifier rejected, Mosquitto's answer to an MQTT 3.1.1 client). 0 or absent: any.
   */
  readonly maxKeepaliveSeconds?: number;
  /** Log each client's connect (address, user name, keep alive, clean session) and disconnect at info. */
  readonly connectionMessages?: boolean;
  /** Hand intake each publish's DUP flag: devices set it on every retransmission (`[broker] trust_dup`). */
  readonly trustDup?: boolean;
  /**
   * Called for each device publish that passed the topic rules and ACL, BEFORE the broker acks it. Must resolve once
   * the message is durably recorded.
   */
  intake(msg: PublishedMessage, client: ClientInfo): Promise<IntakeVerdict>;
  readonly logger: Logger;
  /** Where sessions, offline queues and retained messages live; default in memory (lost on restart, 1,000 a client). */
  readonly persistence?: PersistenceChoice;
  /**
   * A clean = false session whose client has been away this long (ms, counted while the broker runs) ends, as a
   * clean = true CONNECT would end it (`[broker] session_expiry_days`). 0 or absent: sessions never expire.
   */
  readonly sessionExpiryMs?: number;
  /**
   * How often the `$SYS/broker/...` tree (./sys.ts: Mosquitto's names, counts only) is refreshed, ms
   * (`[broker] sys_interval`). 0 or absent: no tree, and `$SYS` filters are refused as every `$` filter is.
   */
  readonly sysIntervalMs?: number;
  /** `$SYS/broker/version`: the product and its version. */
  readonly version?: string;
}

/** Counters since `start()`. */
export interface BrokerStats {
  /** Connected, authenticated clients. */
  readonly clients: number;
  /** Device publishes accepted by intake. */
  readonly messagesIn: number;
  /** PUBLISH packets forwarded to clients. */
  readonly messagesOut: number;
  /**
   * Device publishes refused by our rules, ACL, intake refusal or failure, or stopped intake.
   * Wildcard and empty topics close the connection before our hook: they count as `invalid`.
   */
  readonly refused: number;
  /**
   * Of those, refused for good (topic rules, ACL, unknown inbox, retired agent): acknowledged and
   * dropped, the connection kept. The rest were transient: no PUBACK, the device retries.
   */
  readonly dropped: number;
  /** Connections closed by the packet size guard (oversized or malformed length). */
  readonly oversized: number;
  /** Connections closed for breaking an MQTT input rule (invalid UTF-8, will QoS 3, ...). */
  readonly invalid: number;
  /** Open client connections (TCP + WebSocket, before and after CONNECT). */
  readonly connections: number;
  /** Embedded broker only: bytes received from and sent to client connections since start (MQTT, all listeners). */
  readonly bytesIn?: number;
  readonly bytesOut?: number;
  /** Connections refused because `maxConnections` were open. */
  readonly connectionsRefused: number;
  /** CONNECTs refused for their credentials: a wrong or unknown user name, secret or client id (CONNACK 4 / 5). */
  readonly loginsRefused: number;
  /** CONNECTs refused unverified: too many logins for their user name were waiting (CONNACK 3). */
  readonly loginsBusy: number;
  /** Messages not queued for a clean = false client: its queue was full (`max_offline_messages` or `_bytes`). */
  readonly offlineDropped: number;
  /** Embedded broker only: messages held in sessions' queues (queued + in flight), and their payload bytes. */
  readonly offlineQueued?: number;
  readonly offlineQueuedBytes?: number;
  /** Embedded broker only: retained messages held, the `$SYS/broker/` tree's own included. */
  readonly retainedMessages?: number;
  /** Embedded broker only: clean = false sessions held, connected or not. */
  readonly sessions?: number;
  /** Embedded broker only: sessions ended because their client stayed away (`sessionExpiryMs`). */
  readonly sessionsExpired?: number;
  /** External-broker mode only: the gateway's own connection to the broker. */
  readonly external?: {
    readonly url: string;
    readonly connected: boolean;
    readonly reconnects: number;
    /** Deliveries whose PUBACK was withheld (transient refusal); the broker redelivers them. */
    readonly withheld: number;
    /** Retained copies delivered at subscribe time, acknowledged and not taken as stimuli. */
    readonly staleRetained: number;
    /** Since when (ms) the session connection is down; null while connected. */
    readonly disconnectedSince: number | null;
    /** The broker keeps closing the session right after each CONNACK: another client uses its client id. */
    readonly takenOver: boolean;
  };
}

/** What `Broker.setAuth` did to the sessions already connected. */
export interface AuthChange {
  /** Sessions closed because they no longer pass the new rules. */
  readonly disconnected: number;
}

/** An MQTT broker the gateway runs or connects to. */
export interface Broker {
  /** The MQTT/TCP port; the actual one once started. */
  readonly port: number;
  /** The MQTT/WebSocket port, or null when not configured. */
  readonly wsPort: number | null;
  /** The MQTT over TLS port, or null when not configured. */
  readonly tlsPort: number | null;
  /** The MQTT over secure WebSocket port, or null when not configured. */
  readonly wssPort: number | null;
  /** Listen; resolves when listening; idempotent. */
  start(): Promise<void>;
  /**
   * Publish from the gateway itself (bypasses intake and device rules). `meta` travels as MQTT 5
   * user properties where MQTT 5 is spoken (external mode), else it is only in the payload.
   */
  publish(
    topic: string,
    payload: Uint8Array | string,
    opts?: { qos?: 0 | 1; retain?: boolean; meta?: PublishMeta },
  ): Promise<void>;
  /**
   * The topic filters the agents listen on. The embedded broker sees every publish and ignores
   * this; an external broker client subscribes to them (new ones now, removed ones dropped).
   */
  setIntakeFilters(filters: readonly string[]): Promise<void>;
  /** Current counters. */
  stats(): BrokerStats;
  /**
   * Embedded broker only: the subscriptions held, connected clients' and those of persistent sessions whose
   * client is away (`$SYS/broker/subscriptions/count`). O(connected clients): not part of `stats()`.
   */
  subscriptionCount?(): number;
  /**
   * Apply new auth rules now: later CONNECTs, publishes and subscribes use them, and every
   * connected client that no longer passes them (or whose subscriptions they no longer
   * grant) is disconnected.
   */
  setAuth(auth: BrokerAuth): Promise<AuthChange>;
  /** Change the connection limit for new connections (0 = none); open ones stay. */
  setMaxConnections(max: number): void;
  /** Change the keep alive bound for new CONNECTs (seconds, 0 = none); connected clients keep theirs. */
  setMaxKeepalive(seconds: number): void;
  /** Turn the connect and disconnect log lines (`connectionMessages`) on or off. */
  setConnectionMessages(on: boolean): void;
  /**
   * New CRLs for the TLS listeners' handshakes to come (`tls.crl`); connections already open stay. Rejects,
   * the listeners keeping the CRLs they had, when the PEM cannot be used.
   */
  setTlsCrl(crl: string | null): Promise<void>;
  /** Stop accepting connections and publishes (intake stops), keep gateway publishing possible. */
  stopIntake(): Promise<void>;
  /** Close listeners and every connection; idempotent. */
  close(): Promise<void>;
}
