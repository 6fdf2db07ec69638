/**
 * Whether a gateway's process still runs, as the checks that a data dir is free read it (the
 * sandbox ledger's owner at start, the CLI's `gateway.json`, `fleet reshard`).
 *
 * A pid alone does not say: pids are reused (32,768 of them on many boxes, and after a reboot the
 * same few low ones), so a file a gateway killed with -9 or a power cut left behind can name a
 * live process that is not the gateway. Each record of a gateway's pid also keeps its start time,
 * which a reused pid does not share, and the boot it was in: start times count from the boot, and
 * a box that starts its services in the same order each time gives them the same pids at much the
 * same times after every power cut.
 */
import { readFileSync } from "node:fs";

/** Start time of a process in clock ticks since boot, or null when it is gone (or /proc cannot tell). */
export function startTicks(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the parenthesised command: state ppid pgrp ... starttime is the 20th of them.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19] ?? null;
  } catch {
    return null;
  }
}

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

/** This boot's id (/proc/sys/kernel/random/boot_id, new at every boot), or null where /proc does not say. */
export function bootId(): string | null {
  if (boot === undefined)
    try {
      boot = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim() || null;
    } catch {
      boot = null;
    }
  return boot;
}

let boot: string | null | undefined;

/**
 * Whether the process a record names (`pid`; `start`, its `startTicks`, and `boot`, the `bootId`, when
 * the record was written) still runs: the record is of this boot, and the pid is alive, not a zombie
 * and, where the record has a start time and /proc shows one, started then. A record without them
 * (an older gateway.json) or a box without /proc is judged by the pid alone, as before.
 */
export function processRuns(pid: number, start?: string | null, boot?: string | null): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  if (!sameBoot(boot)) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    // EPERM: it runs, as another user's process.
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  if (isZombie(pid)) return false;
  if (start == null || start === "") return true;
  const now = startTicks(pid);
  return now === null || now === start;
}

/** Whether a record of `boot` (a `bootId`) is of this boot; true where either does not say. */
export function sameBoot(boot: string | null | undefined): boolean {
  const now = bootId();
  return boot == null || boot === "" || now === null || boot === now;
}
