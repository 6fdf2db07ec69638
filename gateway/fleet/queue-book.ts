/**
 * The queue book: the one owner of how many stimuli wait for each agent in a running
 * gateway, and the one admission every source goes through (MQTT and inbox intake,
 * webhooks, manual and API stimuli, timers, quarantine retries, and agent-to-agent sends).
 * The store's `stimuli` rows are the durable queue; the book is loaded from them at start
 * and then changed only by the code that changes those rows, right after it did:
 *
 *   admit() reserves a place -> recorded() (the row was written) or released() (duplicate,
 *   failed write, the sending episode did not commit); left() when an episode commits or
 *   quarantines the head; rejected() when a retired agent's queue is refused.
 *
 * A draining agent (`fleet retire --drain`) is refused like a retired one, but what was queued
 * or admitted before still runs; `pending()` says when nothing is left.
 *
 * Nothing here listens to the event bus: the bus is for observers.
 */
import type { Store } from "../store/index.ts";
import type { Admission, AgentId } from "../types.ts";

/** What the book tells the scheduler. */
export interface QueueBookOptions {
  /** An agent gained queued work. */
  readonly onQueued?: (agent: AgentId) => void;
  /** A draining agent's last admitted place was given back unused: nothing is left for it. */
  readonly onDrained?: (agent: AgentId) => void;
}

/** Per-agent queued counts, reservations and retirements of a running gateway. */
export class QueueBook {
  private readonly counts = new Map<AgentId, number>();
  /** Places admitted but not yet written (intake in flight, sends of a running episode). */
  private readonly reserved = new Map<AgentId, number>();
  private readonly retired = new Set<AgentId>();
  private readonly draining = new Set<AgentId>();
  private totalQueued = 0;

  constructor(private readonly opts: QueueBookOptions = {}) {}

  /** Read queued counts and retirements from the store (gateway start). */
  async load(store: Pick<Store, "queuedSummary" | "listAgents">): Promise<void> {
    const { rows } = await store.listAgents({ status: "retired", limit: 1_000_000 });
    for (const a of rows) this.retired.add(a.id as AgentId);
    const drains = await store.listAgents({ status: "draining", limit: 1_000_000 });
    for (const a of drains.rows) this.draining.add(a.id as AgentId);
    for (const q of await store.queuedSummary()) this.add(q.agent as AgentId, q.n);
  }

  /**
   * Admit one stimulus for `agent`: refused when it is retired or its queue (counting places
   * reserved by admissions still in flight) holds `maxQueue`. An admitted place is reserved
   * until `recorded()` or `released()`.
   */
  admit(agent: AgentId, maxQueue: number): Admission {
    if (this.retired.has(agent)) return { ok: false, code: "retired", message: "agent is retired" };
    if (this.draining.has(agent))
      return { ok: false, code: "draining", message: "agent is draining: it runs what is queued, then retires" };
    const reserved = this.reserved.get(agent) ?? 0;
    if (this.queued(agent) + reserved >= maxQueue)
      return { ok: false, code: "queue_full", message: `queue full (max_queue ${maxQueue})` };
    this.reserved.set(agent, reserved + 1);
    return { ok: true };
  }

  /** `n` admitted stimuli were written to the agent's queue. */
  recorded(agent: AgentId, n = 1): void {
    this.unreserve(agent, n);
    this.add(agent, n);
  }

  /** `n` admitted places were not used (duplicates, a failed write, a send whose episode did not commit). */
  released(agent: AgentId, n = 1): void {
    this.unreserve(agent, n);
    if (this.draining.has(agent) && this.pending(agent) === 0) this.opts.onDrained?.(agent);
  }

  /** The head of the agent's queue left it (committed or quarantined). */
  left(agent: AgentId): void {
    const n = this.queued(agent);
    if (n <= 1) this.counts.delete(agent);
    else this.counts.set(agent, n - 1);
    if (n > 0) this.totalQueued--;
  }

  /** `n` queued stimuli of the agent left at once (a retired agent's queue was refused). */
  rejected(agent: AgentId, n: number): void {
    const have = this.queued(agent);
    const left = Math.max(0, have - n);
    this.totalQueued -= have - left;
    if (left === 0) this.counts.delete(agent);
    else this.counts.set(agent, left);
  }

  /** Stimuli waiting for an agent. */
  queued(agent: AgentId): number {
    return this.counts.get(agent) ?? 0;
  }

  /** Stimuli waiting across the fleet. */
  total(): number {
    return this.totalQueued;
  }

  /** Stimuli queued or admitted (places reserved by admissions in flight) for an agent. */
  pending(agent: AgentId): number {
    return this.queued(agent) + (this.reserved.get(agent) ?? 0);
  }

  /** Whether an agent is draining (admissions refused; what is queued still runs). */
  isDraining(agent: AgentId): boolean {
    return this.draining.has(agent);
  }

  /** The agent drains: refuse what comes for it from now on, keep what is queued or admitted. */
  drain(agent: AgentId): void {
    this.draining.add(agent);
  }

  /** Whether an agent is retired (its admissions are refused). */
  isRetired(agent: AgentId): boolean {
    return this.retired.has(agent);
  }

  /** The agent was retired: refuse what comes for it from now on. */
  retire(agent: AgentId): void {
    this.draining.delete(agent);
    this.retired.add(agent);
  }

  /** The agent is active again (no longer retired or draining). */
  unretire(agent: AgentId): void {
    this.retired.delete(agent);
    this.draining.delete(agent);
  }

  private add(agent: AgentId, n: number): void {
    if (n <= 0) return;
    this.counts.set(agent, this.queued(agent) + n);
    this.totalQueued += n;
    this.opts.onQueued?.(agent);
  }

  private unreserve(agent: AgentId, n: number): void {
    const left = (this.reserved.get(agent) ?? 0) - n;
    if (left > 0) this.reserved.set(agent, left);
    else this.reserved.delete(agent);
  }
}
