/**
 * Whether a gateway's process still runs, as the checks that a data dir is free read it (the
 * sandbox ledger's owner at start, `fleet reshard`).
 */
import { readFileSync } from "node:fs";

/**
 * Whether `pid` has exited and waits to be reaped (state Z in `/proc/<pid>/stat`): dead, though
 * `kill(pid, 0)` still succeeds. A gateway killed with -9 stays one until its parent (or init) reaps
 * it, for good under an init that never does. False where /proc cannot tell.
 */
export function isZombie(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The state is the first field after the parenthesised command (which may hold spaces and parentheses).
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return false;
  }
}
