/** Embedded brokers on free ports and MQTT clients of them, for in-process tests; all closed after each test. */
import { afterEach } from "bun:test";
import { connect, connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import pino from "pino";
import { type BrokerOptions, createEmbeddedBroker, type EmbeddedBroker } from "../../broker/index.ts";

export class BrokerKit {
  private readonly cleanups: (() => unknown)[] = [];

  /** Registers its own `afterEach`: make one at the top of a test file. */
  constructor() {
    afterEach(async () => {
      for (const fn of this.cleanups.splice(0).reverse()) await fn();
    });
  }

  /** Run `fn` after the current test, before what was deferred earlier. */
  defer(fn: () => unknown): void {
    this.cleanups.push(fn);
  }

  /** An anonymous loopback broker whose intake takes everything, started. */
  async start(opts: Partial<Omit<BrokerOptions, "logger" | "intake">>): Promise<EmbeddedBroker> {
    const broker = createEmbeddedBroker({
      host: "127.0.0.1",
      port: 0,
      maxPacketBytes: 65536,
      allowAnonymous: true,
      logger: pino({ level: "silent" }),
      intake: async () => ({ ok: true }),
      ...opts,
    });
    this.defer(() => broker.close());
    await broker.start();
    return broker;
  }

  /** A client connected to `broker` (no reconnects). */
  async client(broker: EmbeddedBroker, opts: IClientOptions): Promise<MqttClient> {
    const c = await connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, ...opts });
    this.defer(() => c.endAsync(true));
    return c;
  }

  /**
   * What a client taking up its clean = false session again gets: CONNACK's session present, and the messages
   * that come within `ms` of it.
   */
  async comeBack(broker: EmbeddedBroker, clientId: string, ms = 300): Promise<{ present: boolean; got: string[] }> {
    const opts = { clientId, clean: false, reconnectPeriod: 0, manualConnect: true };
    const c = connect(`mqtt://127.0.0.1:${broker.port}`, opts);
    this.defer(() => c.endAsync(true));
    const got: string[] = [];
    c.on("message", (_t, payload) => got.push(payload.toString()));
    const present = new Promise<boolean>((resolve) => c.once("connect", (p) => resolve(p.sessionPresent)));
    c.connect();
    const result = { present: await present, got };
    await Bun.sleep(ms);
    return result;
  }
}
