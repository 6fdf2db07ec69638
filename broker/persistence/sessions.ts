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
