/**
 * Packet guard (aedes has no maximum packet size: it buffers whatever a packet announces).
 * Reads the MQTT fixed header of each packet as bytes stream past, so a connection can be closed the moment a packet
 * announces more than the limit, before any of its body is buffered. It also holds back the
 * few body bytes the input rules of packet-rules.ts need (all of CONNECT/SUBSCRIBE/
 * UNSUBSCRIBE, the topic of a PUBLISH) and closes the connection on a broken rule.
 */
import { bytesNeeded, PUBLISH, packetProblem } from "./packet-rules.ts";

/** What the guard saw in a chunk. */
export type GuardVerdict =
  | { readonly ok: true }
  | { readonly ok: false; readonly kind: "oversized"; readonly packetBytes: number }
  | { readonly ok: false; readonly kind: "malformed" }
  | { readonly ok: false; readonly kind: "invalid"; readonly reason: string };

const OK: GuardVerdict = { ok: true };
const MALFORMED: GuardVerdict = { ok: false, kind: "malformed" };

/** Incremental MQTT fixed-header parser for one connection's inbound byte stream. */
export class PacketSizeGuard {
  /** Body bytes of the current packet still to pass before the next fixed header. */
  private bodyLeft = 0;
  /** True between a packet's type byte and the end of its remaining-length field. */
  private inHeader = false;
  private type = 0;
  private remaining = 0;
  private multiplier = 1;
  private lengthBytes = 0;
  /** Body bytes of the current packet kept for the input rules, and how many they need. */
  private kept: Uint8Array = new Uint8Array(0);
  private keptLength = 0;
  private need = 0;
  /** A PUBLISH whose topic length (its first 2 body bytes) is not read yet. */
  private topicPending = false;
  private failed: GuardVerdict | null = null;

  constructor(private readonly maxPacketBytes: number) {}

  /**
   * Feed the next chunk. Any verdict other than ok is final: the caller must close the
   * connection and drop the chunk. Headers split across chunks are handled.
   */
  feed(chunk: Uint8Array): GuardVerdict {
    if (this.failed) return this.failed;
    let i = 0;
    while (i < chunk.length) {
      if (this.bodyLeft > 0) {
        let n = Math.min(this.bodyLeft, chunk.length - i);
        if (this.keptLength < this.need) {
          n = Math.min(n, this.need - this.keptLength);
          const verdict = this.keep(chunk.subarray(i, i + n));
          if (!verdict.ok) return (this.failed = verdict);
        }
        this.bodyLeft -= n;
        i += n;
        continue;
      }
      if (!this.inHeader) {
        // Byte 1: packet type and flags; aedes' parser judges the flags.
        this.inHeader = true;
        this.type = (chunk[i] ?? 0) >> 4;
        this.remaining = 0;
        this.multiplier = 1;
        this.lengthBytes = 0;
        i++;
        continue;
      }
      const b = chunk[i++] ?? 0;
      this.remaining += (b & 0x7f) * this.multiplier;
      this.multiplier *= 128;
      this.lengthBytes++;
      if (b & 0x80) {
        // MQTT-2.2.3: the remaining length takes at most 4 bytes.
        if (this.lengthBytes === 4) return (this.failed = MALFORMED);
        continue;
      }
      const packetBytes = 1 + this.lengthBytes + this.remaining;
      if (packetBytes > this.maxPacketBytes) {
        return (this.failed = { ok: false, kind: "oversized", packetBytes });
      }
      this.inHeader = false;
      this.bodyLeft = this.remaining;
      this.keptLength = 0;
      this.need = 0;
      this.topicPending = this.type === PUBLISH && this.remaining >= 2;
      this.expect(bytesNeeded(this.type, this.remaining, null));
    }
    return OK;
  }

  /** Keep body bytes; judge the packet once the rules have what they need. */
  private keep(bytes: Uint8Array): GuardVerdict {
    this.kept.set(bytes, this.keptLength);
    this.keptLength += bytes.length;
    if (this.keptLength < this.need) return OK;
    if (this.topicPending) {
      // The topic length is known now: keep the topic too.
      this.topicPending = false;
      this.expect(bytesNeeded(PUBLISH, this.remaining, (this.kept[0]! << 8) | this.kept[1]!));
      if (this.keptLength < this.need) return OK;
    }
    return this.judge();
  }

  /** Keep the first `need` body bytes of the current packet (already-kept bytes stay). */
  private expect(need: number): void {
    if (need > this.kept.length) {
      const grown = new Uint8Array(Math.max(need, 2 * this.kept.length, 64));
      grown.set(this.kept.subarray(0, this.keptLength));
      this.kept = grown;
    }
    this.need = need;
  }

  private judge(): GuardVerdict {
    const reason = packetProblem(this.type, this.kept.subarray(0, this.keptLength));
    this.need = 0;
    // A large CONNECT or SUBSCRIBE does not pin its buffer for the connection's life.
    if (this.kept.length > 4096) this.kept = new Uint8Array(64);
    return reason === null ? OK : { ok: false, kind: "invalid", reason };
  }
}
