/**
 * The broker boundary as the rest of the fleet sees it (SPEC §8: embedded now, an external
 * broker cluster later). Plain values only; nothing here names aedes.
 */
import type { Logger } from "pino";

/** One PUBLISH as a device sent it. */
export interface PublishedMessage {
  readonly topic: string;
  readonly payload: Uint8Array;
  readonly qos: 0 | 1 | 2;
  readonly retain: boolean;
}

/** Who sent a packet. `id` is the MQTT client id; `username` is null for anonymous clients. */
export interface ClientInfo {
  readonly id: string;
  readonly username: string | null;
}

/** Intake result: ok -> the publish is accepted (PUBACK sent for QoS1 only after intake resolved); refused -> publish is refused with reason. */
export type IntakeVerdict = { readonly ok: true } | { readonly ok: false; readonly reason: string };

/** How to build and run a broker. */
export interface BrokerOptions {
  readonly host: string;
  /** 0 = pick a free port (read it back from `Broker.port` after `start()`). */
  readonly port: number;
  /** Optional MQTT over WebSocket listener (subprotocol `mqtt`); 0 = pick a free port. */
  readonly wsPort?: number | null;
  /** Largest MQTT packet accepted (fixed header included); a larger one closes the connection. */
  readonly maxPacketBytes: number;
  /** Whether clients without a username may connect. */
  readonly allowAnonymous: boolean;
  /** Called for each device publish that passed the topic rules and ACL, BEFORE the broker acks it. Must resolve once the message is durably recorded. */
  intake(msg: PublishedMessage, client: ClientInfo): Promise<IntakeVerdict>;
  /**
   * Optional device auth, asked for clients that present a username (false -> CONNACK 4).
   * Clients without one are refused when `allowAnonymous` is false; when it is true they are
   * asked too, with `username: null` (false -> CONNACK 5), so a hook can keep anonymous
   * clients off registered client ids. Without this hook, `allowAnonymous` decides for all.
   */
  authenticate?(client: ClientInfo, password: Uint8Array | null): Promise<boolean>;
  /** Optional per-client publish ACL; default allow (the device topic rules always apply first). */
  authorizePublishTopic?(client: ClientInfo, topic: string): boolean;
  /** Optional per-client subscribe ACL; default allow (`$SYS` filters are always refused). */
  authorizeSubscribeTopic?(client: ClientInfo, filter: string): boolean;
  readonly logger: Logger;
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
   * Wildcard and empty topics are refused by aedes before our hook and are not counted.
   */
  readonly refused: number;
  /** Connections closed by the packet size guard (oversized or malformed length). */
  readonly oversized: number;
}

/** An MQTT broker the gateway runs or connects to. */
export interface Broker {
  /** The MQTT/TCP port; the actual one once started. */
  readonly port: number;
  /** The MQTT/WebSocket port, or null when not configured. */
  readonly wsPort: number | null;
  /** Listen; resolves when listening; idempotent. */
  start(): Promise<void>;
  /** Publish from the gateway itself (bypasses intake and device rules). */
  publish(topic: string, payload: Uint8Array | string, opts?: { qos?: 0 | 1; retain?: boolean }): Promise<void>;
  /** Current counters. */
  stats(): BrokerStats;
  /** Stop accepting connections and publishes (intake stops), keep gateway publishing possible. */
  stopIntake(): Promise<void>;
  /** Close listeners and every connection; idempotent. */
  close(): Promise<void>;
}
