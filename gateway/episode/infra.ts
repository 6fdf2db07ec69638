/**
 * Infrastructure health of episode starts. A failure to start an episode subprocess (out of
 * processes, fds or memory; a sandbox that cannot set up) is the machine's, not the agent's:
 * it does not consume the agent's retries; the stimulus waits with backoff and the gateway
 * reports itself degraded until an episode starts again.
 */

/** What `health()`, /readyz and the dashboard show while episodes cannot start. */
export interface Degraded {
  /** When the first failure of this run of failures happened (epoch ms). */
  readonly since: number;
  /** The latest failure's message. */
  readonly reason: string;
  /** Failures since the last episode that started. */
  readonly failures: number;
}

/** Longest wait before a stimulus whose episode could not start is tried again. */
export const INFRA_MAX_BACKOFF_MS = 30_000;

/** Tracks consecutive infrastructure failures; one instance per gateway. */
export class InfraHealth {
  private state: Degraded | null = null;

  /** An episode could not start; returns how long its stimulus should wait (1 s, doubling, at most 30 s). */
  failed(reason: string, at: number): number {
    const failures = (this.state?.failures ?? 0) + 1;
    this.state = { since: this.state?.since ?? at, reason, failures };
    return Math.min(INFRA_MAX_BACKOFF_MS, 1000 * 2 ** Math.min(failures - 1, 5));
  }

  /** An episode started (its agent code ran); true when this ends a degraded period. */
  started(): boolean {
    const was = this.state !== null;
    this.state = null;
    return was;
  }

  /** Null while episodes start. */
  get degraded(): Degraded | null {
    return this.state;
  }
}
