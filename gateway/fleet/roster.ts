/**
 * The operator lifecycle of agents (pause, resume, retire; a type removed from or brought
 * back to fleet.toml). The store keeps the status; the queue book learns retirements (its
 * admission refuses them); the scheduler is woken when an agent may run again.
 */
import { budgetOfPause } from "../episode/index.ts";
import type { FleetEvents } from "../events.ts";
import type { QueueBook } from "./queue-book.ts";
import type { Scheduler } from "./scheduler.ts";
import type { Store, StoredAgentStatus } from "../store/index.ts";
import {
  type AgentId,
  type LifecycleAction,
  type LifecycleRefusal,
  lifecycleRefusal,
  OPERATOR_DRAIN,
} from "../types.ts";

/** What a lifecycle action returns: an unknown or retired agent is an expected outcome. */
export type LifecycleResult =
  | { readonly ok: true; readonly status: StoredAgentStatus }
  | { readonly ok: false; readonly code: LifecycleRefusal; readonly message: string };

/** The suffix of a removed type's agents' reason while they drain. */
const DRAINING_SUFFIX = "; draining its queued stimuli";

/** The reason a removed type's agents are retired with (a returning type revives those that carry it). */
const removedReason = (type: string, hash: string) =>
  `type ${type} removed from fleet.toml (spec ${hash.slice(0, 12)})`;

/** The reason a drained agent is retired with (the removal reason a returning type looks for stays). */
function drainedReason(reason: string | null): string {
  if (reason?.endsWith(DRAINING_SUFFIX)) return reason.slice(0, -DRAINING_SUFFIX.length);
  return "retired by operator after draining its queue";
}

/** Lifecycle actions of a running gateway. */
export class Roster {
  /** Bumped on every operator lifecycle action, so a finishing episode knows whether to re-read status. */
  private readonly lifecycleStamps = new Map<AgentId, number>();

  constructor(
    private readonly store: Store,
    private readonly events: FleetEvents,
    private readonly scheduler: Scheduler,
    private readonly book: QueueBook,
  ) {}

  /** How many lifecycle actions an agent has seen (compared before and after an episode). */
  lifecycleStamp(agent: AgentId): number {
    return this.lifecycleStamps.get(agent) ?? 0;
  }

  private bump(id: AgentId): void {
    this.lifecycleStamps.set(id, (this.lifecycleStamps.get(id) ?? 0) + 1);
  }

  /**
   * Operator lifecycle: pause, resume or retire an agent. `drain` (retire only): the agent takes
   * no new stimuli, runs those already queued, then is retired. A draining agent cannot be paused
   * or resumed; a plain retire retires it at once (what is still queued is refused).
   */
  async setLifecycle(id: AgentId, action: LifecycleAction, opts: { drain?: boolean } = {}): Promise<LifecycleResult> {
    const agent = await this.store.getAgent(id);
    if (!agent) return { ok: false, code: "not_found", message: `no agent ${id}` };
    // Before any write of the action, after the lookup: a stamp per id an operator mistyped would stay for good.
    this.bump(id);
    const refused = lifecycleRefusal(agent, action);
    if (refused) return { ok: false, ...refused };
    if (action === "pause") {
      await this.store.setAgentStatus(id, "paused", "paused by operator");
      this.events.emit("status", { agent: id, status: "paused", reason: "paused by operator" });
      return { ok: true, status: "paused" };
    }
    if (action === "resume") {
      // A budget pause's reason names its budget ("budget episodes_per_hour (20) reached"): the resume lifts that one.
      const budget = budgetOfPause(agent.reason);
      if (agent.status === "paused" && agent.pausedUntil !== null && budget)
        await this.store.setMeta(`budget_override:${id}`, `${budget}:${agent.pausedUntil}`);
      await this.store.setAgentStatus(id, "active", null);
      this.events.emit("status", { agent: id, status: "idle", checkpoint: agent.headHash });
      this.scheduler.wake(id);
      return { ok: true, status: "active" };
    }
    // A failed agent cannot run what waits for it: draining it is retiring it.
    if (opts.drain && agent.status === "retired") return { ok: true, status: "retired" };
    if (opts.drain && agent.status !== "failed") {
      if (agent.status !== "draining") await this.startDrain(id, OPERATOR_DRAIN);
      return { ok: true, status: (await this.finishDrain(id)) ? "retired" : "draining" };
    }
    await this.retireNow(id, "retired by operator");
    return { ok: true, status: "retired" };
  }

  /** Retire at once: what still waits is refused by its next turn (recorded as rejected). */
  private async retireNow(id: AgentId, reason: string): Promise<void> {
    await this.store.setAgentStatus(id, "retired", reason);
    this.book.retire(id);
    this.events.emit("status", { agent: id, status: "retired", reason });
    if (this.book.queued(id) > 0) this.scheduler.wake(id);
  }

  /** Stop admitting stimuli for the agent; what is queued or admitted still runs. */
  private async startDrain(id: AgentId, reason: string): Promise<void> {
    // The book first: nothing admitted after this point, while the status is written.
    this.book.drain(id);
    await this.store.setAgentStatus(id, "draining", reason);
    this.events.emit("status", { agent: id, status: "draining", reason });
    // A paused agent's queue runs now: draining takes it to retirement.
    this.scheduler.wake(id);
  }

  /**
   * A draining agent with nothing queued or admitted is retired (true); so is one that failed
   * while draining (a bad checkpoint): it cannot run its queue, which is refused. Called after each
   * of its turns, when it fails, when an admitted place is given back, and at start; idempotent.
   */
  async finishDrain(id: AgentId): Promise<boolean> {
    if (!this.book.isDraining(id)) return false;
    const agent = await this.store.getAgent(id);
    if (agent?.status === "failed") {
      this.bump(id);
      await this.retireNow(id, `failed while draining, retired: ${agent.reason ?? "no reason recorded"}`);
      return true;
    }
    if (agent?.status !== "draining" || this.book.pending(id) > 0) return false;
    this.bump(id);
    const reason = drainedReason(agent.reason);
    await this.store.setAgentStatus(id, "retired", reason);
    this.book.retire(id);
    this.events.emit("status", { agent: id, status: "retired", reason, checkpoint: agent.headHash });
    return true;
  }

  /**
   * A reload changed these types' budgets: wake the agents a budget paused, so that each looks
   * again (one whose budget now exceeds its usage runs at once rather than at the window's end).
   */
  async budgetsChanged(types: readonly string[]): Promise<void> {
    for (const type of types)
      for (const a of (await this.store.listAgents({ type, status: "paused", limit: 1_000_000 })).rows)
        if (budgetOfPause(a.reason) !== null) this.scheduler.wake(a.id as AgentId);
  }

  /** Agents a reload's `instances` created or made sure of: they count under their type's `max_agents`. */
  deployed(ids: readonly AgentId[]): void {
    this.book.deployed(ids);
  }

  /** At start: retire the draining agents whose queue emptied before the last stop. */
  async finishDrains(): Promise<void> {
    for (const a of (await this.store.listAgents({ status: "draining", limit: 1_000_000 })).rows)
      await this.finishDrain(a.id as AgentId);
  }

  /**
   * Retire every agent of a type removed from fleet.toml (spec `hash`) the graceful way: each
   * drains first (its queued stimuli run on the last spec version that had the type).
   */
  async retireType(type: string, hash: string): Promise<void> {
    const reason = removedReason(type, hash);
    for (const a of await this.store.listAgents({ type, limit: 1_000_000 }).then((r) => r.rows)) {
      if (a.status === "retired" || a.status === "draining") continue;
      const id = a.id as AgentId;
      this.bump(id);
      if (a.status === "failed") await this.retireNow(id, reason);
      else {
        await this.startDrain(id, reason + DRAINING_SUFFIX);
        await this.finishDrain(id);
      }
    }
  }

  /**
   * `retireType` before the queue book has loaded (a type removed while the gateway was stopped): the
   * statuses only. The book then loads them as draining, and `finishDrains` retires those with nothing queued.
   */
  async drainTypeAtStart(type: string, hash: string): Promise<void> {
    const reason = removedReason(type, hash);
    for (const a of await this.store.listAgents({ type, limit: 1_000_000 }).then((r) => r.rows)) {
      if (a.status === "retired" || a.status === "draining") continue;
      const [status, why] =
        a.status === "failed" ? (["retired", reason] as const) : (["draining", reason + DRAINING_SUFFIX] as const);
      await this.store.setAgentStatus(a.id as AgentId, status, why);
      this.events.emit("status", { agent: a.id as AgentId, status, reason: why });
    }
  }

  /** A type that comes back brings back the agents its removal retired or drains (not operator retirements). */
  async unretireType(type: string): Promise<void> {
    for (const status of ["retired", "draining"] as const) {
      for (const a of await this.store.listAgents({ type, status, limit: 1_000_000 }).then((r) => r.rows)) {
        if (!a.reason?.startsWith(`type ${type} removed`)) continue;
        const id = a.id as AgentId;
        this.bump(id);
        await this.store.setAgentStatus(id, "active", null);
        this.book.unretire(id);
        this.events.emit("status", { agent: id, status: "idle", checkpoint: a.headHash });
        this.scheduler.wake(id);
      }
    }
  }
}
