/**
 * gateway/pids.ts: whether the process a record (gateway.json, the sandbox ledger) names still
 * runs. A pid alone does not say: a gateway killed with -9 or a power cut leaves its file behind,
 * and its pid is reused (after a reboot, often at once).
 */
import { describe, expect, test } from "bun:test";
import { bootId, isZombie, processRuns, sameBoot, startTicks } from "../gateway/pids.ts";
import { zombie } from "./helpers/gateway.ts";

describe("processRuns", () => {
  test("a live process runs, by its pid alone and by its pid with the start time it has", () => {
    const start = startTicks(process.pid);
    expect(start).toMatch(/^\d+$/);
    expect(processRuns(process.pid)).toBe(true);
    expect(processRuns(process.pid, null)).toBe(true);
    expect(processRuns(process.pid, start)).toBe(true);
  });

  test("a live pid with another start time is a reused pid: the process the record named does not run", () => {
    const start = Number(startTicks(process.pid));
    expect(processRuns(process.pid, String(start + 1))).toBe(false);
    expect(processRuns(process.pid, "0")).toBe(false);
  });

  test("a pid that is gone does not run, whatever the record says of its start", async () => {
    const p = Bun.spawn(["true"]);
    await p.exited;
    expect(processRuns(p.pid)).toBe(false);
    expect(processRuns(p.pid, "12345")).toBe(false);
  });

  test("a zombie (killed, not reaped) does not run, though kill(pid, 0) still succeeds for it", async () => {
    const z = await zombie();
    try {
      expect(isZombie(z.pid)).toBe(true);
      expect(() => process.kill(z.pid, 0)).not.toThrow();
      expect(processRuns(z.pid)).toBe(false);
      expect(processRuns(z.pid, startTicks(z.pid))).toBe(false);
    } finally {
      z.end();
    }
  });

  test("pids that are not one process (0, negative, fractional, NaN) never run: kill would signal a group", () => {
    // kill(0, 0) and kill(-1, 0) succeed (this process group, every process we may signal).
    for (const pid of [0, -1, -process.pid, 1.5, Number.NaN, Number.POSITIVE_INFINITY])
      expect(processRuns(pid)).toBe(false);
  });

  test("a record of another boot names no process that runs now, even a live pid started at that tick", () => {
    const boot = bootId();
    expect(boot).toMatch(/^[0-9a-f-]{36}$/);
    const start = startTicks(process.pid);
    expect(processRuns(process.pid, start, boot)).toBe(true);
    expect(processRuns(process.pid, start, "00000000-0000-4000-8000-000000000000")).toBe(false);
    // A record that does not say which boot (an older gateway.json) is judged by pid and start time.
    expect(processRuns(process.pid, start, null)).toBe(true);
    expect(sameBoot(undefined)).toBe(true);
    expect(sameBoot(boot)).toBe(true);
    expect(sameBoot("00000000-0000-4000-8000-000000000000")).toBe(false);
  });
});
