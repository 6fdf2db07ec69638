/**
 * The scheduler: one durable FIFO per agent (rows in `stimuli`), one episode at a time
 * per agent, at most `maxConcurrent` across the fleet, round-robin across agents that have
 * work so a flooded agent cannot starve a quiet one. Only agents with work have an entry:
 * idle agents cost rows on disk, not memory or processes.
 */

import type { TurnResult } from "../types.ts";

export type { TurnResult };

/** Options of the scheduler. */
export interface SchedulerOptions {
  readonly maxConcurrent: number;
  /** Run one turn for an agent: one episode at most. Must not throw. */
  readonly runTurn: (agent: string) => Promise<TurnResult>;
  readonly now?: () => number;
}

interface Slot {
  queued: number;
  running: boolean;
  parked: boolean;
  waitUntil: number;
  inReady: boolean;
  /** Stimuli enqueued while a turn ran: that turn may have looked at the queue before they arrived. */
  addedWhileRunning: number;
  /** wake() while a turn ran: that turn may have read the agent's status before the change. */
  wokenWhileRunning: boolean;
}

/** Fair, bounded episode scheduler. */
export class Scheduler {
  private readonly slots = new Map<string, Slot>();
  private readonly ready: string[] = [];
  private readyHead = 0;
  private running = 0;
  private stopped = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private timerAt = Infinity;
  private readonly idleWaiters: (() => void)[] = [];
  private readonly now: () => number;
  /** Fleet-wide limit; a redeploy may change it. */
  maxConcurrent: number;

  constructor(private readonly opts: SchedulerOptions) {
    this.now = opts.now ?? Date.now;
    this.maxConcurrent = opts.maxConcurrent;
  }

  /** Change the fleet-wide limit (redeploy) and start what now fits. */
  setMaxConcurrent(n: number): void {
    this.maxConcurrent = n;
    this.pump();
  }

  /** Episodes running now. */
  get active(): number {
    return this.running;
  }

  /** Agents that have queued work or a running episode. */
  get busyAgents(): number {
    return this.slots.size;
  }

  /** Tell the scheduler `n` new stimuli were queued for `agent`. */
  enqueue(agent: string, n = 1): void {
    const slot = this.slot(agent);
    slot.queued += n;
    if (slot.running) slot.addedWhileRunning += n;
    this.makeReady(agent, slot);
    this.pump();
  }

  /** Re-examine an agent (resumed, budget window reset, quarantine retried). */
  wake(agent: string): void {
    const slot = this.slot(agent);
    slot.parked = false;
    slot.waitUntil = 0;
    if (slot.running) slot.wokenWhileRunning = true;
    if (slot.queued === 0) slot.queued = 1; // unknown count: the turn will find out
    this.makeReady(agent, slot);
    this.pump();
  }

  /** Stop starting episodes; running ones finish. */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
  }

  /** Resolves when no episode is running. */
  idle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private slot(agent: string): Slot {
    let s = this.slots.get(agent);
    if (!s) {
      s = {
        queued: 0,
        running: false,
        parked: false,
        waitUntil: 0,
        inReady: false,
        addedWhileRunning: 0,
        wokenWhileRunning: false,
      };
      this.slots.set(agent, s);
    }
    return s;
  }

  private makeReady(agent: string, slot: Slot): void {
    if (slot.running || slot.inReady || slot.parked || slot.queued <= 0) return;
    slot.inReady = true;
    this.ready.push(agent);
  }

  private pump(): void {
    if (this.stopped) return;
    const now = this.now();
    let scanned = 0;
    const pending = this.ready.length - this.readyHead;
    while (this.running < this.maxConcurrent && this.readyHead < this.ready.length && scanned < pending) {
      const agent = this.ready[this.readyHead++]!;
      scanned++;
      const slot = this.slots.get(agent);
      if (!slot) continue;
      slot.inReady = false;
      if (slot.waitUntil > now) {
        this.armTimer(slot.waitUntil);
        continue;
      }
      this.start(agent, slot);
    }
    // Compact the ring once its consumed prefix dominates.
    if (this.readyHead > 1024 && this.readyHead * 2 > this.ready.length) {
      this.ready.splice(0, this.readyHead);
      this.readyHead = 0;
    }
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
          } else if (slot.waitUntil > now) this.armTimer(slot.waitUntil);
        }
        this.pump();
      },
      Math.max(0, at - this.now()),
    );
  }

  private start(agent: string, slot: Slot): void {
    slot.running = true;
    slot.waitUntil = 0; // any wait is over (the timer may not have fired yet)
    this.running++;
    void this.opts
      .runTurn(agent)
      .catch((): TurnResult => ({ kind: "wait", until: this.now() + 1000 }))
      .then((r) => {
        slot.running = false;
        this.running--;
        // News that arrived during the turn overrides what the turn saw before it.
        const added = slot.addedWhileRunning;
        const woken = slot.wokenWhileRunning;
        slot.addedWhileRunning = 0;
        slot.wokenWhileRunning = false;
        switch (r.kind) {
          case "ran":
            if (r.more === false) slot.queued = added;
            else {
              slot.queued = Math.max(0, slot.queued - 1);
              // Unknown remaining count is fine: an empty turn drops the slot.
              if (slot.queued === 0) slot.queued = 1;
            }
            if (woken && slot.queued === 0) slot.queued = 1;
            break;
          case "empty":
            slot.queued = woken ? Math.max(1, added) : added;
            break;
          case "wait":
            if (woken) break; // re-examine now
            slot.waitUntil = r.until;
            this.armTimer(r.until);
            break;
          case "parked":
            if (!woken) slot.parked = true;
            break;
          default: {
            const never: never = r;
            return never;
          }
        }
        if (slot.queued === 0) this.slots.delete(agent);
        else if (slot.waitUntil === 0) this.makeReady(agent, slot);
        if (this.running === 0) for (const w of this.idleWaiters.splice(0)) w();
        this.pump();
      });
  }
}
