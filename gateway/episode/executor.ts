/**
 * One scheduler turn for one agent, in three steps: read the turn's inputs (one store
 * call), decide (pure: ./decide.ts), act. Acting is a status change (pause, retire,
 * refuse a retired agent's queue, fail on a bad checkpoint) or running the head of the
 * queue through the injected runner and committing everything at once (or recording the
 * failure for a retry or quarantine). The runner, the clock and the queue book come in
 * through `EpisodeDeps`, so a turn runs in tests without a subprocess.
 */
import type { Logger } from "pino";
import type { ParentMessage, Stimulus } from "../../agents/protocol.ts";
import type { FleetEventMap, FleetEvents } from "../events.ts";
import type { AgentTypeSpec, SpecVersion } from "../spec/index.ts";
import { hashEvents, IntegrityError, sealCheckpoint, verifyCheckpointRow } from "../store/index.ts";
import type { AgentRow, EpisodeCommit, EpisodeUsage, SentStimulus, Store, TurnInputs } from "../store/index.ts";
import { type AgentId, type EpisodeId, newEpisodeId, type TurnResult } from "../types.ts";
import { topics } from "../protocol.ts";
import { budgetWindows, decideTurn, retryAt, type TurnDecision } from "./decide.ts";
import {
  buildEvents,
  buildInbox,
  buildForwards,
  buildOutbox,
  buildWakes,
  CHILD_LIMITS,
  logCopy,
  runLimitsFor,
  toStimulus,
  type WakeEffects,
} from "./records.ts";
import type { RunLimits, RunResult, ToolHandler } from "./runner.ts";
import { confirmStateVersion, type StampedVersion } from "./state-version.ts";
import type { InfraHealth } from "./infra.ts";
import { type ToolEnv, ToolGate } from "./tools/index.ts";

/** Runs one episode to completion or failure and never throws (runner.ts `runEpisode` with its spawner bound). */
export type EpisodeRunner = (
  start: Extract<ParentMessage, { t: "start" }>,
  limits: RunLimits,
  onTool: ToolHandler,
) => Promise<RunResult>;

/** What a turn tells the queue book (gateway/fleet/queue-book.ts) after each write that changes a queue. */
export interface EpisodeQueue {
  /** The oldest stimulus queued for the agent, or null. */
  head(agent: AgentId): number | null;
  /** Every stimulus queued for the agent, oldest first. */
  seqs(agent: AgentId): readonly number[];
  /** The rows say this is what waits for the agent (the book's head was not queued). */
  resync(agent: AgentId, rows: readonly { seq: number; receivedAt: number }[]): void;
  /** The head of the agent's queue left it (committed or quarantined). */
  left(agent: AgentId, seq: number): void;
  /** Queued stimuli left the agent's queue: refused (retired), expired or superseded. */
  rejected(agent: AgentId, seqs: readonly number[]): void;
  /** An admitted send was written to its target's queue as `seq`. */
  recorded(agent: AgentId, seq: number, receivedAt: number): void;
  /** An admitted send was not written (the episode failed or did not commit, or a duplicate). */
  released(agent: AgentId, n?: number): void;
  /** The agent was retired (its type left the spec). */
  retire(agent: AgentId): void;
}

/** The store as a turn uses it (a `Store` satisfies it). */
export type TurnStore = Pick<
  Store,
  | "gatewayId"
  | "turnInputs"
  | "queuedOf"
  | "setAgentStatus"
  | "rejectQueued"
  | "expireStimulus"
  | "supersedeTimers"
  | "getAgent"
  | "commitEpisode"
  | "recordFailure"
  | "bookAborted"
>;

/** What the episode executor needs from the gateway. */
export interface EpisodeDeps {
  readonly store: TurnStore;
  /** The spec version episodes start on now. */
  readonly spec: () => SpecVersion;
  /** Runs the episode (a sandboxed subprocess in the gateway; scripted in tests). */
  readonly run: EpisodeRunner;
  readonly toolEnv: ToolEnv;
  readonly events: FleetEvents;
  readonly log: Logger;
  readonly now: () => number;
  /** True while the gateway drains: an aborted episode is then not a failure, its stimulus stays queued. */
  readonly stopping: () => boolean;
  /** Counter bumped by operator lifecycle actions; unchanged means no pause/retire happened meanwhile. */
  readonly lifecycleStamp?: (agent: AgentId) => number;
  /** The queue book: told right after the store's queue rows change. */
  readonly queue: EpisodeQueue;
  /**
   * An agent's turn ended (its head left, its queue was empty, or it failed): retire it if it is draining
   * and done. Asked after every turn, not only of an agent that was draining when the turn began: a drain
   * ordered while its last episode ran has nothing else left to finish it (cheap: the queue book knows).
   */
  readonly drained?: (agent: AgentId) => Promise<unknown>;
  /** The spec a draining agent of a type no longer in fleet.toml runs on (the newest that has it), or null. */
  readonly drainSpec?: (type: string) => Promise<SpecVersion | null>;
  /** Infrastructure health of episode starts (an infra failure does not consume the agent's retries). */
  readonly infra?: InfraHealth;
  /** A committed episode set wake-ups; the soonest is due at `dueAt` (the wake-up clock re-arms). */
  readonly wakesScheduled?: (dueAt: number) => void;
  /**
   * The code bundle an agent's episode runs (gateway/code); default: the spec version's bundle for
   * its type. Null: the module file.
   */
  readonly bundleFor?: (agent: AgentId, type: string, sv: SpecVersion) => string | null;
  /**
   * The state version (`defineAgent({ version })`) the code at `module` (a bundle's file, or the module file)
   * declares, as the gateway reads it (a check subprocess, kept per bundle); null when it could not be read.
   * The checkpoint records this, never what the subprocess says (./state-version.ts).
   */
  readonly codeVersion?: (module: string, type: AgentTypeSpec, bundle: string | null) => Promise<number | null>;
  /** The file of a stored bundle, materialised for the sandbox; throws when it cannot be. */
  readonly bundleFile?: (hash: string) => Promise<string>;
  /**
   * A failure's message and stack with the positions in bundle `hash` (its `file`) named in the
   * sources' terms (gateway/code/source-map.ts); as it is without.
   */
  readonly inSourceTerms?: (
    text: string,
    bundle: { hash: string; file: string },
    sv: SpecVersion,
    type: string,
  ) => Promise<string>;
  /** Episodes running now, this one included: a commit waits for others only while some run (`commitGatherMs`). */
  readonly running?: () => number;
  /** Publish a committed episode's outbox now (effects after commit). */
  readonly publishCommitted?: (
    episode: string,
    rows: readonly { seq: number; topic: string; payload: string; qos: number; retain: boolean }[],
    agent: AgentId,
  ) => void;
}

type RunDecision = Extract<TurnDecision, { kind: "run" }>;

/** One episode of a turn, as it starts: what its run, its commit and its failure all name. */
interface EpisodeRun {
  readonly agentId: AgentId;
  readonly d: RunDecision;
  readonly sv: SpecVersion;
  /** When its turn began: the episode's start. */
  readonly startedAt: number;
  readonly episode: EpisodeId;
  readonly stimulus: Stimulus;
  /** The agent's lifecycle stamp as it began (`emitSettled`: did an operator act meanwhile?). */
  readonly stamp: number | undefined;
  readonly ref: { readonly type: string; readonly key: string; readonly id: AgentId };
  readonly gate: ToolGate;
  /** The gateway log, bound to the agent, the episode and its stimulus. */
  readonly log: Logger;
  readonly bundle: string | null;
  /** The module it loads, or why its bundle could not be had. */
  readonly code: { readonly module: string; readonly error: string | null };
}

/** What an ended episode writes whether it commits or fails. */
interface EndedEpisode {
  readonly endedAt: number;
  readonly events: ReturnType<typeof buildEvents>;
  /** Its episode row, less the outcome. */
  readonly base: Omit<EpisodeCommit["episode"], "status">;
  readonly usage: EpisodeUsage;
  /** Its `episode` fact, less the outcome. */
  readonly summary: Omit<FleetEventMap["episode"], "status" | "checkpoint" | "quarantined" | "kind">;
}

/** A stimulus that waited this long for its episode to start is in a backlog (COMMIT_GATHER_MS). */
export const BACKLOG_WAIT_MS = 50;
/**
 * How long the commit of an episode in a backlog waits for other episodes' commits to share its
 * transaction: a commit costs the gateway per transaction as well as per episode (the pages of the
 * tables' and indexes' right edges, the WAL sync, a turn of the event loop), and the episode's
 * latency is its wait in the queue (at least BACKLOG_WAIT_MS) more than this. The episode keeps its
 * place among max_concurrent_episodes meanwhile: episodes then end in convoys, which share more.
 * Measured (bench episodes, 2 cores, 4 interleaved runs each): 2.09 episodes per commit instead of
 * 1.06, gateway CPU per episode 8% lower on average (the runs' own spread is about 10%).
 */
export const COMMIT_GATHER_MS = 10;

/**
 * How long a commit may wait for company: COMMIT_GATHER_MS when its stimulus waited BACKLOG_WAIT_MS
 * or more and other episodes run (one may commit meanwhile); otherwise 0, so an agent that is not
 * behind (a quiet agent beside a flood, an idle fleet) commits at once, and takes any commits
 * waiting into its transaction.
 */
export function commitGatherMs(waitMs: number, running: number): number {
  return waitMs >= BACKLOG_WAIT_MS && running > 1 ? COMMIT_GATHER_MS : 0;
}

/** The wait after a turn that failed unexpectedly (a commit the store refused, say): doubled each time in a row. */
export const TURN_ERROR_BACKOFF_MS = { first: 1000, max: 300_000 } as const;

/** Runs turns; one instance per gateway. */
export class EpisodeExecutor {
  /** Agents whose last turns failed unexpectedly, and how many in a row. */
  private readonly turnErrors = new Map<AgentId, number>();

  constructor(private readonly d: EpisodeDeps) {}

  /**
   * One turn for `agentId` (see Scheduler). Never throws. A turn that fails unexpectedly is tried
   * again after a backoff that doubles while it keeps failing (up to 5 minutes): an error that does
   * not pass (one a store refuses on every commit) must not start a subprocess every second forever.
   */
  async turn(agentId: AgentId): Promise<TurnResult> {
    try {
      const result = await this.turnInner(agentId);
      this.turnErrors.delete(agentId);
      return result;
    } catch (err) {
      const times = (this.turnErrors.get(agentId) ?? 0) + 1;
      this.turnErrors.set(agentId, times);
      const { first, max } = TURN_ERROR_BACKOFF_MS;
      const waitMs = Math.min(first * 2 ** Math.min(times - 1, 20), max);
      this.d.log.error({ err, agent: agentId, times, retry_in_ms: waitMs }, "episode turn failed unexpectedly");
      return { kind: "wait", until: this.d.now() + waitMs };
    }
  }

  /**
   * The agents whose last turn failed unexpectedly, for the caller to wake: storage came back, and a
   * turn whose commit the full disk refused must not wait out a backoff that grew while it was full
   * (up to TURN_ERROR_BACKOFF_MS.max). Their counts stay: a disk that is full again at once (it
   * took a tiny write, not an episode) doubles their next wait as before, not from 1 s.
   */
  failedTurnAgents(): AgentId[] {
    return [...this.turnErrors.keys()];
  }

  /**
   * The turn's inputs, its head read by the seq the queue book has. A head that is not queued
   * for the agent means the book disagrees with the rows: it reads the agent's queue again.
   */
  private async inputs(agentId: AgentId, windows: readonly string[]): Promise<TurnInputs> {
    const { store, queue } = this.d;
    const head = queue.head(agentId);
    const inputs = await store.turnInputs(agentId, windows, head);
    if (head === null || inputs.head) return inputs;
    const rows = await store.queuedOf(agentId);
    this.d.log.warn({ agent: agentId, head, queued: rows.length }, "queue book: its head was not queued; read again");
    queue.resync(agentId, rows);
    return store.turnInputs(agentId, windows, queue.head(agentId));
  }

  private async turnInner(agentId: AgentId): Promise<TurnResult> {
    const { store, events } = this.d;
    const now = this.d.now();
    let sv = this.d.spec();
    const win = budgetWindows(now);
    let inputs = await this.inputs(agentId, [win.hourWindow, win.dayWindow]);
    // A removed type's agents drain on the last spec version that had the type (recorded with
    // each episode, so replay finds its module and config).
    const a = inputs.agent;
    if (a?.status === "draining" && !sv.spec.agents[a.type]) sv = (await this.d.drainSpec?.(a.type)) ?? sv;
    for (;;) {
      const d = decideTurn(inputs, sv.spec, now);
      switch (d.kind) {
        case "reactivate":
          await store.setAgentStatus(agentId, "active", null);
          events.emit("status", { agent: agentId, status: "idle", reason: d.reason });
          this.d.log.info({ agent: agentId }, `agent active again: ${d.reason}`);
          inputs = {
            ...inputs,
            agent: inputs.agent && { ...inputs.agent, status: "active", reason: null, pausedUntil: null },
          };
          continue;
        case "empty":
          // Not a reason to zero the book: a stimulus recorded after this turn's read is counted there.
          await this.d.drained?.(agentId);
          return { kind: "empty" };
        case "refuse_retired": {
          const refused = await store.rejectQueued(agentId, d.reason, now);
          this.d.queue.rejected(agentId, refused);
          const count = refused.length;
          if (count > 0) {
            this.d.log.warn({ agent: agentId, count }, `stimuli refused: ${d.reason}`);
            events.emit("rejected", { agent: agentId, count, reason: d.reason });
          }
          // Not parked: a send admitted before the retirement may still be recorded (during this
          // turn, or after it), and the scheduler gives a parked agent no turn for it until a wake.
          // As empty, news of it brings another turn, which refuses it too.
          return { kind: "empty" };
        }
        case "expire":
          if (await store.expireStimulus(d.seq, d.reason, now, d.state)) {
            this.d.queue.rejected(agentId, [d.seq]);
            this.d.log.info({ agent: agentId, stimulus: d.seq }, `stimulus skipped: ${d.reason}`);
            events.emit("rejected", { agent: agentId, count: 1, reason: d.reason });
          }
          inputs = await this.inputs(agentId, [win.hourWindow, win.dayWindow]);
          continue;
        case "parked":
          return { kind: "parked" };
        case "wait":
          return { kind: "wait", until: d.until };
        case "retire":
          await store.setAgentStatus(agentId, "retired", d.reason);
          this.d.queue.retire(agentId);
          events.emit("status", { agent: agentId, status: "retired", reason: d.reason });
          // What waits for it is refused with the reason (the next decision), not left queued for ever.
          inputs = { ...inputs, agent: inputs.agent && { ...inputs.agent, status: "retired", reason: d.reason } };
          continue;
        case "pause":
          await store.setAgentStatus(agentId, "paused", d.reason, d.until);
          events.emit("status", { agent: agentId, status: "paused", reason: d.reason });
          this.d.log.warn({ agent: agentId, budget: d.budget }, `agent paused: ${d.reason}`);
          return { kind: "wait", until: d.until };
        case "run": {
          // Timer fires that piled up (the agent was paused, or busy) coalesce by catch_up: run the newest only.
          const policy = d.type.timer?.catch_up;
          if (d.head.kind === "timer" && policy !== undefined && policy !== "all") {
            const dropped = await store.supersedeTimers(
              agentId,
              this.d.queue.seqs(agentId),
              `superseded by a newer timer fire (catch_up = "${policy}")`,
              now,
            );
            if (dropped.length > 0) {
              this.d.queue.rejected(agentId, dropped);
              this.d.log.info({ agent: agentId, skipped: dropped.length, policy }, "stale timer fires coalesced");
              inputs = await this.inputs(agentId, [win.hourWindow, win.dayWindow]);
              continue;
            }
          }
          return this.runAndCommit(agentId, d, sv, now);
        }
        default: {
          const never: never = d;
          return never;
        }
      }
    }
  }

  /** Verify and load the checkpoint, run the episode, commit it or record its failure. */
  private async runAndCommit(agentId: AgentId, d: RunDecision, sv: SpecVersion, now: number): Promise<TurnResult> {
    const { agent, head, type } = d;
    const state = await this.loadState(agentId, d);
    if (state.failed) return { kind: "parked" };

    const episode = newEpisodeId();
    const stimulus = toStimulus(head);
    const stamp = this.d.lifecycleStamp?.(agentId);
    const ref = { type: agent.type, key: agent.key, id: agentId };
    const gate = new ToolGate(ref, type, sv.spec, this.d.toolEnv, d.tokensLeft, d.costLeft, head.sid);
    this.d.events.emit("status", { agent: agentId, status: "running" });
    const log = this.d.log.child({ agent: agentId, episode, stimulus: head.sid });
    const bundle = this.d.bundleFor ? this.d.bundleFor(agentId, agent.type, sv) : (sv.bundles[agent.type] ?? null);
    try {
      const code = await this.codeOf(bundle, type.module_path);
      const run: EpisodeRun = {
        agentId,
        d,
        sv,
        startedAt: now,
        episode,
        stimulus,
        stamp,
        ref,
        gate,
        log,
        bundle,
        code,
      };
      return await this.settle(run, await this.runEpisode(run, state.value));
    } finally {
      // Whatever way the turn ends (failure, shutdown, a throw before the commit), the places
      // its sends reserved are given back unless the commit wrote them.
      this.settleSends(gate, null);
    }
  }

  /**
   * Run the episode's process to its end; its tool calls go through the gate, which closes with it.
   * A failure's message names positions in the sources' terms where its code is a bundle.
   */
  private async runEpisode(run: EpisodeRun, state: unknown): Promise<RunResult> {
    const { d, sv, gate, code, bundle } = run;
    const { agent, type } = d;
    let ended = false;
    let result: RunResult;
    try {
      // A bundle that cannot be materialised is the machine's failure, not the agent's: nothing runs.
      result =
        code.error !== null
          ? { ok: false, kind: "infra", message: code.error, records: [], ms: 0 }
          : await this.d.run(
              {
                t: "start",
                episode: run.episode,
                agent: run.ref,
                module: code.module,
                config: type.config,
                state,
                state_version: d.checkpoint?.stateVersion ?? 1,
                fresh: agent.headHash === null,
                stimulus: run.stimulus,
                replay: null,
                limits: CHILD_LIMITS,
                wakes: { pending: d.pendingWakes, max: type.max_wakeups },
              },
              runLimitsFor(type.budget, 0, sv.spec.broker.max_packet_bytes),
              // A call that arrives after the run ended must not reserve a place nobody settles.
              (call, tool, args) =>
                ended
                  ? Promise.resolve({ ok: false, result: { error: "denied", reason: "episode ended" } })
                  : gate.handle(call, tool, args),
            );
    } finally {
      // Calls still in flight are aborted: their answers would reach nobody.
      ended = true;
      gate.end();
    }
    if (!result.ok && bundle !== null && code.error === null && this.d.inSourceTerms)
      result = {
        ...result,
        message: await this.d.inSourceTerms(result.message, { hash: bundle, file: code.module }, sv, agent.type),
      };
    return result;
  }

  /**
   * What an ended run leaves: its commit, or the record of its failure; neither when a shutdown
   * aborted it or its process could not start.
   */
  private async settle(run: EpisodeRun, ran: RunResult): Promise<TurnResult> {
    const { agentId, d, episode, gate, log } = run;
    const { agent, head, type } = d;
    let result = ran;
    let stamped: StampedVersion = { version: 1 };
    if (result.ok) {
      const declared = this.d.codeVersion ? await this.d.codeVersion(run.code.module, type, run.bundle) : null;
      const known = { declared, previous: d.checkpoint?.stateVersion ?? 1, fresh: agent.headHash === null };
      const confirmed = confirmStateVersion(result, known);
      if ("kind" in confirmed) result = { ok: false, ...confirmed, records: result.records, ms: result.ms };
      else stamped = confirmed;
    }
    const endedAt = this.d.now();
    let wakes: Extract<WakeEffects, { ok: true }> | null = null;
    if (result.ok) {
      const w = buildWakes(
        episode,
        this.d.store.gatewayId,
        agentId,
        result.records,
        d.pendingWakes,
        type.max_wakeups,
        endedAt,
      );
      if (w.ok) wakes = w;
      else result = { ok: false, kind: "protocol", message: w.message, records: result.records, ms: result.ms };
    }
    // ctx.log lines go to the gateway log too, with the episode's bound context (within bounds: logCopy).
    for (const [level, msg] of logCopy(result.records)) log[level](msg);
    const events = buildEvents(episode, run.stimulus, result);
    const ended: EndedEpisode = {
      endedAt,
      events,
      base: {
        id: episode,
        gateway: this.d.store.gatewayId,
        agent: agentId,
        stimulusSeq: head.seq,
        stimulusId: head.sid,
        stimulusKind: head.kind,
        specVersion: run.sv.hash,
        attempt: d.attempt,
        startedAt: run.startedAt,
        endedAt,
        parent: agent.headHash,
        eventsHash: await hashEvents(events),
        eventCount: events.length,
        bundle: run.bundle,
      },
      usage: { ...d.windows, toolCalls: gate.calls, tokens: gate.tokens, cost: gate.cost },
      summary: {
        episode,
        agent: agentId,
        stimulus: head.sid,
        ms: result.ms,
        // A clock stepped back (NTP) must not make a wait negative.
        waitMs: Math.max(0, run.startedAt - head.receivedAt),
        type: agent.type,
      },
    };

    if (!result.ok && this.d.stopping()) {
      // Not a failed attempt (no retry or quarantine is counted), but its tool calls went out and
      // run again after the restart: the attempt is booked against its budgets like any other.
      await this.d.store.bookAborted(agentId, ended.usage);
      log.info({ kind: result.kind }, "episode aborted by shutdown; stimulus stays queued");
      return { kind: "parked" };
    }
    if (!result.ok && result.kind === "infra")
      return this.couldNotStart(agentId, agent, run.stamp, result.message, log);
    if (this.d.infra?.started()) this.d.events.emit("infra", { state: "recovered", reason: "episodes start again" });
    if (!result.ok) return this.recordFailed(run, ended, result);
    return this.commit(run, ended, result, stamped, wakes);
  }

  /** Record a failed attempt: its stimulus is tried again after a backoff, or quarantined. */
  private async recordFailed(
    run: EpisodeRun,
    ended: EndedEpisode,
    result: Extract<RunResult, { ok: false }>,
  ): Promise<TurnResult> {
    const { agentId, d, log } = run;
    const { agent, head, type } = d;
    const retry = retryAt(type, d.attempt, ended.endedAt, result.kind);
    await this.d.store.recordFailure({
      episode: { ...ended.base, status: "failed", errorKind: result.kind, error: result.message.slice(0, 4000) },
      events: ended.events,
      retryAt: retry,
      usage: ended.usage,
    });
    if (retry === null) {
      this.d.queue.left(agentId, head.seq);
      await this.d.drained?.(agentId);
    }
    log.warn(
      { kind: result.kind, attempt: d.attempt, quarantined: retry === null },
      `episode failed (${result.kind}): ${result.message.split("\n")[0]}`,
    );
    this.d.events.emit("episode", {
      ...ended.summary,
      status: "failed",
      kind: result.kind,
      checkpoint: agent.headHash,
      quarantined: retry === null,
    });
    await this.emitSettled(
      agentId,
      run.stamp,
      agent.headHash,
      `last episode failed: ${result.kind}`,
      agent.status === "draining",
    );
    return retry === null ? { kind: "ran" } : { kind: "wait", until: retry };
  }

  /**
   * Seal the new checkpoint and commit everything the episode did at once; then its effects
   * (outputs published, sends' places settled, wake-ups armed) and its facts.
   */
  private async commit(
    run: EpisodeRun,
    ended: EndedEpisode,
    result: Extract<RunResult, { ok: true }>,
    stamped: StampedVersion,
    wakes: Extract<WakeEffects, { ok: true }> | null,
  ): Promise<TurnResult> {
    const { agentId, d, episode, gate, log } = run;
    const { agent, head } = d;
    const { endedAt } = ended;
    const seq = agent.headSeq + 1;
    // Version 1 without a migration seals nothing new: such checkpoints hash as they always did.
    const stateVersion = stamped.version > 1 || stamped.migratedFrom !== undefined ? stamped.version : undefined;
    const sealed = await sealCheckpoint({
      agent: agentId,
      seq,
      parent: agent.headHash,
      episode,
      spec_version: run.sv.hash,
      state: result.state,
      state_version: stateVersion,
      migrated_from: stamped.migratedFrom,
    });
    const outbox = buildOutbox(episode, run.ref, result.records, gate.publishes, endedAt);
    // Sends to another shard's agents leave through the broker, at least once, after the commit.
    outbox.push(...buildForwards(episode, gate.sends, endedAt, outbox.length));
    // The fleet/episodes summary rides the outbox too, so it is delivered at least once: QoS 1, so a
    // persistent subscriber that is away gets it queued, like the outputs it summarizes.
    outbox.push({
      episode,
      seq: outbox.length,
      topic: topics.episodes,
      payload: JSON.stringify({
        episode,
        agent: agentId,
        stimulus: head.sid,
        status: "committed",
        checkpoint: sealed.hash,
        ms: Math.round(result.ms),
      }),
      qos: 1,
      retain: false,
      createdAt: endedAt,
    });
    // Sends are written with the sender's commit (exactly once), into places admission reserved.
    const inbox = buildInbox(episode, gate.sends, endedAt);
    const gatherMs = commitGatherMs(ended.summary.waitMs, this.d.running?.() ?? 1);
    const { sent, droppedWakes } = await this.d.store.commitEpisode(
      {
        episode: { ...ended.base, status: "committed", checkpoint: sealed.hash },
        events: ended.events,
        checkpoint: {
          hash: sealed.hash,
          gateway: this.d.store.gatewayId,
          agent: agentId,
          seq,
          parent: agent.headHash,
          episode,
          specVersion: run.sv.hash,
          state: sealed.stateText,
          createdAt: endedAt,
          stateVersion: stateVersion ?? null,
          migratedFrom: stamped.migratedFrom ?? null,
        },
        outbox,
        inbox,
        usage: ended.usage,
        wakes: wakes?.wakes,
        cancels: wakes?.cancels,
      },
      gatherMs,
    );
    this.d.queue.left(agentId, head.seq);
    if (droppedWakes.length > 0) {
      this.d.queue.rejected(agentId, droppedWakes);
      log.info({ count: droppedWakes.length }, "wake-ups cancelled after they fell due: their runs dropped");
    }
    this.settleSends(gate, sent);
    await this.d.drained?.(agentId);
    log.debug({ ms: Math.round(result.ms), checkpoint: sealed.hash }, "episode committed");
    this.d.publishCommitted?.(episode, outbox, agentId);
    if (wakes && wakes.wakes.length > 0) this.d.wakesScheduled?.(Math.min(...wakes.wakes.map((w) => w.dueAt)));
    this.d.events.emit("episode", {
      ...ended.summary,
      status: "committed",
      checkpoint: sealed.hash,
      quarantined: false,
    });
    await this.emitSettled(agentId, run.stamp, sealed.hash, undefined, agent.status === "draining");
    if (inbox.length > 0)
      this.d.events.emit("intake", {
        source: "inbox",
        accepted: sent.length,
        duplicates: inbox.length - sent.length,
      });
    return { kind: "ran" };
  }

  /** The module an episode loads: its bundle's file, or the module file when it has none. */
  private async codeOf(bundle: string | null, modulePath: string): Promise<{ module: string; error: string | null }> {
    if (bundle === null || !this.d.bundleFile) return { module: modulePath, error: null };
    try {
      return { module: await this.d.bundleFile(bundle), error: null };
    } catch (err) {
      return { module: modulePath, error: `the code bundle could not be loaded: ${String(err)}` };
    }
  }

  /**
   * The episode subprocess could not start (the machine's failure, not the agent's): nothing is
   * recorded against the agent, its stimulus stays at the head of its queue with its attempts
   * untouched and is tried again after a backoff; the gateway reports itself degraded meanwhile.
   */
  private async couldNotStart(
    agentId: AgentId,
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
    await this.emitSettled(
      agentId,
      stamp,
      agent.headHash,
      "waiting: the episode could not start (infrastructure)",
      agent.status === "draining",
    );
    return { kind: "wait", until: now + waitMs };
  }

  /** The agent's state from its verified head checkpoint; a bad one marks the agent failed. */
  private async loadState(agentId: AgentId, d: RunDecision): Promise<{ failed: boolean; value: unknown }> {
    if (d.checkpoint === null) return { failed: false, value: null };
    try {
      if (!d.checkpoint)
        throw new IntegrityError(agentId, d.agent.headSeq, d.agent.headHash ?? "", "checkpoint record is missing");
      return { failed: false, value: await verifyCheckpointRow(d.checkpoint) };
    } catch (err) {
      const reason = err instanceof IntegrityError ? err.message : `checkpoint unreadable: ${String(err)}`;
      await this.d.store.setAgentStatus(agentId, "failed", reason);
      this.d.events.emit("status", { agent: agentId, status: "failed", reason });
      this.d.log.error({ agent: agentId }, `agent failed: ${reason}`);
      // A draining agent that fails cannot run its queue: the drain retires it now (docs/upgrading.md).
      await this.d.drained?.(agentId);
      return { failed: true, value: null };
    }
  }

  /** The places the episode's sends reserved: written with its commit (`sent`), or given back. Once per gate. */
  private settleSends(gate: ToolGate, sent: readonly SentStimulus[] | null): void {
    const written = new Map<AgentId, SentStimulus[]>();
    for (const s of sent ?? []) {
      const rows = written.get(s.agent);
      if (rows) rows.push(s);
      else written.set(s.agent, [s]);
    }
    for (const s of gate.sends.splice(0)) {
      if (s.forward) continue; // nothing reserved here: the owning shard admits it
      const row = written.get(s.to.id)?.shift();
      if (row === undefined) this.d.queue.released(s.to.id);
      else this.d.queue.recorded(s.to.id, row.seq, row.receivedAt);
    }
  }

  /**
   * The status after an episode: idle, unless an operator paused or retired the agent while
   * it ran (the retained status topic must not overwrite that with "idle").
   */
  private async emitSettled(
    agentId: AgentId,
    stamp: number | undefined,
    checkpoint: string | null,
    reason?: string,
    draining = false,
  ): Promise<void> {
    // Only an operator action during the episode (or the end of a drain) can have changed the stored status.
    const changed = stamp === undefined || this.d.lifecycleStamp?.(agentId) !== stamp || draining;
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
}
