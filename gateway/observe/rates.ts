/**
 * Counts over a sliding window (default the last 60 s) in one-second buckets: the
 * episode and failure rates of `fleet/health` and the dashboard. Constant memory.
 */

/** Sliding-window counters for a fixed set of names. */
export class RollingCounts<K extends string> {
  private readonly seconds: Int32Array;
  private readonly counts: Map<K, Float64Array>;

  constructor(
    names: readonly K[],
    private readonly now: () => number = Date.now,
    readonly windowS = 60,
  ) {
    this.seconds = new Int32Array(windowS).fill(-1);
    this.counts = new Map(names.map((n) => [n, new Float64Array(windowS)]));
  }

  /** Count `n` occurrences of `name` now. */
  add(name: K, n = 1): void {
    const sec = Math.floor(this.now() / 1000);
    const i = sec % this.windowS;
    if (this.seconds[i] !== sec) {
      // The bucket last held a second that has left the window: clear it for every name.
      this.seconds[i] = sec;
      for (const arr of this.counts.values()) arr[i] = 0;
    }
    const arr = this.counts.get(name);
    if (arr) arr[i]! += n;
  }

  /** Total of `name` over the window. */
  sum(name: K): number {
    const arr = this.counts.get(name);
    if (!arr) return 0;
    const oldest = Math.floor(this.now() / 1000) - this.windowS;
    let total = 0;
    for (let i = 0; i < this.windowS; i++) if (this.seconds[i]! > oldest) total += arr[i]!;
    return total;
  }
}
