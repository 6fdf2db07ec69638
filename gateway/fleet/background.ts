/**
 * What the gateway does on its own clock: agent timers (a fire becomes stimuli through
 * intake), the bounded retention pass, and the retained `fleet/health` topic.
 */
import type { Logger } from "pino";
import type { Broker } from "../../broker/index.ts";
import type { GatewayState } from "../types.ts";
import type { FleetEvents } from "../events.ts";
import { BACKGROUND_GC, gcTick, gcTotal } from "../ops/index.ts";
import type { Intake } from "../intake/index.ts";
import type { SpecVersion } from "../spec/index.ts";
import { publishHealth } from "../observe/index.ts";
import type { Store } from "../store/index.ts";
import { Timers, WakeClock } from "../intake/index.ts";
import { wakeStimulusPayload } from "../episode/index.ts";
import { agentId, parseAgentId, type StimulusId } from "../types.ts";
import { ownsAgent } from "../shard.ts";

/** What background work reads from the gateway (the `Gateway` class satisfies it). */
export interface BackgroundHost {
  readonly state: GatewayState;
  readonly spec: SpecVersion;
  readonly store: Store;
  readonly intake: Intake;
  readonly broker: Broker;
  readonly log: Logger;
  readonly events: FleetEvents;
  /** The body of `fleet/health`. */
  health(): Promise<unknown>;
  /** Retention must spare rows the central server has not confirmed. */
  keepUnconfirmed(): boolean;
  /** Code bundles episodes may run now (retention keeps them). */
  bundlesInUse(): string[];
}

/** The fleet's timer service, wired to the store (last fires) and intake (the stimuli). */
export function fleetTimers(host: BackgroundHost, now: () => number): Timers {
  return new Timers({
    fire: (type, at, firedAt) => fireTimer(host, type.name, at, firedAt),
    lastFire: async (type) => {
      const v = await host.store.getMeta(`timer:${type}`);
      return v === null ? null : Number(v);
    },
    saveLastFire: (type, at) => host.store.setMeta(`timer:${type}`, String(at)),
    log: host.log.child({ mod: "timers" }),
    now,
  });
}

/** The fleet's wake-up clock, wired to the store (the `wakeups` rows) and intake (the stimuli). */
export function fleetWakeups(host: BackgroundHost, now: () => number): WakeClock {
  return new WakeClock({
    store: host.store,
    target: (agent) => {
      const ref = parseAgentId(agent);
      const type = ref ? host.spec.spec.agents[ref.type] : undefined;
      return ref && type ? { agent, type, key: ref.key } : null;
    },
    record: (target, payload, sid) => host.intake.record([target], "wake", null, payload, sid),
    payload: (w) => wakeStimulusPayload(w),
    log: host.log.child({ mod: "wakeups" }),
    now,
  });
}

/** One timer fire: a stimulus for every deployed instance of the type, id from the scheduled time. */
async function fireTimer(host: BackgroundHost, typeName: string, at: number, now: number): Promise<void> {
  const type = host.spec.spec.agents[typeName];
  if (!type) return;
  const agents = await host.store.deployedOfType(typeName);
  if (agents.length === 0) return;
  const payload = new TextEncoder().encode(JSON.stringify({ scheduled_at: at, fired_at: now, timer: type.timer }));
  // Only this shard's agents: a data dir may hold rows of agents another shard owns (docs/shards.md).
  const shard = host.spec.spec.fleet.shard;
  const targets = agents.flatMap((a) => {
    const id = agentId(typeName, a.key);
    return id && ownsAgent(shard, id) ? [{ agent: id, type, key: a.key }] : [];
  });
  if (targets.length === 0) return;
  await host.intake.record(targets, "timer", null, payload, `timer:${at}` as StimulusId);
}

/** Intervals of the periodic work, ms. */
export interface HousekeepingOptions {
  readonly now: () => number;
  readonly healthIntervalMs: number;
  /** 0 turns the background retention pass off. */
  readonly gcIntervalMs: number;
}

/** The health topic and the retention pass, on unref'd intervals so they never hold the process. */
export class Housekeeping {
  private readonly intervals: ReturnType<typeof setInterval>[] = [];
  private gcRunning = false;

  constructor(
    private readonly host: BackgroundHost,
    private readonly opts: HousekeepingOptions,
  ) {}

  /** Start both intervals and publish health once now. */
  start(): void {
    this.every(this.opts.healthIntervalMs, () => this.publishHealth());
    if (this.opts.gcIntervalMs > 0) this.every(this.opts.gcIntervalMs, () => this.backgroundGc());
    void this.publishHealth();
  }

  /** Clear the intervals (a pass already running finishes on its own). */
  stop(): void {
    for (const t of this.intervals) clearInterval(t);
  }

  private every(ms: number, run: () => Promise<void>): void {
    const t = setInterval(() => void run(), ms);
    t.unref?.();
    this.intervals.push(t);
  }

  private async publishHealth(): Promise<void> {
    if (this.host.state !== "running") return;
    const shard = this.host.spec.spec.fleet.shard;
    await publishHealth(this.host.broker, () => this.host.health(), this.host.log, shard);
  }

  /** One round of bounded retention passes (ops/gc.ts `gcTick`); skipped if the previous one still runs. */
  private async backgroundGc(): Promise<void> {
    if (this.gcRunning || this.host.state !== "running") return;
    this.gcRunning = true;
    try {
      const {
        report: r,
        passes,
        behind,
      } = await gcTick(this.host.store, this.host.spec.spec, {
        ...BACKGROUND_GC,
        now: this.opts.now(),
        keepUnconfirmed: this.host.keepUnconfirmed(),
        keepBundles: this.host.bundlesInUse(),
      });
      this.host.events.emit("retention", {
        collected: {
          tombstoned: r.tombstoned,
          checkpoints: r.checkpointsDeleted,
          episodes: r.episodesDeleted,
          stimuli: r.stimuliForgotten,
          quarantine_expired: r.quarantineExpired,
          usage_rows: r.usageRowsDeleted,
          bundles: r.bundlesDeleted,
        },
        passes,
        ms: r.ms,
        behind,
      });
      if (behind)
        this.host.log.warn(
          { ...r, ms: Math.round(r.ms), passes },
          "retention round stopped at its pass limit with rows still due: history grows past the retention window",
        );
      else if (gcTotal(r) > 0) this.host.log.info({ ...r, ms: Math.round(r.ms), passes }, "retention pass");
      if (r.quarantineExpired > 0)
        this.host.log.warn(
          { dropped: r.quarantineExpired, quarantine_days: this.host.spec.spec.retention.quarantine_days },
          "retention dropped quarantined stimuli nobody retried or dropped within quarantine_days",
        );
    } catch (err) {
      this.host.log.error({ err }, "retention pass failed");
    } finally {
      this.gcRunning = false;
    }
  }
}
