/**
 * The scheduler: one durable FIFO per agent (rows in `stimuli`), one episode at a time
 * per agent, at most `maxConcurrent` across the fleet, round-robin across agents that have
 * work so a flooded agent cannot starve a quiet one. How much work an agent has is the
 * queue book's count (`queued`), never a copy kept here. Only agents with work have an
 * entry: idle agents cost rows on disk, not memory or processes.
 */

import { MAX_TIMER_MS, type AgentId, type TurnResult } from "../types.ts";

export type { TurnResult };

/** Options of the scheduler. */
export interface SchedulerOptions {
  readonly maxConcurrent: number;
  /** Run one turn for an agent: one episode at most. Must not throw. */
  readonly runTurn: (agent: AgentId) => Promise<TurnResult>;
  /** Stimuli waiting for an agent (the queue book). */
  readonly queued: (agent: AgentId) => number;
  /**
   * Whether an agent has a backlog (a flood). Under a cap (setCap) only these wait for a slot
   * below the cap; an agent with a stimulus or two still gets any slot up to maxConcurrent.
   */
  readonly flooded?: (agent: AgentId) => boolean;
  /**
   * Under a cap, the pace at which agents that are not flooded start (devices first, in time:
   * ./devices-first.ts); without it they take any free slot at once.
   */
  readonly pace?: Pace;
  readonly now?: () => number;
}

/** A pace of starts (QuietPace): whether one may start now, when the next may, and how long turns take. */
export interface Pace {
  take(now: number, slots: number): boolean;
  nextAt(now: number, slots: number): number;
  ran(ms: number): void;
}

interface Slot {
  running: boolean;
  parked: boolean;
  waitUntil: number;
  inReady: boolean;
  /** notify() while a turn ran: that turn may have looked at the queue before the news. */
  notifiedWhileRunning: boolean;
  /** wake() while a turn ran: that turn may have read the agent's status before the change. */
  wokenWhileRunning: boolean;
}

/** Fair, bounded episode scheduler. */
export class Scheduler {
  private readonly slots = new Map<AgentId, Slot>();
  private readonly ready: AgentId[] = [];
  private readyHead = 0;
  /** Flooded agents waiting for a slot below the cap, in arrival order (devices first). */
  private readonly held: AgentId[] = [];
  private heldHead = 0;
  /** Agents that are not flooded waiting under a cap for the pace to allow a start. */
  private readonly paced = new PacedAgents();
  private running = 0;
  /** Agents with inReady set (in the ready ring, held under the cap, or waiting for the pace). */
  private readyAgents = 0;
  private stopped = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private timerAt = Infinity;
  private paceTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly idleWaiters: (() => void)[] = [];
  private readonly now: () => number;
  /** Fleet-wide limit; a redeploy may change it. */
  maxConcurrent: number;
  /** A lower limit for now (devices first, during an intake burst), or its rule of maxConcurrent, or null. */
  private cap: number | ((maxConcurrent: number) => number) | null = null;

  constructor(private readonly opts: SchedulerOptions) {
    this.now = opts.now ?? Date.now;
    this.maxConcurrent = opts.maxConcurrent;
  }

  /** Change the fleet-wide limit (redeploy) and start what now fits; a cap given as a rule follows it. */
  setMaxConcurrent(n: number): void {
    this.maxConcurrent = n;
    this.pump();
  }

  /**
   * Run at most `n` episodes of flooded agents at once until called with null (running ones go
   * on; none are stopped). Without a `flooded` option the cap holds for every agent. Devices
   * first: the gateway lowers it while devices publish a burst, as a rule of the fleet-wide limit
   * (`burstSlots`), so a redeploy that changes the limit mid-burst changes the cap with it.
   */
  setCap(n: number | ((maxConcurrent: number) => number) | null): void {
    this.cap = n;
    this.pump();
  }

  /** Episodes of flooded agents allowed to run at once now. */
  get capacity(): number {
    const cap = typeof this.cap === "function" ? this.cap(this.maxConcurrent) : this.cap;
    return cap === null ? this.maxConcurrent : Math.min(cap, this.maxConcurrent);
  }

  /** Agents whose next episode waits for the pace now (devices first, during an intake burst). */
  get pacedAgents(): number {
    return this.paced.size;
  }

  /** Episodes running now. */
  get active(): number {
    return this.running;
  }

  /** Agents that have queued work or a running episode. */
  get busyAgents(): number {
    return this.slots.size;
  }

  /**
   * Agents contending for a slot now: running an episode or ready to start one. Work that waits
   * on a pause, a quarantine, a budget window or a retry's backoff is not: it takes no CPU and
   * nothing yielding to it would help (the flood rule, ./flood.ts).
   */
  get contendingAgents(): number {
    return this.running + this.readyAgents;
  }

  /** New stimuli were queued for `agent` (the queue book says so). */
  notify(agent: AgentId): void {
    const slot = this.slot(agent);
    if (slot.running) slot.notifiedWhileRunning = true;
    this.makeReady(agent, slot);
    this.forgetIfIdle(agent, slot);
    this.pump();
  }

  /** Re-examine an agent that has work (resumed, budget window reset, retired with work left). */
  wake(agent: AgentId): void {
    const slot = this.slot(agent);
    slot.parked = false;
    slot.waitUntil = 0;
    if (slot.running) slot.wokenWhileRunning = true;
    this.makeReady(agent, slot);
    this.forgetIfIdle(agent, slot);
    this.pump();
  }

  /** Stop starting episodes; running ones finish. */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.paceTimer) clearTimeout(this.paceTimer);
  }

  /** Resolves when no episode is running. */
  idle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private slot(agent: AgentId): Slot {
    let s = this.slots.get(agent);
    if (!s) {
      s = {
        running: false,
        parked: false,
        waitUntil: 0,
        inReady: false,
        notifiedWhileRunning: false,
        wokenWhileRunning: false,
      };
      this.slots.set(agent, s);
    }
    return s;
  }

  /**
   * No entry for an agent with nothing to do: not running, ready, parked or waiting (a notify or a
   * wake of an agent whose queue is empty, as a rollout's wake-up of every agent of a type is).
   */
  private forgetIfIdle(agent: AgentId, slot: Slot): void {
    if (!slot.running && !slot.inReady && !slot.parked && slot.waitUntil === 0) this.slots.delete(agent);
  }

  private makeReady(agent: AgentId, slot: Slot): void {
    if (slot.running || slot.inReady || slot.parked || this.opts.queued(agent) <= 0) return;
    slot.inReady = true;
    this.readyAgents++;
    this.ready.push(agent);
  }

  private pump(): void {
    if (this.stopped) return;
    const now = this.now();
    let scanned = 0;
    const pending = this.ready.length - this.readyHead;
    const capacity = this.capacity;
    // Flooded agents the cap held back go first once it allows (they keep inReady).
    while (this.running < capacity && this.heldHead < this.held.length) {
      const agent = this.held[this.heldHead++]!;
      const slot = this.slots.get(agent);
      if (slot) this.leaveReady(agent, slot, now);
    }
    if (this.heldHead === this.held.length) this.held.length = this.heldHead = 0;
    else if (this.heldHead > 1024 && this.heldHead * 2 > this.held.length) {
      this.held.splice(0, this.heldHead);
      this.heldHead = 0;
    }
    const pace = this.cap !== null ? this.opts.pace : undefined;
    // Then those the pace held back, as it allows (all of them once the cap is lifted).
    while (this.running < this.maxConcurrent && this.paced.size > 0 && (!pace || pace.take(now, capacity))) {
      const agent = this.paced.next();
      const slot = this.slots.get(agent);
      if (slot) this.leaveReady(agent, slot, now);
    }
    if (!pace) this.paced.newBurst();
    const flooded = this.opts.flooded;
    while (this.running < this.maxConcurrent && this.readyHead < this.ready.length && scanned < pending) {
      const agent = this.ready[this.readyHead++]!;
      scanned++;
      const slot = this.slots.get(agent);
      if (!slot) continue;
      // Under a cap, a flooded agent waits for a slot below it; others take any free slot.
      if (this.running >= capacity && (!flooded || flooded(agent))) {
        this.held.push(agent);
        continue;
      }
      // Under a cap, one that is not flooded starts at the pace.
      if (pace && flooded && !flooded(agent)) {
        if (this.paced.size > 0 || !pace.take(now, capacity)) {
          this.paced.add(agent);
          continue;
        }
        this.paced.started(agent);
      }
      this.leaveReady(agent, slot, now);
    }
    // Waiting on the pace, not on a slot (a turn's end pumps again): look again when it allows a start.
    if (pace && this.paced.size > 0 && this.running < this.maxConcurrent) this.armPace(pace.nextAt(now, capacity));
    // Compact the ring once its consumed prefix dominates.
    if (this.readyHead > 1024 && this.readyHead * 2 > this.ready.length) {
      this.ready.splice(0, this.readyHead);
      this.readyHead = 0;
    }
  }

  /** An agent taken from the ready ring (or held): it starts, or waits for its time. */
  private leaveReady(agent: AgentId, slot: Slot, now: number): void {
    slot.inReady = false;
    this.readyAgents--;
    if (slot.waitUntil > now) this.armTimer(slot.waitUntil);
    else this.start(agent, slot);
  }

  /** Pump at `at`, when the pace allows the next start (one timer at a time; a turn that ends pumps sooner). */
  private armPace(at: number): void {
    if (this.paceTimer) return;
    this.paceTimer = setTimeout(
      () => {
        this.paceTimer = null;
        this.pump();
      },
      Math.max(1, at - this.now()),
    );
  }

  private armTimer(at: number): void {
    if (at >= this.timerAt) return;
    if (this.timer) clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(
      () => {
        this.timer = null;
        this.timerAt = Infinity;
        const now = this.now();
        for (const [agent, slot] of this.slots) {
          if (slot.waitUntil > 0 && slot.waitUntil <= now && !slot.running && !slot.parked) {
            slot.waitUntil = 0;
            this.makeReady(agent, slot);
            if (!slot.inReady) this.slots.delete(agent); // its queue emptied meanwhile
          } else if (slot.waitUntil > now) this.armTimer(slot.waitUntil);
        }
        this.pump();
      },
      // A wait beyond what a timer can hold (a pause of a month, a retry's backoff doubled many
      // times) wakes at the longest one, and the callback arms again for what is left: past it,
      // setTimeout fires at once, and the callback re-armed it every millisecond.
      Math.min(Math.max(0, at - this.now()), MAX_TIMER_MS),
    );
  }

  private start(agent: AgentId, slot: Slot): void {
    slot.running = true;
    slot.waitUntil = 0; // any wait is over (the timer may not have fired yet)
    this.running++;
    const { pace, flooded } = this.opts;
    const began = pace ? this.now() : 0;
    void this.opts
      .runTurn(agent)
      .catch((): TurnResult => ({ kind: "wait", until: this.now() + 1000 }))
      .then((r) => {
        // Asked while the turn still counts as running: the agent contends for itself, as at its start.
        if (pace && r.kind === "ran" && !flooded?.(agent)) pace.ran(this.now() - began);
        slot.running = false;
        this.running--;
        // News that arrived during the turn overrides what the turn saw before it.
        const notified = slot.notifiedWhileRunning;
        const woken = slot.wokenWhileRunning;
        slot.notifiedWhileRunning = false;
        slot.wokenWhileRunning = false;
        let again: boolean;
        switch (r.kind) {
          case "ran":
            again = true;
            break;
          case "empty":
            // The turn found nothing: only news from during the turn is worth another look.
            again = notified || woken;
            break;
          case "wait":
            again = woken; // re-examine now
            if (!woken) {
              slot.waitUntil = r.until;
              this.armTimer(r.until);
            }
            break;
          case "parked":
            again = woken;
            if (!woken) slot.parked = true;
            break;
          default: {
            const never: never = r;
            return never;
          }
        }
        const work = this.opts.queued(agent) > 0;
        if (!work || (!again && !slot.parked && slot.waitUntil === 0)) this.slots.delete(agent);
        else if (again) this.makeReady(agent, slot);
        if (this.running === 0) for (const w of this.idleWaiters.splice(0)) w();
        this.pump();
      });
  }
}

/** Agents whose starts one burst counts, at most. */
const MAX_COUNTED = 10_000;

/**
 * Agents waiting for the pace during a burst: the one with the fewest starts in this burst goes
 * first (arrival order among equals), so an agent pinged once is not queued behind one working
 * through a backlog that FloodRule does not call a flood (it had no one to yield to).
 */
class PacedAgents {
  /** Waiting agents by their starts in this burst (the last level holds every count beyond it). */
  private readonly levels: AgentId[][] = Array.from({ length: 8 }, () => []);
  private readonly starts = new Map<AgentId, number>();
  private waiting = 0;

  get size(): number {
    return this.waiting;
  }

  add(agent: AgentId): void {
    const level = Math.min(this.starts.get(agent) ?? 0, this.levels.length - 1);
    this.levels[level]!.push(agent);
    this.waiting++;
  }

  /** The next to start (size > 0), counted as started. */
  next(): AgentId {
    for (const level of this.levels) {
      const agent = level.shift();
      if (agent === undefined) continue;
      this.waiting--;
      this.started(agent);
      return agent;
    }
    throw new Error("PacedAgents.next on an empty queue");
  }

  /** `agent` started in this burst without waiting. */
  started(agent: AgentId): void {
    // A burst that never ends (a steady stream above the rate) forgets its counts now and then.
    if (this.starts.size >= MAX_COUNTED) this.starts.clear();
    this.starts.set(agent, (this.starts.get(agent) ?? 0) + 1);
  }

  /** A burst ended: counts start again (call only once no agent waits). */
  newBurst(): void {
    if (this.waiting === 0 && this.starts.size > 0) this.starts.clear();
  }
}
