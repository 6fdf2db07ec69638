/**
 * Devices first: while devices publish a burst, episodes make room. Acknowledging a durable
 * stimulus is cheap and keeps devices from backing up; episode work can lag. With every episode
 * slot busy on a two-core box, intake fell to a third of its rate with agents paused (bench
 * `busy`), because the gateway's thread shared the cores with episode processes and with its own
 * work for them. While stimuli from outside (`pressesIntake`) are recorded faster than `rate` per
 * second, agents with a backlog run at most a quarter of `max_concurrent_episodes` (at least one)
 * at once (an agent with a stimulus or two still takes any free slot, at a pace: QuietPace); a
 * window below the rate restores every slot. Running episodes are never stopped, and the cap
 * never reaches zero, so a steady stream above the rate slows episodes but does not stop them.
 */

import type { StimulusKind } from "../types.ts";

/** Stimuli per second above which intake counts as a burst. */
export const BURST_RATE = 500;
/** How often a burst is re-examined, ms. */
export const BURST_WINDOW_MS = 250;

/**
 * Whether stimuli of `kind` count toward a burst: those someone outside waits on an acknowledgement
 * for (a device's PUBACK, a webhook's or `/api/send`'s answer). The gateway's own timers and
 * wake-ups wait on no one: a cron tick that wakes a thousand agents at once is no reason for
 * those agents' episodes to make room (until 2026-12-05 it lowered the slots as a burst did).
 */
export function pressesIntake(kind: StimulusKind): boolean {
  return kind !== "timer" && kind !== "wake";
}

/** Episode slots while a burst lasts: a quarter of the configured ones, at least one. */
export function burstSlots(maxConcurrent: number): number {
  return Math.max(1, Math.ceil(maxConcurrent / 4));
}

/**
 * Devices first for agents that are not flooded: one episode of such an agent at a time holds the
 * lane, at the usual priority, so a quiet agent still answers promptly while another agent's
 * devices burst; one that starts beside it during a burst yields (its scheduling group at
 * BURST_GROUP_NICE, ../episode/sandbox.ts). Without this, agents with a stimulus or two each, enough
 * of them to fill every slot, took the cores from intake: in three alternating pairs of bench `busy`
 * (quiet agents' row, two cores) a burst was recorded at 0.30x, 0.22x, 0.28x of its rate with them
 * paused (7,800-8,600 msg/s), and at 0.40x, 0.60x, 0.45x with it (11,300-14,800), their episodes
 * going from 12-13 a second to 9-11 meanwhile; one quiet agent pinged through another's flood
 * (bench-onset, bench-policy --flood) answered no slower with it.
 */
export class QuietLane {
  private held = false;

  /** An episode of an agent that is not flooded starts: whether it yields, and what to call when it ends. */
  enter(burst: boolean): { yields: boolean; leave: () => void } {
    if (this.held) return { yields: burst, leave: () => undefined };
    this.held = true;
    let left = false;
    return {
      yields: false,
      leave: () => {
        if (left) return;
        left = true;
        this.held = false;
      },
    };
  }
}

/**
 * Of one slot's time per slot of a burst's cap, the share episodes of agents that are not flooded
 * may take while the burst lasts (flooded agents' episodes may fill the cap's slots).
 */
export const QUIET_BURST_SHARE = 0.5;
/** Starts such episodes may make at once per slot of the cap before the pace applies (a ping or two). */
export const QUIET_BURST_STARTS = 2;

/**
 * Devices first, in time: while a burst lasts, episodes of agents that are not flooded start at
 * a pace of one per `mean turn / (share x the cap's slots)` (a token bucket of `starts` per slot),
 * so that together they keep about `share` of each of the cap's slots busy: half of one slot with
 * max_concurrent_episodes = 4. Slots alone did not bound them: most of an episode's cost lands
 * outside its process, at the usual priority (the gateway's spawn and commit, bubblewrap, and the
 * kernel's work of tearing the process down: measured ~20 ms of the machine's CPU per episode on
 * two cores, ~7 ms of it the episode's own), so quiet agents' episodes ran about as fast through
 * one slot as through four (35-43 a second during bursts) and intake kept 0.46x-0.63x of its rate
 * with them paused (bench `busy`, the quiet agents' row, alternating runs); with the pace, 0.73x-1.08x,
 * their episodes at 16-24 a second during bursts. A turn takes longer when the cores are contended,
 * so the pace slows as a burst takes them. A quiet agent pinged now and then finds a start in the
 * bucket; a backlog of such agents waits (six agents pinged through bursts, bench-onset: 39-45 ms
 * at p50 with the pace, 40-49 without).
 */
export class QuietPace {
  private tokens = 0;
  private filledAt = -Infinity;
  private meanMs: number | null = null;

  /**
   * `share`: of one slot's time per slot of the burst's cap (burstSlots: a quarter of
   * max_concurrent_episodes, so a bigger box paces in proportion); `starts`: the bucket per slot.
   */
  constructor(
    readonly share = QUIET_BURST_SHARE,
    readonly starts = QUIET_BURST_STARTS,
  ) {}

  /** A turn of such an agent took `ms`: the pace follows the turns' moving mean. */
  ran(ms: number): void {
    this.meanMs = this.meanMs === null ? ms : 0.8 * this.meanMs + 0.2 * ms;
  }

  /** Take a start now, under a cap of `slots`, if the pace allows one. */
  take(now: number, slots: number): boolean {
    const interval = this.intervalMs(slots);
    if (interval <= 0) return true; // no turn seen yet: nothing to pace by
    this.fill(now, slots, interval);
    if (this.tokens < 1) return false;
    this.tokens--;
    return true;
  }

  /** When the next start will be allowed under a cap of `slots` (now, if one is). */
  nextAt(now: number, slots: number): number {
    const interval = this.intervalMs(slots);
    if (interval <= 0) return now;
    this.fill(now, slots, interval);
    return this.tokens >= 1 ? now : now + (1 - this.tokens) * interval;
  }

  private intervalMs(slots: number): number {
    return (this.meanMs ?? 0) / (this.share * Math.max(1, slots));
  }

  private fill(now: number, slots: number, interval: number): void {
    const most = this.starts * Math.max(1, slots);
    const gained = this.filledAt === -Infinity ? most : (now - this.filledAt) / interval;
    this.tokens = Math.min(most, this.tokens + gained);
    this.filledAt = now;
  }
}

/** Watches the rate of recorded stimuli; tells `onChange` when a burst starts and ends. */
export class IntakePressure {
  private windowStart = -Infinity;
  private count = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private busy = false;

  constructor(
    private readonly onChange: (burst: boolean) => void,
    private readonly now: () => number = Date.now,
    readonly rate = BURST_RATE,
    readonly windowMs = BURST_WINDOW_MS,
  ) {}

  /** Whether a burst is on now. */
  get burst(): boolean {
    return this.busy;
  }

  /** `n` stimuli were recorded. */
  recorded(n: number): void {
    const t = this.now();
    if (!this.busy && t - this.windowStart >= this.windowMs) {
      this.windowStart = t;
      this.count = 0;
    }
    this.count += n;
    if (!this.busy && this.count >= this.threshold()) {
      this.busy = true;
      this.count = 0;
      this.onChange(true);
      this.arm();
    }
  }

  /** Stop watching (gateway stop); a burst in progress ends. */
  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.busy) {
      this.busy = false;
      this.onChange(false);
    }
  }

  private threshold(): number {
    return (this.rate * this.windowMs) / 1000;
  }

  /** While a burst lasts, each window's count decides whether it goes on. */
  private arm(): void {
    this.timer = setTimeout(() => {
      this.timer = null;
      this.closeWindow();
    }, this.windowMs);
    this.timer.unref?.();
  }

  /**
   * End the current window of a burst (the timer does, every `windowMs`): the burst goes on
   * when the window reached the rate, and ends otherwise. Public for tests.
   */
  closeWindow(): void {
    if (!this.busy) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.count >= this.threshold()) {
      this.count = 0;
      this.arm();
      return;
    }
    this.busy = false;
    this.windowStart = this.now();
    this.count = 0;
    this.onChange(false);
  }
}
