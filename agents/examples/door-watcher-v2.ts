/**
 * Example agent, version 2 of the door watcher (agents/examples/door-watcher.ts): the same
 * behaviour with a clearer state shape and a count of openings, and the migration that takes
 * every door watcher's version-1 state to it (docs/upgrading.md walks through the upgrade).
 *
 * Version 1 kept `{ open: boolean, since?, alarm?, alerts }`; version 2 keeps
 * `{ door: "open" | "closed", opened_at?, alarm?, alerts, openings }`. Deploying this module in
 * place of version 1 migrates each agent's state in its first episode on the new code: the
 * migration is part of that episode's commit, recorded in the sealed checkpoint (state version
 * 2, migrated from 1), and a failing migration changes nothing.
 */
import { defineAgent, type WakeDelay } from "../sdk/index.ts";

/** Config of the `door-watcher` type (unchanged from version 1). */
export interface DoorWatcherConfig {
  /** How long a door may stay open before the alert; default "5m". */
  readonly open_after?: WakeDelay;
}

/** Checkpointed state, version 2. */
export interface DoorWatcherStateV2 {
  door: "open" | "closed";
  /** `ctx.now()` when the door last opened. */
  opened_at?: number;
  /** The pending wake-up while the door is open and not yet alerted. */
  alarm?: string;
  alerts: number;
  /** Openings seen since version 2 took over. */
  openings: number;
}

/** Version 1's state, as its checkpoints hold it. */
interface DoorWatcherStateV1 {
  open: boolean;
  since?: number;
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

export default defineAgent<DoorWatcherStateV2, DoorWatcherConfig>({
  version: 2,
  migrate(state, fromVersion) {
    if (fromVersion !== 1) throw new Error(`no migration from version ${fromVersion}`);
    const v1 = state as DoorWatcherStateV1;
    return {
      door: v1.open ? "open" : "closed",
      ...(v1.since === undefined ? {} : { opened_at: v1.since }),
      ...(v1.alarm === undefined ? {} : { alarm: v1.alarm }),
      alerts: v1.alerts,
      openings: 0,
    };
  },
  init: () => ({ door: "closed", alerts: 0, openings: 0 }),
  async onStimulus(stimulus, ctx) {
    const s = ctx.state;
    if (stimulus.kind === "wake") {
      if (s.door !== "open" || s.alarm !== stimulus.wake.id) return;
      s.alarm = undefined;
      s.alerts += 1;
      const openMs = ctx.now() - (s.opened_at ?? stimulus.wake.due_at);
      ctx.decide("open too long", { open_ms: openMs });
      await ctx.tools.publish(`alerts/doors/${ctx.agent.key}`, { door: ctx.agent.key, open_ms: openMs }, { qos: 1 });
      return;
    }
    const open = isOpen(stimulus.payload);
    if (open === null) {
      ctx.log.warn("ignoring a payload that says neither open nor closed");
      return;
    }
    if (open === (s.door === "open")) return;
    s.door = open ? "open" : "closed";
    if (open) {
      s.openings += 1;
      s.opened_at = ctx.now();
      s.alarm = ctx.wakeIn(ctx.config.open_after ?? "5m");
      ctx.decide("opened", { alarm: s.alarm, openings: s.openings });
    } else {
      if (s.alarm) ctx.cancelWake(s.alarm);
      s.alarm = undefined;
      s.opened_at = undefined;
      ctx.decide("closed");
    }
  },
});
