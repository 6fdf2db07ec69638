/**
 * The embedded broker: aedes (MQTT 3.1/3.1.1, in-memory persistence) behind the `Broker`
 * interface, listening on guarded TCP and optionally WebSocket connections.
 */
import { Aedes, type Client } from "aedes";
import type { Duplex } from "node:stream";
import type { Logger } from "pino";
import type { GuardViolation } from "./connection.ts";
import { createHooks, type HookState } from "./hooks.ts";
import { TcpListener, type ListenerHooks } from "./tcp.ts";
import type { Broker, BrokerOptions, BrokerStats } from "./types.ts";
import { WsListener } from "./ws.ts";

/** Lifecycle of an embedded broker. */
type Lifecycle = "new" | "starting" | "running" | "draining" | "closed";

/** Build an embedded aedes broker; nothing listens until `start()`. */
export function createEmbeddedBroker(opts: BrokerOptions): Broker {
  return new EmbeddedBroker(opts);
}

class EmbeddedBroker implements Broker {
  private lifecycle: Lifecycle = "new";
  private readonly log: Logger;
  private readonly state: HookState = { intakeOpen: true, messagesIn: 0, messagesOut: 0, refused: 0 };
  private oversized = 0;
  private readonly aedes: Aedes;
  private readonly tcp: TcpListener;
  private readonly ws: WsListener | null;
  private boundPort: number;
  private boundWsPort: number | null;
  private starting: Promise<void> | null = null;
  private closing: Promise<void> | null = null;

  constructor(private readonly opts: BrokerOptions) {
    if (!Number.isInteger(opts.maxPacketBytes) || opts.maxPacketBytes < 2) {
      throw new RangeError(`maxPacketBytes must be an integer >= 2, got ${opts.maxPacketBytes}`);
    }
    this.log = opts.logger.child({ component: "broker" });
    this.aedes = new Aedes(createHooks(opts, this.state, this.log));
    this.aedes.on("clientError", (client: Client, err: Error) =>
      this.log.debug({ client: client.id, err: err.message }, "client dropped"),
    );
    this.aedes.on("connectionError", (_client: Client, err: Error) =>
      this.log.debug({ err: err.message }, "connection dropped before CONNECT completed"),
    );
    const hooks: ListenerHooks = {
      maxPacketBytes: opts.maxPacketBytes,
      accept: (conn: Duplex) => {
        if (this.lifecycle === "closed") conn.destroy();
        else this.aedes.handle(conn);
      },
      violation: (v: GuardViolation, remote: string) => this.onViolation(v, remote),
    };
    this.tcp = new TcpListener(hooks);
    this.ws = opts.wsPort == null ? null : new WsListener(hooks);
    this.boundPort = opts.port;
    this.boundWsPort = opts.wsPort ?? null;
  }

  get port(): number {
    return this.boundPort;
  }

  get wsPort(): number | null {
    return this.boundWsPort;
  }

  start(): Promise<void> {
    this.starting ??= this.doStart();
    return this.starting;
  }

  private async doStart(): Promise<void> {
    if (this.lifecycle !== "new") throw new Error(`cannot start a broker that is ${this.lifecycle}`);
    this.lifecycle = "starting";
    await this.aedes.listen();
    this.boundPort = await this.tcp.listen(this.opts.host, this.opts.port);
    if (this.ws && this.opts.wsPort != null) {
      this.boundWsPort = await this.ws.listen(this.opts.host, this.opts.wsPort);
    }
    this.lifecycle = "running";
    this.log.info({ host: this.opts.host, port: this.boundPort, wsPort: this.boundWsPort }, "broker listening");
  }

  publish(topic: string, payload: Uint8Array | string, opts: { qos?: 0 | 1; retain?: boolean } = {}): Promise<void> {
    if (this.lifecycle === "closed") return Promise.reject(new Error("broker is closed"));
    if (this.lifecycle === "new" || this.lifecycle === "starting") {
      return Promise.reject(new Error("broker is not started"));
    }
    if (topic.length === 0 || topic.includes("+") || topic.includes("#")) {
      return Promise.reject(new TypeError(`invalid publish topic ${JSON.stringify(topic)}`));
    }
    const body = typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload);
    return new Promise((resolve, reject) => {
      this.aedes.publish(
        { cmd: "publish", topic, payload: body, qos: opts.qos ?? 0, retain: opts.retain ?? false, dup: false },
        (err) => (err ? reject(err) : resolve()),
      );
    });
  }

  stats(): BrokerStats {
    return {
      clients: this.aedes.connectedClients ?? 0,
      messagesIn: this.state.messagesIn,
      messagesOut: this.state.messagesOut,
      refused: this.state.refused,
      oversized: this.oversized,
    };
  }

  async stopIntake(): Promise<void> {
    if (!this.state.intakeOpen) return;
    this.state.intakeOpen = false;
    if (this.lifecycle === "running") this.lifecycle = "draining";
    await Promise.all([this.tcp.stopAccepting(), this.ws?.stopAccepting()]);
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
    await new Promise<void>((resolve) => this.aedes.close(() => resolve()));
    await Promise.all([this.tcp.closeAll(), this.ws?.closeAll()]);
    this.log.info("broker closed");
  }

  private onViolation(v: GuardViolation, remote: string): void {
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
