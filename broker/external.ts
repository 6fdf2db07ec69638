/**
 * External-broker mode (docs/broker.md#external-broker): the gateway embeds no broker and is an
 * mqtt.js client of an existing one (Mosquitto, EMQX, HiveMQ, NATS' MQTT listener). It keeps a
 * persistent session (clean = false; under MQTT 5 a session that never expires) with QoS 1
 * subscriptions to the agents' topics, so the broker queues while the gateway is down, and
 * sends each PUBACK only after intake recorded the stimulus (mqtt.js `handleMessage`).
 */
import type { IClientOptions, IConnackPacket, IPublishPacket, MqttClient } from "mqtt";
import { existsSync, readFileSync } from "node:fs";
import type { Logger } from "pino";
import { writeFileDurably } from "../gateway/durable.ts";
import { logDue } from "./hooks.ts";
import type {
  AuthChange,
  Broker,
  BrokerStats,
  ClientInfo,
  IntakeVerdict,
  PublishMeta,
  PublishedMessage,
} from "./types.ts";
import { OperatorError } from "../gateway/errors.ts";

/**
 * mqtt.js, loaded when an external broker is first reached: a fleet on the embedded broker (the
 * default) never needs it, and importing it costs every gateway start and CLI call ~60 ms.
 */
async function mqttConnect(): Promise<typeof import("mqtt").connect> {
  return (await import("mqtt")).connect;
}

/** How to reach the external broker and what to do with what it delivers. */
export interface ExternalBrokerOptions {
  /** `mqtt://host:port` or `mqtts://host:port`. */
  readonly url: string;
  readonly username: string | null;
  readonly password: string | null;
  /** The gateway's client id: the name of its persistent session. */
  readonly clientId: string;
  /** PEM CA bundle for `mqtts://` (null: the system's CAs). */
  readonly ca: string | null;
  /** 4 = MQTT 3.1.1, 5 = MQTT 5. */
  readonly protocolVersion: 4 | 5;
  /** Topic filters the agents listen on (subscribed with QoS 1). */
  readonly filters: readonly string[];
  /** Record a delivered message; the PUBACK waits for it (see `onQos1`). */
  intake(msg: PublishedMessage, client: ClientInfo): Promise<IntakeVerdict>;
  readonly logger: Logger;
  /** How long a gateway publish may wait for its PUBACK before it is reported failed (default 10 s). */
  readonly publishTimeoutMs?: number;
  /** First wait before a withheld PUBACK makes the gateway reconnect (default 1 s, doubling to 30 s). */
  readonly retryMs?: number;
  /**
   * Where the filters subscribed last are kept (in the data dir), so filters of types removed
   * while the gateway was down are unsubscribed at the next connection; null: not kept.
   */
  readonly subscriptionsFile?: string | null;
  /** How long `start()` waits for the first CONNACK (default 10 s); past it the client keeps trying. */
  readonly connectTimeoutMs?: number;
  /**
   * Client ids whose persistent sessions to end, once: those of shards a `fleet reshard` left out of the
   * layout (docs/shards.md). Each gets a clean-session CONNECT and a DISCONNECT after the gateway connects.
   */
  readonly dropSessions?: readonly string[];
  /** Called once every session of `dropSessions` has been ended (the data dir forgets them). */
  readonly onSessionsDropped?: () => void;
  /**
   * Called when the outputs connection is up again after the broker could not be reached (not at the
   * first CONNACK of a start that found the broker): what could not be published meanwhile can go now.
   */
  readonly onOutputsReconnected?: () => void;
}

/** MQTT 5 user property naming the gateway (its client id) on everything it publishes. */
const ORIGIN = "fleet-gateway";
/** MQTT 5 session expiry that never ends (MQTT-3.1.2-11: 0xFFFFFFFF = does not expire). */
const NEVER = 0xffff_ffff;
/** A connection the broker closes within this long of its CONNACK may have been taken over. */
const TAKEOVER_MS = 5000;
/** So many such closes in a row are reported as a take-over (a second gateway with the same client id). */
const TAKEOVERS = 3;
/** At most one client-error line per this long while the broker cannot be reached. */
const ERROR_LOG_MS = 60_000;

type Lifecycle = "new" | "starting" | "running" | "draining" | "closed";

/** Build an external-broker client; nothing connects until `start()`. */
export function createExternalBroker(opts: ExternalBrokerOptions): Broker {
  return new ExternalBroker(opts);
}

class ExternalBroker implements Broker {
  readonly wsPort = null;
  readonly tlsPort = null;
  readonly wssPort = null;
  private lifecycle: Lifecycle = "new";
  /** The session connection: subscriptions and deliveries. */
  private client: MqttClient | null = null;
  /** The outputs connection (`<client_id>-out`, clean session): the gateway's publishes. */
  private out: MqttClient | null = null;
  private readonly log: Logger;
  private filters: string[];
  private messagesIn = 0;
  private messagesOut = 0;
  private refused = 0;
  private dropped = 0;
  private withheld = 0;
  private reconnects = 0;
  private staleRetained = 0;
  /** Refusals since the last log line, by kind: one line per 10 s at most for each (`logDue`). */
  private readonly droppedLog = { at: 0, since: 0 };
  private readonly withheldLog = { at: 0, since: 0 };
  /** The Maximum Packet Size the broker's CONNACK on the outputs connection gave (MQTT 5), or null. */
  private outMaxPacket: number | null = null;
  /** The gateway's own publishes the broker refused for good (MQTT 5 PUBACK), since the last log line. */
  private readonly outputsRefusedLog = { at: 0, since: 0 };
  private retryDelay: number;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private starting: Promise<void> | null = null;
  /** Counts CONNACKs: a held PUBACK belongs to the connection it was read on. */
  private generation = 0;
  /** Held PUBACKs, in the order their deliveries arrived. */
  private acks: Promise<void> = Promise.resolve();
  private closing: Promise<void> | null = null;
  /** Options every connection of this client shares (protocol, login, CA). */
  private common: IClientOptions = {};
  /** Sessions still to end (`dropSessions`); tried again on each connection until done. */
  private toDrop: string[];
  private dropping: Promise<void> | null = null;
  private dropsPending: boolean;
  /** Whether this data dir has had a session on the broker (it recorded its subscriptions). */
  private hadSession = false;
  /** Since when the session connection is down (ms), null while connected; set before the first CONNACK. */
  private downSince: number | null = Date.now();
  /** Connections the broker closed soon after their CONNACK, in a row (another client took the session over). */
  private takenOver = 0;
  private connectedAt = 0;
  /** The gateway itself is closing the session connection (a withheld PUBACK's reconnect). */
  private closingOurselves = false;
  /** Client errors since the last one logged (logged at most once per ERROR_LOG_MS while it lasts). */
  private errorsSinceLog = 0;
  private lastErrorLog = 0;

  constructor(private readonly opts: ExternalBrokerOptions) {
    this.log = opts.logger.child({ component: "broker", url: redact(opts.url) });
    this.filters = [...new Set(opts.filters)];
    this.toDrop = (opts.dropSessions ?? []).filter((id) => id !== opts.clientId && id !== `${opts.clientId}-out`);
    this.dropsPending = (opts.dropSessions ?? []).length > 0;
    this.retryDelay = opts.retryMs ?? 1000;
  }

  /** The external broker's port (what devices connect to). */
  get port(): number {
    const u = new URL(this.opts.url);
    return u.port === "" ? (u.protocol === "mqtts:" ? 8883 : 1883) : Number(u.port);
  }

  start(): Promise<void> {
    this.starting ??= this.doStart();
    return this.starting;
  }

  private async doStart(): Promise<void> {
    if (this.lifecycle !== "new") throw new Error(`cannot start a broker client that is ${this.lifecycle}`);
    this.lifecycle = "starting";
    const connect = await mqttConnect();
    const common: IClientOptions = (this.common = { ...loginOptions(this.opts), reconnectPeriod: 1000 });
    // Subscriptions are (re)made on every CONNACK below, with the filters in force then.
    const client = connect(this.opts.url, {
      ...common,
      ...persistentSession(this.opts.clientId, this.opts.protocolVersion),
    });
    this.client = client;
    // Outputs go out on a connection of their own: mqtt.js reads one packet at a time, so on the
    // session connection their PUBACKs would wait behind every delivery still being recorded.
    const out = connect(this.opts.url, { ...common, clientId: `${this.opts.clientId}-out`, clean: true });
    this.out = out;
    out.on("error", (err) => this.clientError("broker client (outputs) error", err));
    let outBefore = false;
    out.on("connect", (connack) => {
      this.outMaxPacket = connack.properties?.maximumPacketSize ?? null;
      if (outBefore || this.lifecycle === "running") this.opts.onOutputsReconnected?.();
      outBefore = true;
    });
    this.holdAcks(client);
    const file = this.opts.subscriptionsFile;
    this.hadSession = file ? existsSync(file) : false;
    client.on("connect", (connack) => {
      this.generation++;
      this.retryDelay = this.opts.retryMs ?? 1000;
      this.connectedAt = Date.now();
      this.downSince = null;
      const quiet = this.takenOver > 0;
      if (!quiet)
        this.log.info({ sessionPresent: connack.sessionPresent, clientId: this.opts.clientId }, "connected to broker");
      if (!connack.sessionPresent && this.hadSession)
        this.log.warn(
          { clientId: this.opts.clientId },
          `the broker has no session ${this.opts.clientId} for this gateway: messages published while it was not ` +
            "connected are not queued here (readings queued for an earlier session, e.g. under another client_id, " +
            "will not arrive here; or the broker lost its sessions)",
        );
      this.hadSession = true;
      void this.subscribe(this.filters).then(() => this.dropStale());
      if (this.dropsPending) this.dropping ??= this.endSessions().finally(() => (this.dropping = null));
    });
    client.on("reconnect", () => this.reconnects++);
    client.on("close", () => this.closed());
    client.on("offline", () => this.log.warn("broker connection lost; reconnecting"));
    client.on("error", (err) => this.clientError("broker client error", err));
    const first = await Promise.race([
      new Promise<"connected">((resolve) => client.once("connect", () => resolve("connected"))),
      new Promise<Error>((resolve) => client.once("error", resolve)),
      Bun.sleep(this.opts.connectTimeoutMs ?? 10_000).then(() => "timeout" as const),
    ]);
    if (first instanceof Error && isRefusal(first)) {
      client.end(true);
      out.end(true);
      this.lifecycle = "closed";
      throw new Error(`broker ${redact(this.opts.url)} refused the gateway's CONNECT: ${first.message}`);
    }
    if (first instanceof Error && isTlsRefusal(first)) {
      client.end(true);
      out.end(true);
      this.lifecycle = "closed";
      throw new Error(
        `broker ${redact(this.opts.url)}: its TLS certificate does not verify (${first.message}); ` +
          "check [broker] ca_file (the CA that signed the broker's certificate) and the host name in url",
      );
    }
    if (first !== "connected")
      this.log.warn(
        { why: first instanceof Error ? first.message : first },
        "broker not reachable at start; the gateway keeps trying (its session queues meanwhile)",
      );
    this.lifecycle = "running";
  }

  /** The session connection closed: note since when, and whether the broker closed it right after its CONNACK. */
  private closed(): void {
    const ours = this.closingOurselves;
    this.closingOurselves = false;
    if (this.downSince !== null) return;
    const now = Date.now();
    this.downSince = now;
    if (ours || (this.lifecycle !== "running" && this.lifecycle !== "starting")) return;
    // Taken over: the broker closes a session's connection when another client connects with its id.
    if (now - this.connectedAt < TAKEOVER_MS) this.takenOver++;
    else this.takenOver = 0;
    if (this.takenOver === TAKEOVERS)
      this.log.error(
        { clientId: this.opts.clientId, times: this.takenOver },
        `the broker keeps closing the gateway's session ${this.opts.clientId} right after it connects: ` +
          "another client uses the same client id (likely a second gateway with the same [broker] client_id " +
          "and [fleet] shard); each takes the session from the other and the agents' state splits between them",
      );
  }

  /** While the connection fails (a broker down for hours), one line per ERROR_LOG_MS, with the count. */
  private clientError(what: string, err: Error): void {
    this.errorsSinceLog++;
    const now = Date.now();
    if (now - this.lastErrorLog < ERROR_LOG_MS) return;
    this.log.warn({ err: err.message, errors: this.errorsSinceLog }, what);
    this.lastErrorLog = now;
    this.errorsSinceLog = 0;
  }

  /**
   * PUBACKs only after intake, without reading one delivery at a time. mqtt.js calls
   * `handleMessage` for every delivery, then writes the PUBACK through `_sendPacket`, and reads
   * nothing more until that write's callback (`customHandleAcks` would let us hold the PUBACK,
   * but it is MQTT 5 only, and serial: one commit per message, ~67 msg/s measured). So
   * `handleMessage` starts intake and returns at once; the PUBACK write is held back, in arrival
   * order (MQTT-4.6.0-2), until that delivery's intake settled: sent when it was recorded (or
   * refused for good), never when it was not. The broker bounds how many wait (Mosquitto:
   * `max_inflight_messages`, 20). `_sendPacket` is mqtt.js 5's (pinned in bun.lock) internal.
   */
  private holdAcks(client: MqttClient): void {
    const inner = client as unknown as {
      _sendPacket(packet: { cmd: string; messageId?: number }, cb?: (err?: Error) => void, ...rest: unknown[]): void;
    };
    const send = inner._sendPacket.bind(client);
    const verdicts = new Map<number, Promise<boolean>>();
    client.handleMessage = (packet, callback) => {
      if (packet.cmd !== "publish") return callback();
      const verdict = this.deliver(packet);
      if (packet.qos === 1 && typeof packet.messageId === "number") verdicts.set(packet.messageId, verdict);
      // QoS 0 is best effort; QoS 2 never comes (subscriptions are QoS 1) but would wait, like QoS 1.
      if (packet.qos === 2) void verdict.then((ok) => (ok ? callback() : this.withhold()));
      else callback();
    };
    inner._sendPacket = (packet, cb, ...rest) => {
      const verdict =
        packet.cmd === "puback" && packet.messageId !== undefined ? verdicts.get(packet.messageId) : undefined;
      if (!verdict) return send(packet, cb, ...rest);
      verdicts.delete(packet.messageId!);
      cb?.(); // mqtt.js reads on; the PUBACK follows the record
      const generation = this.generation;
      this.acks = this.acks
        .then(() => verdict.catch(() => false))
        .then((ok) => {
          if (!ok) return this.withhold();
          // A PUBACK for a previous connection is not sent: the broker redelivers (DUP) and dedup answers.
          if (generation === this.generation && client.connected) send(packet, () => {});
        });
    };
  }

  /** Subscribe (QoS 1; under MQTT 5 without retained copies: Retain Handling 2). */
  private async subscribe(filters: readonly string[]): Promise<void> {
    const client = this.client;
    if (!client || filters.length === 0) return;
    try {
      const denied = await subscribeQos1(client, filters, this.opts.protocolVersion === 5);
      for (const filter of denied)
        this.log.error({ filter }, "broker refused the gateway's subscription (check its ACL)");
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, "subscribe failed; retried on the next connection");
    }
  }

  /** Unsubscribe what the session still holds from before (`subscriptionsFile`), then record the filters. */
  private async dropStale(): Promise<void> {
    const file = this.opts.subscriptionsFile;
    if (!file) return;
    let before: string[] = [];
    try {
      const parsed: unknown = JSON.parse(readFileSync(file, "utf8"));
      if (Array.isArray(parsed)) before = parsed.filter((f): f is string => typeof f === "string");
    } catch {
      // first start, or an unreadable file: nothing known to drop
    }
    const stale = before.filter((f) => !this.filters.includes(f));
    if (stale.length > 0 && this.client?.connected) {
      try {
        await this.client.unsubscribeAsync(stale);
        this.log.info({ filters: stale }, "unsubscribed filters no agent type listens on any more");
      } catch {
        return; // tried again at the next connection
      }
    }
    this.remember();
  }

  /**
   * End the sessions of shards the layout no longer has: a clean-session CONNECT with each client id
   * (MQTT-3.1.2-6 discards the session; under MQTT 5 a session expiry of 0 ends it at the DISCONNECT).
   * Each still queued every message of the fleet, which the remaining shards' sessions hold too.
   */
  private async endSessions(): Promise<void> {
    const v5 = this.opts.protocolVersion === 5;
    const connect = await mqttConnect();
    for (const clientId of [...this.toDrop]) {
      if (this.lifecycle === "closed") return;
      const c = connect(this.opts.url, {
        ...this.common,
        clientId,
        clean: true,
        reconnectPeriod: 0,
        ...(v5 ? { properties: { sessionExpiryInterval: 0 } } : {}),
      });
      const ok = await Promise.race([
        new Promise<boolean>((resolve) => c.once("connect", () => resolve(true))),
        new Promise<boolean>((resolve) => c.once("error", () => resolve(false))),
        Bun.sleep(this.opts.connectTimeoutMs ?? 10_000).then(() => false),
      ]);
      await new Promise<void>((resolve) => c.end(!ok, {}, () => resolve()));
      if (!ok) return; // tried again at the next connection
      this.toDrop = this.toDrop.filter((id) => id !== clientId);
      this.log.info({ clientId }, "ended the broker session of a shard the layout no longer has");
    }
    this.dropsPending = false;
    this.opts.onSessionsDropped?.();
  }

  private remember(): void {
    const file = this.opts.subscriptionsFile;
    if (!file) return;
    try {
      // Whole or not at all: a torn file would make the next start forget which filters to drop.
      writeFileDurably(file, `${JSON.stringify(this.filters)}\n`, 0o600);
    } catch (err) {
      this.log.warn({ err, file }, "could not record the broker subscriptions");
    }
  }

  /** Follow the spec's filters: subscribe to new ones, drop removed ones (applies on hot reload). */
  async setIntakeFilters(filters: readonly string[]): Promise<void> {
    const next = [...new Set(filters)];
    const added = next.filter((f) => !this.filters.includes(f));
    const removed = this.filters.filter((f) => !next.includes(f));
    this.filters = next;
    if (!this.client?.connected) return;
    await this.subscribe(added);
    if (removed.length > 0) await this.client.unsubscribeAsync(removed).catch(() => undefined);
    this.remember();
  }

  /**
   * Intake for one delivery: true to acknowledge it (recorded, or refused for good), false to
   * withhold the PUBACK. QoS 0 is best effort: always true.
   */
  private async deliver(packet: IPublishPacket): Promise<boolean> {
    const { topic } = packet;
    const payload = typeof packet.payload === "string" ? Buffer.from(packet.payload) : packet.payload;
    // Deliveries may come before `start()` resolves (a queued session): intake waits for the gateway.
    if (this.lifecycle === "draining" || this.lifecycle === "closed") return packet.qos === 0;
    // MQTT-3.3.1-9: retain = 1 on delivery marks a stored copy sent because we subscribed; it was a
    // stimulus when it was published live (while our session existed), not again now.
    if (packet.retain) {
      this.staleRetained++;
      return true;
    }
    // MQTT 5: our own outputs (they come from the `-out` connection, so No Local cannot skip them).
    if (packet.properties?.userProperties?.[ORIGIN] === this.opts.clientId) return true;
    const msg: PublishedMessage = {
      topic,
      payload: new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength),
      qos: packet.qos,
      retain: false,
      dup: packet.dup,
      ...(typeof packet.properties?.messageExpiryInterval === "number"
        ? { expirySeconds: packet.properties.messageExpiryInterval }
        : {}),
      ...(packet.qos > 0 && typeof packet.messageId === "number" ? { messageId: packet.messageId } : {}),
      ...hopsOf(packet.properties?.userProperties?.hops),
    };
    let verdict: IntakeVerdict;
    try {
      verdict = await this.opts.intake(msg, { id: `broker:${this.opts.clientId}`, username: null });
    } catch (err) {
      this.log.error({ err, topic }, "intake failed; PUBACK withheld");
      verdict = { ok: false, reason: "intake failed" };
    }
    if (verdict.ok) {
      this.messagesIn++;
      return true;
    }
    this.refused++;
    if (verdict.permanent || packet.qos === 0) {
      this.dropped++;
      this.logRefusal(topic, verdict.reason);
      return true;
    }
    // A full queue refuses every redelivery again until it drains: one line per 10 s at most, with the count.
    const refused = logDue(this.withheldLog);
    if (refused !== null)
      this.log.warn(
        { topic, reason: verdict.reason, refused },
        "publish not recorded now; PUBACK withheld, redelivered later",
      );
    return false;
  }

  /** Permanent refusals are acked and dropped; one log line per 10 s at most, with the count. */
  private logRefusal(topic: string, reason: string): void {
    const refused = logDue(this.droppedLog);
    if (refused !== null) this.log.warn({ topic, reason, refused }, "publish refused for good: acknowledged, dropped");
  }

  /** An output the broker refused for good is dropped; one log line per 10 s at most, with the count. */
  private logOutputRefusal(topic: string, reason: string): void {
    const refused = logDue(this.outputsRefusedLog);
    if (refused !== null)
      this.log.warn(
        { topic, reason, refused },
        "the broker refused a gateway publish for good (its ACL?); dropped, not retried",
      );
  }

  /**
   * A PUBACK held back: the broker resends an unacked message only on a new connection
   * (MQTT-4.4.0-1), so after a backoff the gateway drops the connection and reconnects.
   */
  private withhold(): void {
    this.withheld++;
    if (this.retryTimer || this.lifecycle !== "running") return;
    const delay = this.retryDelay;
    this.retryDelay = Math.min(this.retryDelay * 2, 30_000);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.lifecycle !== "running") return;
      this.log.info({ after_ms: delay }, "reconnecting so the broker redelivers unacknowledged messages");
      this.closingOurselves = true; // not a take-over
      this.client?.stream?.destroy();
    }, delay);
  }

  publish(
    topic: string,
    payload: Uint8Array | string,
    opts: { qos?: 0 | 1; retain?: boolean; meta?: PublishMeta } = {},
  ): Promise<void> {
    const client = this.out;
    if (this.lifecycle === "closed" || !client) return Promise.reject(new Error("broker client is closed"));
    // The outbox keeps what could not go out; mqtt.js' own queue would hold it only in memory.
    if (!client.connected) return Promise.reject(new Error(`not connected to ${redact(this.opts.url)}`));
    const meta = opts.meta;
    const properties =
      this.opts.protocolVersion === 5
        ? {
            userProperties: {
              [ORIGIN]: this.opts.clientId,
              ...(meta ? { episode: meta.episode, seq: String(meta.seq), agent: meta.agent } : {}),
              ...(meta?.hops === undefined ? {} : { hops: String(meta.hops) }),
            },
          }
        : undefined;
    const body = typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload);
    // MQTT 5: a packet over the broker's Maximum Packet Size (its CONNACK) would be answered by a
    // DISCONNECT (0x95), every time it was sent again: settled here, as a refusal for good.
    const max = this.outMaxPacket;
    if (max !== null) {
      const size = publishPacketSize(topic, body.length, opts.qos ?? 0, properties?.userProperties);
      if (size > max) {
        this.logOutputRefusal(topic, `${size} bytes is larger than the broker's maximum packet size (${max})`);
        return Promise.resolve();
      }
    }
    const ms = this.opts.publishTimeoutMs ?? 10_000;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no PUBACK within ${ms} ms`)), ms);
      client.publish(
        topic,
        body,
        { qos: opts.qos ?? 0, retain: opts.retain ?? false, ...(properties ? { properties } : {}) },
        (err) => {
          clearTimeout(timer);
          // Sent again, the same message gets the same answer: it is settled (retried, it would hold
          // back every output behind it in the outbox, forever).
          if (err && refusedForGood(err)) {
            this.logOutputRefusal(topic, err.message);
            return resolve();
          }
          if (err) return reject(err);
          this.messagesOut++;
          resolve();
        },
      );
    });
  }

  stats(): BrokerStats {
    return {
      clients: (this.client?.connected ? 1 : 0) + (this.out?.connected ? 1 : 0),
      messagesIn: this.messagesIn,
      messagesOut: this.messagesOut,
      refused: this.refused,
      dropped: this.dropped,
      oversized: 0,
      invalid: 0,
      connections: (this.client?.connected ? 1 : 0) + (this.out?.connected ? 1 : 0),
      connectionsRefused: 0,
      loginsRefused: 0,
      loginsBusy: 0,
      offlineDropped: 0,
      external: {
        url: redact(this.opts.url),
        connected: (this.client?.connected ?? false) && (this.out?.connected ?? false),
        disconnectedSince: this.downSince,
        // Until a connection outlasts TAKEOVER_MS again.
        takenOver:
          this.takenOver >= TAKEOVERS && (this.downSince !== null || Date.now() - this.connectedAt < TAKEOVER_MS),
        reconnects: this.reconnects,
        withheld: this.withheld,
        staleRetained: this.staleRetained,
      },
    };
  }

  /** Device auth and ACLs are the external broker's job (`fleet device export --mosquitto`). */
  async setAuth(): Promise<AuthChange> {
    return { disconnected: 0 };
  }

  setMaxConnections(): void {}

  setMaxKeepalive(): void {}

  setConnectionMessages(): void {}

  /** The external broker's listeners are its own (Mosquitto: crlfile). */
  async setTlsCrl(): Promise<void> {}

  /** From now on nothing is acknowledged: what arrives stays queued in the broker for the next run. */
  async stopIntake(): Promise<void> {
    if (this.lifecycle === "running" || this.lifecycle === "starting") this.lifecycle = "draining";
  }

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    await this.starting?.catch(() => {});
    this.lifecycle = "closed";
    if (this.retryTimer) clearTimeout(this.retryTimer);
    for (const c of [this.client, this.out])
      if (c) await new Promise<void>((resolve) => c.end(true, {}, () => resolve()));
    this.log.info("broker client closed");
  }
}

/** A CONNACK refusal (bad credentials, not authorized, ...): a configuration error, not a network one. */
function isRefusal(err: Error): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "number" && code > 0;
}

/**
 * MQTT 5 PUBACK reason codes that answer a message the same way each time it is sent: not authorized
 * (0x87), topic name invalid (0x90), payload format invalid (0x99). Others (quota exceeded, unspecified)
 * may pass later and are retried.
 */
const REFUSED_FOR_GOOD = new Set([0x87, 0x90, 0x99]);

function refusedForGood(err: Error): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "number" && REFUSED_FOR_GOOD.has(code);
}

/** The broker's TLS certificate does not verify against the CA: as permanent as a refused CONNECT. */
function isTlsRefusal(err: Error): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" && /CERT|UNABLE_TO_(VERIFY|GET_ISSUER)|HOSTNAME_MISMATCH/.test(code);
}

/**
 * Subscribe `client` to `filters` with QoS 1 (under MQTT 5 without retained copies: Retain Handling 2),
 * as a gateway's session is; resolves with the filters the broker refused in its SUBACK (reason code
 * 0x80 or above: an ACL, most often). mqtt.js fails the whole call on such a code; the SUBACK it carries
 * says which. Rejects when no SUBACK came (the connection closed).
 */
async function subscribeQos1(client: MqttClient, filters: readonly string[], v5: boolean): Promise<string[]> {
  if (filters.length === 0) return [];
  const map = Object.fromEntries(
    filters.map((f) => [f, v5 ? { qos: 1 as const, rh: 2 as const } : { qos: 1 as const }]),
  );
  try {
    await client.subscribeAsync(map);
    return [];
  } catch (err) {
    // One SUBACK for the lot (no subscribeBatchSize is set): its codes in the order of the filters.
    const granted = (err as { packet?: { granted?: unknown } }).packet?.granted;
    if (!Array.isArray(granted) || granted.length !== filters.length) throw err;
    return filters.filter((_, i) => typeof granted[i] === "number" && granted[i] >= 0x80);
  }
}

/** How every connection to the broker logs in: protocol, login, CA, the wait for a CONNACK. */
function loginOptions(o: SessionBrokerOptions): IClientOptions {
  return {
    protocolVersion: o.protocolVersion,
    connectTimeout: o.connectTimeoutMs ?? 10_000,
    ...(o.username === null ? {} : { username: o.username }),
    ...(o.password === null ? {} : { password: o.password }),
    ...(o.ca === null ? {} : { ca: o.ca }),
  };
}

/**
 * A gateway's persistent session as `clientId` (clean = false; under MQTT 5 one that never expires). Its
 * subscriptions are made by the caller after each CONNACK, not replayed by mqtt.js.
 */
function persistentSession(clientId: string, protocolVersion: 4 | 5): IClientOptions {
  return {
    clientId,
    clean: false,
    resubscribe: false,
    ...(protocolVersion === 5 ? { properties: { sessionExpiryInterval: NEVER } } : {}),
  };
}

/** How `prepareSessions` reaches the broker: as the gateway does (`ExternalBrokerOptions`). */
export type SessionBrokerOptions = Pick<
  ExternalBrokerOptions,
  "url" | "username" | "password" | "ca" | "protocolVersion" | "connectTimeoutMs"
>;

/** One session `prepareSessions` made (or found). */
export interface PreparedSession {
  readonly clientId: string;
  /** False when the broker had the session already (its subscriptions are renewed). */
  readonly created: boolean;
}

/** A broker that refused `prepareSessions` its CONNECT, a subscription, or could not be reached. */
export class SessionPrepareError extends OperatorError {
  override readonly name = "SessionPrepareError";
}

/**
 * Give each of `clientIds` a persistent session on the broker subscribed (QoS 1) to `filters`, as
 * a gateway with that client id would have it, then disconnect: the broker queues the fleet's
 * messages for it from now on, until that gateway first connects and reads them (docs/shards.md).
 * A session that exists already keeps its queue; its subscriptions are made again. Throws
 * SessionPrepareError, naming the client id, at the first one that fails; those before it stay made.
 */
export async function prepareSessions(
  o: SessionBrokerOptions,
  clientIds: readonly string[],
  filters: readonly string[],
): Promise<PreparedSession[]> {
  const v5 = o.protocolVersion === 5;
  const done: PreparedSession[] = [];
  const connect = await mqttConnect();
  for (const clientId of clientIds) {
    const c = connect(o.url, {
      ...loginOptions(o),
      reconnectPeriod: 0,
      ...persistentSession(clientId, o.protocolVersion),
    });
    const fail = (why: string): never => {
      throw new SessionPrepareError(`broker ${redact(o.url)}, session ${clientId}: ${why}`);
    };
    try {
      const connack = await connackOf(c, o, fail);
      const denied = await subscribeQos1(c, filters, v5).catch((err: Error) =>
        fail(`subscribing to the fleet's filters: ${err.message}`),
      );
      if (denied.length > 0) fail(`the broker refused the subscription to ${denied.join(", ")} (check its ACL)`);
      done.push({ clientId, created: !connack.sessionPresent });
    } finally {
      await new Promise<void>((resolve) => c.end(false, {}, () => resolve()));
    }
  }
  return done;
}

/**
 * The retained messages the broker holds on `filters` now, as a clean session of its own reads them
 * (a client id the broker makes up): what arrives between the SUBACK and `settleMs` after the last
 * message. A filter the broker refuses (ACL: in its SUBACK, or by closing the connection) gives
 * nothing. Throws SessionPrepareError when the broker cannot be reached or refuses the CONNECT.
 */
export async function readRetained(
  o: SessionBrokerOptions,
  filters: readonly string[],
  settleMs = 300,
): Promise<{ topic: string; payload: Buffer }[]> {
  const connect = await mqttConnect();
  const c = connect(o.url, { ...loginOptions(o), reconnectPeriod: 0, clean: true, clientId: "" });
  const got: { topic: string; payload: Buffer }[] = [];
  let last = performance.now();
  c.on("message", (topic, payload, packet) => {
    if (!packet.retain) return;
    got.push({ topic, payload });
    last = performance.now();
  });
  const fail = (why: string): never => {
    throw new SessionPrepareError(`broker ${redact(o.url)}, reading retained ${filters.join(", ")}: ${why}`);
  };
  try {
    await connackOf(c, o, fail);
    // A broker that answers a refused filter by closing the connection (as MQTT 3.1.1 lets it) hides it too.
    if ((await subscribeQos1(c, filters, o.protocolVersion === 5).catch(() => null)) === null) return got;
    last = performance.now();
    while (performance.now() - last < settleMs) await Bun.sleep(Math.max(10, settleMs - (performance.now() - last)));
    return got;
  } finally {
    await new Promise<void>((resolve) => c.end(false, {}, () => resolve()));
  }
}

/**
 * The CONNACK of a one-off connection `c` (reconnectPeriod 0); `fail` says why there is none: a refusal, an
 * error, the timeout.
 */
async function connackOf(
  c: MqttClient,
  o: SessionBrokerOptions,
  fail: (why: string) => never,
): Promise<IConnackPacket> {
  const first = await Promise.race([
    new Promise<IConnackPacket>((resolve) => c.once("connect", resolve)),
    new Promise<Error>((resolve) => c.once("error", resolve)),
    Bun.sleep(o.connectTimeoutMs ?? 10_000).then(() => "timeout" as const),
  ]);
  if (first === "timeout") return fail("no CONNACK within the connect timeout");
  if (first instanceof Error)
    return fail(isRefusal(first) ? `the broker refused the CONNECT: ${first.message}` : first.message);
  return first;
}

/** The URL without a password, for logs. */
function redact(url: string): string {
  const u = new URL(url);
  u.password = "";
  u.username = "";
  return u.toString();
}

/** Bytes of the remaining length's variable-length encoding (MQTT 2.2.3 / 1.5.5). */
function varintBytes(n: number): number {
  return n < 128 ? 1 : n < 16_384 ? 2 : n < 2_097_152 ? 3 : 4;
}

/**
 * The size of an MQTT 5 PUBLISH packet on the wire, as the broker measures it against its Maximum
 * Packet Size: fixed header, topic, packet id (QoS > 0), properties (user properties only) and payload.
 */
export function publishPacketSize(
  topic: string,
  payloadBytes: number,
  qos: 0 | 1,
  userProperties: Record<string, string> | undefined,
): number {
  let props = 0;
  for (const [k, v] of Object.entries(userProperties ?? {}))
    props += 1 + 2 + Buffer.byteLength(k) + 2 + Buffer.byteLength(v);
  const remaining = 2 + Buffer.byteLength(topic) + (qos > 0 ? 2 : 0) + varintBytes(props) + props + payloadBytes;
  return 1 + varintBytes(remaining) + remaining;
}

/**
 * A forwarded send's `hops` user property: a whole number of at most 6 digits, else nothing (its
 * count starts here).
 */
export function hopsOf(v: string | string[] | undefined): { hops?: number } {
  const text = Array.isArray(v) ? v[0] : v;
  return text !== undefined && /^\d{1,6}$/.test(text) ? { hops: Number(text) } : {};
}
