/**
 * The embedded broker against real clients: mqtt.js, raw sockets speaking MQTT bytes,
 * Bun's WebSocket, and Debian's mosquitto_pub / mosquitto_sub.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { once } from "node:events";
import { connect as netConnect, type Socket } from "node:net";
import { connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import pino from "pino";
import {
  checkDevicePublishTopic,
  createEmbeddedBroker,
  matchTopic,
  PacketSizeGuard,
  PARSE_SLICE_BYTES,
  parseInSlices,
  type Broker,
  type BrokerOptions,
  type ClientInfo,
  type PublishedMessage,
} from "../broker/index.ts";
import { compileFilter, hopsOf, publishPacketSize } from "../broker/index.ts";
import { remainingLength, seeded, waitFor, within } from "./helpers/gateway.ts";

const HOST = "127.0.0.1";
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn();
});

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve = () => {};
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** Re-checks a condition whenever `notify()` is called; resolves once it holds. */
class Watch {
  private readonly checks = new Set<() => void>();
  notify(): void {
    for (const check of this.checks) check();
  }
  until<T>(probe: () => T | undefined, what: string, ms = 3000): Promise<T> {
    return within(
      new Promise<T>((resolve) => {
        const check = () => {
          const v = probe();
          if (v === undefined) return;
          this.checks.delete(check);
          resolve(v);
        };
        this.checks.add(check);
        check();
      }),
      ms,
      what,
    );
  }
}

interface Harness {
  broker: Broker;
  intakes: { msg: PublishedMessage; client: ClientInfo }[];
  untilIntakes(n: number): Promise<void>;
  logs: string[];
}

async function startBroker(overrides: Partial<BrokerOptions> = {}): Promise<Harness> {
  const intakes: Harness["intakes"] = [];
  const logs: string[] = [];
  const watch = new Watch();
  const logger = pino({ level: "info" }, { write: (line: string) => void logs.push(line) });
  const intake = overrides.intake ?? (async () => ({ ok: true }) as const);
  const broker = createEmbeddedBroker({
    host: HOST,
    port: 0,
    maxPacketBytes: 4096,
    allowAnonymous: true,
    logger,
    ...overrides,
    intake(msg, client) {
      intakes.push({ msg, client });
      watch.notify();
      return intake(msg, client);
    },
  });
  cleanups.push(() => broker.close());
  await broker.start();
  const untilIntakes = (n: number) =>
    watch.until(() => (intakes.length >= n ? true : undefined), `${n} intake calls`).then(() => {});
  return { broker, intakes, untilIntakes, logs };
}

async function device(h: Harness, opts: IClientOptions = {}): Promise<MqttClient> {
  const client = await within(
    connectAsync(`mqtt://${HOST}:${h.broker.port}`, { reconnectPeriod: 0, connectTimeout: 3000, ...opts }),
    5000,
    "mqtt.js connect",
  );
  cleanups.push(() => client.endAsync(true));
  return client;
}

/** Resolves on the next message the client receives. */
function nextMessage(client: MqttClient): Promise<{ topic: string; payload: string; retain: boolean }> {
  return within(
    new Promise((resolve) =>
      client.once("message", (topic, payload, packet) =>
        resolve({ topic, payload: payload.toString(), retain: packet.retain }),
      ),
    ),
    3000,
    "a message",
  );
}

/** Resolves when the broker (or anything) closes the client's connection. */
function closeOf(client: MqttClient): Promise<void> {
  return new Promise((resolve) => client.once("close", () => resolve()));
}

/** The QoS granted per filter (mqtt.js rejects a SUBACK with 128 but carries the packet). */
function grantedQos(client: MqttClient, filters: string[]): Promise<number[]> {
  return client.subscribeAsync(filters, { qos: 1 }).then(
    (grants) => grants.map((g) => g.qos),
    (err: { packet?: { granted?: number[] } }) => {
      if (!err.packet?.granted) throw err;
      return err.packet.granted;
    },
  );
}

// --- raw MQTT 3.1.1 bytes, for what mqtt.js will not send ---

const utf8 = new TextEncoder();
const str = (s: string): number[] => {
  const b = utf8.encode(s);
  return [b.length >> 8, b.length & 0xff, ...b];
};
const frame = (first: number, body: number[]): Uint8Array<ArrayBuffer> =>
  Uint8Array.from([first, ...remainingLength(body.length), ...body]);
const connectPacket = (id: string): Uint8Array<ArrayBuffer> =>
  frame(0x10, [...str("MQTT"), 4, 0x02, 0, 60, ...str(id)]);
const publishPacket = (topic: string, payload: string, qos: 0 | 1, id = 1): Uint8Array<ArrayBuffer> =>
  frame(0x30 | (qos << 1), [...str(topic), ...(qos ? [id >> 8, id & 0xff] : []), ...utf8.encode(payload)]);
const CONNACK = 2;
const PUBACK = 4;
const SUBACK = 9;

interface RawPacket {
  type: number;
  body: Uint8Array;
}

/** Splits a byte stream into MQTT packets (test-side parser; the broker's guard is under test). */
class PacketReader {
  readonly packets: RawPacket[] = [];
  private buf = new Uint8Array(0);
  push(chunk: Uint8Array): void {
    const next = new Uint8Array(this.buf.length + chunk.length);
    next.set(this.buf);
    next.set(chunk, this.buf.length);
    this.buf = next;
    for (;;) {
      let len = 0;
      let mult = 1;
      let i = 1;
      for (; i < this.buf.length; i++) {
        const b = this.buf[i] ?? 0;
        len += (b & 0x7f) * mult;
        mult *= 128;
        if (!(b & 0x80)) break;
      }
      if (i >= this.buf.length || this.buf.length < i + 1 + len) return;
      this.packets.push({ type: (this.buf[0] ?? 0) >> 4, body: this.buf.slice(i + 1, i + 1 + len) });
      this.buf = this.buf.slice(i + 1 + len);
    }
  }
}

class RawClient {
  readonly reader = new PacketReader();
  readonly watch = new Watch();
  closed = false;
  readonly whenClosed: Promise<void>;

  static async open(port: number): Promise<RawClient> {
    const socket = netConnect({ host: HOST, port });
    await within(once(socket, "connect"), 3000, "tcp connect");
    return new RawClient(socket);
  }

  private constructor(readonly socket: Socket) {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => {
      this.reader.push(chunk);
      this.watch.notify();
    });
    socket.on("error", () => {}); // EPIPE/ECONNRESET are how a refusal looks from here
    this.whenClosed = new Promise((resolve) =>
      socket.once("close", () => {
        this.closed = true;
        resolve();
      }),
    );
    cleanups.push(() => socket.destroy());
  }

  packet(type: number, what: string): Promise<RawPacket> {
    return this.watch.until(() => this.reader.packets.find((p) => p.type === type), what);
  }

  async handshake(id: string): Promise<void> {
    this.socket.write(connectPacket(id));
    const connack = await this.packet(CONNACK, "CONNACK");
    expect(connack.body[1]).toBe(0);
  }

  closedWithin(ms: number, what: string): Promise<void> {
    return within(this.whenClosed, ms, what);
  }
}

describe("intake and acknowledgement", () => {
  test("a QoS 1 publish is acked only after intake resolved", async () => {
    const release = deferred();
    const h = await startBroker({
      intake: async () => {
        await release.promise;
        return { ok: true };
      },
    });
    const c = await device(h);
    let pubacks = 0;
    c.on("packetreceive", (p) => void (p.cmd === "puback" && pubacks++));
    const acked = c.publishAsync("sensors/boiler-1/temperature", "81", { qos: 1 });
    await h.untilIntakes(1);
    // "No PUBACK yet" is the absence of an event; give one a fair window to (wrongly) show up.
    await Bun.sleep(150);
    expect(pubacks).toBe(0);
    release.resolve();
    await within(acked, 3000, "PUBACK after release");
    expect(pubacks).toBe(1);
    expect(h.broker.stats().messagesIn).toBe(1);
  });

  test("intake receives topic, payload, qos, retain and the client", async () => {
    const h = await startBroker();
    const c = await device(h, { clientId: "boiler-1", username: "dev" });
    await c.publishAsync("sensors/boiler-1/temperature", '{"value":81}', { qos: 1, retain: true });
    await c.publishAsync("sensors/boiler-1/humidity", "40", { qos: 0 });
    await h.untilIntakes(2);
    const [first, second] = h.intakes;
    expect(first?.msg.topic).toBe("sensors/boiler-1/temperature");
    expect(new TextDecoder().decode(first?.msg.payload)).toBe('{"value":81}');
    expect(first?.msg.payload).toBeInstanceOf(Uint8Array);
    expect(first?.msg.qos).toBe(1);
    expect(first?.msg.retain).toBe(true);
    expect(first?.client).toEqual({ id: "boiler-1", username: "dev" });
    expect(second?.msg.qos).toBe(0);
  });

  test("an intake refusal marked permanent (unknown inbox) is acked and dropped; the device goes on", async () => {
    const h = await startBroker({
      intake: async (msg) =>
        msg.topic.endsWith("/inbox") ? { ok: false, reason: "unknown agent type", permanent: true } : { ok: true },
    });
    const c = await device(h);
    await c.publishAsync("fleet/agents/nope/x/inbox", "{}", { qos: 1 });
    await c.publishAsync("sensors/a/temperature", "1", { qos: 1 });
    expect(c.connected).toBe(true);
    expect(h.broker.stats()).toMatchObject({ messagesIn: 1, refused: 1, dropped: 1 });
  });

  test("a transient refusal (queue full) is resent by mqtt.js on its next connection, then recorded", async () => {
    let refusals = 1;
    const h = await startBroker({
      intake: async () => (refusals-- > 0 ? { ok: false, reason: "queue full (max_queue 1)" } : { ok: true }),
    });
    const c = await device(h, { clientId: "retrier", clean: false, reconnectPeriod: 50 });
    // Resolves on the PUBACK, which only the resend after the reconnect gets.
    await within(c.publishAsync("sensors/a/temperature", "1", { qos: 1 }), 10_000, "the PUBACK of the resend");
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["sensors/a/temperature", "sensors/a/temperature"]);
    expect(h.broker.stats()).toMatchObject({ messagesIn: 1, refused: 1, dropped: 0 });
  });

  test("a device resending into a full disk is logged at most once per 10 s, with the count", async () => {
    const h = await startBroker({ intake: async (): Promise<never> => Promise.reject(new Error("disk is full")) });
    // Each resend comes on a new connection, as a device's after its last one was closed.
    for (let i = 0; i < 5; i++) {
      const c = await device(h, { clientId: `full-${i}` });
      const closed = closeOf(c);
      c.publish("sensors/a/temperature", "1", { qos: 1 });
      await within(closed, 5000, "the connection closed without a PUBACK");
    }
    expect(h.broker.stats()).toMatchObject({ messagesIn: 0, refused: 5 });
    expect(h.logs.filter((l) => l.includes("intake failed; publish refused"))).toHaveLength(1);
    expect(h.logs.filter((l) => l.includes("publish refused for now"))).toHaveLength(1);
  });

  for (const [name, intake] of [
    ["a refused intake", async () => ({ ok: false, reason: "duplicate store down" }) as const],
    ["an intake that throws", async (): Promise<never> => Promise.reject(new Error("disk full"))],
    [
      "an intake that throws before it answers",
      (): Promise<never> => {
        throw new Error("a bug");
      },
    ],
  ] as const) {
    test(`${name} (transient) disconnects the device and never acks, so it resends`, async () => {
      const h = await startBroker({ intake });
      const c = await device(h);
      let pubacks = 0;
      c.on("packetreceive", (p) => void (p.cmd === "puback" && pubacks++));
      const closed = closeOf(c);
      c.publish("sensors/a/temperature", "1", { qos: 1 }, () => {});
      await within(closed, 3000, "the broker to drop the connection");
      expect(pubacks).toBe(0);
      expect(h.intakes).toHaveLength(1);
      expect(h.broker.stats()).toMatchObject({ messagesIn: 0, refused: 1, dropped: 0 });
    });
  }

  test("a device's last will goes through the topic rules and intake", async () => {
    const h = await startBroker();
    const c = await device(h, {
      clientId: "boiler-1",
      will: { topic: "sensors/boiler-1/status", payload: Buffer.from("offline"), qos: 1, retain: false },
    });
    c.stream.destroy(); // an unclean drop, so the broker publishes the will
    await h.untilIntakes(1);
    expect(h.intakes[0]?.msg.topic).toBe("sensors/boiler-1/status");
    expect(h.intakes[0]?.client.id).toBe("boiler-1");
  });

  test("acks go out in publish order even when intake resolves out of order", async () => {
    const first = deferred();
    const h = await startBroker({
      intake: async (msg) => {
        if (msg.topic === "s/1") await first.promise;
        return { ok: true };
      },
    });
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("order");
    raw.socket.write(Buffer.concat([publishPacket("s/1", "a", 1, 1), publishPacket("s/2", "b", 1, 2)]));
    // Both usually arrive in one read, which aedes handles concurrently; if they do not,
    // the second waits for the first anyway.
    await h.untilIntakes(2).catch(() => {});
    first.resolve();
    await raw.watch.until(
      () => (raw.reader.packets.filter((p) => p.type === PUBACK).length === 2 ? true : undefined),
      "2 PUBACKs",
    );
    const ids = raw.reader.packets
      .filter((p) => p.type === PUBACK)
      .map((p) => ((p.body[0] ?? 0) << 8) | (p.body[1] ?? 0));
    expect(ids).toEqual([1, 2]);
  });
});

describe("packet size guard", () => {
  test("a packet announcing more than maxPacketBytes closes the connection before it is buffered", async () => {
    const h = await startBroker({ maxPacketBytes: 64 * 1024 });
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("big");
    const announced = 10 * 1024 * 1024;
    raw.socket.write(Uint8Array.from([0x30, ...remainingLength(announced)]));
    const chunk = new Uint8Array(64 * 1024);
    let sent = 0;
    while (!raw.closed && sent < announced) {
      sent += chunk.length;
      if (!raw.socket.write(chunk))
        await Promise.race([new Promise((r) => raw.socket.once("drain", r)), raw.whenClosed]);
    }
    await raw.closedWithin(2000, "the server to close the socket");
    // Closed before the announced 10 MB could arrive: nothing was buffered up to it.
    expect(sent).toBeLessThan(announced);
    expect(h.broker.stats().oversized).toBe(1);
    expect(h.intakes).toHaveLength(0);
    expect(h.logs.some((l) => l.includes("oversized packet"))).toBe(true);
  });

  test("a packet of exactly maxPacketBytes is accepted; one byte more closes the connection", async () => {
    const h = await startBroker({ maxPacketBytes: 1024 });
    const topic = "sensors/limit"; // PUBLISH QoS1: 1 + 2 (length) + 2 + 13 (topic) + 2 (id) + payload
    const ok = await device(h);
    await within(ok.publishAsync(topic, "x".repeat(1024 - 20), { qos: 1 }), 3000, "PUBACK at the limit");
    expect(h.intakes[0]?.msg.payload.byteLength).toBe(1004);

    const over = await device(h);
    const closed = closeOf(over);
    over.publish(topic, "x".repeat(1024 - 19), { qos: 1 }, () => {});
    await within(closed, 3000, "the broker to drop the connection");
    expect(h.intakes).toHaveLength(1);
    expect(h.broker.stats().oversized).toBe(1);
  });

  test("a malformed remaining length closes the connection", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("malformed");
    raw.socket.write(Uint8Array.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01]));
    await raw.closedWithin(2000, "the server to close the socket");
    expect(h.broker.stats().oversized).toBe(1);
  });

  test("bytes that are not MQTT close that connection, never reach intake, and other clients go on", async () => {
    const h = await startBroker();
    const junk = await RawClient.open(h.broker.port);
    junk.socket.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    await junk.closedWithin(2000, "the server to close the junk connection");

    // A PUBLISH whose topic length runs past the end of its packet, after a valid CONNECT.
    const bad = await RawClient.open(h.broker.port);
    await bad.handshake("bad-publish");
    bad.socket.write(Uint8Array.from([0x32, 0x06, 0x00, 0x40, 0x61, 0x62, 0x00, 0x01]));
    await bad.closedWithin(2000, "the server to close the malformed PUBLISH connection");
    expect(h.intakes).toHaveLength(0);

    const ok = await device(h);
    await within(ok.publishAsync("sensors/after-junk", "1", { qos: 1 }), 3000, "a PUBACK for a well-formed client");
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["sensors/after-junk"]);
  });

  test("fixed headers split across chunks are still measured", () => {
    const guard = new PacketSizeGuard(100);
    // A 4-byte PINGREQ-sized packet split mid-body, then a header split byte by byte.
    expect(guard.feed(Uint8Array.from([0x30, 2, 0]))).toEqual({ ok: true });
    expect(guard.feed(Uint8Array.from([1, 0x30]))).toEqual({ ok: true });
    expect(guard.feed(Uint8Array.from([0xff]))).toEqual({ ok: true });
    expect(guard.feed(Uint8Array.from([0x7f]))).toEqual({ ok: false, kind: "oversized", packetBytes: 1 + 2 + 16383 });
    expect(guard.feed(Uint8Array.from([0xc0]))).toEqual({ ok: false, kind: "oversized", packetBytes: 16386 });

    const exact = new PacketSizeGuard(100);
    // A PUBLISH to topic "a" (a topic may not be empty) of 98 body bytes, then a PINGREQ.
    expect(exact.feed(Uint8Array.from([0x30, 98, 0, 1, 0x61, ...new Uint8Array(95), 0xc0, 0]))).toEqual({ ok: true });
    const malformed = new PacketSizeGuard(1 << 30);
    expect(malformed.feed(Uint8Array.from([0x30, 0x80, 0x80, 0x80]))).toEqual({ ok: true });
    expect(malformed.feed(Uint8Array.from([0x80]))).toEqual({ ok: false, kind: "malformed" });
  });
});

describe("parsing in slices", () => {
  /**
   * A stand-in for aedes' MQTT parser with the same contract: it keeps a message cut at the end
   * of one `parse` until the next completes it. Messages are lines here. (The real parser is
   * under test in the broker-level test below.)
   */
  class LineParser {
    readonly got: string[] = [];
    private rest = "";
    parse(buf: Buffer): number {
      const lines = (this.rest + buf.toString()).split("\n");
      this.rest = lines.pop()!;
      this.got.push(...lines);
      return this.rest.length;
    }
  }

  /** Settle every slice still scheduled (each takes one turn of the event loop). */
  const turns = async (n: number) => {
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
  };

  test("input is parsed a slice per turn, in order, with a message cut at a slice's end kept whole", async () => {
    const parser = new LineParser();
    const got = parser.got;
    const sent = Array.from({ length: 300 }, (_, i) => `message ${i}`);
    const bytes = Buffer.from(sent.map((m) => `${m}\n`).join(""));
    // 1,000-byte slices of ~3.5 KB of messages: most slices end inside a message.
    parseInSlices({ _parser: parser }, () => false, 1000);
    parser.parse(bytes);
    const first = got.length;
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThan(sent.length);
    // Bytes that arrive meanwhile wait behind the rest, not before it.
    parser.parse(Buffer.from("late\n"));
    expect(got).toHaveLength(first);
    await turns(20);
    expect(got).toEqual([...sent, "late"]);
    // Small reads with nothing queued are parsed at once, as before.
    parser.parse(Buffer.from("now\n"));
    expect(got.at(-1)).toBe("now");
  });

  test("nothing more is parsed once the connection is closed", async () => {
    const parser = new LineParser();
    let closed = false;
    parseInSlices({ _parser: parser }, () => closed, 100);
    parser.parse(Buffer.from("x\n".repeat(200)));
    const before = parser.got.length;
    expect(before).toBeLessThan(200);
    closed = true;
    await turns(50);
    expect(parser.got).toHaveLength(before);
  });

  test("a burst of QoS 1 publishes in one write, many slices long, is taken and acked whole, in order", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("burst");
    const n = 2000;
    const burst = Buffer.concat(Array.from({ length: n }, (_, i) => publishPacket(`s/${i}`, String(i), 1, i + 1)));
    expect(burst.length).toBeGreaterThan(3 * PARSE_SLICE_BYTES);
    raw.socket.write(burst);
    await h.untilIntakes(n);
    expect(h.intakes.map((x) => x.msg.topic)).toEqual(Array.from({ length: n }, (_, i) => `s/${i}`));
    await raw.watch.until(
      () => (raw.reader.packets.filter((p) => p.type === PUBACK).length === n ? true : undefined),
      `${n} PUBACKs`,
    );
    const ids = raw.reader.packets.filter((p) => p.type === PUBACK).map((p) => (p.body[0]! << 8) | p.body[1]!);
    expect(ids).toEqual(Array.from({ length: n }, (_, i) => i + 1));
  });
});

describe("device topic rules", () => {
  test("publishes to $SYS and fleet/ topics other than an inbox are acked and dropped; the session stays", async () => {
    const h = await startBroker();
    const watcher = await device(h);
    await watcher.subscribeAsync("#", { qos: 1 });
    const received: string[] = [];
    watcher.on("message", (topic) => received.push(topic));

    const dropped = ["$SYS/x", "fleet/agents/t/k/out", "fleet/health", "fleet/agents/t//inbox"];
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("refused");
    for (const [i, topic] of dropped.entries()) raw.socket.write(publishPacket(topic, "{}", 1, i + 1));
    await raw.watch.until(
      () => (raw.reader.packets.filter((p) => p.type === PUBACK).length === dropped.length ? true : undefined),
      "a PUBACK for every dropped publish",
    );
    expect(raw.closed).toBe(false);
    expect(h.intakes).toHaveLength(0);
    expect(h.broker.stats()).toMatchObject({ refused: 4, dropped: 4 });

    // Same connection, in order: once the inbox arrives, nothing dropped reached the subscriber.
    const delivered = nextMessage(watcher);
    raw.socket.write(publishPacket("fleet/agents/t/k/inbox", '{"hi":1}', 1, 9));
    expect((await delivered).topic).toBe("fleet/agents/t/k/inbox");
    expect(received).toEqual(["fleet/agents/t/k/inbox"]);
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["fleet/agents/t/k/inbox"]);
    // One log line for the burst (at most one per 10 s), with the count.
    expect(h.logs.filter((l) => l.includes("publish refused: acked, dropped"))).toHaveLength(1);
  });

  test("a wildcard in a publish topic is a protocol error: aedes closes the connection, no PUBACK", async () => {
    const h = await startBroker();
    for (const topic of ["a/+/b", "a/#"]) {
      const raw = await RawClient.open(h.broker.port);
      await raw.handshake("wild");
      raw.socket.write(publishPacket(topic, "{}", 1));
      await raw.closedWithin(3000, `the broker to drop the publisher of ${topic}`);
      expect(raw.reader.packets.filter((p) => p.type === PUBACK)).toHaveLength(0);
    }
    expect(h.intakes).toHaveLength(0);
  });

  test("without a $SYS tree, any $ filter ($SYS/# too) is granted 128 and the connection stays open", async () => {
    const h = await startBroker();
    const c = await device(h);
    expect(await grantedQos(c, ["$SYS/#", "$fleet/#", "fleet/#"])).toEqual([128, 128, 1]);
    const msg = nextMessage(c);
    await h.broker.publish("fleet/health", "{}");
    expect((await msg).topic).toBe("fleet/health");
  });

  test("the publish and subscribe ACL hooks can refuse per client", async () => {
    const h = await startBroker({
      authorizePublishTopic: (client, topic) => topic.startsWith(`sensors/${client.id}/`),
      authorizeSubscribeTopic: (_client, filter) => filter !== "secret/#",
    });
    const c = await device(h, { clientId: "boiler-1" });
    expect(await grantedQos(c, ["secret/#"])).toEqual([128]);
    await c.publishAsync("sensors/boiler-1/t", "1", { qos: 1 });
    // Refused for good: acknowledged and dropped, the session goes on.
    await c.publishAsync("sensors/boiler-2/t", "1", { qos: 1 });
    await c.publishAsync("sensors/boiler-1/t", "2", { qos: 1 });
    expect(c.connected).toBe(true);
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["sensors/boiler-1/t", "sensors/boiler-1/t"]);
    expect(h.broker.stats()).toMatchObject({ refused: 1, dropped: 1 });
  });
});

describe("gateway publishing", () => {
  test("a retained broker.publish reaches a later subscriber", async () => {
    const h = await startBroker();
    await h.broker.publish("fleet/agents/t/k/status", '{"status":"idle"}', { qos: 1, retain: true });
    const c = await device(h);
    const msg = nextMessage(c);
    await c.subscribeAsync("fleet/agents/+/+/status", { qos: 1 });
    expect(await msg).toEqual({ topic: "fleet/agents/t/k/status", payload: '{"status":"idle"}', retain: true });
    expect(h.intakes).toHaveLength(0);
    expect(h.broker.stats().messagesOut).toBe(1);
  });

  test("a subscriber that stops reading is dropped within seconds, not a minute", async () => {
    const h = await startBroker();
    const slow = await device(h, { clientId: "slow" });
    await slow.subscribeAsync("big/#", { qos: 1 });
    (slow.stream as Socket).pause(); // reads nothing more: the gateway's writes to it stop draining
    const started = Date.now();
    const payload = new Uint8Array(256 * 1024);
    for (let i = 0; i < 64; i++) void h.broker.publish(`big/${i}`, payload, { qos: 1 }).catch(() => {});
    const gone = async () => {
      while (h.broker.stats().connections > 0) await Bun.sleep(100);
    };
    await within(gone(), 20_000, "the stalled subscriber to be dropped");
    expect(Date.now() - started).toBeLessThan(20_000);
    expect(h.logs.filter((l) => l.includes("subscriber stopped reading"))).toHaveLength(1);
  }, 30_000);

  test("stopIntake refuses new devices and publishes but gateway publishes still flow", async () => {
    const h = await startBroker();
    const sub = await device(h);
    await sub.subscribeAsync("fleet/#", { qos: 1 });
    const pub = await device(h);
    await h.broker.stopIntake();

    await expect(
      connectAsync(`mqtt://${HOST}:${h.broker.port}`, { reconnectPeriod: 0, connectTimeout: 2000 }),
    ).rejects.toThrow();
    const dropped = closeOf(pub);
    pub.publish("sensors/a/t", "1", { qos: 1 }, () => {});
    await within(dropped, 3000, "the publisher to be dropped");
    expect(h.intakes).toHaveLength(0);

    const msg = nextMessage(sub);
    await h.broker.publish("fleet/agents/t/k/status", '{"status":"retired"}');
    expect((await msg).payload).toBe('{"status":"retired"}');
    await h.broker.close();
    await h.broker.close();
  });
});

describe("third-party clients", () => {
  test("mosquitto_pub publishes and intake sees it", async () => {
    const h = await startBroker();
    const proc = Bun.spawn(
      [
        "mosquitto_pub",
        "-h",
        HOST,
        "-p",
        String(h.broker.port),
        "-i",
        "mosq-pub",
        "-q",
        "1",
        "-t",
        "sensors/boiler-1/temperature",
        "-m",
        '{"value":81}',
      ],
      { env: {}, stdout: "pipe", stderr: "pipe" },
    );
    // mosquitto_pub -q 1 exits after the PUBACK, which comes only after intake.
    expect(await within(proc.exited, 5000, "mosquitto_pub to exit")).toBe(0);
    expect(h.intakes).toHaveLength(1);
    expect(h.intakes[0]?.client.id).toBe("mosq-pub");
    expect(h.intakes[0]?.msg.qos).toBe(1);
    expect(new TextDecoder().decode(h.intakes[0]?.msg.payload)).toBe('{"value":81}');
  });

  test("mosquitto_sub receives a broker.publish", async () => {
    const h = await startBroker();
    const proc = Bun.spawn(
      // stdbuf: mosquitto_sub block-buffers its debug lines on a pipe; we wait for "SUBACK".
      [
        "stdbuf",
        "-oL",
        "mosquitto_sub",
        "-d",
        "-h",
        HOST,
        "-p",
        String(h.broker.port),
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "10",
        "-t",
        "fleet/agents/+/+/out",
      ],
      { env: {}, stdout: "pipe", stderr: "pipe" },
    );
    cleanups.push(() => proc.kill());
    const reader = proc.stdout.getReader();
    let out = "";
    const decoder = new TextDecoder();
    const readUntil = async (marker: string) => {
      while (!out.includes(marker)) {
        const { value, done } = await reader.read();
        if (done) return;
        out += decoder.decode(value, { stream: true });
      }
    };
    await within(readUntil("SUBACK"), 5000, "mosquitto_sub's SUBACK");
    await h.broker.publish("fleet/agents/t/k/out", '{"episode":"e1","seq":0}', { qos: 1 });
    await within(readUntil('{"episode":"e1","seq":0}'), 5000, "mosquitto_sub to print the message");
    expect(await within(proc.exited, 5000, "mosquitto_sub to exit")).toBe(0);
  });
});

describe("authentication", () => {
  test("allowAnonymous=false refuses an anonymous connect", async () => {
    const h = await startBroker({ allowAnonymous: false });
    const err = await connectAsync(`mqtt://${HOST}:${h.broker.port}`, {
      reconnectPeriod: 0,
      connectTimeout: 3000,
    }).then(
      () => null,
      (e: { code?: number }) => e,
    );
    expect(err?.code).toBe(5);
    expect(h.broker.stats().clients).toBe(0);
  });

  test("the authenticate hook decides for clients with credentials", async () => {
    const h = await startBroker({
      allowAnonymous: false,
      authenticate: async (client, password) =>
        client.username === "dev-1" && new TextDecoder().decode(password ?? new Uint8Array()) === "s3cret",
    });
    const good = await device(h, { username: "dev-1", password: "s3cret", clientId: "d1" });
    await good.publishAsync("sensors/d1/t", "1", { qos: 1 });
    expect(h.intakes[0]?.client).toEqual({ id: "d1", username: "dev-1" });
    const bad = await connectAsync(`mqtt://${HOST}:${h.broker.port}`, {
      reconnectPeriod: 0,
      username: "dev-1",
      password: "wrong",
    }).then(
      () => null,
      (e: { code?: number }) => e,
    );
    expect(bad?.code).toBe(4);
  });

  test("refused logins are logged at most once per 10 s, with the count", async () => {
    const h = await startBroker({ allowAnonymous: false, authenticate: async () => false });
    for (let i = 0; i < 5; i++) {
      expect((await refusedConnect(h, { username: "nobody", password: `guess-${i}` }))?.code).toBe(4);
    }
    expect(h.logs.filter((l) => l.includes("bad credentials"))).toHaveLength(1);
  });
});

// --- MQTT input rules aedes does not enforce (raw bytes: mqtt.js refuses to build these) ---

const bytesField = (b: readonly number[]): number[] => [b.length >> 8, b.length & 0xff, ...b];
/** "dev/" + 0xff + "/c": not UTF-8 (0xff never starts a sequence). */
const BAD_TOPIC = [0x64, 0x65, 0x76, 0x2f, 0xff, 0x2f, 0x63];

async function refusedConnect(h: Harness, opts: IClientOptions): Promise<{ code?: number } | null> {
  return connectAsync(`mqtt://${HOST}:${h.broker.port}`, { reconnectPeriod: 0, connectTimeout: 3000, ...opts }).then(
    (c) => {
      cleanups.push(() => c.endAsync(true));
      return null;
    },
    (e: { code?: number }) => e,
  );
}

describe("MQTT input rules", () => {
  test("a zero-length client id with clean session 0 gets CONNACK 0x02 and is closed (MQTT-3.1.3-8)", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    raw.socket.write(frame(0x10, [...str("MQTT"), 4, 0x00, 0, 60, ...str("")]));
    const connack = await raw.packet(CONNACK, "CONNACK");
    expect(connack.body[1]).toBe(0x02);
    await raw.closedWithin(2000, "the server to close the connection");
    expect(h.broker.stats().clients).toBe(0);

    // With clean session 1 an empty id is fine: the broker assigns one.
    const clean = await RawClient.open(h.broker.port);
    clean.socket.write(frame(0x10, [...str("MQTT"), 4, 0x02, 0, 60, ...str("")]));
    expect((await clean.packet(CONNACK, "CONNACK")).body[1]).toBe(0);
  });

  test("max_keepalive: a keep alive above it, or 0, gets CONNACK 0x02; a new bound holds for new ones", async () => {
    const h = await startBroker({ maxKeepaliveSeconds: 60 });
    const code = async (keepalive: number, clientId: string) =>
      (await refusedConnect(h, { keepalive, clientId }))?.code;
    expect(await code(0, "never-pings")).toBe(2);
    expect(await code(61, "too-seldom")).toBe(2);
    expect(h.logs.some((l) => l.includes("keep alive 61 s is not within max_keepalive 60 s"))).toBe(true);
    expect(await code(60, "at-the-bound")).toBeUndefined();
    const kept = await device(h, { clientId: "kept", keepalive: 30 });
    // Lowered live: the connected client stays; a new CONNECT with the same keep alive is refused.
    h.broker.setMaxKeepalive(10);
    expect(await code(30, "after")).toBe(2);
    expect(kept.connected).toBe(true);
    h.broker.setMaxKeepalive(0);
    expect(await code(0, "any-again")).toBeUndefined();
  });

  test("connection_messages logs each connect (address, keep alive, clean session) and disconnect", async () => {
    const h = await startBroker();
    const lines = (msg: string) =>
      h.logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.msg === msg);
    const quiet = await device(h, { clientId: "quiet" });
    await quiet.endAsync();
    expect(lines("client connected")).toEqual([]);
    h.broker.setConnectionMessages(true);
    const loud = await device(h, { clientId: "loud", keepalive: 42, clean: false });
    await loud.endAsync();
    await waitFor(() => lines("client disconnected").length === 1, 5000, "the disconnect line", 10);
    expect(lines("client connected")).toEqual([
      expect.objectContaining({ client: "loud", username: null, host: "127.0.0.1", keepalive: 42, clean: false }),
    ]);
    expect(lines("client disconnected")).toEqual([expect.objectContaining({ client: "loud", username: null })]);
  });

  test("an MQTT 5 CONNECT gets the 3.1.1 refusal CONNACK 0x01 and is closed; the broker goes on", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    // Protocol level 5, clean start, keepalive 60, no properties, client id "v5".
    raw.socket.write(frame(0x10, [...str("MQTT"), 5, 0x02, 0, 60, 0, ...str("v5")]));
    const connack = await raw.packet(CONNACK, "CONNACK");
    // MQTT-3.1.2-2: "unacceptable protocol level", in the 3.1.1 form MQTT 5 clients recognise.
    expect([...connack.body]).toEqual([0, 0x01]);
    await raw.closedWithin(2000, "the server to close the connection");
    // mqtt.js speaking MQTT 5 sees the refusal as a CONNACK error with code 1.
    const err = await connectAsync(`mqtt://${HOST}:${h.broker.port}`, { protocolVersion: 5, reconnectPeriod: 0 }).then(
      () => null,
      (e: Error & { code?: number }) => e,
    );
    expect(err?.code).toBe(1);
    expect(h.logs.some((l) => l.includes("MQTT 5 CONNECT refused"))).toBe(true);
    const v311 = await device(h);
    await v311.publishAsync("sensors/a", "1", { qos: 1 });
    expect(h.intakes.length).toBe(1);
  });

  test("a will with QoS 3 closes the connection without a CONNACK (MQTT-3.1.2-14)", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    // flags: clean 0x02 | will 0x04 | will QoS 3 (0x18)
    raw.socket.write(frame(0x10, [...str("MQTT"), 4, 0x1e, 0, 60, ...str("w3"), ...str("wills/w3"), ...str("bye")]));
    await raw.closedWithin(2000, "the server to close the connection");
    expect(raw.reader.packets.find((p) => p.type === CONNACK)).toBeUndefined();
    expect(h.broker.stats().invalid).toBe(1);
    expect(h.logs.some((l) => l.includes("MQTT-3.1.2-14"))).toBe(true);
  });

  test("a PUBLISH whose topic is not UTF-8 closes the connection: no PUBACK, no intake (MQTT-1.5.3-1)", async () => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("bad-utf8");
    raw.socket.write(frame(0x32, [...bytesField(BAD_TOPIC), 0, 1, ...utf8.encode('{"v":1}')]));
    await raw.closedWithin(2000, "the server to close the connection");
    expect(raw.reader.packets.find((p) => p.type === PUBACK)).toBeUndefined();
    expect(h.intakes).toHaveLength(0);
    expect(h.broker.stats().invalid).toBe(1);

    // U+FFFD written as valid UTF-8 is an ordinary character.
    const ok = await device(h);
    await within(ok.publishAsync("dev/\uFFFD/c", "1", { qos: 1 }), 3000, "PUBACK for a valid topic");
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["dev/\uFFFD/c"]);
  });

  test("SUBSCRIBE and UNSUBSCRIBE filters and a will topic that are not UTF-8 close the connection", async () => {
    const h = await startBroker();
    const sub = await RawClient.open(h.broker.port);
    await sub.handshake("bad-sub");
    sub.socket.write(frame(0x82, [0, 1, ...bytesField(BAD_TOPIC), 1]));
    await sub.closedWithin(2000, "SUBSCRIBE to close the connection");
    expect(sub.reader.packets.find((p) => p.type === SUBACK)).toBeUndefined();

    const unsub = await RawClient.open(h.broker.port);
    await unsub.handshake("bad-unsub");
    unsub.socket.write(frame(0xa2, [0, 2, ...bytesField(BAD_TOPIC)]));
    await unsub.closedWithin(2000, "UNSUBSCRIBE to close the connection");

    const will = await RawClient.open(h.broker.port);
    will.socket.write(
      frame(0x10, [...str("MQTT"), 4, 0x0e, 0, 60, ...str("w1"), ...bytesField(BAD_TOPIC), ...str("x")]),
    );
    await will.closedWithin(2000, "CONNECT with a bad will topic to close the connection");
    expect(will.reader.packets.find((p) => p.type === CONNACK)).toBeUndefined();
    expect(h.broker.stats().invalid).toBe(3);
  });

  test.each([
    ["an empty topic", "", "topic name is empty (MQTT-4.7.3-1)"],
    ["a + in the topic", "dev/+/c", "topic name contains a wildcard character + or # (MQTT-3.3.2-2)"],
    ["a # in the topic", "dev/#", "topic name contains a wildcard character + or # (MQTT-3.3.2-2)"],
  ])("a PUBLISH with %s closes the connection, counted and logged with the rule", async (_what, topic, reason) => {
    const h = await startBroker();
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("bad-topic");
    raw.socket.write(frame(0x32, [...str(topic), 0, 1, ...utf8.encode('{"v":1}')]));
    await raw.closedWithin(2000, "the server to close the connection");
    expect(raw.reader.packets.find((p) => p.type === PUBACK)).toBeUndefined();
    expect(h.intakes).toHaveLength(0);
    expect(h.broker.stats().invalid).toBe(1);
    expect(h.logs.some((l) => l.includes(reason))).toBe(true);
  });

  test.each([
    ["a+/b", "a wildcard + or # must be a whole level of the topic filter (MQTT-4.7.1-2, -3)"],
    ["a/#/b", "# must be the last level of the topic filter (MQTT-4.7.1-2)"],
    ["a/b#", "a wildcard + or # must be a whole level of the topic filter (MQTT-4.7.1-2, -3)"],
    ["", "topic filter is empty (MQTT-4.7.3-1)"],
  ])("a SUBSCRIBE to %p closes the connection with the rule it breaks", async (filter, reason) => {
    const h = await startBroker();
    const sub = await RawClient.open(h.broker.port);
    await sub.handshake("bad-filter");
    sub.socket.write(frame(0x82, [0, 1, ...str(filter), 1]));
    await sub.closedWithin(2000, "SUBSCRIBE to close the connection");
    expect(sub.reader.packets.find((p) => p.type === SUBACK)).toBeUndefined();
    expect(h.broker.stats().invalid).toBe(1);
    expect(h.logs.some((l) => l.includes(reason))).toBe(true);
    // Well-formed wildcards are fine.
    const ok = await device(h, { clientId: "good-filter" });
    await within(ok.subscribeAsync(["+/b", "a/+/c", "#", "a/#"]), 3000, "SUBACK for well-formed filters");
  });

  test.each([
    [false, [undefined, undefined]],
    [true, [false, true]],
  ])("with trustDup %p intake sees each publish's DUP flag as %p", async (trustDup, seen) => {
    const h = await startBroker({ trustDup });
    const raw = await RawClient.open(h.broker.port);
    await raw.handshake("dup-flag");
    const body = [...str("dev/d1/c"), 0x12, 0x34, ...utf8.encode("open")];
    raw.socket.write(frame(0x32, body)); // QoS 1, DUP = 0
    raw.socket.write(frame(0x3a, body)); // QoS 1, DUP = 1: the same packet again
    await h.untilIntakes(2);
    expect(h.intakes.map((i) => i.msg.dup)).toEqual(seen);
  });

  test("the guard never throws on random packets cut at random, and a verdict against a connection is final", () => {
    const rnd = seeded(20261130);
    const int = (n: number) => Math.floor(rnd() * n);
    for (let run = 0; run < 300; run++) {
      const guard = new PacketSizeGuard(512);
      const parts: number[] = [];
      for (let p = 0; p < 8; p++) {
        const type = [1, 3, 8, 10, int(16)][int(5)]!;
        const body = Array.from({ length: int(80) }, () => (rnd() < 0.8 ? 0x61 + int(26) : int(256)));
        if (type === 3 && body.length >= 2 && rnd() < 0.7) [body[0], body[1]] = [0, int(body.length)];
        parts.push(type << 4, ...remainingLength(body.length), ...body);
      }
      const bytes = Uint8Array.from(parts);
      let failed: unknown = null;
      for (let at = 0; at < bytes.length; ) {
        const next = Math.min(bytes.length, at + 1 + int(40));
        const verdict = guard.feed(bytes.subarray(at, next));
        if (failed) expect(verdict).toEqual(failed as never);
        else if (!verdict.ok) failed = verdict;
        at = next;
      }
    }
  });

  test("the guard finds a bad topic byte however the PUBLISH is split into chunks", () => {
    const packet = frame(0x30, [...bytesField(BAD_TOPIC), ...utf8.encode("payload")]);
    for (let cut = 1; cut < packet.length; cut++) {
      const guard = new PacketSizeGuard(1024);
      const first = guard.feed(packet.subarray(0, cut));
      const verdict = first.ok ? guard.feed(packet.subarray(cut)) : first;
      expect(verdict).toEqual({ ok: false, kind: "invalid", reason: "topic name is not valid UTF-8 (MQTT-1.5.3-1)" });
    }
    const good = new PacketSizeGuard(1024);
    const fine = frame(0x30, [...str("dev/ok/c"), ...utf8.encode("payload")]);
    for (const b of [...fine, ...fine]) expect(good.feed(Uint8Array.of(b))).toEqual({ ok: true });
  });
});

describe("connection limit", () => {
  test("past maxConnections a new client gets CONNACK 3 and is counted; a freed slot is usable again", async () => {
    const h = await startBroker({ maxConnections: 2 });
    const a = await device(h, { clientId: "a" });
    await device(h, { clientId: "b" });
    const refused = await refusedConnect(h, { clientId: "c" });
    expect(refused?.code).toBe(3);
    expect(h.broker.stats().connectionsRefused).toBe(1);
    expect(h.broker.stats().clients).toBe(2);

    const gone = closeOf(a);
    await a.endAsync();
    await within(gone, 3000, "client a to close");
    const again = await within(
      (async () => {
        for (;;) {
          const r = await refusedConnect(h, { clientId: "c" });
          if (r === null) return true;
          await Bun.sleep(20);
        }
      })(),
      3000,
      "a connection in the freed slot",
    );
    expect(again).toBe(true);
  });
});

describe("live auth changes", () => {
  test("turning anonymous off disconnects anonymous sessions and refuses new ones", async () => {
    const h = await startBroker();
    const anon = await device(h, { clientId: "anon-1" });
    const closed = closeOf(anon);
    const change = await h.broker.setAuth({ allowAnonymous: false });
    expect(change.disconnected).toBe(1);
    await within(closed, 3000, "the anonymous session to be closed");
    expect((await refusedConnect(h, { clientId: "anon-2" }))?.code).toBe(5);
  });

  test("sessions with a username stay only if the new rules vouch for them and lose denied subscriptions", async () => {
    const users: Record<string, string> = { "dev-1": "s1", "dev-2": "s2" };
    const authenticate = async (c: ClientInfo, pw: Uint8Array | null) =>
      c.username !== null && users[c.username] === new TextDecoder().decode(pw ?? new Uint8Array());
    const h = await startBroker({ allowAnonymous: false, authenticate });
    const d1 = await device(h, { clientId: "d1", username: "dev-1", password: "s1" });
    const d2 = await device(h, { clientId: "d2", username: "dev-2", password: "s2" });
    await d2.subscribeAsync("alerts/#");
    const d1Closed = closeOf(d1);
    const d2Closed = closeOf(d2);
    let d1Open = true;
    d1.once("close", () => (d1Open = false));
    const change = await h.broker.setAuth({
      allowAnonymous: false,
      authenticate,
      sessionValid: (c) => c.username === "dev-1" || c.username === "dev-2",
      authorizeSubscribeTopic: (_c, f) => f !== "alerts/#",
    });
    expect(change.disconnected).toBe(1);
    await within(d2Closed, 3000, "dev-2 (subscription no longer granted) to be closed");
    await within(d1.publishAsync("sensors/d1/t", "1", { qos: 1 }), 3000, "dev-1 to keep publishing");
    expect(d1Open).toBe(true);
    void d1Closed;

    await h.broker.setAuth({ allowAnonymous: false, authenticate });
    await within(d1Closed, 3000, "dev-1 to be closed when nothing vouches for its session");
  });
});

/** A WebSocket client speaking raw MQTT bytes (subprotocol `mqtt`), its packets parsed as they arrive. */
async function rawWebSocket(h: Harness) {
  const ws = new WebSocket(`ws://${HOST}:${h.broker.wsPort}/`, ["mqtt"]);
  ws.binaryType = "arraybuffer";
  const reader = new PacketReader();
  const watch = new Watch();
  ws.onmessage = (e) => {
    reader.push(new Uint8Array(e.data as ArrayBuffer));
    watch.notify();
  };
  const closed = new Promise<void>((resolve) => ws.addEventListener("close", () => resolve()));
  cleanups.push(() => ws.close());
  await within(once(ws as unknown as EventTarget, "open"), 3000, "ws open");
  return { ws, reader, watch, closed };
}

describe("MQTT over WebSocket", () => {
  test("mqtt.js over ws publishes through intake and receives gateway publishes", async () => {
    const h = await startBroker({ wsPort: 0 });
    expect(h.broker.wsPort).toBeGreaterThan(0);
    const c = await within(
      connectAsync(`ws://${HOST}:${h.broker.wsPort}/mqtt`, { reconnectPeriod: 0 }),
      5000,
      "ws connect",
    );
    cleanups.push(() => c.endAsync(true));
    await c.subscribeAsync("fleet/agents/t/k/out", { qos: 1 });
    const msg = nextMessage(c);
    await h.broker.publish("fleet/agents/t/k/out", "hello");
    expect((await msg).payload).toBe("hello");
    await c.publishAsync("fleet/agents/t/k/inbox", "hi", { qos: 1 });
    expect(h.intakes.map((i) => i.msg.topic)).toEqual(["fleet/agents/t/k/inbox"]);
  });

  test("packets may span websocket frames, and an oversized one closes the socket", async () => {
    const h = await startBroker({ wsPort: 0, maxPacketBytes: 1024 });
    const { ws, reader, watch, closed } = await rawWebSocket(h);
    expect(ws.protocol).toBe("mqtt");
    const connect = connectPacket("ws-raw");
    ws.send(connect.slice(0, 3));
    ws.send(connect.slice(3));
    await watch.until(() => reader.packets.find((p) => p.type === CONNACK), "CONNACK");
    ws.send(frame(0x82, [0, 1, ...str("$SYS/#"), 0]));
    const suback = await watch.until(() => reader.packets.find((p) => p.type === SUBACK), "SUBACK");
    expect(suback.body[2]).toBe(0x80);
    ws.send(Uint8Array.from([0x30, ...remainingLength(5 * 1024 * 1024)]));
    await within(closed, 3000, "the server to close the websocket");
    expect(h.broker.stats().oversized).toBe(1);
  });
  test("a PUBLISH whose frames arrive while its CONNECT is still being authenticated is acked", async () => {
    // aedes reads nothing while it authenticates; the PUBLISH waits in the connection's buffer
    // as six chunks, and must be read whole once the CONNECT is done (Bun's read() returned one
    // chunk per call, and aedes stopped asking after two).
    const authenticating = deferred();
    const gate = deferred();
    const h = await startBroker({
      wsPort: 0,
      allowAnonymous: false,
      authenticate: async () => {
        authenticating.resolve();
        await gate.promise;
        return true;
      },
    });
    const { ws, reader, watch } = await rawWebSocket(h);
    ws.send(frame(0x10, [...str("MQTT"), 4, 0xc2, 0, 60, ...str("split"), ...str("dev"), ...str("pw")]));
    await within(authenticating.promise, 3000, "the authenticate hook");
    const publish = publishPacket("sensors/split/t", "21.5", 1, 7);
    // One frame per field, as mqtt.js sends them: header, length, topic length, topic, id, payload.
    for (const [from, to] of [
      [0, 1],
      [1, 2],
      [2, 4],
      [4, 19],
      [19, 21],
      [21, publish.length],
    ] as const) {
      ws.send(publish.slice(from, to));
    }
    // No sentinel exists for "the server has buffered every frame"; without the wait the test
    // could only pass for the wrong reason, never fail for one.
    await Bun.sleep(100);
    gate.resolve();
    await watch.until(() => reader.packets.find((p) => p.type === CONNACK), "CONNACK");
    const puback = await watch.until(() => reader.packets.find((p) => p.type === PUBACK), "PUBACK");
    expect(Array.from(puback.body)).toEqual([0, 7]);
    expect(h.intakes.map((i) => [i.msg.topic, new TextDecoder().decode(i.msg.payload)])).toEqual([
      ["sensors/split/t", "21.5"],
    ]);
  });

  test("a websocket frame larger than the limit closes the socket and counts as oversized", async () => {
    const h = await startBroker({ wsPort: 0, maxPacketBytes: 1024 });
    const ws = new WebSocket(`ws://${HOST}:${h.broker.wsPort}/`, ["mqtt"]);
    const closed = new Promise<void>((resolve) => ws.addEventListener("close", () => resolve()));
    cleanups.push(() => ws.close());
    await within(once(ws as unknown as EventTarget, "open"), 3000, "ws open");
    ws.send(new Uint8Array(8 * 1024));
    await within(closed, 3000, "the server to close the websocket");
    await within(
      (async () => {
        while (h.broker.stats().oversized === 0) await Bun.sleep(10);
      })(),
      2000,
      "the server side to count the violation",
    );
    expect(h.broker.stats().oversized).toBe(1);
  });
});

describe("matchTopic", () => {
  test("captures '+' levels and the '#' remainder in order", () => {
    expect(matchTopic("sensors/+/temperature", "sensors/boiler-1/temperature")).toEqual(["boiler-1"]);
    expect(matchTopic("a/+/c/#", "a/b/c/d/e")).toEqual(["b", "d/e"]);
    expect(matchTopic("a/b", "a/b")).toEqual([]);
    expect(matchTopic("+", "")).toEqual([""]);
  });

  test("'#' matches its parent level with an empty capture", () => {
    expect(matchTopic("a/#", "a")).toEqual([""]);
    expect(matchTopic("#", "a/b")).toEqual(["a/b"]);
  });

  test("returns null when the topic does not match", () => {
    expect(matchTopic("sensors/+/temperature", "sensors/boiler-1/humidity")).toBeNull();
    expect(matchTopic("a/+", "a/b/c")).toBeNull();
    expect(matchTopic("a/b/c", "a/b")).toBeNull();
    expect(matchTopic("a/#", "b")).toBeNull();
    // MQTT-4.7.2-1: leading wildcards do not match '$' topics.
    expect(matchTopic("#", "$SYS/x")).toBeNull();
    expect(matchTopic("+/x", "$SYS/x")).toBeNull();
    expect(matchTopic("$SYS/#", "$SYS/x")).toEqual(["x"]);
  });
});

describe("checkDevicePublishTopic", () => {
  test("allows ordinary topics and agent inboxes", () => {
    for (const topic of ["sensors/boiler-1/temperature", "fleet/agents/t/k/inbox", "fleetwide/x", "a"]) {
      expect(checkDevicePublishTopic(topic)).toEqual({ ok: true });
    }
  });

  test("refuses wildcards, empty, '$' and the rest of fleet/", () => {
    for (const topic of [
      "",
      "a/+",
      "a/#",
      "$SYS/x",
      "$share/g/x",
      "fleet",
      "fleet/health",
      "fleet/agents/t/k/out",
      "fleet/agents/t/k/inbox/x",
      "fleet/agents//k/inbox",
    ]) {
      expect(checkDevicePublishTopic(topic).ok).toBe(false);
    }
  });
});

describe("compiled filters", () => {
  test("a compiled filter matches and captures exactly as matchTopic does", () => {
    const filters = ["a/b", "a/+", "a/#", "#", "+/b", "+", "a/+/c/#", "a/+/+", "$SYS/#", "sensors/+/temperature"];
    const topics = [
      "a",
      "a/b",
      "a/b/c",
      "a/x/c/d/e",
      "b",
      "$SYS/x",
      "$SYS",
      "x/b",
      "sensors/boiler-1/temperature",
      "sensors//temperature",
      "a//",
      "",
    ];
    for (const f of filters) {
      const compiled = compileFilter(f);
      for (const t of topics) expect({ f, t, m: compiled(t.split("/")) }).toEqual({ f, t, m: matchTopic(f, t) });
    }
  });
});

describe("the hops user property of a forwarded send (external broker, MQTT 5)", () => {
  test("a whole number of at most 6 digits is the count; anything else is no count (it starts again at 1)", () => {
    expect(hopsOf("3")).toEqual({ hops: 3 });
    expect(hopsOf("999999")).toEqual({ hops: 999999 });
    // Sent twice, the first one counts.
    expect(hopsOf(["2", "9"])).toEqual({ hops: 2 });
    for (const junk of [undefined, "", "-1", "1.5", "1e3", " 4", "0x10", "1234567", "NaN", "four", []])
      expect(hopsOf(junk)).toEqual({});
  });
});

describe("publishPacketSize (external broker, MQTT 5)", () => {
  test("equals the bytes mqtt-packet writes for the PUBLISH, remaining lengths of 1 to 3 bytes", async () => {
    const { generate } = (await import("mqtt-packet")) as unknown as {
      generate(packet: object, opts: { protocolVersion: number }): Buffer;
    };
    const props = { origin: "fleet-x", episode: "0190f000-0000-7000-8000-000000000001", seq: "3", agent: "t/é" };
    for (const [bytes, qos, userProperties] of [
      [0, 0, undefined],
      [60, 1, undefined],
      [100, 1, props],
      [20_000, 1, props],
      [3_000_000, 0, { a: "b" }],
    ] as const) {
      const topic = "fleet/agents/t/ké/out";
      const wire = generate(
        {
          cmd: "publish",
          topic,
          payload: Buffer.alloc(bytes),
          qos,
          ...(qos > 0 ? { messageId: 42 } : {}),
          properties: userProperties ? { userProperties } : {},
        },
        { protocolVersion: 5 },
      );
      expect({ bytes, size: publishPacketSize(topic, bytes, qos, userProperties) }).toEqual({
        bytes,
        size: wire.length,
      });
    }
  });
});
