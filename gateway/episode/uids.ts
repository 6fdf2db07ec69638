/**
 * A uid of its own for every sandboxed process (the gateway is root). The kernel counts
 * RLIMIT_NPROC per uid, not per process tree: when every episode ran as nobody (65534), one
 * agent's fork bomb filled the count for all of them, and a healthy agent's episode could not
 * start a thread (test/e2e.policy's isolation tests). With a uid each, `max_processes` is
 * each episode's own, and one agent's processes cannot signal or ptrace another's.
 */
import type { UidRange } from "../spec/index.ts";

/**
 * Hands out the uids of a range in turn, skipping those still in use, so a uid is reused as late
 * as possible (a leftover of its last process has the whole range's turn to be gone). When every
 * uid is in use (a range smaller than the processes alive) the next in turn is shared.
 */
export class UidPool {
  private readonly users = new Map<number, number>();
  private next = 0;

  constructor(readonly range: UidRange) {
    if (!Number.isInteger(range.first) || !Number.isInteger(range.count) || range.first < 1 || range.count < 1)
      throw new RangeError(`not a range of uids: ${range.first}:${range.count}`);
  }

  /** The uid for a process about to start; `give` it back once the process has exited. */
  take(): number {
    const { first, count } = this.range;
    let offset = this.next;
    for (let tried = 0; tried < count && this.users.has(first + offset); tried++) offset = (offset + 1) % count;
    // Every uid in use: the loop came round to the one in turn, which is shared.
    const uid = first + offset;
    this.next = (offset + 1) % count;
    this.users.set(uid, (this.users.get(uid) ?? 0) + 1);
    return uid;
  }

  /** A process that ran as `uid` has exited. */
  give(uid: number): void {
    const n = this.users.get(uid);
    if (n === undefined) return;
    if (n > 1) this.users.set(uid, n - 1);
    else this.users.delete(uid);
  }

  /** Uids held by processes now. */
  get inUse(): number {
    return this.users.size;
  }

  /** `first-last`, for logs. */
  toString(): string {
    return `${this.range.first}-${this.range.first + this.range.count - 1}`;
  }
}
