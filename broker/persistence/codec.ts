/**
 * Packets as stored rows: JSON text where byte fields (payloads, MQTT 5 correlation data)
 * become `{"$b": base64}`, so a packet read back is deep-equal to the one stored.
 */

/** A packet as aedes hands it over: plain fields, byte payloads as Buffers. */
export type StoredPacket = Record<string, unknown> & { messageId?: number | null };

const BYTES = "$b";

function replacer(this: Record<string, unknown>, key: string, value: unknown): unknown {
  // JSON.stringify has already called Buffer#toJSON on `value`; read the original instead.
  const raw = this[key];
  if (raw instanceof Uint8Array)
    return { [BYTES]: Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString("base64") };
  return value;
}

function reviver(_key: string, value: unknown): unknown {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    const b = (value as Record<string, unknown>)[BYTES];
    if (typeof b === "string" && Object.keys(value).length === 1) return Buffer.from(b, "base64");
  }
  return value;
}

/** Encode a packet without its `messageId` (kept in a column of its own so it can be updated in place). */
export function encodePacket(packet: object): string {
  const { messageId: _omit, payload, ...rest } = packet as StoredPacket;
  // MQTT 5 properties may hold bytes anywhere: walk them (slower); else only the payload can.
  if (rest.properties !== undefined) return JSON.stringify({ ...rest, payload }, replacer);
  if (payload instanceof Uint8Array) {
    const b = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString("base64");
    return JSON.stringify({ ...rest, payload: { [BYTES]: b } });
  }
  return JSON.stringify(payload === undefined ? rest : { ...rest, payload });
}

/** Decode a stored packet; `messageId` comes from its column when it has one. */
export function decodePacket(text: string, messageId: number | null = null): StoredPacket {
  let packet = JSON.parse(text) as StoredPacket;
  if (packet.properties !== undefined) packet = JSON.parse(text, reviver) as StoredPacket;
  else {
    const b = (packet.payload as Record<string, unknown> | undefined)?.[BYTES];
    if (typeof b === "string") packet.payload = Buffer.from(b, "base64");
  }
  if (messageId !== null) packet.messageId = messageId;
  return packet;
}

/**
 * The fields aedes-packet's `Packet` keeps (aedes-packet 4: a queued copy gets a fresh,
 * unassigned messageId), so a queued packet is stored the way the in-memory persistence
 * would keep it.
 */
export function queuedCopy(original: StoredPacket): StoredPacket {
  const p: StoredPacket = {};
  for (const k of ["clientId", "nl", "properties", "messageExpiry"] as const) {
    if (Object.hasOwn(original, k)) p[k] = original[k];
  }
  p.cmd = original.cmd || "publish";
  p.brokerId = original.brokerId;
  p.brokerCounter = original.brokerCounter || 0;
  p.topic = original.topic;
  p.payload = original.payload || Buffer.alloc(0);
  p.qos = original.qos || 0;
  p.retain = original.retain || false;
  p.dup = original.dup || false;
  return p;
}

/**
 * The copy of a published packet an offline queue keeps for a subscriber. RETAIN 0: it goes out because it
 * matched an established subscription (MQTT-3.3.1-9). DUP 0: the publisher's flag is not passed on
 * (MQTT-3.3.1-3), and the queue sets it once this copy was sent (`OutgoingQueues.handedOver`).
 */
export function queuedForSubscriber(original: StoredPacket): StoredPacket {
  return { ...queuedCopy(original), retain: false, dup: false };
}

/**
 * The copy of a retained message a new subscription of a clean = false session is sent, as its queue keeps
 * it: RETAIN 1 (MQTT-3.3.1-8), DUP 0 until sent, at the QoS it goes out at.
 */
export function queuedRetained(original: StoredPacket, qos: number): StoredPacket {
  return { ...queuedCopy(original), qos, retain: true, dup: false };
}

/** A subscription aedes matched a publish to (one per matching filter); `qos` absent: a direct send. */
export interface QueuedFor {
  readonly clientId: string;
  readonly qos?: number;
}

/**
 * What the offline queues keep of `original` for `subs`: each client once, however many of its filters
 * matched (the live copies of overlapping filters are one delivery too: deliveries.ts), at the QoS it is
 * owed, the lower of the publish's and the highest its matching subscriptions granted (MQTT-3.8.4-6).
 * Queuing a copy per filter sent a reconnecting client the message twice, and with a QoS 2 copy the
 * second one's PUBREL found no packet: the connection was dropped at every reconnect.
 */
export function queuedPerClient(
  subs: readonly QueuedFor[],
  original: StoredPacket,
): { readonly copy: StoredPacket; readonly clientIds: string[] }[] {
  const published = Number(original.qos) || 0;
  const owed = new Map<string, number>();
  for (const s of subs)
    owed.set(s.clientId, Math.max(owed.get(s.clientId) ?? 0, Math.min(published, s.qos ?? published)));
  const byQos = new Map<number, string[]>();
  for (const [clientId, qos] of owed) {
    if (qos === 0) continue; // an offline client is owed no QoS 0 message
    const clients = byQos.get(qos) ?? [];
    clients.push(clientId);
    byQos.set(qos, clients);
  }
  const copy = queuedForSubscriber(original);
  return [...byQos].map(([qos, clientIds]) => ({ copy: { ...copy, qos }, clientIds }));
}
