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
 */
import type { Client } from "aedes";

/** Counters remembered per client: copies of one message arrive together, so a few suffice. */
const REMEMBERED = 64;

type Deliver = (packet: DeliveredPacket, cb: () => void) => void;

/** What aedes hands a client's delivery functions (aedes-packet's Packet). */
interface DeliveredPacket {
  readonly qos: number;
  readonly brokerId?: string | null;
  readonly brokerCounter?: number;
}

/** The parts of aedes' Client this relies on (set in its constructor, read by `dedupe`). */
interface DeliveringClient {
  deliver0: Deliver;
  deliverQoS: Deliver;
  readonly duplicates: Record<string, number>;
}

/**
 * Make `client` drop only exact repeats. Call before it subscribes (aedes' `preConnect`): each
 * subscription keeps the delivery function it found.
 */
export function dedupeExactly(client: Client): void {
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
  c.deliver0 = (packet, cb) => {
    admit(packet);
    deliver0(packet, cb);
  };
  // aedes' deliverQoS hands a QoS 0 message to `deliver0` (this one): admitted there, once.
  c.deliverQoS = (packet, cb) => {
    if (packet.qos === 0) return c.deliver0(packet, cb);
    admit(packet);
    deliverQoS(packet, cb);
  };
}
