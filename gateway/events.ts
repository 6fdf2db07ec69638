/**
 * Domain facts of the fleet (episode committed or failed, agent status changed, stimuli
 * accepted or refused). The bus is for observers only: metrics, the MQTT status topics,
 * the SSE stream. Nothing functional listens here (queue accounting is the queue book's,
 * told directly); nothing that emits knows who listens.
 */
import type { Logger } from "pino";
import type { AgentStatus } from "./types.ts";

/** The facts and their payloads. */
export interface FleetEventMap {
  episode: {
    episode: string;
    agent: string;
    type: string;
    stimulus: string;
    status: "committed" | "failed";
    kind?: string;
    checkpoint: string | null;
    ms: number;
    /**
     * How long its stimulus waited, ms: from being recorded to this episode's start (queued behind
     * other work, a paused agent, a budget window, earlier attempts). Never negative.
     */
    waitMs: number;
    quarantined: boolean;
  };
  status: {
    agent: string;
    status: AgentStatus;
    reason?: string;
    checkpoint?: string | null;
    /** The agent's current status again, to restore its retained topic (start, broker reconnect): no change. */
    republished?: true;
  };
  /** An episode's process started: from the warm spares, or spawned for it. */
  spawn: { type: string; start: "warm" | "cold" };
  /** Stimuli left in a retired agent's queue were refused (recorded as `rejected`). */
  rejected: { agent: string; count: number; reason: string };
  /** A stimulus was refused: it would have created one agent more of `type` than its `max_agents`. */
  agentRefused: { type: string; max: number };
  /**
   * Intake refused a stimulus for an agent of `type` (`code`: queue_full, retired, draining,
   * max_agents): from a device, webhook or send (the sender is told), a wake-up (tried again
   * later) or a timer fire (lost for that agent).
   */
  refused: { source: FleetEventMap["intake"]["source"]; type: string; code: string };
  /** Messages that matched a subscription but named no valid agent were recorded as rejected. */
  rejectedMessage: { count: number };
  intake: {
    source: "mqtt" | "timer" | "webhook" | "inbox" | "manual" | "wake";
    accepted: number;
    duplicates: number;
    /** The agent type of each duplicate (dedup hits are counted by type). */
    duplicateTypes?: readonly string[];
  };
  /**
   * A background retention round ended (ops/gc.ts `gcTick`): rows collected by kind, its passes and
   * time, and whether it stopped at its pass limit with rows still due (`behind`).
   */
  retention: {
    collected: {
      readonly tombstoned: number;
      readonly checkpoints: number;
      readonly episodes: number;
      readonly stimuli: number;
      readonly quarantine_expired: number;
      readonly usage_rows: number;
      readonly bundles: number;
    };
    passes: number;
    ms: number;
    behind: boolean;
  };
  /** Episodes could not start for reasons of the machine (degraded), or started again (recovered). */
  infra: { state: "degraded" | "recovered"; reason: string; agent?: string; type?: string };
}

type Listener<K extends keyof FleetEventMap> = (e: FleetEventMap[K]) => void;

/**
 * A tiny typed event bus. A listener's error is logged and contained, so one bad observer
 * cannot break the commit that emitted the fact.
 */
export class FleetEvents {
  private readonly listeners: { [K in keyof FleetEventMap]?: Listener<K>[] } = {};

  constructor(private readonly log?: Pick<Logger, "error">) {}

  /** Subscribe; returns an unsubscribe function. */
  on<K extends keyof FleetEventMap>(kind: K, fn: Listener<K>): () => void {
    const list = (this.listeners[kind] ??= []) as Listener<K>[];
    list.push(fn);
    return () => {
      const i = list.indexOf(fn);
      if (i >= 0) list.splice(i, 1);
    };
  }

  /** Deliver a fact to every subscriber. */
  emit<K extends keyof FleetEventMap>(kind: K, e: FleetEventMap[K]): void {
    for (const fn of (this.listeners[kind] ?? []) as Listener<K>[]) {
      try {
        fn(e);
      } catch (err) {
        // An observer's bug must not fail the episode that emitted the fact.
        this.log?.error({ err, event: kind }, `a listener of "${kind}" events failed`);
      }
    }
  }
}
