/**
 * The gateway's in-memory view of its agents: which are retired, how many stimuli wait for
 * each, and the operator lifecycle actions (pause, resume, retire) that change them. The
 * store stays the source of truth; this mirror answers the hot-path questions (intake,
 * scheduler, tools) without a query.
 */
import type { FleetEvents } from "../events.ts";
import type { Scheduler } from "./scheduler.ts";
import type { Store } from "../store/index.ts";

/** An operator lifecycle action (`fleet pause|resume|retire`, POST /api/agents/.../<action>). */
export type LifecycleAction = "pause" | "resume" | "retire";

/** Why a lifecycle action was refused; callers branch on this, never on the message. */
export type LifecycleRefusal = "not_found" | "retired";

/** What a lifecycle action returns: an unknown or retired agent is an expected outcome. */
export type LifecycleResult =
  | { readonly ok: true }
  | { readonly ok: false; readonly code: LifecycleRefusal; readonly message: string };

/** Retired agents, queued counts and lifecycle stamps of a running gateway. */
export class Roster {
  private readonly retired = new Set<string>();
  private readonly queuedCounts = new Map<string, number>();
  /** Bumped on every operator lifecycle action, so a finishing episode knows whether to re-read status. */
  private readonly lifecycleStamps = new Map<string, number>();

  constructor(
    private readonly store: Store,
    private readonly events: FleetEvents,
    private readonly scheduler: Scheduler,
  ) {}

  /** Follow the event bus: finished stimuli leave the queue, queued ones join it. */
  wire(): void {
    this.events.on("episode", (e) => {
      if (e.status !== "committed" && !e.quarantined) return; // a failure is retried: still queued
      const n = (this.queuedCounts.get(e.agent) ?? 1) - 1;
      if (n <= 0) this.queuedCounts.delete(e.agent);
      else this.queuedCounts.set(e.agent, n);
    });
    this.events.on("queued", (e) => this.noteQueued(e.agent));
    this.events.on("rejected", (e) => this.queuedCounts.delete(e.agent));
  }

  /** Read retirements and queued stimuli from the store, and hand the queue to the scheduler. */
  async load(): Promise<void> {
    for (const a of await this.store.listAgents({ status: "retired", limit: 1_000_000 }).then((r) => r.rows))
      this.retired.add(a.id);
    for (const q of await this.store.queuedSummary()) {
      this.queuedCounts.set(q.agent, q.n);
      this.scheduler.enqueue(q.agent, q.n);
    }
  }

  /** Whether an agent is retired (intake drops its stimuli, tools refuse to send to it). */
  isRetired(agent: string): boolean {
    return this.retired.has(agent);
  }

  /** Stimuli waiting for an agent. */
  queued(agent: string): number {
    return this.queuedCounts.get(agent) ?? 0;
  }

  /** Stimuli waiting across the fleet. */
  totalQueued(): number {
    let n = 0;
    for (const v of this.queuedCounts.values()) n += v;
    return n;
  }

  /** How many lifecycle actions an agent has seen (compared before and after an episode). */
  lifecycleStamp(agent: string): number {
    return this.lifecycleStamps.get(agent) ?? 0;
  }

  /** One more stimulus is queued for `agent`. */
  noteQueued(agent: string): void {
    this.queuedCounts.set(agent, (this.queuedCounts.get(agent) ?? 0) + 1);
    this.scheduler.enqueue(agent);
  }

  /** Operator lifecycle: pause, resume or retire an agent. */
  async setLifecycle(id: string, action: LifecycleAction): Promise<LifecycleResult> {
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
      this.retired.add(id);
      this.events.emit("status", { agent: id, status: "retired", reason: "retired by operator" });
      // Its next turn refuses what still waits for it (recorded as rejected).
      if (this.queued(id) > 0) this.scheduler.wake(id);
    }
    return { ok: true };
  }

  /** Retire every agent of a type removed from fleet.toml (spec `hash`). */
  async retireType(type: string, hash: string): Promise<void> {
    const reason = `type ${type} removed from fleet.toml (spec ${hash.slice(0, 12)})`;
    for (const a of await this.store.listAgents({ type, limit: 1_000_000 }).then((r) => r.rows)) {
      if (a.status === "retired") continue;
      await this.store.setAgentStatus(a.id, "retired", reason);
      this.retired.add(a.id);
      this.events.emit("status", { agent: a.id, status: "retired", reason });
      if (this.queued(a.id) > 0) this.scheduler.wake(a.id);
    }
  }

  /** A type that comes back brings back the agents its removal retired (not operator retirements). */
  async unretireType(type: string): Promise<void> {
    for (const a of await this.store.listAgents({ type, status: "retired", limit: 1_000_000 }).then((r) => r.rows)) {
      if (!a.reason?.startsWith(`type ${type} removed`)) continue;
      await this.store.setAgentStatus(a.id, "active", null);
      this.retired.delete(a.id);
      this.events.emit("status", { agent: a.id, status: "idle", checkpoint: a.headHash });
      this.scheduler.wake(a.id);
    }
  }
}
