/**
 * Persistent subscriptions by topic filter, in memory (they are few and read on every
 * QoS > 0 publish): a level trie that answers "who is subscribed to this topic".
 */

/** One QoS > 0 subscription as aedes' `subscriptionsByTopic` returns it. */
export interface TopicSubscription {
  readonly clientId: string;
  readonly topic: string;
  readonly qos: number;
  readonly rh?: unknown;
  readonly rap?: unknown;
  readonly nl?: unknown;
}

interface Node {
  readonly children: Map<string, Node>;
  /** clientId -> subscription, for the filter that ends at this node. */
  readonly subs: Map<string, TopicSubscription>;
}

const node = (): Node => ({ children: new Map(), subs: new Map() });

/** Filter trie with MQTT matching ('+' one level, '#' the rest including the parent level). */
export class SubscriptionTrie {
  private readonly root = node();
  private count = 0;

  /** Number of subscriptions held. */
  get size(): number {
    return this.count;
  }

  /** Add or replace `sub` (one per client and filter). */
  add(sub: TopicSubscription): void {
    let n = this.root;
    for (const level of sub.topic.split("/")) {
      let next = n.children.get(level);
      if (!next) {
        next = node();
        n.children.set(level, next);
      }
      n = next;
    }
    if (!n.subs.has(sub.clientId)) this.count++;
    n.subs.set(sub.clientId, sub);
  }

  /** Remove a client's subscription to `filter`, if any. */
  remove(clientId: string, filter: string): void {
    const path: Node[] = [this.root];
    let n: Node | undefined = this.root;
    const levels = filter.split("/");
    for (const level of levels) {
      n = n.children.get(level);
      if (!n) return;
      path.push(n);
    }
    if (n.subs.delete(clientId)) this.count--;
    // Prune empty branches so the trie does not keep every filter ever seen.
    for (let i = levels.length; i > 0; i--) {
      const child = path[i]!;
      if (child.subs.size > 0 || child.children.size > 0) break;
      path[i - 1]!.children.delete(levels[i - 1]!);
    }
  }

  /** Every subscription whose filter matches `topic`. */
  match(topic: string): TopicSubscription[] {
    const out: TopicSubscription[] = [];
    const levels = topic.split("/");
    // MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with '$'.
    const dollar = topic.startsWith("$");
    const walk = (n: Node, i: number): void => {
      const hash = n.children.get("#");
      if (hash && !(dollar && i === 0)) for (const s of hash.subs.values()) out.push(s);
      if (i === levels.length) {
        for (const s of n.subs.values()) out.push(s);
        return;
      }
      const plus = n.children.get("+");
      if (plus && !(dollar && i === 0)) walk(plus, i + 1);
      const exact = n.children.get(levels[i]!);
      if (exact) walk(exact, i + 1);
    };
    walk(this.root, 0);
    return out;
  }
}
