/**
 * A clean = false session stores each subscription the subscribe ACL granted, once, and none it refused.
 *
 * aedes 1.2.0 (lib/handlers/subscribe.js `storeSubscriptions`) calls `persistence.addSubscriptions(client,
 * packet.subscriptions)` once per granted filter of a SUBSCRIBE, each time with the whole packet. So N
 * filters cost N² stores (600 filters: 360,000 INSERTs into broker.db, every PUBACK queued behind them),
 * and a filter refused beside a granted one was stored all the same: the hook's removal of it ran first
 * (./hooks.ts `authorizeSubscribe`), and its messages filled the away session's queue.
 *
 * Here the hook records each grant, and the persistence is handed only the grants not stored yet.
 */
import type { Client } from "aedes";

/** The part of aedes' persistence that stores a client's subscriptions. */
interface SubscriptionStore {
  addSubscriptions(client: Client, subs: readonly object[]): Promise<unknown>;
}

/** Subscriptions granted to a SUBSCRIBE of a clean = false session, not yet stored. */
export class GrantedSubscriptions {
  private readonly unstored = new WeakMap<Client, object[]>();

  /** The subscribe ACL granted `sub` to `client`. */
  record(client: Client, sub: object): void {
    // A clean session stores nothing; a restore re-grants what is stored already. aedes restores a
    // session before its CONNACK (lib/handlers/connect.js `restoreSubs`, then `doConnack`), and a
    // client subscribes after it, while aedes may still be `connecting` (sending it its queue).
    if (client.clean || !(client as Client & { connackSent?: boolean }).connackSent) return;
    const subs = this.unstored.get(client);
    if (subs) subs.push(sub);
    else this.unstored.set(client, [sub]);
  }

  /** Make `persistence` (aedes' own, as given to aedes) store only the granted subscriptions, each once. */
  storeOnlyGranted(persistence: object): void {
    const store = persistence as SubscriptionStore;
    const add = store.addSubscriptions.bind(store);
    // aedes calls this right after each grant, in the same turn: the grants waiting are this call's (and,
    // should a grant ever come late, ones its own call would store). A call with none waiting stores nothing.
    store.addSubscriptions = (client) => {
      const subs = this.unstored.get(client);
      if (!subs) return Promise.resolve();
      this.unstored.delete(client);
      return add(client, subs);
    };
  }
}
