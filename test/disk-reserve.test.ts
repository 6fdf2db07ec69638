/**
 * The data disk's free-space reserve (`[fleet] disk_free_limit_mb`, gateway/observe/disk.ts) with the disk's
 * free space and the clock driven by hand: when it starts and stops refusing, how often it looks, what it says.
 * test/e2e.disk-full.test.ts runs the gateway on a real small filesystem.
 */
import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CHECK_MS, clearsAt, DiskReserve } from "../gateway/observe/index.ts";
import { type DiskSpace, diskSpace } from "../gateway/disk.ts";

const MB = 1024 * 1024;

/** A reserve over a disk whose free space the test sets, with a hand-driven clock and a captured log. */
function reserve(limitMb = 50) {
  // `dbFree`: fleet.db's free pages; `dbFail`: that read fails.
  const disk = { free: 100 * MB, looks: 0, fail: null as Error | null, dbFree: 0, dbFail: false };
  const clock = { t: 0 };
  const lines: { level: string; msg: string; obj: Record<string, unknown> }[] = [];
  const at = (level: string) => (obj: object, msg: string) =>
    void lines.push({ level, msg, obj: obj as Record<string, unknown> });
  const log = { error: at("error"), warn: at("warn"), info: at("info") };
  const limit = { mb: limitMb };
  const measure = (): DiskSpace => {
    disk.looks++;
    if (disk.fail) throw disk.fail;
    return { freeBytes: disk.free, totalBytes: 1000 * MB };
  };
  const r = new DiskReserve(
    "/data",
    () => limit.mb,
    log as never,
    async () => {
      if (disk.dbFail) throw new Error("the database is closed");
      return disk.dbFree;
    },
    measure,
    () => clock.t,
    () => 1_700_000_000_000,
  );
  /** Let the check interval pass, then ask. */
  const ask = () => {
    clock.t += CHECK_MS;
    return r.refusal();
  };
  return { r, disk, clock, lines, limit, ask };
}

describe("the data disk's reserve", () => {
  test("refuses once the free space is below the limit, and says how much is free and which key sets it", () => {
    const { r, disk, lines, ask } = reserve();
    expect(ask()).toBeNull();
    disk.free = 49 * MB;
    expect(ask()).toBe("the data disk is low (49.0 MB free, below [fleet] disk_free_limit_mb = 50); try again later");
    expect(r.status()).toEqual({
      free_bytes: 49 * MB,
      db_free_bytes: 0,
      total_bytes: 1000 * MB,
      limit_bytes: 50 * MB,
      low: true,
      low_since: 1_700_000_000_000,
    });
    expect(lines.map((l) => [l.level, l.obj.free_mb, l.obj.limit_mb])).toEqual([["error", 49, 50]]);
  });

  test("stops refusing only a tenth above the limit: a disk at the line does not flip it at every look", () => {
    const { disk, lines, ask } = reserve();
    disk.free = 49 * MB;
    expect(ask()).not.toBeNull();
    disk.free = 51 * MB; // above the limit, below limit + 5 MB
    expect(ask()).not.toBeNull();
    disk.free = clearsAt(50 * MB);
    expect(ask()).toBeNull();
    expect(lines.map((l) => l.level)).toEqual(["error", "info"]);
    expect(lines[1]!.msg).toBe("data disk has room again; accepting stimuli");
    // One line when it starts and one when it ends, however often intake asks in between.
    expect(clearsAt(2 * MB)).toBe(3 * MB);
  });

  test("intake looks at the disk at most once per check interval; the background looks every time", () => {
    const { r, disk, clock } = reserve();
    r.refusal();
    for (let i = 0; i < 1000; i++) r.refusal();
    expect(disk.looks).toBe(1);
    clock.t += CHECK_MS;
    r.refusal();
    expect(disk.looks).toBe(2);
    r.check(true);
    expect(disk.looks).toBe(3);
  });

  test("a limit changed by a reload applies at the next look; 0 turns the reserve off", () => {
    const { disk, limit, ask } = reserve();
    disk.free = 60 * MB;
    expect(ask()).toBeNull();
    limit.mb = 100;
    expect(ask()).toContain("disk_free_limit_mb = 100");
    limit.mb = 0;
    expect(ask()).toBeNull();
    disk.free = 0;
    expect(ask()).toBeNull();
  });

  test("a disk that cannot be read keeps the last state and warns once", () => {
    const { disk, lines, ask } = reserve();
    disk.free = 10 * MB;
    expect(ask()).not.toBeNull();
    disk.fail = Object.assign(new Error("ENOENT: no such file or directory, statfs '/data'"), { code: "ENOENT" });
    expect(ask()).not.toBeNull();
    expect(ask()).not.toBeNull();
    expect(lines.filter((l) => l.level === "warn").map((l) => l.msg)).toEqual([
      "cannot read the data disk's free space",
    ]);
  });

  test("a first poll reads the free pages before it decides: a start is not refused for nothing", async () => {
    const { r, disk, lines } = reserve();
    disk.free = 45 * MB;
    disk.dbFree = 15 * MB;
    await r.poll();
    expect(r.refusal()).toBeNull();
    expect(lines).toEqual([]);
  });

  test("the database's free pages count as room: retention's deletes end the refusal without a VACUUM", async () => {
    const { r, disk, ask } = reserve();
    disk.free = 40 * MB;
    expect(ask()).not.toBeNull();
    // `fleet gc` freed 20 MB of pages in fleet.db: the disk is as full as before, the next writes reuse them.
    disk.dbFree = 20 * MB;
    await r.poll();
    expect(r.refusal()).toBeNull();
    expect(r.status()).toMatchObject({ free_bytes: 40 * MB, db_free_bytes: 20 * MB, low: false });
    // A read of them that fails keeps the last figure.
    disk.dbFail = true;
    await r.poll();
    expect(r.status().db_free_bytes).toBe(20 * MB);
    // Used up again by new writes: low again, and the message counts both.
    disk.dbFail = false;
    disk.dbFree = 2 * MB;
    await r.poll();
    expect(r.refusal()).toBe(
      "the data disk is low (42.0 MB free, below [fleet] disk_free_limit_mb = 50); try again later",
    );
  });

  test("diskSpace reads a real filesystem: free space within its size", () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-disk-"));
    try {
      const s = diskSpace(dir);
      expect(s.totalBytes).toBeGreaterThan(0);
      expect(s.freeBytes).toBeGreaterThanOrEqual(0);
      expect(s.freeBytes).toBeLessThanOrEqual(s.totalBytes);
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
