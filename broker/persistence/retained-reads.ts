/**
 * Which retained messages a read of broker.db's retained table must leave out: those stored after the
 * read began.
 *
 * aedes 1.2.0 adds a SUBSCRIBE's subscriptions, writes its SUBACK and only then asks for the retained
 * messages they match (lib/handlers/subscribe.js `completeSubscribe`). broker.db answers on its worker
 * thread, later: a message published retained meanwhile reached the new subscription live and was read
 * back too, so the subscriber got it twice, the second time with RETAIN 1 (a QoS 2 message included).
 * A message stored after the read began was published to the subscription already in place: the live
 * copy is the one it gets. (aedes' in-memory persistence reads its map at once: no such window.)
 */
export class RetainedReads {
  /** Retained stores counted since start. */
  private stores = 0;
  /** Topics stored while a read was open, with the count at their last store. */
  private readonly storedAt = new Map<string, number>();
  private open = 0;

  /** A retained message of `topic` is being stored (or cleared). */
  stored(topic: string): void {
    this.stores++;
    if (this.open > 0) this.storedAt.set(topic, this.stores);
  }

  /** A read begins: `storedSince(topic)` says whether `topic` was stored after it began; call `end()` after it. */
  begin(): { storedSince(topic: string): boolean; end(): void } {
    const since = this.stores;
    this.open++;
    let ended = false;
    return {
      storedSince: (topic) => (this.storedAt.get(topic) ?? 0) > since,
      end: () => {
        if (ended) return;
        ended = true;
        // With no read open, no store can matter to a read yet to begin.
        if (--this.open === 0) this.storedAt.clear();
      },
    };
  }
}
