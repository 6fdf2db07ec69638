/**
 * Example agent: alerts when a door stays open too long, with no polling timer.
 *
 * When the door opens it sets a durable wake-up for `open_after` ("5m" by default); when the
 * door closes first it cancels it. If the wake-up fires, the door is still open: it publishes
 * an alert. Wake-ups are committed with the episode and survive restarts, so a gateway
 * restart in between neither loses the alert nor sends it twice.
 *
 *   [agents.door-watcher]
 *   module = "agents/examples/door-watcher.ts"
 *   subscribe = ["doors/+/state"]
 *   key = "{1}"
 *   tools = ["publish"]
 *   publish = ["alerts/doors/#"]
 *   config = { open_after = "5m" }
 */
import { defineAgent, type WakeDelay } from "../sdk/index.ts";

/** Config of the `door-watcher` type. */
export interface DoorWatcherConfig {
  /** How long a door may stay open before the alert; default "5m". */
  readonly open_after?: WakeDelay;
}

/** Checkpointed state. */
export interface DoorWatcherState {
  open: boolean;
  /** `ctx.now()` when the door last opened. */
  since?: number;
  /** The pending wake-up while the door is open and not yet alerted. */
  alarm?: string;
  alerts: number;
}

/** `{"open": true}`, `{"state": "open"}`, "open" / "closed", or 1 / 0. */
function isOpen(payload: unknown): boolean | null {
  if (typeof payload === "boolean") return payload;
  if (payload === 1 || payload === 0) return payload === 1;
  if (typeof payload === "string") return payload === "open" ? true : payload === "closed" ? false : null;
  if (typeof payload === "object" && payload !== null) {
    const p = payload as { open?: unknown; state?: unknown };
    if (typeof p.open === "boolean") return p.open;
    if (p.state !== undefined) return isOpen(p.state);
  }
  return null;
}

export default defineAgent<DoorWatcherState, DoorWatcherConfig>({
  init: () => ({ open: false, alerts: 0 }),
  async onStimulus(stimulus, ctx) {
    const s = ctx.state;
    if (stimulus.kind === "wake") {
      // Only the wake-up this open door is waiting for counts (an older one may have been
      // cancelled by a close that committed after it fired).
      if (!s.open || s.alarm !== stimulus.wake.id) return;
      s.alarm = undefined;
      s.alerts += 1;
      const openMs = ctx.now() - (s.since ?? stimulus.wake.due_at);
      ctx.decide("open too long", { open_ms: openMs });
      await ctx.tools.publish(`alerts/doors/${ctx.agent.key}`, { door: ctx.agent.key, open_ms: openMs }, { qos: 1 });
      return;
    }
    const open = isOpen(stimulus.payload);
    if (open === null) {
      ctx.log.warn("ignoring a payload that says neither open nor closed");
      return;
    }
    if (open === s.open) return;
    s.open = open;
    if (open) {
      s.since = ctx.now();
      s.alarm = ctx.wakeIn(ctx.config.open_after ?? "5m");
      ctx.decide("opened", { alarm: s.alarm });
    } else {
      if (s.alarm) ctx.cancelWake(s.alarm);
      s.alarm = undefined;
      s.since = undefined;
      ctx.decide("closed");
    }
  },
});
