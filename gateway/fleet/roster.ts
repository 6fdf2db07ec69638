/**
 * The operator lifecycle of agents (pause, resume, retire; a type removed from or brought
 * back to fleet.toml). The store keeps the status; the queue book learns retirements (its
 * admission refuses them); the scheduler is woken when an agent may run again.
 */
import type { FleetEvents } from "../events.ts";
import type { QueueBook } from "./queue-book.ts";
import type { Scheduler } from "./scheduler.ts";
import type { Store } from "../store/index.ts";
import type { AgentId } from "../types.ts";

/** An operator lifecycle action (`fleet pause|resume|retire`, POST /api/agents/.../<action>). */
export type LifecycleAction = "pause" | "resume" | "retire";

/** Why a lifecycle action was refused; callers branch on this, never on the message. */
export type LifecycleRefusal = "not_found" | "retired";

/** What a lifecycle action returns: an unknown or retired agent is an expected outcome. */
export type LifecycleResult =
  | { readonly ok: true }
  | { readonly ok: false; readonly code: LifecycleRefusal; readonly message: string };

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

  /** Operator lifecycle: pause, resume or retire an agent. */
  async setLifecycle(id: AgentId, action: LifecycleAction): Promise<LifecycleResult> {
    this.lifecycleStamps.set(id, (this.lifecycleStamps.get(id) ?? 0) + 1);
    const agent = await this.store.getAgent(id);
    if (!agent) return { ok: false, code: "not_found", message: `no agent ${id}` };
    if (action === "pause") {
      // Pausing must not bring a retired agent back (resume would then reactivate it).
      if (agent.status === "retired") return { ok: false, code: "retired", message: `${id} is retired` };
      await this.store.setAgentStatus(id, "paused", "paused by operator");
      this.events.emit("status", { agent: id, status: "paused", reason: "paused by operator" });
    } else if (action === "resume") {
      if (agent.status === "retired") return { ok: false, code: "retired", message: `${id} is retired` };
      if (agent.status === "paused" && agent.pausedUntil !== null && agent.reason?.startsWith("budget")) {
        await this.store.setMeta(`budget_override:${id}`, String(agent.pausedUntil));
      }
      await this.store.setAgentStatus(id, "active", null);
      this.events.emit("status", { agent: id, status: "idle", checkpoint: agent.headHash });
      this.scheduler.wake(id);
    } else {
      await this.store.setAgentStatus(id, "retired", "retired by operator");
      this.book.retire(id);
      this.events.emit("status", { agent: id, status: "retired", reason: "retired by operator" });
      // Its next turn refuses what still waits for it (recorded as rejected).
      if (this.book.queued(id) > 0) this.scheduler.wake(id);
    }
    return { ok: true };
  }

  /** Retire every agent of a type removed from fleet.toml (spec `hash`). */
  async retireType(type: string, hash: string): Promise<void> {
    const reason = `type ${type} removed from fleet.toml (spec ${hash.slice(0, 12)})`;
    for (const a of await this.store.listAgents({ type, limit: 1_000_000 }).then((r) => r.rows)) {
      if (a.status === "retired") continue;
      const id = a.id as AgentId;
      await this.store.setAgentStatus(id, "retired", reason);
      this.book.retire(id);
      this.events.emit("status", { agent: id, status: "retired", reason });
      if (this.book.queued(id) > 0) this.scheduler.wake(id);
    }
  }

  /** A type that comes back brings back the agents its removal retired (not operator retirements). */
  async unretireType(type: string): Promise<void> {
    for (const a of await this.store.listAgents({ type, status: "retired", limit: 1_000_000 }).then((r) => r.rows)) {
      if (!a.reason?.startsWith(`type ${type} removed`)) continue;
      const id = a.id as AgentId;
      await this.store.setAgentStatus(id, "active", null);
      this.book.unretire(id);
      this.events.emit("status", { agent: id, status: "idle", checkpoint: a.headHash });
      this.scheduler.wake(id);
    }
  }
}
