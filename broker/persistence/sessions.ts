/**
 * Which clean = false sessions exist, so CONNACK's session present is right for one with no subscriptions.
 *
 * MQTT 3.1.1 §3.1.2.4 counts "the existence of a Session, even if the rest of the Session state is empty" as
 * session state, and MQTT-3.2.2-2 wants session present = 1 whenever there is some (Mosquitto says 1). aedes
 * 1.2.0 takes the flag from the subscriptions its persistence returns for the client alone
 * (lib/handlers/connect.js `restoreSubs`: an empty list counts as no session). So a persistence that knows
 * the session returns, for one with no subscriptions, a single placeholder: `sessionMark()`. aedes restores
 * it like any stored subscription, through the broker's `authorizeSubscribe`, which turns it away
 * (`isSessionMark`); a subscription refused on restore is skipped (lib/handlers/subscribe.js `addSubs`), so
 * nothing is subscribed, and the flag is 1.
 *
 * aedes asks its persistence for a client's subscriptions once per clean = false CONNECT, after the login:
 * the session's lookup. The lookup also opens the session (it is resumed or created, MQTT-3.1.2-4), and a
 * clean = true CONNECT, which makes aedes clean the client's subscriptions, ends it (MQTT-3.1.2-6).
 */
const SESSION = Symbol("fleet.session");

/** A stored subscription as far as this file needs one (libsql.ts `StoredSubscription`), or the placeholder. */
type Subscription = { readonly topic: string; readonly qos: number; readonly [SESSION]?: true };

/** The placeholder for a session with no subscriptions: no SUBSCRIBE can carry its symbol. */
function sessionMark(): Subscription {
  // A valid filter (aedes validates it before authorizing), in the reserved `$` space, should a log show it.
  return { topic: "$fleet/session", qos: 0, [SESSION]: true };
}

/** Whether `sub` is `sessionMark()`'s placeholder. */
export function isSessionMark(sub: unknown): boolean {
  return typeof sub === "object" && sub !== null && (sub as Record<symbol, unknown>)[SESSION] === true;
}

/**
 * aedes' answer for a clean = false CONNECT's lookup: the stored subscriptions, or the placeholder when
 * the session existed before with none of them (`existed`: it was open before this lookup).
 */
export function restoredSubscriptions<S extends Subscription>(subs: S[], existed: boolean): (S | Subscription)[] {
  return subs.length === 0 && existed ? [sessionMark()] : subs;
}

/**
 * When each clean = false session was last in use, for `[broker] session_expiry_days` (Mosquitto's
 * `persistent_client_expiration`): a session whose client stayed away longer ends, as a clean = true
 * CONNECT would end it, so a device that never comes back does not keep its subscriptions and a full
 * offline queue for ever. Its client's CONNECT (the session's lookup) and its going away set the time;
 * so does each sweep that finds it connected, so after a crash the time is at most one sweep old.
 *
 * broker.db also keeps when the broker last knew itself running (each sweep, and the stop): at the next
 * start every session's time moves on by the downtime, since no client could have come back meanwhile. After
 * a crash the running time since the last sweep is taken for downtime too: a session expires late by up to a
 * sweep, never early.
 */
export class SessionAges {
  private readonly seen = new Map<string, number>();

  /** The session of `clientId` is in use at `at` (ms). */
  touch(clientId: string, at: number): void {
    this.seen.set(clientId, at);
  }

  forget(clientId: string): void {
    this.seen.delete(clientId);
  }

  /**
   * One sweep over `sessions` at `now`: those whose client is connected are in use now, those never
   * timed (older files) start counting now (both `touched`, to write down); the others last in use
   * before `cutoff` are `due` to end.
   */
  sweep(
    sessions: Iterable<string>,
    connected: (clientId: string) => boolean,
    now: number,
    cutoff: number,
  ): { due: string[]; touched: string[] } {
    const due: string[] = [];
    const touched: string[] = [];
    for (const id of new Set(sessions)) {
      const seen = this.seen.get(id);
      if (connected(id) || seen === undefined) {
        this.seen.set(id, now);
        touched.push(id);
      } else if (seen < cutoff) due.push(id);
    }
    return { due, touched };
  }
}

/** What the broker asks of its persistence for `[broker] session_expiry_days`. */
export interface SessionExpiry {
  /** The client of a clean = false session went away at `at` (ms). */
  left(clientId: string, at: number): void;
  /**
   * End every session whose client has been away longer than `maxAgeMs` at `now`: its subscriptions,
   * offline queue and QoS 2 packets go; the client ids ended are returned.
   */
  expire(now: number, maxAgeMs: number, connected: (clientId: string) => boolean): Promise<string[]>;
  /** Clean = false sessions held. */
  count(): number;
}
