/**
 * How idle the machine's cores have been of late, from the kernel's CPU time counters (`/proc/stat`'s
 * first line: user nice system idle iowait irq softirq steal ..., in clock ticks since boot). The test
 * runner (scripts/test.ts) starts a file more when they have been idle for a while.
 */
import { readFileSync } from "node:fs";

/** One reading of the counters: ticks spent idle (idle + iowait) and in all. */
export interface CpuTicks {
  readonly idle: number;
  readonly total: number;
}

/** The counters of `/proc/stat`'s aggregate `cpu` line, or null when the text has none. */
export function parseCpuTicks(stat: string): CpuTicks | null {
  const line = /^cpu\s+([\d\s]+)$/m.exec(stat)?.[1];
  if (line === undefined) return null;
  const ticks = line.trim().split(/\s+/).map(Number);
  if (ticks.length < 4 || ticks.some((n) => !Number.isFinite(n))) return null;
  // guest and guest_nice (9th and 10th) are already counted in user and nice.
  const total = ticks.slice(0, 8).reduce((a, b) => a + b, 0);
  return { idle: ticks[3]! + (ticks[4] ?? 0), total };
}

/** The share of `from`..`to` the cores spent idle, or null when no time passed between them. */
export function idleShare(from: CpuTicks, to: CpuTicks): number | null {
  const total = to.total - from.total;
  return total > 0 ? Math.min(1, Math.max(0, (to.idle - from.idle) / total)) : null;
}

/** Samples `file` every SAMPLE_MS; `share()` is the idle share over the last `windowMs`. */
export class IdleMeter {
  static readonly SAMPLE_MS = 500;
  private readonly samples: { readonly at: number; readonly ticks: CpuTicks }[] = [];
  private readonly timer: ReturnType<typeof setInterval>;

  constructor(
    private readonly file: string,
    private readonly windowMs: number,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), IdleMeter.SAMPLE_MS);
  }

  /** The idle share over the last window, or null until a whole window has been sampled (or none can be). */
  share(): number | null {
    const last = this.samples.at(-1);
    const first = this.samples[0];
    if (!last || !first || last.at - first.at < this.windowMs) return null;
    return idleShare(first.ticks, last.ticks);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  private sample(): void {
    let ticks: CpuTicks | null = null;
    try {
      ticks = parseCpuTicks(readFileSync(this.file, "utf8"));
    } catch {
      // no /proc (not Linux): never idle, so no spare worker starts a file
    }
    if (ticks === null) return;
    const at = performance.now();
    this.samples.push({ at, ticks });
    // Keep the oldest sample that still spans the window, and what came after it.
    while (this.samples.length > 2 && at - this.samples[1]!.at >= this.windowMs) this.samples.shift();
  }
}
