/**
 * Which agents count as flooded (docs/sandbox.md "Warm spares and fairness"): a backlog of
 * FLOOD_BACKLOG or more stimuli while some other agent has work it can run now (an episode running
 * or ready to start), or started an episode a moment ago. A
 * flooded agent yields to the others: it starts cold (the warm spares are theirs), at SCHED_IDLE,
 * and waits for a slot below the devices-first cap.
 *
 * A backlog alone is not enough. Yielding to agents that have no work helps no one, and it fed on
 * itself: an agent pinged 10 times a second that fell 8 behind while a CPU-bound program ran beside
 * the gateway (scripts/soak.ts) then started every episode cold and under SCHED_IDLE, below that
 * program, and was 26 s behind half a minute later (bench-policy --flood, its no-flood phase, where
 * it is the only agent). Alone, a backlog runs warm and at the usual priority, and catches up when
 * the machine lets it. Work that waits on a pause or a quarantine is no one to yield to either: until
 * 2026-12-06 an agent paused with a stimulus queued made every other backlog in the fleet a flood,
 * for as long as the pause lasted.
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
  /** Agents running an episode or ready to start one (the scheduler's contendingAgents). */
  contendingAgents(): number;
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

  /** Whether `agent` has a backlog while others have work to run (now, or within the window). */
  flooded(agent: AgentId): boolean {
    if (this.view.queued(agent) < this.backlog) return false;
    // Asked as it starts or waits to start, it contends itself: more than one means another one does.
    if (this.view.contendingAgents() > 1) return true;
    const peer = this.last !== null && this.last.agent !== agent ? this.last : this.other;
    return peer !== null && this.view.now() - peer.at <= this.peersWindowMs;
  }
}
