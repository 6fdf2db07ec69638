/**
 * A guarded MQTT connection: a Duplex that aedes reads and writes, fed by a transport
 * (TCP socket or WebSocket) only after every byte passed the packet size guard.
 */
import { Duplex } from "node:stream";
import type { GuardVerdict, PacketSizeGuard } from "./guard.ts";

/** A refusal from the guard. */
export type GuardViolation = Exclude<GuardVerdict, { ok: true }>;

/** The byte pipe under a connection. */
export interface Transport {
  /** Stop delivering inbound bytes (backpressure); may be a no-op. */
  pause(): void;
  resume(): void;
  /** Send bytes; call `done` once the transport can take more. */
  write(chunk: Uint8Array, done: (err?: Error | null) => void): void;
  end(): void;
  destroy(): void;
}

/** Bytes received from and sent to clients, every connection of a broker together ($SYS/broker/bytes/...). */
export interface Traffic {
  in: number;
  out: number;
}

/** The stream aedes sees for one client connection. */
export class GuardedConnection extends Duplex {
  constructor(
    private readonly transport: Transport,
    private readonly guard: PacketSizeGuard,
    private readonly onViolation: (v: GuardViolation) => void,
    /** Where the bytes this connection receives and sends are counted. */
    private readonly traffic: Traffic = { in: 0, out: 0 },
  ) {
    super({ allowHalfOpen: false });
  }

  /** Inbound bytes from the transport. A violating chunk is dropped whole and the connection destroyed. */
  receive(chunk: Uint8Array): void {
    if (this.destroyed) return;
    this.traffic.in += chunk.byteLength;
    const verdict = this.guard.feed(chunk);
    if (!verdict.ok) {
      // Destroy first so not one more byte of the announced packet is read or buffered.
      this.destroy();
      this.onViolation(verdict);
      return;
    }
    if (!this.push(chunk)) this.transport.pause();
  }

  /** The transport ended cleanly. */
  receiveEnd(): void {
    if (!this.destroyed) this.push(null);
  }

  /**
   * Everything buffered when no size is given, as Node does. Bun 1.4.5's `read()` returns only
   * the first buffered chunk; aedes reads once per `readable` and after each packet, so a
   * packet whose bytes arrived in several chunks while aedes was busy (a CONNECT still being
   * authenticated, a websocket client sending one frame per field) sat in the buffer until
   * the client sent something more: a PUBLISH with no PUBACK.
   */
  override read(size?: number): Buffer | null {
    return size === undefined || size === null || Number.isNaN(size)
      ? super.read(this.readableLength > 0 ? this.readableLength : undefined)
      : super.read(size);
  }

  override _read(): void {
    this.transport.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    this.traffic.out += chunk.byteLength;
    this.transport.write(chunk, done);
  }

  /**
   * The pieces of a corked write as one send: mqtt-packet writes a PUBLISH as five chunks
   * (header, length, topic length, topic, payload) inside cork/uncork, one syscall each otherwise.
   */
  override _writev(chunks: { chunk: Buffer }[], done: (err?: Error | null) => void): void {
    const bytes = chunks.length === 1 ? chunks[0]!.chunk : Buffer.concat(chunks.map((c) => c.chunk));
    this.traffic.out += bytes.byteLength;
    this.transport.write(bytes, done);
  }

  override _final(done: (err?: Error | null) => void): void {
    this.transport.end();
    done();
  }

  override _destroy(err: Error | null, done: (err?: Error | null) => void): void {
    this.transport.destroy();
    done(err);
  }
}

/**
 * Bytes of one connection's input parsed per turn of the event loop. aedes parses everything a
 * connection has buffered in one go and starts each packet's handling on the spot (~60 µs of
 * gateway CPU per QoS 1 message): a publisher that sends thousands of messages at once, or whose
 * bytes piled up during a commit, held the thread for the whole read while every other device
 * waited behind it. Parsing in slices lets the other connections, the commits and the episode
 * scheduler take turns between them. The parser keeps a packet cut at a slice's end until the
 * next slice completes it.
 *
 * How the input is cut does not decide a quiet agent's latency at a flood's onset (`bun
 * scripts/bench-policy.ts --flood`, its p99 against no flood): slices of 1 to 4 KB, and a window
 * of at most 64 publishes of one connection awaiting their commit before its next slice is parsed
 * (3.07x, 2.49x against 4.04x, 2.27x without), stayed within the run-to-run spread. What the
 * thread spends per message does.
 */
export const PARSE_SLICE_BYTES = 8 * 1024;

/** What `parseInSlices` needs of an aedes client: its MQTT parser. */
export interface SliceableClient {
  _parser: { parse(buf: Buffer): unknown };
}

/**
 * Make `client` parse its input at most `slice` bytes per turn of the event loop, in order; what
 * arrives meanwhile queues behind. Nothing more is parsed once `closed()` says the client is gone.
 */
export function parseInSlices(client: SliceableClient, closed: () => boolean, slice = PARSE_SLICE_BYTES): void {
  const parser = client._parser;
  const parseNow = parser.parse.bind(parser);
  const queue: Buffer[] = [];
  const drain = (): void => {
    if (closed()) {
      queue.length = 0;
      return;
    }
    const head = queue[0];
    if (head === undefined) return;
    if (head.length > slice) queue[0] = head.subarray(slice);
    else queue.shift();
    // Scheduled first: a slice's packets may read and parse more (aedes reads after each batch).
    if (queue.length > 0) setImmediate(drain);
    parseNow(head.length > slice ? head.subarray(0, slice) : head);
  };
  parser.parse = (buf: Buffer) => {
    if (queue.length === 0 && buf.length <= slice) return parseNow(buf);
    queue.push(buf);
    if (queue.length === 1) drain();
  };
}
