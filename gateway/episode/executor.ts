/**
 * One scheduler turn for one agent: pick the head of its queue, check status and budgets,
 * load and verify its checkpoint, run the episode in a subprocess with the tool gate, then
 * commit everything at once (or record the failure and schedule a retry / quarantine).
 */
import type { Logger } from "pino";
import type { Stimulus, EpisodeRecord } from "../../agents/protocol.ts";
import { IntegrityError, hashEvents, sealCheckpoint, verifyCheckpointRow } from "../store/index.ts";
import { runEpisode, type RunLimits, type RunResult, type SparePool, type SpawnOptions } from "./runner.ts";
import type { BudgetSpec, SpecVersion } from "../spec/index.ts";
import type { Store, AgentRow, StimulusRow } from "../store/index.ts";
import type { TurnResult } from "../types.ts";
import { ToolGate, type ToolEnv } from "./tools/index.ts";
import type { InfraHealth } from "./infra.ts";
import { decodePayload, newEpisodeId, type AgentId, type NewStimulus, type StimulusId } from "../types.ts";
import type { FleetEvents } from "../events.ts";
import { topics } from "../protocol.ts";

/** What the episode executor needs from the gateway. */
export interface EpisodeDeps {
  readonly store: Store;
  /** The spec version episodes start on now. */
  readonly spec: () => SpecVersion;
  readonly spawn: SpawnOptions;
  /** Warm spare host processes (optional). */
  readonly pool?: SparePool;
  readonly toolEnv: ToolEnv;
  readonly events: FleetEvents;
  readonly log: Logger;
  readonly now: () => number;
  /** True while the gateway drains: an aborted episode is then not a failure, its stimulus stays queued. */
  readonly stopping: () => boolean;
  /** Counter bumped by operator lifecycle actions; unchanged means no pause/retire happened meanwhile. */
  readonly lifecycleStamp?: (agent: string) => number;
  /** Whether stimuli still wait for the agent (the gateway's in-memory count). */
  readonly hasQueued?: (agent: string) => boolean;
  /** Infrastructure health of episode starts (an infra failure does not consume the agent's retries). */
  readonly infra?: InfraHealth;
  /** Publish a committed episode's outbox now (effects after commit). */
  readonly publishCommitted?: (
    episode: string,
    rows: readonly { topic: string; payload: string; qos: number; retain: boolean }[],
  ) => void;
}

/** Record limits the subprocess enforces on itself (the gateway checks them too). */
export const CHILD_LIMITS = { max_records: 10_000, max_record_bytes: 8 * 1024 * 1024 } as const;

/** The sandbox limits of an episode of a type with this budget. */
export function runLimitsFor(budget: BudgetSpec, minTimeoutMs = 0): RunLimits {
  return {
    timeoutMs: Math.max(budget.episode_timeout_ms, minTimeoutMs),
    memoryMb: budget.memory_mb,
    maxRecords: CHILD_LIMITS.max_records,
    maxRecordBytes: CHILD_LIMITS.max_record_bytes,
    maxOpenFiles: 256,
    maxProcesses: 4096,
  };
}

/** Budget windows an episode's usage is booked in. */
export function budgetWindows(at: number): {
  hourWindow: string;
  dayWindow: string;
  hourEnds: number;
  dayEnds: number;
} {
  const hour = Math.floor(at / 3_600_000);
  const day = Math.floor(at / 86_400_000);
  return {
    hourWindow: `h:${hour}`,
    dayWindow: `d:${day}`,
    hourEnds: (hour + 1) * 3_600_000,
    dayEnds: (day + 1) * 86_400_000,
  };
}

/** Turn a stored stimulus row into what the agent sees. */
export function toStimulus(row: StimulusRow): Stimulus {
  return {
    id: row.sid,
    kind: row.kind,
    ...(row.topic !== null ? { topic: row.topic } : {}),
    payload: decodePayload(row.payload),
    received_at: row.receivedAt,
  };
}

/** Runs turns; one instance per gateway. */
export class EpisodeExecutor {
  constructor(private readonly d: EpisodeDeps) {}

  /** One turn for `agentId` (see Scheduler). Never throws. */
  async turn(agentId: string): Promise<TurnResult> {
    try {
      return await this.turnInner(agentId);
    } catch (err) {
      this.d.log.error({ err, agent: agentId }, "episode turn failed unexpectedly");
      return { kind: "wait", until: this.d.now() + 1000 };
    }
  }

  private async turnInner(agentId: string): Promise<TurnResult> {
    const { store } = this.d;
    const now = this.d.now();
    let agent = await store.getAgent(agentId);
    if (!agent) return { kind: "empty" };
    if (agent.status === "paused") {
      if (agent.pausedUntil === null || agent.pausedUntil > now)
        return { kind: "wait", until: agent.pausedUntil ?? now + 3_600_000 };
      await store.setAgentStatus(agentId, "active", null);
      this.d.events.emit("status", { agent: agentId, status: "idle", reason: "budget window reset" });
      agent = { ...agent, status: "active", reason: null, pausedUntil: null };
    }
    if (agent.status === "retired") {
      // Whatever still waits for a retired agent (queued before the retirement, or sent by an
      // episode that committed just after it) is refused with a recorded reason, not left forever.
      const reason = `agent is retired${agent.reason ? ` (${agent.reason})` : ""}`;
      const count = await store.rejectQueued(agentId, reason, now);
      if (count > 0) {
        this.d.log.warn({ agent: agentId, count }, `stimuli refused: ${reason}`);
        this.d.events.emit("rejected", { agent: agentId, count, reason });
      }
      return { kind: "parked" };
    }
    if (agent.status !== "active") return { kind: "parked" };
    const head = await store.headOfQueue(agentId);
    if (!head) return { kind: "empty" };
    if (head.notBefore > now) return { kind: "wait", until: head.notBefore };

    const sv = this.d.spec();
    const type = sv.spec.agents[agent.type];
    if (!type) {
      await store.setAgentStatus(agentId, "retired", `type ${agent.type} is not in the fleet spec`);
      this.d.events.emit("status", {
        agent: agentId,
        status: "retired",
        reason: `type ${agent.type} is not in the fleet spec`,
      });
      return { kind: "parked" };
    }

    const win = budgetWindows(now);
    const usage = await store.usage(agentId, [win.hourWindow, win.dayWindow]);
    let over = this.overBudget(agent, win, usage);
    // An operator's `fleet resume` of a budget pause lets the agent run until that window ends.
    if (over && Number((await store.getMeta(`budget_override:${agentId}`)) ?? 0) > now) over = null;
    if (over) {
      await store.setAgentStatus(agentId, "paused", over.reason, over.until);
      this.d.events.emit("status", { agent: agentId, status: "paused", reason: over.reason });
      this.d.log.warn({ agent: agentId, budget: over.budget }, `agent paused: ${over.reason}`);
      return { kind: "wait", until: over.until };
    }

    let state: unknown = null;
    if (agent.headHash) {
      const row = await store.getCheckpoint(agent.headHash);
      try {
        if (!row) throw new IntegrityError(agentId, agent.headSeq, agent.headHash, "checkpoint record is missing");
        state = await verifyCheckpointRow(row);
      } catch (err) {
        const reason = err instanceof IntegrityError ? err.message : `checkpoint unreadable: ${String(err)}`;
        await store.setAgentStatus(agentId, "failed", reason);
        this.d.events.emit("status", { agent: agentId, status: "failed", reason });
        this.d.log.error({ agent: agentId }, `agent failed: ${reason}`);
        return { kind: "parked" };
      }
    }

    const episode = newEpisodeId();
    const stimulus = toStimulus(head);
    const attempt = head.attempts + 1;
    const tokensLeft = type.budget.tokens_per_day - (usage.find((u) => u.window === win.dayWindow)?.tokens ?? 0);
    const stamp = this.d.lifecycleStamp?.(agentId);
    const gate = new ToolGate(
      { type: agent.type, key: agent.key, id: agentId },
      type,
      sv.spec,
      this.d.toolEnv,
      tokensLeft,
    );
    this.d.events.emit("status", { agent: agentId, status: "running" });
    const log = this.d.log.child({ agent: agentId, episode, stimulus: head.sid });

    const result = await runEpisode(
      {
        t: "start",
        episode,
        agent: { type: agent.type, key: agent.key, id: agentId },
        module: type.module_path,
        config: type.config,
        state,
        fresh: agent.headHash === null,
        stimulus,
        replay: null,
        limits: CHILD_LIMITS,
      },
      runLimitsFor(type.budget),
      (call, tool, args) => gate.handle(call, tool, args),
      this.d.spawn,
      this.d.pool,
    );
    const endedAt = this.d.now();
    // ctx.log lines go to the gateway log too, with the episode's bound context (the first
    // 100: all of them stay in the episode's event log; a chatty agent must not flood ours).
    let logged = 0;
    for (const r of result.records) if (r.k === "log" && logged++ < 100) log[r.level](r.msg);
    const events = buildEvents(episode, stimulus, result);
    const eventsHash = await hashEvents(events);
    const bookUsage = { ...win, toolCalls: gate.calls, tokens: gate.tokens, cost: gate.cost };
    const base = {
      id: episode,
      gateway: store.gatewayId,
      agent: agentId,
      stimulusSeq: head.seq,
      stimulusId: head.sid,
      specVersion: sv.hash,
      attempt,
      startedAt: now,
      endedAt,
      parent: agent.headHash,
      eventsHash,
      eventCount: events.length,
    };

    if (!result.ok && this.d.stopping()) {
      log.info({ kind: result.kind }, "episode aborted by shutdown; stimulus stays queued");
      return { kind: "parked" };
    }
    if (!result.ok && result.kind === "infra") return this.couldNotStart(agentId, agent, stamp, result.message, log);
    if (this.d.infra?.started()) this.d.events.emit("infra", { state: "recovered", reason: "episodes start again" });
    if (!result.ok) {
      const quarantine = attempt >= type.retry.max_attempts;
      const retryAt = quarantine ? null : endedAt + type.retry.backoff_ms * 2 ** (attempt - 1);
      await store.recordFailure({
        episode: { ...base, status: "failed", errorKind: result.kind, error: result.message.slice(0, 4000) },
        events,
        retryAt,
        usage: bookUsage,
      });
      log.warn(
        { kind: result.kind, attempt, quarantined: quarantine },
        `episode failed (${result.kind}): ${result.message.split("\n")[0]}`,
      );
      this.d.events.emit("episode", {
        episode,
        agent: agentId,
        stimulus: head.sid,
        status: "failed",
        kind: result.kind,
        checkpoint: agent.headHash,
        ms: result.ms,
        type: agent.type,
        quarantined: quarantine,
      });
      await this.emitSettled(agentId, stamp, agent.headHash, `last episode failed: ${result.kind}`);
      return retryAt === null ? { kind: "ran", more: this.d.hasQueued?.(agentId) } : { kind: "wait", until: retryAt };
    }

    const seq = agent.headSeq + 1;
    const { hash, stateText } = await sealCheckpoint({
      agent: agentId,
      seq,
      parent: agent.headHash,
      episode,
      spec_version: sv.hash,
      state: result.state,
    });
    const outbox = buildOutbox(episode, agentId, agent, result.records, gate, endedAt);
    // The fleet/episodes summary rides the outbox too, so it is delivered at least once.
    outbox.push({
      episode,
      seq: outbox.length,
      topic: topics.episodes,
      payload: JSON.stringify({
        episode,
        agent: agentId,
        stimulus: head.sid,
        status: "committed",
        checkpoint: hash,
        ms: Math.round(result.ms),
      }),
      qos: 0,
      retain: false,
      createdAt: endedAt,
    });
    const inbox: NewStimulus[] = gate.sends.map((s, i) => ({
      agent: s.to.id as AgentId,
      type: s.to.type,
      key: s.to.key,
      sid: `inbox:${episode}:${i}` as StimulusId,
      kind: "inbox",
      topic: topics.inbox(s.to.type, s.to.key),
      payload: new TextEncoder().encode(s.payload),
      receivedAt: endedAt,
    }));
    await store.commitEpisode({
      episode: { ...base, status: "committed", checkpoint: hash },
      events,
      checkpoint: {
        hash,
        gateway: store.gatewayId,
        agent: agentId,
        seq,
        parent: agent.headHash,
        episode,
        specVersion: sv.hash,
        state: stateText,
        createdAt: endedAt,
      },
      outbox,
      inbox,
      usage: bookUsage,
    });
    log.debug({ ms: Math.round(result.ms), checkpoint: hash }, "episode committed");
    this.d.publishCommitted?.(episode, outbox);
    this.d.events.emit("episode", {
      episode,
      agent: agentId,
      stimulus: head.sid,
      status: "committed",
      checkpoint: hash,
      ms: result.ms,
      type: agent.type,
      quarantined: false,
    });
    await this.emitSettled(agentId, stamp, hash);
    for (const s of inbox) this.d.events.emit("queued", { agent: s.agent });
    return { kind: "ran", more: this.d.hasQueued?.(agentId) };
  }

  /**
   * The episode subprocess could not start (the machine's failure, not the agent's): nothing is
   * recorded against the agent, its stimulus stays at the head of its queue with its attempts
   * untouched and is tried again after a backoff; the gateway reports itself degraded meanwhile.
   */
  private async couldNotStart(
    agentId: string,
    agent: AgentRow,
    stamp: number | undefined,
    reason: string,
    log: Logger,
  ): Promise<TurnResult> {
    const now = this.d.now();
    const waitMs = this.d.infra?.failed(reason, now) ?? 1000;
    log.error(
      { kind: "infra", retry_in_ms: waitMs },
      `episode could not start (not counted against the agent): ${reason}`,
    );
    this.d.events.emit("infra", { state: "degraded", reason, agent: agentId, type: agent.type });
    await this.emitSettled(agentId, stamp, agent.headHash, "waiting: the episode could not start (infrastructure)");
    return { kind: "wait", until: now + waitMs };
  }

  /**
   * The status after an episode: idle, unless an operator paused or retired the agent while
   * it ran (the retained status topic must not overwrite that with "idle").
   */
  private async emitSettled(
    agentId: string,
    stamp: number | undefined,
    checkpoint: string | null,
    reason?: string,
  ): Promise<void> {
    // Only an operator action during the episode can have changed the stored status.
    const changed = stamp === undefined || this.d.lifecycleStamp?.(agentId) !== stamp;
    const now = changed ? await this.d.store.getAgent(agentId) : null;
    if (now && now.status !== "active") {
      this.d.events.emit("status", {
        agent: agentId,
        status: now.status,
        ...(now.reason ? { reason: now.reason } : {}),
        checkpoint,
      });
      return;
    }
    this.d.events.emit("status", { agent: agentId, status: "idle", checkpoint, ...(reason ? { reason } : {}) });
  }

  private overBudget(
    agent: AgentRow,
    win: ReturnType<typeof budgetWindows>,
    rows: readonly { window: string; episodes: number; tokens: number; cost: number }[],
  ): { budget: string; reason: string; until: number } | null {
    const type = this.d.spec().spec.agents[agent.type];
    if (!type) return null;
    const hour = rows.find((r) => r.window === win.hourWindow);
    const day = rows.find((r) => r.window === win.dayWindow);
    const b = type.budget;
    if (hour && hour.episodes >= b.episodes_per_hour)
      return {
        budget: "episodes_per_hour",
        reason: `budget episodes_per_hour (${b.episodes_per_hour}) reached`,
        until: win.hourEnds,
      };
    if (day && day.tokens >= b.tokens_per_day)
      return {
        budget: "tokens_per_day",
        reason: `budget tokens_per_day (${b.tokens_per_day}) reached`,
        until: win.dayEnds,
      };
    if (day && b.cost_per_day > 0 && day.cost >= b.cost_per_day)
      return { budget: "cost_per_day", reason: `budget cost_per_day (${b.cost_per_day}) reached`, until: win.dayEnds };
    return null;
  }
}

/** The event log: the stimulus, every record in order, and how it ended. */
export function buildEvents(
  episode: string,
  stimulus: Stimulus,
  result: RunResult,
): { episode: string; seq: number; kind: string; data: string }[] {
  const out: { episode: string; seq: number; kind: string; data: string }[] = [];
  const push = (kind: string, data: unknown) =>
    out.push({ episode, seq: out.length, kind, data: JSON.stringify(data) });
  push("stimulus", stimulus);
  for (const r of result.records) push(r.k, r);
  if (result.ok) push("end", { ok: true, ms: Math.round(result.ms) });
  else push("failure", { kind: result.kind, message: result.message.slice(0, 4000), ms: Math.round(result.ms) });
  return out;
}

function buildOutbox(
  episode: string,
  agentId: string,
  agent: AgentRow,
  records: readonly EpisodeRecord[],
  gate: ToolGate,
  at: number,
) {
  const rows: {
    episode: string;
    seq: number;
    topic: string;
    payload: string;
    qos: number;
    retain: boolean;
    createdAt: number;
  }[] = [];
  const out = topics.out(agent.type, agent.key);
  for (const r of records) {
    if (r.k !== "emit") continue;
    const seq = rows.length;
    rows.push({
      episode,
      seq,
      topic: out,
      payload: JSON.stringify({ episode, seq, agent: agentId, data: r.data }),
      qos: 1,
      retain: false,
      createdAt: at,
    });
  }
  for (const p of gate.publishes)
    rows.push({
      episode,
      seq: rows.length,
      topic: p.topic,
      payload: p.payload,
      qos: p.qos,
      retain: p.retain,
      createdAt: at,
    });
  return rows;
}
