/**
 * Which agents count as flooded (docs/sandbox.md "Warm spares and fairness"): a backlog of
 * FLOOD_BACKLOG or more stimuli while some other agent has work, or had some a moment ago. A
 * flooded agent yields to the others: it starts cold (the warm spares are theirs), at SCHED_IDLE,
 * and waits for a slot below the devices-first cap.
 *
 * A backlog alone is not enough. Yielding to agents that have no work helps no one, and it fed on
 * itself: an agent pinged 10 times a second that fell 8 behind while a CPU-bound program ran beside
 * the gateway (scripts/soak.ts) then started every episode cold and under SCHED_IDLE, below that
 * program, and was 26 s behind half a minute later (bench-policy --flood, its no-flood phase, where
 * it is the only agent). Alone, a backlog runs warm and at the usual priority, and catches up when
 * the machine lets it.
 */
import type { AgentId } from "../types.ts";

/** Stimuli queued for one agent from which it may count as flooded. */
export const FLOOD_BACKLOG = 8;

/**
 * How recently another agent's episode must have started for a backlog to count as a flood when no
 * other agent has work this moment: a quiet agent's next stimulus is usually a few seconds away,
 * and it should find the spares and the CPU as free as if no flood were on.
 */
export const FLOOD_PEERS_WINDOW_MS = 10_000;

/** What the rule reads of the running gateway. */
export interface FloodView {
  /** Stimuli waiting for an agent (the queue book). */
  queued(agent: AgentId): number;
  /** Agents that have queued work or a running episode (the scheduler). */
  busyAgents(): number;
  now(): number;
}

/** The flood rule of one gateway: told of every episode start, asked before each one and by the scheduler. */
export class FloodRule {
  /** The latest episode start, and the latest of an agent other than its agent. */
  private last: { agent: AgentId; at: number } | null = null;
  private other: { agent: AgentId; at: number } | null = null;

  constructor(
    private readonly view: FloodView,
    readonly backlog = FLOOD_BACKLOG,
    readonly peersWindowMs = FLOOD_PEERS_WINDOW_MS,
  ) {}

  /** An episode of `agent` starts. */
  started(agent: AgentId): void {
    if (this.last !== null && this.last.agent !== agent) this.other = this.last;
    this.last = { agent, at: this.view.now() };
  }

  /** Whether `agent` has a backlog while others have work (now, or within the window). */
  flooded(agent: AgentId): boolean {
    if (this.view.queued(agent) < this.backlog) return false;
    // It has work itself, so more than one busy agent means another one has some.
    if (this.view.busyAgents() > 1) return true;
    const peer = this.last !== null && this.last.agent !== agent ? this.last : this.other;
    return peer !== null && this.view.now() - peer.at <= this.peersWindowMs;
  }
}
