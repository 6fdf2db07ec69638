/**
 * The queue book: the one owner of which stimuli wait for each agent in a running gateway,
 * and the one admission every source goes through (MQTT and inbox intake, webhooks, manual
 * and API stimuli, timers, quarantine retries, and agent-to-agent sends). The store's
 * `stimuli` rows are the durable queue; the book is loaded from them at start and then
 * changed only by the code that changes those rows, right after it did:
 *
 *   admit() reserves a place -> recorded() (the row was written) or released() (duplicate,
 *   failed write, the sending episode did not commit); left() when an episode commits or
 *   quarantines the head; rejected() when queued stimuli are refused, expire or are superseded.
 *
 * The book keeps each agent's queued seqs in order, with their receive times, so a turn
 * reads its head by seq (a rowid lookup) and health and metrics count queues and their lag
 * without reading every queued row. The store has no index by agent over queued stimuli:
 * that index put one scattered leaf write per agent into every intake commit (issue 13).
 * The turn checks the row it reads is still queued for that agent; if the book ever
 * disagrees with the rows, the agent's queue is read again from the store (`resync`).
 *
 * A draining agent (`fleet retire --drain`) is refused like a retired one, but what was queued
 * or admitted before still runs; `pending()` says when nothing is left.
 *
 * The book also knows which agents exist (have a row and are not retired), counted per type:
 * a stimulus for an agent with no row creates it when written, so its admission takes a place
 * under the type's `max_agents` (issue: sends to fresh keys grew a fleet without bound). The
 * count is kept here, changed on create, retire and unretire, so intake never counts rows.
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
  /** A stimulus was refused: it would have created one agent more of `type` than `max` (`max_agents`). */
  readonly onCapped?: (type: string, max: number) => void;
}

/** A stimulus waiting in a queue: its seq and when it was received. */
export interface QueuedStimulus {
  readonly seq: number;
  readonly receivedAt: number;
}

/** Stimuli queued for the agents of one type, and the oldest receive time among them. */
export interface TypeQueue {
  readonly type: string;
  readonly n: number;
  readonly oldest: number;
}

/** One agent's queue: seqs ascending, and each one's receive time at the same index. */
interface AgentQueue {
  readonly seqs: number[];
  readonly at: number[];
}

/** Per-agent queued stimuli, reservations and retirements of a running gateway. */
export class QueueBook {
  /** Each agent's queue; no entry when none is queued. */
  private readonly queues = new Map<AgentId, AgentQueue>();
  /** Places admitted but not yet written (intake in flight, sends of a running episode). */
  private readonly reserved = new Map<AgentId, number>();
  private readonly retired = new Set<AgentId>();
  private readonly draining = new Set<AgentId>();
  /** Agents that exist and are not retired (draining ones too). */
  private readonly live = new Set<AgentId>();
  /** `live` per type. */
  private readonly liveByType = new Map<string, number>();
  /** Agents without a row that admitted stimuli will create when written, per type: places under `max_agents`. */
  private readonly creating = new Map<string, Set<AgentId>>();
  private totalQueued = 0;

  constructor(private readonly opts: QueueBookOptions = {}) {}

  /** Read the agents (retired, draining, the rest counted per type) and queued stimuli from the store (at start). */
  async load(store: Pick<Store, "queuedSeqs" | "agentStatuses">): Promise<void> {
    for (const a of await store.agentStatuses()) {
      if (a.status === "retired") this.retired.add(a.id);
      else this.exists(a.id);
      if (a.status === "draining") this.draining.add(a.id);
    }
    const loaded = new Set<AgentId>();
    for (const q of await store.queuedSeqs()) {
      if (this.insert(q.agent, q.seq, q.receivedAt)) loaded.add(q.agent);
    }
    for (const agent of loaded) this.opts.onQueued?.(agent);
  }

  /**
   * Admit one stimulus for `agent`: refused when it is retired, its queue (counting places
   * reserved by admissions still in flight) holds `maxQueue`, or it does not exist yet and its
   * type has `maxAgents` agents (counting those admissions will create; 0: no limit). An
   * admitted place is reserved until `recorded()` or `released()`.
   */
  admit(agent: AgentId, maxQueue: number, maxAgents = 0): Admission {
    if (this.retired.has(agent)) return { ok: false, code: "retired", message: "agent is retired" };
    if (this.draining.has(agent))
      return { ok: false, code: "draining", message: "agent is draining: it runs what is queued, then retires" };
    const reserved = this.reserved.get(agent) ?? 0;
    if (this.queued(agent) + reserved >= maxQueue)
      return { ok: false, code: "queue_full", message: `queue full (max_queue ${maxQueue})` };
    if (!this.live.has(agent)) {
      const refused = this.admitNew(agent, maxAgents);
      if (refused) return refused;
    }
    this.reserved.set(agent, reserved + 1);
    return { ok: true };
  }

  /** An admission for an agent with no row: a place under its type's `max_agents`, or the refusal. */
  private admitNew(agent: AgentId, maxAgents: number): Admission | null {
    const type = typeOf(agent);
    let creating = this.creating.get(type);
    if (creating?.has(agent)) return null;
    if (maxAgents > 0 && this.agents(type) + (creating?.size ?? 0) >= maxAgents) {
      this.opts.onCapped?.(type, maxAgents);
      return { ok: false, code: "max_agents", message: `no new agent: type ${type} has max_agents (${maxAgents})` };
    }
    if (!creating) this.creating.set(type, (creating = new Set()));
    creating.add(agent);
    return null;
  }

  /** An admitted stimulus was written to the agent's queue as `seq` (and the agent's row with it). */
  recorded(agent: AgentId, seq: number, receivedAt: number): void {
    this.unreserve(agent, 1);
    if (!this.live.has(agent) && !this.retired.has(agent)) {
      this.creating.get(typeOf(agent))?.delete(agent);
      this.exists(agent);
    }
    this.add(agent, seq, receivedAt);
  }

  /** `n` admitted places were not used (duplicates, a failed write, a send whose episode did not commit). */
  released(agent: AgentId, n = 1): void {
    this.unreserve(agent, n);
    // No place left reserved: an agent they were to create was not.
    if (!this.reserved.has(agent) && !this.live.has(agent)) this.creating.get(typeOf(agent))?.delete(agent);
    if (this.draining.has(agent) && this.pending(agent) === 0) this.opts.onDrained?.(agent);
  }

  /** Stimulus `seq` (the head) left the agent's queue: its episode committed or quarantined it. */
  left(agent: AgentId, seq: number): void {
    this.remove(agent, [seq]);
  }

  /** Queued stimuli of the agent left at once: refused (retired), expired or superseded. */
  rejected(agent: AgentId, seqs: readonly number[]): void {
    this.remove(agent, seqs);
  }

  /** The oldest stimulus waiting for an agent (its queue's head), or null. */
  head(agent: AgentId): number | null {
    return this.queues.get(agent)?.seqs[0] ?? null;
  }

  /** Every stimulus waiting for an agent, oldest first. */
  seqs(agent: AgentId): readonly number[] {
    return this.queues.get(agent)?.seqs ?? [];
  }

  /**
   * What waits for the agent, as the store's rows say (a turn found its head was not queued):
   * the book takes the rows' word for it.
   */
  resync(agent: AgentId, rows: readonly QueuedStimulus[]): void {
    this.totalQueued -= this.queued(agent);
    this.queues.delete(agent);
    let added = false;
    for (const r of rows) added = this.insert(agent, r.seq, r.receivedAt) || added;
    if (added) this.opts.onQueued?.(agent);
  }

  /** Stimuli waiting for an agent. */
  queued(agent: AgentId): number {
    return this.queues.get(agent)?.seqs.length ?? 0;
  }

  /**
   * Stimuli waiting per agent type (the part of the id before `/`), with the oldest receive
   * time among them: the lag. One pass over every waiting stimulus, in memory: receive times
   * are not in seq order (a put-back or a send can carry an older one), so no head stands in.
   */
  byType(): TypeQueue[] {
    const types = new Map<string, { n: number; oldest: number }>();
    for (const [agent, q] of this.queues) {
      const type = agent.slice(0, agent.indexOf("/"));
      let oldest = q.at[0]!;
      for (const at of q.at) if (at < oldest) oldest = at;
      const t = types.get(type);
      if (!t) types.set(type, { n: q.seqs.length, oldest });
      else {
        t.n += q.seqs.length;
        t.oldest = Math.min(t.oldest, oldest);
      }
    }
    return [...types].map(([type, t]) => ({ type, ...t }));
  }

  /** The oldest receive time of any stimulus waiting, or null when none waits. */
  oldestReceivedAt(): number | null {
    const types = this.byType();
    return types.length === 0 ? null : Math.min(...types.map((t) => t.oldest));
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

  /** The agent was retired: refuse what comes for it from now on. Its place under `max_agents` is free. */
  retire(agent: AgentId): void {
    this.draining.delete(agent);
    this.retired.add(agent);
    if (this.live.delete(agent)) this.liveByType.set(typeOf(agent), this.agents(typeOf(agent)) - 1);
  }

  /** The agent is active again (no longer retired or draining). */
  unretire(agent: AgentId): void {
    this.retired.delete(agent);
    this.draining.delete(agent);
    this.exists(agent);
  }

  /** Agents whose rows were written outside intake (fleet.toml `instances`); retired ones stay retired. */
  deployed(agents: readonly AgentId[]): void {
    for (const a of agents) if (!this.retired.has(a)) this.exists(a);
  }

  /** Agents of a type that exist and are not retired: what `max_agents` bounds. */
  agents(type: string): number {
    return this.liveByType.get(type) ?? 0;
  }

  /** The agent has a row and is not retired (counted once). */
  private exists(agent: AgentId): void {
    if (this.live.has(agent)) return;
    this.live.add(agent);
    const type = typeOf(agent);
    this.liveByType.set(type, this.agents(type) + 1);
  }

  private add(agent: AgentId, seq: number, receivedAt: number): void {
    if (this.insert(agent, seq, receivedAt)) this.opts.onQueued?.(agent);
  }

  /** Put `seq` in the agent's queue, in order; false when it is there already. */
  private insert(agent: AgentId, seq: number, receivedAt: number): boolean {
    const q = this.queues.get(agent);
    if (!q) this.queues.set(agent, { seqs: [seq], at: [receivedAt] });
    else if (seq > q.seqs[q.seqs.length - 1]!) {
      q.seqs.push(seq);
      q.at.push(receivedAt);
    } else {
      // Older than the tail: a quarantined stimulus put back. Once only.
      const i = lowerBound(q.seqs, seq);
      if (q.seqs[i] === seq) return false;
      q.seqs.splice(i, 0, seq);
      q.at.splice(i, 0, receivedAt);
    }
    this.totalQueued++;
    return true;
  }

  private remove(agent: AgentId, seqs: readonly number[]): void {
    const q = this.queues.get(agent);
    if (!q) return;
    for (const seq of seqs) {
      // The head, nearly always: an episode commits its queue's oldest stimulus.
      const i = q.seqs[0] === seq ? 0 : lowerBound(q.seqs, seq);
      if (q.seqs[i] !== seq) continue;
      q.seqs.splice(i, 1);
      q.at.splice(i, 1);
      this.totalQueued--;
    }
    if (q.seqs.length === 0) this.queues.delete(agent);
  }

  private unreserve(agent: AgentId, n: number): void {
    const left = (this.reserved.get(agent) ?? 0) - n;
    if (left > 0) this.reserved.set(agent, left);
    else this.reserved.delete(agent);
  }
}

/** An agent id's type: the part before `/`. */
const typeOf = (agent: AgentId): string => agent.slice(0, agent.indexOf("/"));

/** The first index of sorted `q` whose value is not below `seq`. */
function lowerBound(q: readonly number[], seq: number): number {
  let lo = 0;
  let hi = q.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (q[mid]! < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
