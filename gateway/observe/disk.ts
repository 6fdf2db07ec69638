/**
 * The data disk's free-space reserve, `[fleet] disk_free_limit_mb` (as RabbitMQ's `disk_free_limit`): while
 * the disk holding the data dir has less free space than the limit, stimuli from outside the fleet (devices,
 * webhooks, manual stimuli, sends from other shards) are refused the way a full queue refuses them (no
 * PUBACK; 503 with Retry-After), so the space left stays for what must still write: the episodes of what
 * was already accepted, retention, and an operator's pause, reload or gc. Without it the fleet's own intake
 * (or another program's log) takes the disk to its last byte, and then even the writes that would free
 * space fail. Timers and wake-ups go on: the fleet's own work, bounded by its agents.
 *
 * The disk is looked at (one statfs) at most every CHECK_MS on the intake path, and every POLL_MS in the
 * background so readiness and the gauges follow without traffic. Free space is what an unprivileged writer
 * may use (`df`'s Avail): on a root-run gateway the blocks ext4 keeps for root stay a margin of their own.
 * Added to it: fleet.db's free pages (read in the background), which the next writes reuse before the file
 * grows. Retention's deletes free pages, not disk (SQLite returns them only on a VACUUM): without them, a
 * disk the fleet's own history filled would stay below the limit after `fleet gc` made room.
 */
import type { Logger } from "pino";
import { type DiskSpace, diskSpace, MB, mbText } from "../disk.ts";

/** Intake looks at the disk at most this often: a flood of 40,000 messages a second costs ~4 statfs a second. */
export const CHECK_MS = 250;
/** And the background at least this often, so /readyz, /metrics and the log follow a quiet gateway's disk. */
export const POLL_MS = 2000;

/**
 * Refusing ends once the free space is back above the limit by a tenth of it (1 MB at least): a disk that
 * hovers at the line (intake writes, retention frees) does not flip the refusal with every check.
 */
export function clearsAt(limitBytes: number): number {
  return limitBytes + Math.max(limitBytes / 10, MB);
}

/** What operators see of the reserve (`/api/fleet` `disk`, the gauges). */
export interface DiskStatus {
  /** The filesystem's free space (`df`'s Avail). */
  readonly free_bytes: number | null;
  /** fleet.db's free pages, reused before the file grows: counted with `free_bytes` against the limit. */
  readonly db_free_bytes: number;
  readonly total_bytes: number | null;
  readonly limit_bytes: number;
  /** True while outside stimuli are refused. */
  readonly low: boolean;
  /** Epoch ms since when they are, or null. */
  readonly low_since: number | null;
}

/** Watches the data disk's free space against `[fleet] disk_free_limit_mb` (0: no reserve). */
export class DiskReserve {
  private space: DiskSpace | null = null;
  private dbFree = 0;
  private checkedAt = Number.NEGATIVE_INFINITY;
  private lowSince: number | null = null;
  private statFailed = false;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(
    private readonly dir: string,
    /** The limit in MB, read at each check: a reload that changes it applies at the next one. */
    private readonly limitMb: () => number,
    private readonly log: Pick<Logger, "error" | "warn" | "info">,
    /** Bytes of the database's free pages (Store.freePageBytes), read in the background; none if absent. */
    private readonly dbFreeBytes: (() => Promise<number>) | null = null,
    private readonly measure: (dir: string) => DiskSpace = diskSpace,
    private readonly clock: () => number = () => performance.now(),
    private readonly now: () => number = Date.now,
  ) {}

  /**
   * Poll in the background from now on (idempotent). Await one `poll()` before: until the database's free
   * pages are read once, a look counts none, and a disk those pages keep above the limit would read as low.
   */
  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => void this.poll(), POLL_MS);
    this.timer.unref?.();
  }

  /** One background look: the database's free pages, then the disk. Resolves with the pages' bytes just read. */
  async poll(): Promise<number | undefined> {
    let read: number | undefined;
    if (this.dbFreeBytes) {
      try {
        read = await this.dbFreeBytes();
        this.dbFree = read;
      } catch {
        // A store that is closing, or busy: the last figure stands until the next poll.
      }
    }
    this.check(true);
    return read;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Why a stimulus from outside is refused now, or null. Cheap: at most one statfs per CHECK_MS. */
  refusal(): string | null {
    this.check(false);
    if (this.lowSince === null) return null;
    const free = this.space ? `${mbText(this.space.freeBytes + this.dbFree)} MB free` : "free space unknown";
    return `the data disk is low (${free}, below [fleet] disk_free_limit_mb = ${this.limitMb()}); try again later`;
  }

  status(): DiskStatus {
    this.check(false);
    return {
      free_bytes: this.space?.freeBytes ?? null,
      db_free_bytes: this.dbFree,
      total_bytes: this.space?.totalBytes ?? null,
      limit_bytes: this.limitMb() * MB,
      low: this.lowSince !== null,
      low_since: this.lowSince,
    };
  }

  /** Look at the disk if the last look is CHECK_MS old (or `force`), and start or end refusing. */
  check(force: boolean): void {
    const t = this.clock();
    if (!force && t - this.checkedAt < CHECK_MS) return;
    this.checkedAt = t;
    try {
      this.space = this.measure(this.dir);
      this.statFailed = false;
    } catch (err) {
      // The data dir gone or unreadable: commits fail on their own and say why; the reserve keeps its state.
      if (!this.statFailed) this.log.warn({ err, dir: this.dir }, "cannot read the data disk's free space");
      this.statFailed = true;
      return;
    }
    const limit = this.limitMb() * MB;
    const free = this.space.freeBytes + this.dbFree;
    const mb = mbText(free);
    if (this.lowSince === null) {
      if (limit === 0 || free >= limit) return;
      this.lowSince = this.now();
      this.log.error(
        { free_mb: Number(mb), limit_mb: this.limitMb(), dir: this.dir },
        "data disk low: new stimuli from devices, webhooks and the API are refused until space is freed " +
          "(accepted ones still run; /readyz is 503)",
      );
    } else if (limit === 0 || free >= clearsAt(limit)) {
      this.log.info({ free_mb: Number(mb), limit_mb: this.limitMb() }, "data disk has room again; accepting stimuli");
      this.lowSince = null;
    }
  }
}
