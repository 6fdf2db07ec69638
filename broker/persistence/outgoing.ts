/**
 * Each client session's outgoing queue as both persistences keep it in memory: per packet its broker
 * id and counter and the messageId it was sent with (broker.db keeps the packets themselves on disk,
 * `persistence = "memory"` in the entries). The matching aedes relies on lives here, with what its own
 * in-memory persistence gets wrong: a session coming back while messages keep coming, a second
 * pending QoS 2 PUBREL, a packet identifier drawn twice.
 */
import type { Logger } from "pino";
import type { StoredPacket } from "./codec.ts";

/** A queued packet as the index knows it (queue order = delivery order). */
export interface QueueEntry {
  brokerId: string | null;
  brokerCounter: number | null;
  messageId: number | null;
  /** The queued packet itself, where the persistence keeps it in memory (`persistence = "memory"`). */
  packet?: StoredPacket;
  /** Its payload's size, counted against `maxBytes` while it is queued. */
  bytes?: number;
  /** The packet being delivered (set when aedes numbers it), so its PUBACK needs no read-back. */
  inFlight?: StoredPacket;
  /** When aedes last numbered it (the count of sends). */
  sent?: number;
  /** Gone from its queue (acknowledged). */
  cleared?: boolean;
  /** A retained message sent to a new subscription (`queueRetained`): it goes out with RETAIN 1. */
  retained?: true;
  /** The connection that sent it live (`claimLive`, `connectionOf`): its read-back of the queue leaves it out. */
  liveBy?: number;
  /** The connection whose read-back of the queue hands it over (`snapshot`): its live copies are dropped. */
  readBy?: number;
}

/** The entry a packet aedes numbered is (`OutgoingQueues.number`). */
export interface Numbered {
  readonly entry: QueueEntry;
  /** The entry held another packet: it is this one now. */
  readonly replaces: boolean;
  /** The entry is new: a PUBREL of a PUBLISH never queued (`OutgoingQueues.keepPubrel`). */
  readonly added?: true;
  /** The entry left its queue: it goes out at QoS 0 (`OutgoingQueues.sentAtQos0`). */
  readonly delivered?: true;
  /** The entry is new: a live PUBLISH its publish's queuing missed (`OutgoingQueues.joinLate`). */
  readonly joined?: true;
}

/** What aedes passes as a client: its id, and its next packet identifier (aedes' own field). */
export interface ClientRef {
  readonly id: string;
  _nextId?: number;
}

/** The drop log's rate limit (one line per 10 s at most, with the count since the last one). */
const DROP_LOG_INTERVAL_MS = 10_000;

/**
 * Messages full queues turned away, remembered for their live sends (`number`), which follow within
 * milliseconds: the newest this many, across all clients.
 */
const TURNED_AWAY_KEPT = 4096;

/** The bytes of a packet's payload (what `maxBytes` counts, as Mosquitto's max_queued_bytes). */
export function payloadBytes(packet: StoredPacket): number {
  const payload = packet.payload;
  if (payload instanceof Uint8Array) return payload.byteLength;
  return typeof payload === "string" ? Buffer.byteLength(payload) : 0;
}

/** The largest MQTT packet identifier (they run 1..65535). */
const MAX_PACKET_ID = 65_535;

export const num = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));

/** Every client's queue, bounded; what aedes' outgoing calls decide before anything is stored. */
export class OutgoingQueues {
  private readonly queues = new Map<string, QueueEntry[]>();
  /** Payload bytes each client's queue holds (`QueueEntry.bytes`). */
  private readonly queuedBytes = new Map<string, number>();
  /** The last messages full queues turned away (`client id, broker id:counter`), oldest first. */
  private readonly turnedAway = new Set<string>();
  /** Packets numbered so far: orders a live send against a queue's read-back. */
  private sends = 0;
  /** Payloads of the packets queues' read-backs have handed aedes (see `number`). */
  private readonly readBack = new WeakSet<object>();
  /** A number per connection (aedes' client object), for entries to name one without holding on to it. */
  private readonly connections = new WeakMap<ClientRef, number>();
  private lastConnection = 0;

  /** Most packets per client (queued + in flight). */
  readonly max: number;
  /** Most payload bytes per client (queued + in flight); 0: no bound but `max`. */
  readonly maxBytes: number;
  /** Most payload bytes in all clients' queues together; 0: no bound. */
  readonly maxTotalBytes: number;
  /** Payload bytes in all queues (the sum of `queuedBytes`). */
  private totalBytes = 0;
  private droppedTotal = 0;
  private droppedSinceLog = 0;
  private lastDropLog = Number.NEGATIVE_INFINITY;

  /** `now`: the clock of the drop log's rate limit. */
  constructor(
    private readonly opts: {
      readonly max: number;
      readonly maxBytes?: number;
      readonly maxTotalBytes?: number;
      readonly logger?: Logger;
      readonly now?: () => number;
    },
  ) {
    this.max = opts.max;
    this.maxBytes = opts.maxBytes ?? 0;
    this.maxTotalBytes = opts.maxTotalBytes ?? 0;
    if (!Number.isInteger(this.max) || this.max < 1)
      throw new RangeError(`maxOfflineMessages must be a positive integer, got ${opts.max}`);
    if (!Number.isInteger(this.maxBytes) || this.maxBytes < 0)
      throw new RangeError(`maxOfflineBytes must be a non-negative integer, got ${opts.maxBytes}`);
    if (!Number.isInteger(this.maxTotalBytes) || this.maxTotalBytes < 0)
      throw new RangeError(`maxOfflineBytesTotal must be a non-negative integer, got ${opts.maxTotalBytes}`);
  }

  /** Packets refused by a full queue since start. */
  get dropped(): number {
    return this.droppedTotal;
  }

  /** Payload bytes held in all queues. */
  get bytes(): number {
    return this.totalBytes;
  }

  /** Packets held in all queues. */
  get size(): number {
    let n = 0;
    for (const q of this.queues.values()) n += q.length;
    return n;
  }

  /** Append an entry to a client's queue as it was stored (at start, from disk); not bounded. */
  restore(clientId: string, entry: QueueEntry): void {
    this.queueOf(clientId).push(entry);
    this.addBytes(clientId, entry.bytes ?? 0);
  }

  /**
   * Queue a copy of `entry` (with its payload's `bytes`) for each client with room: fewer than `max`
   * messages, and room for the bytes under `maxBytes` and, with every other queue, under `maxTotalBytes`.
   * A full queue drops it for that client (the oldest are kept). Returns the clients it was queued for.
   */
  enqueue(clientIds: readonly string[], topic: string, entry: QueueEntry & { readonly bytes: number }): string[] {
    const kept: string[] = [];
    for (const clientId of clientIds) {
      const queue = this.queueOf(clientId);
      if (!this.hasRoom(clientId, queue, entry.bytes)) {
        if (queue.length === 0) this.queues.delete(clientId);
        this.drop(clientId, topic, entry);
        continue;
      }
      queue.push({ ...entry });
      this.addBytes(clientId, entry.bytes);
      kept.push(clientId);
    }
    return kept;
  }

  /** Whether `clientId`'s queue (and all of them together) has room for one more message of `bytes`. */
  private hasRoom(clientId: string, queue: readonly QueueEntry[], bytes: number): boolean {
    if (queue.length >= this.max) return false;
    if (this.maxBytes > 0 && (this.queuedBytes.get(clientId) ?? 0) + bytes > this.maxBytes) return false;
    return !(this.maxTotalBytes > 0 && this.totalBytes + bytes > this.maxTotalBytes);
  }

  private addBytes(clientId: string, bytes: number): void {
    if (bytes === 0) return;
    this.totalBytes += bytes;
    const total = (this.queuedBytes.get(clientId) ?? 0) + bytes;
    if (total === 0) this.queuedBytes.delete(clientId);
    else this.queuedBytes.set(clientId, total);
  }

  /** `entry` left `clientId`'s queue (already spliced out): it is cleared, and its bytes given back. */
  private released(clientId: string, queue: QueueEntry[], entry: QueueEntry): void {
    if (queue.length === 0) this.queues.delete(clientId);
    entry.cleared = true;
    this.addBytes(clientId, -(entry.bytes ?? 0));
  }

  /**
   * aedes numbered `packet` to send it: its entry (the same broker id and counter, else the one holding
   * its messageId: a PUBREL replacing its PUBLISH), now recording the messageId and the packet in
   * flight; `replaces` when the entry held another packet (it is this one now), `added` when the entry
   * is new (a PUBREL of a PUBLISH never queued: `keepPubrel`), `delivered` when it left its queue (sent
   * at QoS 0: `sentAtQos0`). Null, with nothing to keep, for a
   * read-back's copy whose live twin was acknowledged meanwhile (sent once more, at least once) and for
   * a live send of a message a full queue dropped (sent once, at most once). `joined` for a live PUBLISH
   * whose publish's queuing missed this session (`joinLate`). Throws for another packet no queue holds
   * (a PUBLISH at QoS 0 or from no broker), as aedes' own persistence does.
   */
  number(client: ClientRef, packet: StoredPacket): Numbered | null {
    const bid = (packet.brokerId as string | undefined) ?? null;
    const bc = num(packet.brokerCounter);
    if (bid !== null) this.renumberIfTaken(client, bid, bc, packet);
    const mid = num(packet.messageId);
    const entry = this.find(client.id, bid, bc, mid);
    if (!entry) {
      // aedes wraps the packet it read (aedes-packet) but keeps its payload, which tells it from a live send.
      if (this.readBack.has(packet.payload as object)) return null;
      // A message dropped from a full queue still goes to a connected client, once, live: an error here
      // would make aedes close the connection of a client that is only behind.
      if (bid !== null && this.turnedAway.delete(`${client.id}\n${bid}:${bc}`)) return null;
      if (bid !== null && (this.queues.get(client.id)?.length ?? 0) >= this.max) return null;
      if (packet.cmd === "pubrel" && mid !== null) return this.keepPubrel(client.id, mid, packet);
      if (packet.cmd === "publish" && bid !== null && Number(packet.qos) > 0) return this.joinLate(client.id, packet);
      throw new Error("no such packet");
    }
    if (packet.cmd === "publish" && Number(packet.qos) === 0) return this.sentAtQos0(client.id, entry);
    // aedes queues only what it sends with RETAIN 0 (lib/client.js `deliverQoS`): a retained message
    // queued for a new subscription reaches it so, and gets its flag back before aedes writes this packet.
    if (entry.retained) {
      if (packet.cmd === "publish") packet.retain = true;
      else delete entry.retained; // its PUBREL now
    }
    const replaces = entry.brokerId !== bid || entry.brokerCounter !== bc;
    if (entry.messageId !== null && packet.cmd === "publish" && this.readBack.has(packet.payload as object)) {
      // MQTT-3.3.1-1: a session's PUBLISH sent before (numbered then) goes out again with DUP = 1: aedes
      // writes this very packet next, and never sets the flag on a read-back itself. One never sent keeps
      // the DUP = 0 it was queued with (`queuedForSubscriber`).
      packet.dup = true;
    }
    entry.sent = ++this.sends;
    entry.brokerId = bid;
    entry.brokerCounter = bc;
    entry.messageId = mid;
    entry.inFlight = packet;
    return { entry, replaces };
  }

  /**
   * A queued message aedes sends at QoS 0 leaves the queue: nothing acknowledges it (at most once). It was
   * queued at the QoS the client's filters owe it (`queuedPerClient`), but aedes 1.2.0 lowers a live copy to
   * the QoS of a subscription to exactly its topic (lib/client.js `deliverQoS`; docs/broker.md). Kept, it
   * came again with DUP = 1 when the session came back, and such messages filled a connected client's queue
   * until `max` and every later one was dropped from it.
   */
  private sentAtQos0(clientId: string, entry: QueueEntry): Numbered {
    const queue = this.queues.get(clientId)!;
    queue.splice(queue.indexOf(entry), 1);
    this.released(clientId, queue, entry);
    return { entry, replaces: false, delivered: true };
  }

  /**
   * The PUBREL answering a PUBREC for a PUBLISH no queue held: a retained message sent to a new
   * subscription, which aedes writes without queuing it (lib/client.js `deliverQoS`; deliveries.ts
   * queues it for a clean = false session, unless its queue is full). It joins the session's queue
   * like any PUBREL, so it is sent again when the session comes back (MQTT-4.4.0-1) and its PUBCOMP
   * clears it. Thrown at ("no such packet"), aedes closed the connection of every clean = false client
   * a retained QoS 2 message reached at QoS 2. Past `max` it is sent and not kept, like a live
   * message a full queue dropped.
   */
  private keepPubrel(clientId: string, messageId: number, packet: StoredPacket): Numbered | null {
    const queue = this.queueOf(clientId);
    if (queue.length >= this.max) return null;
    const entry: QueueEntry = {
      brokerId: null,
      brokerCounter: null,
      messageId,
      inFlight: packet,
      sent: ++this.sends,
    };
    queue.push(entry);
    return { entry, replaces: true, added: true };
  }

  /**
   * A live QoS 1/2 PUBLISH no queue holds: a message published while this session's subscription was being
   * stored. aedes stores a SUBSCRIBE's subscriptions, then adds them to its live routing; a publish meanwhile
   * queued for the sessions stored before (its queuing waits on a commit with broker.db), and reached the new
   * one live. It joins the session's queue at its send, so a connection lost before its PUBACK brings it
   * again (MQTT-4.4.0-1); past the bounds it is sent and not kept (counted as dropped). Thrown at ("no such
   * packet"), aedes closed the connection: a clean = false device that subscribed while its topic was busy
   * was disconnected and got nothing.
   */
  private joinLate(clientId: string, packet: StoredPacket): Numbered | null {
    const queue = this.queueOf(clientId);
    const bytes = payloadBytes(packet);
    if (!this.hasRoom(clientId, queue, bytes)) {
      if (queue.length === 0) this.queues.delete(clientId);
      // Counted and logged as any drop; nothing to remember for a live send: this is it.
      this.drop(clientId, String(packet.topic), { brokerId: null, brokerCounter: null, messageId: null });
      return null;
    }
    const entry: QueueEntry = {
      brokerId: (packet.brokerId as string | undefined) ?? null,
      brokerCounter: num(packet.brokerCounter),
      messageId: num(packet.messageId),
      bytes,
      inFlight: packet,
      sent: ++this.sends,
    };
    queue.push(entry);
    this.addBytes(clientId, bytes);
    return { entry, replaces: false, joined: true };
  }

  /**
   * Queue a retained message sent to a new subscription of a clean = false session, which aedes sends
   * without queuing it (lib/client.js `deliverQoS`): so a connection lost before its PUBACK or PUBREC
   * brings it again when the session comes back (MQTT-4.4.0-1), as Mosquitto does. Whether it was
   * queued (a full queue sends it unkept, as a live message a full queue dropped).
   */
  queueRetained(clientId: string, topic: string, entry: QueueEntry & { readonly bytes: number }): boolean {
    return this.enqueue([clientId], topic, { ...entry, retained: true }).length > 0;
  }

  /** Forget a client's whole queue (its session ended); returns how many entries it held. */
  dropClient(clientId: string): number {
    const queue = this.queues.get(clientId);
    this.queues.delete(clientId);
    this.totalBytes -= this.queuedBytes.get(clientId) ?? 0;
    this.queuedBytes.delete(clientId);
    for (const entry of queue ?? []) entry.cleared = true;
    return queue?.length ?? 0;
  }

  /** Remove the first entry holding `messageId` (a PUBACK or PUBCOMP) and return it. */
  clear(clientId: string, messageId: number | null): QueueEntry | undefined {
    const queue = this.queues.get(clientId);
    const at = messageId === null || !queue ? -1 : queue.findIndex((e) => e.messageId === messageId);
    if (at < 0) return undefined;
    const [entry] = queue!.splice(at, 1);
    this.released(clientId, queue!, entry!);
    return entry;
  }

  /**
   * The first entry of a client's queue that is this packet: the same broker id and counter, else its
   * messageId. A packet with no broker id (a PUBREL, which replaces its PUBLISH) is found by its
   * messageId alone: matched on the missing ids, as aedes' in-memory persistence does, a second PUBREL
   * took the first one's entry, so after a reconnection the first message's PUBREL was never sent
   * again (its QoS 2 flow never completed) and the second message went out twice.
   */
  find(clientId: string, bid: string | null, bc: number | null, mid: number | null): QueueEntry | undefined {
    const sameId = (e: QueueEntry) => mid !== null && e.messageId === mid;
    return this.queues
      .get(clientId)
      ?.find((e) => (bid === null ? sameId(e) : e.brokerId === bid ? e.brokerCounter === bc : sameId(e)));
  }

  /**
   * A client's queue as it stands when the client comes back, for aedes' read-back on CONNECT: `hands(e)`
   * says whether an entry is still to be handed over then. Not when it has left the queue meanwhile, or
   * was sent since; entries queued after this call go out live. aedes takes a packet it cannot number
   * ("no such packet") for the client's error and drops its connection: a session coming back while
   * messages kept coming was dropped at every try.
   *
   * aedes restores the session's subscriptions before it reads the queue, and a message published in
   * between is both queued and sent live. Each such message goes out one way only: one this connection
   * already sent live (`claimLive`) is left out here, and the others are this read-back's, whose live
   * copies `claimLive` turns away. Sent both ways, a message published while its subscriber came back
   * reached it twice, under two packet identifiers: QoS 2 delivered twice (MQTT-4.3.3).
   */
  snapshot(client: ClientRef): { readonly entries: readonly QueueEntry[]; hands(entry: QueueEntry): boolean } {
    const connection = this.connectionOf(client);
    const entries = (this.queues.get(client.id) ?? []).filter((e) => e.liveBy !== connection);
    for (const e of entries) e.readBy = connection;
    const at = new Set(entries);
    const since = this.sends;
    return { entries, hands: (e) => at.has(e) && !e.cleared && (e.sent ?? 0) <= since };
  }

  /**
   * Whether a live copy of the message with this broker id and counter may go to `client` (a connection of
   * a clean = false session): not when that connection's read-back holds it (`snapshot`), which sends it.
   * Otherwise a queued message is marked as sent live by this connection, for its read-back to leave out.
   */
  claimLive(client: ClientRef, brokerId: string, brokerCounter: number): boolean {
    const entry = this.find(client.id, brokerId, brokerCounter, null);
    if (!entry) return true;
    const connection = this.connectionOf(client);
    if (entry.readBy === connection) return false;
    entry.liveBy = connection;
    return true;
  }

  private connectionOf(client: ClientRef): number {
    let n = this.connections.get(client);
    if (n === undefined) {
      n = ++this.lastConnection;
      this.connections.set(client, n);
    }
    return n;
  }

  /** A packet a read-back handed aedes: until aedes numbers it, it may still go out live and be acknowledged. */
  handedOver(packet: StoredPacket): void {
    // (A Buffer from the wire or the gateway. A PUBREL has none: its PUBCOMP cannot come before it is sent.)
    if (typeof packet.payload === "object" && packet.payload !== null) this.readBack.add(packet.payload);
  }

  /**
   * A returning connection starts numbering at a random identifier (aedes' `_nextId`) while packets
   * of its session are still in flight under the identifiers they were sent with. A new packet given
   * one of those would be in flight twice (MQTT-2.3.1-2 wants a currently unused one): the client
   * drops a second QoS 2 PUBLISH with a pending identifier as a duplicate, and a packet of an earlier
   * broker run holding it is the entry `find` matches first: the new message took over that entry, and
   * the old one, unacknowledged, was never sent again if the connection broke before its PUBACK. Such
   * a packet gets the next identifier nothing of the session holds, and aedes numbers on from there.
   */
  private renumberIfTaken(client: ClientRef, bid: string, bc: number | null, packet: StoredPacket): void {
    const queue = this.queues.get(client.id);
    const mid = num(packet.messageId);
    if (!queue || mid === null) return;
    const own = queue.find((e) => e.brokerId === bid && e.brokerCounter === bc);
    if (!own || !queue.some((e) => e !== own && e.messageId === mid)) return;
    const taken = new Set(queue.map((e) => (e === own ? null : e.messageId)));
    const start = Number.isInteger(client._nextId) && client._nextId! >= 1 ? client._nextId! : mid;
    for (let i = 0, id = start; i < MAX_PACKET_ID; i++, id = (id % MAX_PACKET_ID) + 1) {
      if (taken.has(id)) continue;
      packet.messageId = id;
      client._nextId = (id % MAX_PACKET_ID) + 1;
      return;
    }
    throw new Error(`every packet identifier is in flight for client ${client.id}`);
  }

  /**
   * Count a refused packet, and remember it for its live send (`number`); logged at most once every 10 s,
   * with the count since the last line.
   */
  private drop(clientId: string, topic: string, entry: QueueEntry): void {
    this.droppedTotal++;
    this.droppedSinceLog++;
    if (entry.brokerId !== null) {
      this.turnedAway.add(`${clientId}\n${entry.brokerId}:${entry.brokerCounter}`);
      if (this.turnedAway.size > TURNED_AWAY_KEPT) this.turnedAway.delete(this.turnedAway.values().next().value!);
    }
    const t = (this.opts.now ?? Date.now)();
    if (t - this.lastDropLog < DROP_LOG_INTERVAL_MS) return;
    const queued = { messages: this.queues.get(clientId)?.length ?? 0, bytes: this.queuedBytes.get(clientId) ?? 0 };
    this.opts.logger?.warn(
      {
        client: clientId,
        topic,
        dropped: this.droppedSinceLog,
        total: this.droppedTotal,
        queued,
        queuedAll: this.totalBytes,
        max: this.max,
        maxBytes: this.maxBytes,
        maxTotalBytes: this.maxTotalBytes,
      },
      "offline queue full (max_offline_messages, max_offline_bytes or max_offline_bytes_total); " +
        "message dropped for this client",
    );
    this.lastDropLog = t;
    this.droppedSinceLog = 0;
  }

  private queueOf(clientId: string): QueueEntry[] {
    let q = this.queues.get(clientId);
    if (!q) {
      q = [];
      this.queues.set(clientId, q);
    }
    return q;
  }
}
