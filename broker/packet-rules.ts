/**
 * MQTT 3.1.1 input rules that aedes and mqtt-packet do not enforce, checked on a packet's
 * raw body bytes (mqtt-packet decodes strings leniently, so invalid UTF-8 would reach us as
 * U+FFFD and could no longer be told apart). Pure functions; the guard calls them.
 */

/** MQTT control packet types the rules look at (MQTT 3.1.1 §2.2.1). */
export const CONNECT = 1;
export const PUBLISH = 3;
export const SUBSCRIBE = 8;
export const UNSUBSCRIBE = 10;

const strict = new TextDecoder("utf-8", { fatal: true });

/** Why a UTF-8 string field is not allowed (MQTT-1.5.3-1, -2), or null. */
function stringProblem(bytes: Uint8Array, what: string): string | null {
  // Fast path: printable-or-control ASCII without NUL is valid UTF-8 (most topics).
  let ascii = true;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]!;
    if (b === 0 || b >= 0x80) {
      ascii = false;
      break;
    }
  }
  if (ascii) return null;
  let text: string;
  try {
    text = strict.decode(bytes);
  } catch {
    return `${what} is not valid UTF-8 (MQTT-1.5.3-1)`;
  }
  if (text.includes("\u0000")) return `${what} contains U+0000 (MQTT-1.5.3-2)`;
  return null;
}

/** Why a topic name may not be published to (MQTT-4.7.3-1, MQTT-3.3.2-2), or null; its bytes are valid UTF-8. */
function topicNameProblem(bytes: Uint8Array): string | null {
  if (bytes.length === 0) return "topic name is empty (MQTT-4.7.3-1)";
  for (const b of bytes)
    if (b === 0x2b || b === 0x23) return "topic name contains a wildcard character + or # (MQTT-3.3.2-2)";
  return null;
}

/** Why a topic filter is malformed (MQTT-4.7.3-1, MQTT-4.7.1-2, -3), or null; its bytes are valid UTF-8. */
function filterShapeProblem(bytes: Uint8Array): string | null {
  if (bytes.length === 0) return "topic filter is empty (MQTT-4.7.3-1)";
  let levelStart = 0;
  for (let i = 0; i <= bytes.length; i++) {
    if (i < bytes.length && bytes[i] !== 0x2f) continue;
    const level = bytes.subarray(levelStart, i);
    const wild = level.findIndex((b) => b === 0x2b || b === 0x23);
    if (wild !== -1 && level.length !== 1)
      return "a wildcard + or # must be a whole level of the topic filter (MQTT-4.7.1-2, -3)";
    if (level[0] === 0x23 && i !== bytes.length) return "# must be the last level of the topic filter (MQTT-4.7.1-2)";
    levelStart = i + 1;
  }
  return null;
}

/** A cursor over a packet body; `null` from a read means the body ended early (mqtt-packet reports that). */
class Reader {
  pos = 0;
  constructor(readonly body: Uint8Array) {}
  byte(): number | null {
    return this.pos < this.body.length ? this.body[this.pos++]! : null;
  }
  u16(): number | null {
    if (this.pos + 2 > this.body.length) return null;
    const v = (this.body[this.pos]! << 8) | this.body[this.pos + 1]!;
    this.pos += 2;
    return v;
  }
  /** A length-prefixed field (string or binary). */
  field(): Uint8Array | null {
    const n = this.u16();
    if (n === null || this.pos + n > this.body.length) return null;
    const out = this.body.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
}

function connectProblem(body: Uint8Array): string | null {
  const r = new Reader(body);
  const protocol = r.field();
  const level = r.byte();
  const flags = r.byte();
  if (protocol === null || level === null || flags === null || r.u16() === null) return null;
  // Only 3.1 (3) and 3.1.1 (4); aedes answers any other level with CONNACK 1.
  if (level !== 3 && level !== 4) return null;
  const will = (flags & 0x04) !== 0;
  const willQos = (flags >> 3) & 0x03;
  if (will && willQos === 3) return "will QoS 3 (MQTT-3.1.2-14)";
  if (!will && (willQos !== 0 || (flags & 0x20) !== 0))
    return "will QoS or retain set without a will (MQTT-3.1.2-13, -15)";
  const clientId = r.field();
  if (clientId === null) return null;
  const p = stringProblem(clientId, "client id");
  if (p) return p;
  if (will) {
    const topic = r.field();
    if (topic === null) return null;
    const t =
      stringProblem(topic, "will topic") ?? topicNameProblem(topic)?.replace("topic name", "will topic") ?? null;
    if (t) return t;
    if (r.field() === null) return null; // will message: binary
  }
  if (flags & 0x80) {
    const username = r.field();
    if (username === null) return null;
    return stringProblem(username, "user name");
  }
  return null;
}

function filtersProblem(body: Uint8Array, withQos: boolean): string | null {
  const r = new Reader(body);
  if (r.u16() === null) return null;
  while (r.pos < body.length) {
    const filter = r.field();
    if (filter === null) return null;
    const p = stringProblem(filter, "topic filter") ?? filterShapeProblem(filter);
    if (p) return p;
    if (withQos && r.byte() === null) return null;
  }
  return null;
}

/**
 * How many leading body bytes of a packet the rules need: all of CONNECT, SUBSCRIBE and
 * UNSUBSCRIBE, only the topic of a PUBLISH (`topicLength` once its first 2 bytes are in),
 * nothing of other packets.
 */
export function bytesNeeded(type: number, remaining: number, topicLength: number | null): number {
  switch (type) {
    case CONNECT:
    case SUBSCRIBE:
    case UNSUBSCRIBE:
      return remaining;
    case PUBLISH:
      return Math.min(remaining, topicLength === null ? 2 : 2 + topicLength);
    default:
      return 0;
  }
}

/** Why a packet breaks an input rule (the connection must be closed), or null. `body` holds `bytesNeeded` bytes. */
export function packetProblem(type: number, body: Uint8Array): string | null {
  switch (type) {
    case CONNECT:
      return connectProblem(body);
    case PUBLISH: {
      const topic = new Reader(body).field();
      return topic === null ? null : (stringProblem(topic, "topic name") ?? topicNameProblem(topic));
    }
    case SUBSCRIBE:
      return filtersProblem(body, true);
    case UNSUBSCRIBE:
      return filtersProblem(body, false);
    default:
      return null;
  }
}
