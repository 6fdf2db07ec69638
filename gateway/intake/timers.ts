/**
 * Timers (`every` / `cron` on an agent type). One scheduler for the whole fleet: a single
 * timeout armed for the earliest due type, never one timer per agent. A fire is a
 * stimulus for every deployed instance of the type whose id is derived from the
 * *scheduled* time (`timer:<ms>`), so restarts, redeploys and overlapping schedulers
 * can never fire it twice. The last fire handled per type (at first, when it was scheduled)
 * is remembered in `meta`, and fires missed while the gateway was down follow the type's
 * `catch_up` policy.
 */
import { Cron } from "croner";
import type { Logger } from "pino";
import type { AgentTypeSpec, FleetSpec, TimerSpec } from "../spec/index.ts";

/** Most missed fires replayed for `catch_up = "all"` per type after downtime. */
export const CATCH_UP_ALL_MAX = 100;

/** What the timer service needs from the gateway. */
export interface TimerDeps {
  /** Record one fire (scheduled at `at`) for every deployed instance of `type`. */
  fire(type: AgentTypeSpec, at: number, now: number): Promise<void>;
  /** The last fire handled for a type (durable), or null. */
  lastFire(type: string): Promise<number | null>;
  saveLastFire(type: string, at: number): Promise<void>;
  readonly log: Logger;
  readonly now?: () => number;
  /** Arm and clear the one timeout (default: the global timers); tests drive a fake clock. */
  readonly setTimer?: (fn: () => void, ms: number) => unknown;
  readonly clearTimer?: (handle: unknown) => void;
}

/** Longest sleep between looks at the clock, so a suspended machine or clock jump is noticed. */
export const MAX_TIMER_SLEEP_MS = 60_000;
/** After a fire that could not be recorded, wait this long before trying it again. */
export const FAILED_FIRE_RETRY_MS = 1000;

/** Next scheduled time strictly after `after`. */
export function nextFire(timer: TimerSpec, after: number): number | null {
  // aligned to the epoch: stable across restarts
  if (timer.kind === "every") return (Math.floor(after / timer.ms) + 1) * timer.ms;
  const next = cron(timer.expr).nextRun(new Date(after));
  return next ? next.getTime() : null;
}

/**
 * Scheduled times in (from, to], oldest first, at most `limit` (the newest ones). Walks back
 * from `to`, so the cost is `limit` steps however long the gap (a seconds cron down for a week).
 */
export function firesBetween(timer: TimerSpec, from: number, to: number, limit: number): number[] {
  const out: number[] = [];
  if (timer.kind === "every") {
    const first = Math.floor(from / timer.ms) + 1;
    const last = Math.floor(to / timer.ms);
    for (let k = Math.max(first, last - limit + 1); k <= last; k++) out.push(k * timer.ms);
    return out;
  }
  const c = cron(timer.expr);
  // previousRuns(1, d) is the newest run strictly before d (cron times are whole seconds).
  for (let before = to + 1; out.length < limit; ) {
    const t = c.previousRuns(1, new Date(before))[0]?.getTime();
    if (t === undefined || t <= from) break;
    out.unshift(t);
    before = t;
  }
  return out;
}

function cron(expr: string): Cron {
  return new Cron(expr, { paused: true, timezone: "UTC" });
}

interface Entry {
  type: AgentTypeSpec;
  timer: TimerSpec;
  next: number;
}

/** The fleet's single timer scheduler. */
export class Timers {
  private entries = new Map<string, Entry>();
  private handle: unknown = null;
  private stopped = false;
  private started = false;
  private firing: Promise<void> = Promise.resolve();
  /** Fires recorded since start (bench / metrics). */
  fired = 0;
  private readonly now: () => number;
  private readonly setTimer: (fn: () => void, ms: number) => unknown;
  private readonly clearTimer: (handle: unknown) => void;

  constructor(private readonly d: TimerDeps) {
    this.now = d.now ?? Date.now;
    this.setTimer = d.setTimer ?? ((fn, ms) => setTimeout(fn, ms));
    this.clearTimer = d.clearTimer ?? ((h) => clearTimeout(h as ReturnType<typeof setTimeout>));
  }

  /**
   * (Re)schedule from a spec: new types start, removed ones stop, changed ones re-plan. The
   * first call (gateway start) catches up fires missed while the gateway was down, since the
   * last fire or, before the first, since the timer was scheduled; a timer a later call adds
   * or changes starts from now, as nothing was due before the change.
   */
  async update(spec: FleetSpec): Promise<void> {
    const now = this.now();
    const starting = !this.started;
    this.started = true;
    const next = new Map<string, Entry>();
    for (const type of Object.values(spec.agents)) {
      if (!type.timer) continue;
      const prev = this.entries.get(type.name);
      if (prev && JSON.stringify(prev.timer) === JSON.stringify(type.timer)) {
        next.set(type.name, { ...prev, type });
        continue;
      }
      const last = starting ? await this.d.lastFire(type.name) : null;
      if (last !== null) await this.catchUp(type, type.timer, last, now);
      else {
        // Scheduled from now, remembered: a timer that has not fired yet when the gateway stops
        // catches up after the downtime all the same. A later restart catches up from here, not
        // from a fire of an old schedule.
        await this.d.saveLastFire(type.name, now).catch((err) => {
          this.d.log.warn({ err, type: type.name }, "timer: could not record when it was scheduled");
        });
      }
      const at = nextFire(type.timer, now);
      if (at !== null) next.set(type.name, { type, timer: type.timer, next: at });
    }
    this.entries = next;
    this.arm();
  }

  /** Stop firing; resolves after an in-progress fire is recorded. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.handle !== null) this.clearTimer(this.handle);
    await this.firing;
  }

  private async catchUp(type: AgentTypeSpec, timer: TimerSpec, last: number, now: number): Promise<void> {
    const policy = timer.catch_up;
    if (policy === "none") return;
    const replayed = firesBetween(timer, last, now, policy === "all" ? CATCH_UP_ALL_MAX : 1);
    if (replayed.length === 0) return;
    // How many were missed is not counted (an every-second timer down for a day missed 86,400).
    this.d.log.info(
      { type: type.name, replayed: replayed.length, policy, last_fire: last },
      `timer catch-up after downtime: ${replayed.length} missed fire(s) replayed (catch_up = "${policy}")`,
    );
    for (const at of replayed) await this.fireOne(type, at);
  }

  private arm(minDelay = 0): void {
    if (this.stopped) return;
    if (this.handle !== null) this.clearTimer(this.handle);
    this.handle = null;
    let earliest = Infinity;
    for (const e of this.entries.values()) earliest = Math.min(earliest, e.next);
    if (!Number.isFinite(earliest)) return;
    // Cap the sleep so a suspended machine or clock jump is noticed within a minute.
    const delay = Math.min(Math.max(minDelay, earliest - this.now()), MAX_TIMER_SLEEP_MS);
    this.handle = this.setTimer(() => void this.tick(), delay);
  }

  private async tick(): Promise<void> {
    const now = this.now();
    const due = [...this.entries.values()].filter((e) => e.next <= now);
    const run = async () => {
      for (const e of due) {
        // A late tick (a busy event loop, a suspended machine) passed several scheduled times:
        // they follow the type's catch_up rule like fires missed while the gateway was down.
        const policy = e.timer.catch_up;
        const late = firesBetween(e.timer, e.next - 1, now, policy === "all" ? CATCH_UP_ALL_MAX : 1);
        for (const at of late.length > 0 ? late : [e.next]) await this.fireOne(e.type, at);
        e.next = nextFire(e.timer, Math.max(e.next, now)) ?? Infinity;
      }
    };
    let failed = false;
    this.firing = run().catch((err) => {
      failed = true;
      this.d.log.error({ err, retry_ms: FAILED_FIRE_RETRY_MS }, "timer fire failed; retrying it");
    });
    await this.firing;
    // A fire that could not be recorded stays due: try it again, but not in a tight loop.
    this.arm(failed ? FAILED_FIRE_RETRY_MS : 0);
  }

  private async fireOne(type: AgentTypeSpec, at: number): Promise<void> {
    await this.d.fire(type, at, this.now());
    await this.d.saveLastFire(type.name, at);
    this.fired++;
  }
}
