/**
 * Storage health as operators see it: a full disk or I/O error makes commits fail (nothing
 * is acknowledged, nothing is lost), and that must be visible. The watch logs the first
 * failure of a run and the recovery, probes with a tiny write while commits fail (so
 * readiness comes back without waiting for traffic), and answers /readyz.
 */
import type { Logger } from "pino";
import type { Store } from "../store/index.ts";
import type { GatewayState } from "../types.ts";

/** The body of `/readyz`. */
export interface Readiness {
  readonly ready: boolean;
  readonly state: GatewayState;
  /** Why not ready: the lifecycle, or failing commits with their kind and error. */
  readonly reason?: string;
}

/** Readiness from the gateway lifecycle and the committer's storage health. */
export function readiness(state: GatewayState, store: Store | undefined): Readiness {
  if (state !== "running") return { ready: false, state, reason: `gateway is ${state}` };
  const h = store?.writer.health;
  if (h?.failing) {
    const since = h.since === null ? "" : ` since ${new Date(h.since).toISOString()}`;
    return { ready: false, state, reason: `commits failing (${h.kind})${since}: ${h.error}` };
  }
  return { ready: true, state };
}

/** Logs storage failure and recovery, and probes with a tiny write while commits fail. */
export class StorageWatch {
  private timer: ReturnType<typeof setInterval> | null = null;
  private wasFailing = false;
  /** Called once when commits succeed again after failing: what waited on the failure goes again now. */
  onRecovered: (() => void) | null = null;

  constructor(
    private readonly store: Store,
    private readonly log: Logger,
    private readonly probeMs = 2000,
    private readonly now: () => number = Date.now,
  ) {}

  /** Start watching (idempotent). */
  start(): void {
    if (this.timer) return;
    const prev = this.store.writer.onFailure;
    this.store.writer.onFailure = (kind, err) => {
      prev?.(kind, err);
      this.check();
    };
    this.timer = setInterval(() => void this.probe(), this.probeMs);
    this.timer.unref?.();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private check(): void {
    const h = this.store.writer.health;
    if (h.failing && !this.wasFailing) {
      this.log.error(
        { kind: h.kind, err: h.error },
        "commits are failing: nothing new is acknowledged until storage recovers (/readyz is 503)",
      );
    } else if (!h.failing && this.wasFailing) {
      this.log.info("commits succeed again; ready");
    }
    const recovered = !h.failing && this.wasFailing;
    this.wasFailing = h.failing;
    if (recovered) this.onRecovered?.();
  }

  private async probe(): Promise<void> {
    if (this.store.writer.health.failing) {
      await this.store.setMeta("storage_probe", String(this.now())).catch(() => undefined);
    }
    this.check();
  }
}
