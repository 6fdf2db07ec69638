/**
 * The embedded broker: aedes (MQTT 3.1/3.1.1; persistence in libSQL or in memory) behind the `Broker`
 * interface, listening on guarded TCP and optionally WebSocket connections.
 */
import { Aedes, type Client, type PublishPacket } from "aedes";
import type { Duplex } from "node:stream";
import type { Logger } from "pino";
import { type GuardViolation, parseInSlices, type SliceableClient, type Traffic } from "./connection.ts";
import { GrantedSubscriptions } from "./granted.ts";
import { createHooks, type HookState } from "./hooks.ts";
import { type SysSnapshot, SysTree } from "./sys.ts";
import { persistenceFor, type BrokerPersistence } from "./persistence/index.ts";
import { TcpListener, type ListenerHooks } from "./tcp.ts";
import { checkTopicName } from "./topics.ts";
import { PublishRefused } from "./types.ts";
import type { AuthChange, Broker, BrokerAuth, BrokerOptions, BrokerStats, ClientInfo } from "./types.ts";
import { WsListener } from "./ws.ts";

/**
 * How long a write to a client may wait for its socket to drain before the client is dropped
 * (aedes' default is 60 s). A subscriber that stops reading would otherwise hold the delivery of
 * every message it matches, and with it the publisher whose messages fill its socket.
 */
export const DRAIN_TIMEOUT_MS = 5000;

/** Lifecycle of an embedded broker. */
type Lifecycle = "new" | "starting" | "running" | "draining" | "closed";

/** The embedded broker: a `Broker` that also holds its clients' sessions. */
export interface EmbeddedBroker extends Broker {
  /**
   * End now the clean = false sessions whose client has been away longer than `sessionExpiryMs` at `now`
   * (a timer does it too); resolves with how many ended.
   */
  expireSessions(now?: number): Promise<number>;
}

/** Build an embedded aedes broker; nothing listens until `start()`. */
export function createEmbeddedBroker(opts: BrokerOptions): EmbeddedBroker {
  return new AedesBroker(opts);
}

class AedesBroker implements EmbeddedBroker {
  private lifecycle: Lifecycle = "new";
  private readonly log: Logger;
  private readonly state: HookState;
  private oversized = 0;
  private invalid = 0;
  /** Open client connections and the limit past which new ones are refused. */
  private open = 0;
  /** Bytes received from and sent to clients since start, every listener ($SYS/broker/bytes/...). */
  private readonly traffic: Traffic = { in: 0, out: 0 };
  private maxConnections: number;
  private connectionsRefused = 0;
  private lastRefusalLog = 0;
  /** CONNECTs of another protocol level (MQTT 5) refused, and when that was last logged. */
  private protocolRefused = 0;
  private lastProtocolLog = 0;
  private readonly aedes: Aedes;
  private readonly persistence: BrokerPersistence;
  private readonly tcp: TcpListener;
  private readonly ws: WsListener | null;
  private readonly mqtts: TcpListener | null;
  private readonly wss: WsListener | null;
  private boundTlsPort: number | null = null;
  private boundWssPort: number | null = null;
  private boundPort: number;
  private boundWsPort: number | null;
  private starting: Promise<void> | null = null;
  private closing: Promise<void> | null = null;
  /** `sessionExpiryMs`: the sweep's timer, the sweep under way, and the sessions it ended. */
  private sweepTimer: ReturnType<typeof setInterval> | null = null;
  private sweeping: Promise<number> | null = null;
  private sessionsExpired = 0;
  /** The `$SYS/broker/` tree (`sysIntervalMs`), when on; the most clients connected at once, and since when. */
  private readonly sys: SysTree | null;
  private maxClients = 0;
  /** Since the start: CONNECTs accepted, and transport connections opened ($SYS/broker/load/...). */
  private connects = 0;
  private sockets = 0;
  /** Whether connects and disconnects are logged (`connectionMessages`). */
  private connectionMessages: boolean;
  private startedAt = Date.now();

  constructor(private readonly opts: BrokerOptions) {
    if (!Number.isInteger(opts.maxPacketBytes) || opts.maxPacketBytes < 2) {
      throw new RangeError(`maxPacketBytes must be an integer >= 2, got ${opts.maxPacketBytes}`);
    }
    this.log = opts.logger.child({ component: "broker" });
    this.maxConnections = opts.maxConnections ?? 0;
    this.persistence = persistenceFor(opts.persistence, this.log);
    this.state = {
      intakeOpen: true,
      messagesIn: 0,
      messagesOut: 0,
      refused: 0,
      dropped: 0,
      droppedLog: { at: 0, since: 0 },
      badLoginLog: { at: 0, since: 0 },
      busyLoginLog: { at: 0, since: 0 },
      loginsRefused: 0,
      loginsBusy: 0,
      refusedLog: { at: 0, since: 0 },
      intakeFailedLog: { at: 0, since: 0 },
      auth: authOf(opts),
      refuseAtConnect: new WeakMap(),
      hosts: new WeakMap(),
      identities: new WeakMap(),
      usernames: new WeakMap(),
      maxKeepalive: opts.maxKeepaliveSeconds ?? 0,
      keepalives: new WeakMap(),
      publishFirst: null,
      retained: this.persistence.retained,
      granted: new GrantedSubscriptions(),
    };
    this.state.granted.storeOnlyGranted(this.persistence.aedes);
    this.aedes = new Aedes({
      ...createHooks(opts, this.state, this.log),
      drainTimeout: DRAIN_TIMEOUT_MS,
      persistence: this.persistence.aedes,
    });
    if (opts.persistence?.kind === "libsql") this.state.publishFirst = publishBeforeAck(this.aedes);
    willsOnTakeover(this.aedes);
    this.connectionMessages = opts.connectionMessages ?? false;
    this.aedes.on("client", (client: Client) => {
      this.connects++;
      this.maxClients = Math.max(this.maxClients, this.aedes.connectedClients ?? 0);
      if (!this.connectionMessages) return;
      this.log.info(
        {
          client: client.id,
          username: this.state.usernames.get(client) ?? null,
          host: this.state.hosts.get(client),
          keepalive: this.state.keepalives.get(client),
          clean: client.clean,
          ...(this.state.identities.has(client) ? { certificate: true } : {}),
        },
        "client connected",
      );
    });
    const sysMs = opts.sysIntervalMs ?? 0;
    this.sys =
      sysMs > 0
        ? new SysTree(
            sysMs,
            () => this.sysSnapshot(),
            (t, p) => this.publishSys(t, p),
          )
        : null;
    this.aedes.on("clientDisconnect", (client: Client) => {
      if (!client.clean) this.persistence.sessions.left(client.id, Date.now());
      if (this.connectionMessages)
        this.log.info({ client: client.id, username: this.state.usernames.get(client) ?? null }, "client disconnected");
    });
    const stalled = new WeakSet<Client>();
    this.aedes.on("clientError", (client: Client, err: Error) => {
      if (err.message === "drain timeout") {
        // Every write that was waiting fails with it: say it once per client.
        if (stalled.has(client)) return;
        stalled.add(client);
        this.log.warn({ client: client.id, drainTimeoutMs: DRAIN_TIMEOUT_MS }, "subscriber stopped reading; closed");
        return;
      }
      this.log.debug({ client: client.id, err: err.message }, "client dropped");
    });
    this.aedes.on("connectionError", (_client: Client, err: Error) => {
      if (err.message !== "unacceptable protocol version")
        return this.log.debug({ err: err.message }, "connection dropped before CONNECT completed");
      // aedes 1.2.0 answers CONNACK 0x01 (MQTT-3.1.2-2) and closes; say why, once per 10 s at most.
      this.protocolRefused++;
      const now = Date.now();
      if (now - this.lastProtocolLog < 10_000) return;
      this.lastProtocolLog = now;
      this.log.info(
        { refused: this.protocolRefused },
        "MQTT 5 CONNECT refused: the embedded broker speaks MQTT 3.1.1; serve MQTT 5 devices with [broker] url",
      );
    });
    const hooks: ListenerHooks = {
      maxPacketBytes: opts.maxPacketBytes,
      traffic: this.traffic,
      accept: (conn: Duplex, remote: string, host: string, identity?: string | null) =>
        this.accept(conn, remote, host, identity),
      violation: (v: GuardViolation, remote: string) => this.onViolation(v, remote),
    };
    this.tcp = new TcpListener(hooks);
    this.ws = opts.wsPort == null ? null : new WsListener(hooks);
    const tls = opts.tls ?? null;
    this.mqtts = tls?.port == null ? null : new TcpListener(hooks, { ...tls, identity: tls.useIdentityAsUsername });
    this.wss = tls?.wssPort == null ? null : new WsListener(hooks);
    this.boundPort = opts.port;
    this.boundWsPort = opts.wsPort ?? null;
  }

  get port(): number {
    return this.boundPort;
  }

  get wsPort(): number | null {
    return this.boundWsPort;
  }

  get tlsPort(): number | null {
    return this.boundTlsPort;
  }

  get wssPort(): number | null {
    return this.boundWssPort;
  }

  start(): Promise<void> {
    this.starting ??= this.doStart();
    return this.starting;
  }

  private async doStart(): Promise<void> {
    if (this.lifecycle !== "new") throw new Error(`cannot start a broker that is ${this.lifecycle}`);
    this.lifecycle = "starting";
    await this.aedes.listen();
    // Before the listeners open: the first client to subscribe finds the whole tree retained.
    this.startedAt = Date.now();
    this.sys?.start();
    this.boundPort = await this.tcp.listen(this.opts.host, this.opts.port);
    if (this.ws && this.opts.wsPort != null) {
      this.boundWsPort = await this.ws.listen(this.opts.host, this.opts.wsPort);
    }
    const tls = this.opts.tls;
    if (this.mqtts && tls?.port != null) this.boundTlsPort = await this.mqtts.listen(this.opts.host, tls.port);
    if (this.wss && tls?.wssPort != null) this.boundWssPort = await this.wss.listen(this.opts.host, tls.wssPort, tls);
    this.lifecycle = "running";
    const expiryMs = this.opts.sessionExpiryMs ?? 0;
    if (expiryMs > 0) {
      this.sweepTimer = setInterval(() => void this.expireSessions(), sessionSweepMs(expiryMs));
      this.sweepTimer.unref();
    }
    this.log.info(
      {
        host: this.opts.host,
        port: this.boundPort,
        wsPort: this.boundWsPort,
        tlsPort: this.boundTlsPort,
        wssPort: this.boundWssPort,
      },
      "broker listening",
    );
  }

  publish(topic: string, payload: Uint8Array | string, opts: { qos?: 0 | 1; retain?: boolean } = {}): Promise<void> {
    if (this.lifecycle === "closed") return Promise.reject(new Error("broker is closed"));
    if (this.lifecycle === "new" || this.lifecycle === "starting") {
      return Promise.reject(new Error("broker is not started"));
    }
    // aedes would refuse it too (or, past its level limit, throw in its topic matchers).
    const name = checkTopicName(topic);
    if (!name.ok) return Promise.reject(new PublishRefused(topic, name.reason));
    const body = typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload);
    return new Promise((resolve, reject) => {
      this.aedes.publish(
        { cmd: "publish", topic, payload: body, qos: opts.qos ?? 0, retain: opts.retain ?? false, dup: false },
        (err) => (err ? reject(err) : resolve()),
      );
    });
  }

  /** A call while a sweep runs joins it; 0 without an expiry. */
  expireSessions(now = Date.now()): Promise<number> {
    const maxAgeMs = this.opts.sessionExpiryMs ?? 0;
    if (maxAgeMs <= 0 || this.lifecycle !== "running") return Promise.resolve(0);
    this.sweeping ??= this.sweep(now, maxAgeMs).finally(() => (this.sweeping = null));
    return this.sweeping;
  }

  private async sweep(now: number, maxAgeMs: number): Promise<number> {
    const clients = (this.aedes as unknown as { clients: Record<string, Client | undefined> }).clients;
    try {
      const ended = await this.persistence.sessions.expire(now, maxAgeMs, (id) => clients[id] !== undefined);
      if (ended.length === 0) return 0;
      this.sessionsExpired += ended.length;
      const shown = ended.slice(0, 20);
      this.log.info(
        { expired: ended.length, clients: shown, more: ended.length - shown.length, maxAgeMs },
        "sessions expired: their clients stayed away longer than session_expiry_days",
      );
      return ended.length;
    } catch (err) {
      this.log.warn({ err }, "session expiry failed; the next sweep tries again");
      return 0;
    }
  }

  subscriptionCount(): number {
    // aedes' Client type leaves out `subscriptions` (by filter), which its handlers keep on every client.
    type Held = Client & { readonly subscriptions: Record<string, unknown> };
    // A clean session's subscriptions live in its client only; a kept session's are in the persistence too.
    let clean = 0;
    for (const c of Object.values((this.aedes as unknown as { clients: Record<string, Held> }).clients))
      if (c.clean) clean += Object.keys(c.subscriptions).length;
    return this.persistence.subscriptions() + clean;
  }

  /** What `$SYS/broker/` shows now (./sys.ts). */
  private sysSnapshot(): SysSnapshot {
    const clients = Object.values((this.aedes as unknown as { clients: Record<string, Client> }).clients);
    const persistentOnline = clients.filter((c) => !c.clean).length;
    const stats = this.stats();
    return {
      version: this.opts.version ?? "agent-fleets",
      uptimeSeconds: (Date.now() - this.startedAt) / 1000,
      connected: stats.clients,
      maximum: this.maxClients,
      disconnected: Math.max(0, (stats.sessions ?? 0) - persistentOnline),
      received: stats.messagesIn,
      sent: stats.messagesOut,
      subscriptions: this.subscriptionCount(),
      retained: stats.retainedMessages ?? 0,
      connects: this.connects,
      sockets: this.sockets,
      bytesReceived: stats.bytesIn ?? 0,
      bytesSent: stats.bytesOut ?? 0,
      dropped: stats.dropped + stats.offlineDropped,
      sessionsExpired: stats.sessionsExpired ?? 0,
    };
  }

  /** A retained QoS 0 `$SYS/broker/` message; one that fails (the persistence refused it) is logged and left. */
  private publishSys(topic: string, payload: string): void {
    const packet = { cmd: "publish", topic, payload: Buffer.from(payload), qos: 0, retain: true, dup: false } as const;
    this.aedes.publish(packet as PublishPacket, (err) => {
      if (err) this.log.warn({ err, topic }, "$SYS message not published");
    });
  }

  /** aedes hands every publish to the hooks; nothing to subscribe. */
  async setIntakeFilters(): Promise<void> {}

  stats(): BrokerStats {
    const persisted = this.persistence.stats();
    return {
      clients: this.aedes.connectedClients ?? 0,
      messagesIn: this.state.messagesIn,
      messagesOut: this.state.messagesOut,
      refused: this.state.refused,
      dropped: this.state.dropped,
      oversized: this.oversized,
      invalid: this.invalid,
      connections: this.open,
      bytesIn: this.traffic.in,
      bytesOut: this.traffic.out,
      connectionsRefused: this.connectionsRefused,
      loginsRefused: this.state.loginsRefused,
      loginsBusy: this.state.loginsBusy,
      offlineDropped: persisted.offlineDropped,
      offlineQueued: persisted.queued,
      offlineQueuedBytes: persisted.queuedBytes,
      retainedMessages: this.persistence.retainedCount(),
      sessions: this.persistence.sessions.count(),
      sessionsExpired: this.sessionsExpired,
    };
  }

  setMaxConnections(max: number): void {
    this.maxConnections = max;
  }

  setMaxKeepalive(seconds: number): void {
    this.state.maxKeepalive = seconds;
  }

  setConnectionMessages(on: boolean): void {
    this.connectionMessages = on;
  }

  async setTlsCrl(crl: string | null): Promise<void> {
    // The mqtts listener first: it checks the PEM (a new secure context), so a bad one changes neither.
    this.mqtts?.setCrl(crl);
    await this.wss?.setCrl(crl);
  }

  async setAuth(auth: BrokerAuth): Promise<AuthChange> {
    this.state.auth = authOf(auth);
    const clients = Object.values((this.aedes as unknown as { clients: Record<string, Client> }).clients);
    let disconnected = 0;
    for (const client of clients) {
      if (client.closed) continue;
      const info: ClientInfo = {
        id: client.id,
        username: this.state.usernames.get(client) ?? null,
        certified: this.state.identities.has(client),
      };
      const why = await this.sessionProblem(client, info, auth).catch((err: unknown) => `auth check failed: ${err}`);
      if (why === null) continue;
      disconnected++;
      this.log.info({ client: info.id, username: info.username, reason: why }, "session closed: auth changed");
      client.close();
    }
    return { disconnected };
  }

  /** Why a connected client no longer passes `auth`, or null when it may stay. */
  private async sessionProblem(client: Client, info: ClientInfo, auth: BrokerAuth): Promise<string | null> {
    if (info.username === null) {
      if (!auth.allowAnonymous) return "anonymous clients are no longer allowed";
      if (auth.authenticate && !(await auth.authenticate(info, null))) return "anonymous client no longer authorized";
    } else if (!auth.authenticate) {
      if (!auth.allowAnonymous) return "no device registry and anonymous clients not allowed";
    } else if (!auth.sessionValid?.(info)) {
      return "credentials no longer valid";
    }
    const acl = auth.authorizeSubscribeTopic;
    if (acl) {
      const subscriptions = Object.keys(
        (client as unknown as { subscriptions: Record<string, unknown> }).subscriptions,
      );
      const denied = subscriptions.find((f) => !acl.call(auth, info, f));
      if (denied !== undefined) return `subscription ${JSON.stringify(denied)} no longer granted`;
    }
    return null;
  }

  /** A new transport connection: counted, refused past `maxConnections`, else handed to aedes. */
  private accept(conn: Duplex, remote: string, host: string, identity?: string | null): void {
    if (this.lifecycle === "closed") {
      conn.destroy();
      return;
    }
    const max = this.maxConnections;
    if (max > 0 && this.open >= max) {
      this.connectionsRefused++;
      // One line per 10 s at most: a reconnect storm must not flood the log.
      const now = Date.now();
      if (now - this.lastRefusalLog >= 10_000) {
        this.lastRefusalLog = now;
        this.log.warn(
          { remote, max, refused: this.connectionsRefused },
          "max_connections reached; new connections refused (CONNACK 3)",
        );
      }
      // Past twice the limit, do not even wait for the CONNECT: a flood must not pin memory.
      if (this.open >= 2 * max + 16) {
        conn.destroy();
        return;
      }
    }
    this.open++;
    this.sockets++;
    conn.once("close", () => this.open--);
    const client = this.aedes.handle(conn) as Client;
    this.state.hosts.set(client, host);
    if (identity !== undefined) this.state.identities.set(client, identity);
    parseInSlices(client as unknown as SliceableClient, () => conn.destroyed);
    if (max > 0 && this.open > max) {
      this.state.refuseAtConnect.set(client, { code: 3, reason: `server busy: max_connections (${max}) reached` });
    }
  }

  async stopIntake(): Promise<void> {
    if (!this.state.intakeOpen) return;
    this.state.intakeOpen = false;
    if (this.lifecycle === "running") this.lifecycle = "draining";
    await Promise.all([
      this.tcp.stopAccepting(),
      this.ws?.stopAccepting(),
      this.mqtts?.stopAccepting(),
      this.wss?.stopAccepting(),
    ]);
    this.log.info("broker intake stopped");
  }

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    // A start in progress finishes first, so its listeners are closed below.
    await this.starting?.catch(() => {});
    await this.stopIntake();
    this.lifecycle = "closed";
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sys?.stop();
    await this.sweeping;
    if (this.state.publishFirst) keepWills(this.aedes);
    await new Promise<void>((resolve) => this.aedes.close(() => resolve()));
    await Promise.all([this.tcp.closeAll(), this.ws?.closeAll(), this.mqtts?.closeAll(), this.wss?.closeAll()]);
    // Every write aedes queued has committed once this resolves (a start that failed never opened it).
    await this.persistence.destroy().catch((err: unknown) => this.log.warn({ err }, "broker persistence close failed"));
    this.log.info("broker closed");
  }

  private onViolation(v: GuardViolation, remote: string): void {
    if (v.kind === "invalid") {
      this.invalid++;
      this.log.warn({ remote, reason: v.reason }, "MQTT input rule broken; connection closed");
      return;
    }
    this.oversized++;
    if (v.kind === "oversized") {
      this.log.warn(
        { remote, packetBytes: v.packetBytes, max: this.opts.maxPacketBytes },
        "oversized packet; connection closed",
      );
    } else {
      this.log.warn({ remote }, "malformed remaining length; connection closed");
    }
  }
}

/** The auth part of options, copied so a later swap never mutates what the caller passed. */
function authOf(a: BrokerAuth): BrokerAuth {
  return {
    allowAnonymous: a.allowAnonymous,
    authenticate: a.authenticate?.bind(a),
    authorizePublishTopic: a.authorizePublishTopic?.bind(a),
    authorizeSubscribeTopic: a.authorizeSubscribeTopic?.bind(a),
    sessionValid: a.sessionValid?.bind(a),
  };
}

/**
 * `HookState.publishFirst` for `aedes`: publish a device's QoS 1 message from the publish hook, before
 * aedes writes its PUBACK, and make aedes' own publish of it afterwards (handlers/publish.js) a no-op.
 * Its callback comes once the persistence has written the retained copy and the offline queues.
 */
function publishBeforeAck(aedes: Aedes): (packet: PublishPacket, client: Client) => Promise<void> {
  type Publish = (packet: PublishPacket, client: Client | null, done: (err?: Error | null) => void) => void;
  const publish = (aedes.publish as unknown as Publish).bind(aedes);
  const done = new WeakSet<PublishPacket>();
  (aedes as unknown as { publish: Publish }).publish = (packet, client, cb) => {
    if (!done.delete(packet)) return publish(packet, client, cb);
    cb?.(null);
  };
  return (packet, client) =>
    new Promise((resolve, reject) =>
      publish(packet, client, (err) => {
        if (err) return reject(err);
        done.add(packet);
        resolve();
      }),
    );
}

/**
 * How often sessions are checked for expiry: a quarter of the expiry, between a second and an hour. A session
 * ends at most that long after its time is up.
 */
function sessionSweepMs(expiryMs: number): number {
  return Math.min(3_600_000, Math.max(1000, Math.floor(expiryMs / 4)));
}

/**
 * A connection taken over by a new one of its client (MQTT-3.1.4-2) publishes no will when the session goes
 * on (both clean = false): the client is back, as Mosquitto has it (and MQTT 5: a new connection came before
 * the will delay). A takeover that ends the session (either CONNECT with clean = true) publishes the old will,
 * as Mosquitto does. Either way the new connection's will stays stored for the next start after a crash.
 *
 * aedes 1.2.0 closed the old connection as one that dropped (lib/client.js `close`): it published the old
 * will on every takeover, then deleted the client's stored will, which was by then the new connection's
 * (handlers/connect.js stores it just before). Here the old connection closes without a will, and the will
 * a takeover must publish is published once the old connection is gone (unsubscribed, as aedes does it).
 */
function willsOnTakeover(aedes: Aedes): void {
  type Connection = {
    readonly id: string;
    readonly clean: boolean;
    will?: PublishPacket | null;
    _will?: PublishPacket | null;
    close(done?: () => void): void;
  };
  // aedes keeps its connected clients by id (aedes.js); its types declare neither the map nor registerClient.
  const broker = aedes as unknown as {
    clients: Record<string, Connection>;
    registerClient(c: Connection): void;
    authorizePublish(c: Connection, packet: PublishPacket, done: (err?: Error | null) => void): void;
    // As the old connection's own close does it (lib/client.js): the will goes out from that client.
    publish(packet: PublishPacket, c: Connection, done: () => void): void;
  };
  const register = broker.registerClient.bind(aedes);
  broker.registerClient = (client) => {
    const old = broker.clients[client.id];
    const will = old && old !== client ? old.will : null;
    if (old && will) {
      old.will = null;
      old._will = null;
      if (old.clean || client.clean) {
        const close = old.close.bind(old);
        old.close = (done) =>
          close(() => {
            broker.authorizePublish(old, will, (err) => {
              if (!err) broker.publish(will, old, () => undefined);
            });
            done?.();
          });
      }
    }
    register(client);
  };
}

/**
 * Before a graceful stop, with a durable persistence: closing the clients would publish each one's will
 * (refused: intake is stopped) and delete its stored copy (aedes lib/client.js close). Forgotten in
 * memory instead, the stored wills stay, and the next start publishes those whose clients do not come
 * back, as after a crash (docs/broker.md).
 */
function keepWills(aedes: Aedes): void {
  // aedes keeps its connected clients by id (aedes.js); its types do not declare the map.
  const clients = (aedes as unknown as { clients: Record<string, { will?: unknown; _will?: unknown }> }).clients;
  for (const client of Object.values(clients)) {
    client.will = null;
    client._will = null;
  }
}
