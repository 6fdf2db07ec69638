/**
 * The wake-up clock: fires agents' durable wake-ups (`ctx.wakeIn` / `ctx.wakeAt`, rows in
 * `wakeups` written with the commit of the episode that set them). Like the timers, one
 * timeout for the whole fleet, armed for the soonest pending wake-up, never one per agent.
 *
 * A due wake-up becomes a stimulus of kind `wake` with the id `wake:<wake id>` through
 * intake, then its row is marked fired. The stimulus id is what makes it fire once: after a
 * crash between the two writes the row is still pending, fires again, and intake's dedup
 * finds the stimulus already recorded.
 */
import type { Logger } from "pino";
import type { WakeFilter, WakeRow } from "../store/index.ts";
import type { AgentId, StimulusId } from "../types.ts";
import type { IntakeReport } from "./intake.ts";
import type { Target } from "./router.ts";

/** Wake-ups read per look at the table. */
export const WAKE_BATCH = 500;
/** Longest sleep between looks, so a clock jump or a missed notification is noticed. */
export const MAX_WAKE_SLEEP_MS = 60_000;
/** After a wake-up could not be delivered (queue full, store error), try it again after this long. */
export const WAKE_RETRY_MS = 1000;

/** What the wake-up clock needs from the gateway. */
export interface WakeDeps {
  readonly store: {
    dueWakes(now: number, limit: number, f?: WakeFilter): Promise<WakeRow[]>;
    nextWakeDue(f?: WakeFilter): Promise<number | null>;
    settleWakes(ids: readonly string[], state: "fired" | "dropped", at: number, why?: string | null): Promise<void>;
  };
  /** Where a wake-up of `agent` is delivered; null when its type left the spec. */
  target(agent: AgentId): Target | null;
  /** Record one wake stimulus (intake: admission, dedup, durable write). */
  record(target: Target, payload: Uint8Array, sid: StimulusId): Promise<IntakeReport>;
  /** The stimulus payload of a due wake-up. */
  payload(w: WakeRow): Uint8Array;
  readonly log: Logger;
  readonly now?: () => number;
  readonly setTimer?: (fn: () => void, ms: number) => unknown;
  readonly clearTimer?: (handle: unknown) => void;
}

/** The fleet's single wake-up clock. */
export class WakeClock {
  /** Wake-ups turned into stimuli since start. */
  fired = 0;
  /** Wake-ups dropped since start (agent retired or its type removed). */
  dropped = 0;
  private handle: unknown = null;
  private armedAt = Infinity;
  private stopped = false;
  private firing: Promise<void> | null = null;
  private again = false;
  /** Agents whose queue refused a wake-up, left out of the looks until one of theirs is taken. */
  private readonly blocked = new Set<AgentId>();
  /** When the blocked agents are tried again. */
  private probeAt = 0;
  private readonly now: () => number;
  private readonly setTimer: (fn: () => void, ms: number) => unknown;
  private readonly clearTimer: (handle: unknown) => void;

  constructor(private readonly d: WakeDeps) {
    this.now = d.now ?? Date.now;
    this.setTimer =
      d.setTimer ??
      ((fn, ms) => {
        const t = setTimeout(fn, ms);
        t.unref?.();
        return t;
      });
    this.clearTimer = d.clearTimer ?? ((h) => clearTimeout(h as ReturnType<typeof setTimeout>));
  }

  /** Start: fire what fell due while the gateway was down, then arm for the next. */
  start(): Promise<void> {
    return this.tick();
  }

  /** A committed episode set a wake-up due at `dueAt`: re-arm if it is sooner than the armed one. */
  scheduled(dueAt: number): void {
    if (this.stopped || dueAt >= this.armedAt) return;
    this.armAt(dueAt);
  }

  /** Stop firing; resolves after a look in progress has settled its wake-ups. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.handle !== null) this.clearTimer(this.handle);
    this.handle = null;
    await this.firing;
  }

  private armAt(at: number): void {
    if (this.stopped) return;
    if (this.handle !== null) this.clearTimer(this.handle);
    const delay = Math.min(Math.max(0, at - this.now()), MAX_WAKE_SLEEP_MS);
    this.armedAt = this.now() + delay;
    this.handle = this.setTimer(() => {
      this.handle = null;
      this.armedAt = Infinity;
      void this.tick();
    }, delay);
  }

  /** One look at the table (coalesced: a look asked for while one runs happens right after it). */
  private tick(): Promise<void> {
    if (this.firing) {
      this.again = true;
      return this.firing;
    }
    this.firing = this.look()
      .then(() => false)
      .catch((err) => {
        this.d.log.error({ err, retry_ms: WAKE_RETRY_MS }, "wake-ups could not be fired; retrying");
        return true;
      })
      .then(async (failed) => {
        this.firing = null;
        if (this.again) {
          this.again = false;
          return this.tick();
        }
        // After a store error everything due waits a pause; otherwise what is due for an agent
        // not blocked fires at once, and the blocked ones are tried again at probeAt.
        const except = failed ? [] : [...this.blocked];
        const next = await this.d.store.nextWakeDue({ except }).catch(() => this.now() + WAKE_RETRY_MS);
        const retryAt = failed ? this.now() + WAKE_RETRY_MS : this.blocked.size > 0 ? this.probeAt : Infinity;
        const at = failed ? Math.max(next ?? retryAt, retryAt) : Math.min(next ?? Infinity, retryAt);
        if (at !== Infinity) this.armAt(at);
      });
    return this.firing;
  }

  /**
   * Fire every due wake-up. An agent whose queue refuses one is blocked: its wake-ups are left
   * out of the look (so it does not hold up the others due after them) and only its soonest is
   * tried again, once per WAKE_RETRY_MS, until one is taken.
   */
  private async look(): Promise<void> {
    if (this.blocked.size > 0 && this.now() >= this.probeAt) {
      this.probeAt = this.now() + WAKE_RETRY_MS;
      for (const agent of [...this.blocked]) {
        if (this.stopped) return;
        this.blocked.delete(agent);
        await this.deliver(await this.d.store.dueWakes(this.now(), 1, { agent }));
      }
    }
    for (;;) {
      if (this.stopped) return;
      const due = await this.d.store.dueWakes(this.now(), WAKE_BATCH, { except: [...this.blocked] });
      // Each row of the batch was settled or its agent is blocked now: the next read moves on.
      await this.deliver(due);
      if (due.length < WAKE_BATCH) return;
    }
  }

  /** Deliver due wake-ups: each agent's in order, stopping at the first its queue refuses. */
  private async deliver(due: readonly WakeRow[]): Promise<void> {
    if (due.length === 0) return;
    const byAgent = new Map<AgentId, WakeRow[]>();
    for (const w of due) {
      const rows = byAgent.get(w.agent);
      if (rows) rows.push(w);
      else byAgent.set(w.agent, [w]);
    }
    const fired: string[] = [];
    const dropped = new Map<string, string[]>();
    const drop = (id: string, why: string): void => {
      const ids = dropped.get(why);
      if (ids) ids.push(id);
      else dropped.set(why, [id]);
    };
    await Promise.all(
      [...byAgent].map(async ([agent, rows]) => {
        const target = this.d.target(agent);
        for (const w of rows) {
          if (!target) {
            drop(w.id, "the agent's type is not in the spec");
            continue;
          }
          const report = await this.d.record(target, this.d.payload(w), `wake:${w.id}` as StimulusId);
          const refused = report.refused[0];
          if (!refused) fired.push(w.id);
          else if (refused.code === "retired") drop(w.id, "the agent is retired");
          else if (refused.code === "draining") drop(w.id, "the agent is draining (retiring)");
          else {
            if (this.blocked.size === 0) this.probeAt = this.now() + WAKE_RETRY_MS;
            this.blocked.add(agent);
            return;
          }
        }
      }),
    );
    const at = this.now();
    await this.d.store.settleWakes(fired, "fired", at);
    for (const [why, ids] of dropped) {
      await this.d.store.settleWakes(ids, "dropped", at, why);
      this.d.log.warn({ count: ids.length }, `wake-ups dropped: ${why}`);
    }
    this.fired += fired.length;
    this.dropped += [...dropped.values()].reduce((n, ids) => n + ids.length, 0);
  }
}
