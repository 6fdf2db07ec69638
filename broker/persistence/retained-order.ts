/**
 * A retained copy sent to a new subscription never lands after a newer message of its topic.
 *
 * aedes 1.2.0 adds a SUBSCRIBE's subscriptions, writes its SUBACK and only then streams the retained
 * messages they match (lib/handlers/subscribe.js `completeSubscribe`), about one copy per loop turn:
 * its `through` waits for each write. A message published meanwhile reaches the new subscription live,
 * at once, and the older copy of its topic, read before, came after it: the client was left holding the
 * old value for good (a sensor's last reading; a `$SYS` count, republished only when it changes). With
 * broker.db the read itself comes later (its worker thread), and could return the new message, which
 * then arrived twice, the second time with RETAIN 1.
 *
 * So each copy a read yields is stamped with when the read began, and the client's delivery function
 * (../deliveries.ts, where live messages pass too, in the order they are written) drops a copy whose topic
 * was stored after its read began, before the session's queue keeps it: that newer message went to the
 * subscription live, since aedes stores a retained message before it publishes it.
 */
import { Readable } from "node:stream";
import type { StoredPacket } from "./codec.ts";

/** A read whose copies aedes never looks at (its stream torn down) stops holding the stores after this. */
const ABANDONED_MS = 60_000;

interface Read {
  /** The store count when the read began. */
  readonly since: number;
  /** The read itself while under way, and its copies not yet looked at. */
  open: number;
}

export class RetainedOrder {
  /** Retained stores counted since start. */
  private stores = 0;
  /** Topics stored while anything was pending, with the count at their last store. */
  private readonly storedAt = new Map<string, number>();
  /** Reads under way and copies not yet looked at: while any is, stores are remembered. */
  private pending = 0;
  /** Each copy by its payload, a view of its own: aedes' Packet keeps the payload object it is given. */
  private readonly copies = new WeakMap<object, { readonly topic: string; readonly read: Read }>();

  constructor(private readonly abandonedMs = ABANDONED_MS) {}

  /** A retained message of `topic` is being stored (or cleared). */
  stored(topic: string): void {
    this.stores++;
    if (this.pending > 0) this.storedAt.set(topic, this.stores);
  }

  /** The retained copies `source` reads, stamped: call it when the read begins. */
  stream(source: AsyncIterable<StoredPacket>): Readable {
    const read: Read = { since: this.stores, open: 1 };
    this.pending++;
    const self = this;
    return Readable.from(
      (async function* () {
        try {
          for await (const packet of source) {
            const payload = viewOf(packet.payload);
            read.open++;
            self.pending++;
            self.copies.set(payload, { topic: String(packet.topic), read });
            yield { ...packet, payload };
          }
        } finally {
          self.release(read);
          if (read.open > 0)
            setTimeout(() => {
              while (read.open > 0) self.release(read);
            }, self.abandonedMs).unref();
        }
      })(),
    );
  }

  /**
   * Whether `packet` may go to its client: false only for a retained copy whose topic was stored after its
   * read began. Call it for each replayed packet as it is delivered; it looks at each copy once.
   */
  mayForward(packet: { readonly payload?: unknown }): boolean {
    const payload = packet.payload;
    if (typeof payload !== "object" || payload === null) return true;
    const copy = this.copies.get(payload);
    if (copy === undefined) return true;
    this.copies.delete(payload);
    const fresh = (this.storedAt.get(copy.topic) ?? 0) <= copy.read.since;
    this.release(copy.read);
    return fresh;
  }

  /** Topics remembered now (for tests: none once nothing is pending). */
  get remembered(): number {
    return this.storedAt.size;
  }

  private release(read: Read): void {
    if (read.open === 0) return;
    read.open--;
    // With nothing pending, no store can matter to a copy yet to be read.
    if (--this.pending === 0) this.storedAt.clear();
  }
}

/** A payload object of its own over the same bytes (no copy). */
function viewOf(payload: unknown): Buffer {
  if (payload instanceof Uint8Array) return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  return Buffer.from(typeof payload === "string" ? payload : "");
}
