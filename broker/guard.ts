/**
 * Packet size guard (NOTES: aedes has no maximum packet size). Reads only the MQTT fixed
 * header of each packet as bytes stream past, so a connection can be closed the moment a
 * packet announces more than the limit, before any of its body is buffered.
 */

/** What the guard saw in a chunk. */
export type GuardVerdict =
  | { readonly ok: true }
  | { readonly ok: false; readonly kind: "oversized"; readonly packetBytes: number }
  | { readonly ok: false; readonly kind: "malformed" };

const OK: GuardVerdict = { ok: true };
const MALFORMED: GuardVerdict = { ok: false, kind: "malformed" };

/** Incremental MQTT fixed-header parser for one connection's inbound byte stream. */
export class PacketSizeGuard {
  /** Body bytes of the current packet still to pass before the next fixed header. */
  private bodyLeft = 0;
  /** True between a packet's type byte and the end of its remaining-length field. */
  private inHeader = false;
  private remaining = 0;
  private multiplier = 1;
  private lengthBytes = 0;
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
        const n = Math.min(this.bodyLeft, chunk.length - i);
        this.bodyLeft -= n;
        i += n;
        continue;
      }
      if (!this.inHeader) {
        // Byte 1: packet type and flags; aedes' parser judges those.
        this.inHeader = true;
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
    }
    return OK;
  }
}
