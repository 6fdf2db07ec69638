/**
 * One copy of each message per client, however late it comes.
 *
 * aedes 1.2.0 drops a message for a client when a message with a higher broker counter reached
 * that client first (lib/client.js `dedupe`). It is aedes' guard against handing one message to a
 * client twice through overlapping subscriptions, and it assumes messages reach clients in counter
 * order. They do not: the counter is taken when a publish starts, and a QoS 1/2 publish reaches
 * live clients only after its offline queue rows are written (broker.db here), so a publish that
 * started later, with no such write or a QoS 0 one, passes it. A client subscribed to both topics
 * (`fleet/#`, `#`) then never gets the earlier message, and nothing says so (aedes issues #955 and
 * #994, open; PR #972 proposes the same remedy as this file).
 *
 * Here each client remembers the counters it was handed last; a message is a duplicate only when
 * its counter is one of them. Copies through overlapping subscriptions come within one delivery
 * round, so a short memory holds them.
 *
 * And each message goes out at the QoS its subscriptions granted (MQTT-3.8.4-6: the lower of the
 * published QoS and the granted one). aedes 1.2.0 looks the granted QoS up by the message's own topic
 * (lib/client.js `deliverQoS`: `subscriptions[packet.topic]`), so only an exact-topic subscription
 * lowered it: a QoS 1 retained message went to a QoS 0 `rq/#` subscriber at QoS 1. Here the highest
 * QoS granted by any of the client's subscriptions matching the topic decides, for live messages and
 * for the retained ones a new subscription replays; overlapping subscriptions still deliver once, at
 * the highest of them, whichever copy comes first.
 *
 * And a retained message a new subscription of a clean = false session gets at QoS 1 or 2 joins the
 * session's queue, as a live one does (`RetainedQueue`): aedes 1.2.0 writes it unqueued, so a connection
 * lost before its PUBACK or PUBREC never got it again (MQTT-4.4.0-1; Mosquitto resends it).
 *
 * Replayed copies come about one per loop turn; one older than a message of its topic sent live
 * meanwhile is dropped here, before it is queued or sent (./persistence/retained-order.ts).
 */
import type { Client } from "aedes";
import { matchTopic } from "./topics.ts";

/** Counters remembered per client: copies of one message arrive together, so a few suffice. */
const REMEMBERED = 64;

type Deliver = (packet: DeliveredPacket, cb: () => void) => void;

/** What aedes hands a client's delivery functions (aedes-packet's Packet). */
interface DeliveredPacket {
  qos: number;
  dup?: boolean;
  retain?: boolean;
  readonly topic: string;
  brokerId?: string | null;
  readonly brokerCounter?: number;
}

/**
 * A persistence that keeps a retained message sent to a new subscription in the session's queue
 * (both of this project's: ./persistence/outgoing.ts `queueRetained`). Whether it was queued; if it
 * was, aedes is to send it as a queued one (RETAIN 0), and numbering it gives RETAIN 1 back.
 */
export interface RetainedQueue {
  queueRetained(clientId: string, packet: DeliveredPacket, qos: number): boolean;
}

/** Which retained copies a new subscription replays are older than a live message (./persistence/retained-order.ts). */
export interface RetainedCopies {
  mayForward(packet: object): boolean;
}

/**
 * A persistence that sends each queued message to a returning session one way only, live or from its
 * queue's read-back (./persistence/outgoing.ts `snapshot`): whether a live copy may go to `client`.
 */
export interface LiveClaims {
  claimLive(client: object, brokerId: string, brokerCounter: number): boolean;
}

/** The parts of aedes' Client this relies on (set in its constructor, read by `dedupe`). */
interface DeliveringClient {
  readonly id: string;
  /** Set at CONNECT: the session is kept (clean = false) or not. */
  readonly clean: boolean;
  readonly broker: { readonly id: string; readonly persistence: Partial<RetainedQueue & LiveClaims> };
  deliver0: Deliver;
  deliverQoS: Deliver;
  readonly duplicates: Record<string, number>;
  /** The client's subscriptions by filter, with the QoS granted (aedes' `Subscription`). */
  readonly subscriptions: Record<string, { readonly qos: number }>;
}

/**
 * The QoS `packet` goes out at through a client with these subscriptions: the published QoS, lowered
 * to the highest QoS granted by a subscription matching its topic (MQTT-3.8.4-6), or to `ceiling`
 * when none matches (a delivery no subscription asked for: aedes' `Client#publish`).
 */
export function deliveredQos(
  subscriptions: Readonly<Record<string, { readonly qos: number }>>,
  packet: { readonly qos: number; readonly topic: string },
  ceiling: number,
): number {
  let granted = -1;
  for (const filter in subscriptions) {
    const qos = subscriptions[filter]!.qos;
    if (qos <= granted || !matchTopic(filter, packet.topic)) continue;
    granted = qos;
    if (granted >= packet.qos) break; // nothing lowers it
  }
  return Math.min(packet.qos, granted < 0 ? ceiling : granted);
}

/**
 * Make `client` drop only exact repeats, and deliver at the QoS its subscriptions granted. Call before
 * it subscribes (aedes' `preConnect`): each subscription keeps the delivery function it found.
 */
export function dedupeExactly(client: Client, retained: RetainedCopies): void {
  const c = client as unknown as DeliveringClient;
  // The last counters handed over, with their broker's id (a session's queue kept across a restart
  // holds the counters of the broker before it).
  const counters = new Array<number>(REMEMBERED).fill(-1);
  const brokers = new Array<string>(REMEMBERED).fill("");
  let next = 0;
  const seen = (id: string, counter: number): boolean => {
    for (let i = 0; i < REMEMBERED; i++) if (counters[i] === counter && brokers[i] === id) return true;
    return false;
  };
  // Set aedes' high-water mark so its own check passes a first copy and stops a repeat.
  const admit = (packet: DeliveredPacket): void => {
    const id = packet.brokerId;
    const counter = packet.brokerCounter;
    if (!id || counter === undefined) return; // aedes does not dedupe these (retained on subscribe)
    if (seen(id, counter)) {
      c.duplicates[id] = Math.max(c.duplicates[id] ?? 0, counter);
      return;
    }
    c.duplicates[id] = counter - 1;
    counters[next] = counter;
    brokers[next] = id;
    next = (next + 1) % REMEMBERED;
  };
  const deliver0 = c.deliver0;
  const deliverQoS = c.deliverQoS;
  // A QoS 0 subscription's function (`deliver0`) sends a message at QoS 1 when another subscription
  // matching it granted QoS 1: the copies are one delivery, and the first one to come is the one sent.
  const deliverAt = (ceiling: number): Deliver => {
    return (packet, cb) => {
      // A retained message a new subscription replays has no broker id (lib/handlers/subscribe.js); its counter is new.
      const replay = packet.retain === true && !packet.brokerId;
      // Before it is queued or sent: a copy older than a message of its topic already sent live goes nowhere.
      if (replay && !retained.mayForward(packet)) return cb();
      const qos = packet.qos === 0 ? 0 : deliveredQos(c.subscriptions, packet, ceiling);
      if (qos > 0 && replay && c.clean === false && c.broker.persistence.queueRetained) {
        packet.brokerId = c.broker.id;
        if (c.broker.persistence.queueRetained(c.id, packet, qos)) packet.retain = false;
        else packet.brokerId = null;
      }
      // A message its session's queue holds, which the queue's read-back on CONNECT sends instead.
      if (c.clean === false && packet.brokerId && packet.brokerCounter !== undefined) {
        const claims = c.broker.persistence;
        if (claims.claimLive && !claims.claimLive(c, packet.brokerId, packet.brokerCounter)) return cb();
      }
      admit(packet);
      // A first delivery to this client, whatever the publisher's flag (MQTT-3.3.1-3); a resend of a
      // session's message comes from its queue, not through here (OutgoingQueues.handedOver).
      packet.dup = false;
      if (qos === 0) return deliver0(packet, cb);
      packet.qos = qos; // the copy aedes made for this client's subscription (or retained replay)
      deliverQoS(packet, cb);
    };
  };
  c.deliver0 = deliverAt(0);
  c.deliverQoS = deliverAt(Number.POSITIVE_INFINITY);
}
