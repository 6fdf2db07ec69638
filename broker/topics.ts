/**
 * Topic rules for device traffic (docs/mqtt.md) and MQTT topic-filter matching.
 * Pure functions on strings; the broker adapter calls them, and so can the router.
 */

/** A topic check result: expected refusals are values, not exceptions. */
export type TopicCheck = { readonly ok: true } | { readonly ok: false; readonly reason: string };

const OK: TopicCheck = { ok: true };

/**
 * MQTT filter match. Returns the wildcard captures in order ('+' -> one level, '#' -> the
 * remaining levels joined with '/'), or null if the topic does not match.
 */
export function matchTopic(filter: string, topic: string): string[] | null {
  // MQTT-4.7.2-1: a filter starting with a wildcard does not match topics starting with '$'.
  if ((filter.startsWith("+") || filter.startsWith("#")) && topic.startsWith("$")) return null;
  const f = filter.split("/");
  const t = topic.split("/");
  const captures: string[] = [];
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === "#") {
      // MQTT-4.7.1-2: '#' also matches the parent level ('a/#' matches 'a'), capturing "".
      if (i !== f.length - 1) return null;
      captures.push(t.slice(i).join("/"));
      return captures;
    }
    const actual = t[i];
    if (actual === undefined) return null;
    if (level === "+") captures.push(actual);
    else if (level !== actual) return null;
  }
  return f.length === t.length ? captures : null;
}

/** A filter compiled once: matches a topic already split into levels, returning the captures. */
export type CompiledFilter = (levels: readonly string[]) => string[] | null;

/** Compile an MQTT filter for repeated matching (same semantics as `matchTopic`). */
export function compileFilter(filter: string): CompiledFilter {
  const f = filter.split("/");
  const wildFirst = f[0] === "+" || f[0] === "#";
  const hashAt = f[f.length - 1] === "#" ? f.length - 1 : -1;
  return (t) => {
    // MQTT-4.7.2-1: a filter starting with a wildcard does not match topics starting with '$'.
    if (wildFirst && t[0]?.startsWith("$")) return null;
    if (hashAt < 0 ? t.length !== f.length : t.length < hashAt) return null;
    const captures: string[] = [];
    for (let i = 0; i < f.length; i++) {
      const level = f[i]!;
      if (i === hashAt) {
        // MQTT-4.7.1-2: '#' also matches the parent level ('a/#' matches 'a'), capturing "".
        captures.push(t.slice(i).join("/"));
        return captures;
      }
      if (level === "+") captures.push(t[i]!);
      else if (level !== t[i]) return null;
    }
    return captures;
  };
}

/** Most levels aedes takes in a topic (its `maxTopicLevels`, which its topic matchers cannot exceed). */
export const MAX_TOPIC_LEVELS = 100;
/** MQTT-1.5.3: a topic is a UTF-8 string of at most 65,535 bytes. */
const MAX_TOPIC_BYTES = 65_535;

/**
 * Whether `topic` is a topic name the broker can publish to (MQTT-3.3.2-2, MQTT-4.7.3-1/-2, MQTT-1.5.3,
 * and aedes' level limit): what a device cannot send, the gateway cannot publish either.
 */
export function checkTopicName(topic: string): TopicCheck {
  if (topic.length === 0) return { ok: false, reason: "empty topic" };
  // MQTT-3.3.2-2: wildcards are not allowed in a PUBLISH topic name.
  if (topic.includes("+") || topic.includes("#")) return { ok: false, reason: "wildcard in publish topic" };
  // MQTT-4.7.3-2: no U+0000 in topic names.
  if (topic.includes("\u0000")) return { ok: false, reason: "null character in topic" };
  if (Buffer.byteLength(topic) > MAX_TOPIC_BYTES)
    return { ok: false, reason: `topic longer than ${MAX_TOPIC_BYTES} bytes` };
  let levels = 1;
  for (let i = topic.indexOf("/"); i !== -1; i = topic.indexOf("/", i + 1)) levels++;
  if (levels > MAX_TOPIC_LEVELS) return { ok: false, reason: `topic of more than ${MAX_TOPIC_LEVELS} levels` };
  return OK;
}

/** The one `fleet/` topic a device may publish to: `fleet/agents/<type>/<key>/inbox`. */
function isInboxTopic(levels: readonly string[]): boolean {
  return levels.length === 5 && levels[1] === "agents" && levels[2] !== "" && levels[3] !== "" && levels[4] === "inbox";
}

/**
 * Whether a device may publish to `topic` (docs/mqtt.md): no wildcards, no empty topic, nothing
 * starting with '$' (covers `$SYS`), and nothing in the `fleet` namespace except
 * `fleet/agents/<type>/<key>/inbox`.
 */
export function checkDevicePublishTopic(topic: string): TopicCheck {
  const name = checkTopicName(topic);
  if (!name.ok) return name;
  // Overriding aedes' authorizePublish drops its own $SYS guard, so check here.
  if (topic.startsWith("$")) return { ok: false, reason: "topics starting with '$' are reserved" };
  // Split only under fleet/: this runs for every device message.
  if ((topic === "fleet" || topic.startsWith("fleet/")) && !isInboxTopic(topic.split("/"))) {
    return { ok: false, reason: "devices may only publish to fleet/agents/<type>/<key>/inbox under fleet/" };
  }
  return OK;
}

/**
 * Whether a device may subscribe to `filter`: nothing starting with `$` (broker internals, other clients'
 * ids, `$fleet/dropped` where permanently refused publishes go: hooks.ts), except `$SYS/...` when the broker
 * publishes its `$SYS/broker/` tree (`sys`: ./sys.ts; hooks.ts forwards nothing else under `$SYS/`).
 */
export function checkDeviceSubscribeFilter(filter: string, sys = false): TopicCheck {
  if (filter.startsWith("$") && !(sys && filter.startsWith("$SYS/")))
    return { ok: false, reason: "topics starting with '$' are reserved" };
  return OK;
}
