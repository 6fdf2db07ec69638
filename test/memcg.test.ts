/**
 * Episode memory cgroups (gateway/episode/memcg.ts) on their own: made and limited, emptied and
 * removed, and a dead gateway's left behind swept. Real cgroups: root with cgroup v1's memory
 * controller only (the runner tests cover what an episode in one can and cannot do).
 */
import { describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { MemoryCgroups, startTicks, sweepCgroups } from "../gateway/episode/index.ts";

const memcg = MemoryCgroups.open();

async function until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

const sleeper = () => Bun.spawn(["sleep", "300"], { stdio: ["ignore", "ignore", "ignore"] });

describe.if(memcg !== null)("episode memory cgroups", () => {
  test("a cgroup holds the processes it is given, under the limit it is given", async () => {
    const p = sleeper();
    const cg = memcg!.enter(64 * 1024 * 1024)!;
    expect(cg.add(p.pid)).toBe(true);
    try {
      expect(dirname(cg.dir)).toBe(memcg!.dir);
      expect(readFileSync(join(cg.dir, "memory.limit_in_bytes"), "utf8").trim()).toBe(String(64 * 1024 * 1024));
      // Swap counts too where the kernel accounts it: past the limit an episode is stopped, not swapped out.
      const memsw = join(cg.dir, "memory.memsw.limit_in_bytes");
      if (existsSync(memsw)) expect(readFileSync(memsw, "utf8").trim()).toBe(String(64 * 1024 * 1024));
      expect(readFileSync(join(cg.dir, "cgroup.procs"), "utf8").trim()).toBe(String(p.pid));
      expect(cg.oomKills()).toBe(0);
    } finally {
      cg.end();
    }
    // Ending the episode kills what is still in it.
    await p.exited;
    expect(p.signalCode).toBe("SIGKILL");
  });

  test("an ended episode's cgroup, once empty, serves the next episode under that one's limit", async () => {
    const p = sleeper();
    const first = memcg!.enter(64 * 1024 * 1024)!;
    first.add(p.pid);
    first.end();
    await p.exited;
    // The killed process holds it until reaped; once empty it is given back at the next look.
    await until(() => readFileSync(join(first.dir, "cgroup.procs"), "utf8") === "", "the cgroup emptied");
    await Bun.sleep(200);
    const next = memcg!.enter(96 * 1024 * 1024)!;
    expect(next.dir).toBe(first.dir);
    expect(readFileSync(join(next.dir, "memory.limit_in_bytes"), "utf8").trim()).toBe(String(96 * 1024 * 1024));
    const memsw = join(next.dir, "memory.memsw.limit_in_bytes");
    if (existsSync(memsw)) expect(readFileSync(memsw, "utf8").trim()).toBe(String(96 * 1024 * 1024));
    expect(readFileSync(join(next.dir, "cgroup.procs"), "utf8")).toBe("");
    next.end();
    // And back under a lower limit (memory written first: the kernel keeps memory+swap >= memory).
    await Bun.sleep(200);
    const lower = memcg!.enter(32 * 1024 * 1024)!;
    expect(lower.dir).toBe(first.dir);
    expect(readFileSync(join(lower.dir, "memory.limit_in_bytes"), "utf8").trim()).toBe(String(32 * 1024 * 1024));
    if (existsSync(memsw)) expect(readFileSync(memsw, "utf8").trim()).toBe(String(32 * 1024 * 1024));
    lower.end();
  });

  test("a process gone before it could enter is skipped", () => {
    const gone = Bun.spawnSync(["true"]).pid;
    const cg = memcg!.enter(64 * 1024 * 1024)!;
    expect(cg.add(gone)).toBe(false);
    expect(readFileSync(join(cg.dir, "cgroup.procs"), "utf8")).toBe("");
    cg.end();
  });

  test("a kill at the limit counts for its episode only: the next one in that cgroup counts from none", async () => {
    const cg = memcg!.enter(32 * 1024 * 1024)!;
    expect(cg.oomKills()).toBe(0);
    // Joins first, then touches 96 MB (charged here, unlike what it held before joining): the kernel kills it.
    const hog = Bun.spawn(
      [
        process.execPath,
        "-e",
        "await Bun.sleep(300); const b = Buffer.alloc(96 * 1024 * 1024, 1); await Bun.sleep(9000)",
      ],
      { stdio: ["ignore", "ignore", "ignore"] },
    );
    expect(cg.add(hog.pid)).toBe(true);
    await hog.exited;
    expect(hog.signalCode).toBe("SIGKILL");
    // Read again from the file kept open since the episode began: the kernel's count, not a stale copy.
    expect(cg.oomKills()).toBe(1);
    cg.end();
    await until(() => readFileSync(join(cg.dir, "cgroup.procs"), "utf8") === "", "the cgroup emptied");
    await Bun.sleep(200);
    const next = memcg!.enter(32 * 1024 * 1024)!;
    expect(next.dir).toBe(cg.dir);
    expect(next.oomKills()).toBe(0);
    next.end();
  });

  test("the cgroups a gateway killed with -9 left are emptied and removed; a running gateway's are left", async () => {
    const base = dirname(memcg!.dir);
    const dead = join(base, `fleet-${Bun.spawnSync(["true"]).pid}.1`);
    mkdirSync(join(dead, "e0"), { recursive: true });
    const p = sleeper();
    writeFileSync(join(dead, "e0", "cgroup.procs"), String(p.pid));
    // A live pid that another process has now (its start time is not the folder's): also gone.
    const reused = join(base, `fleet-${process.pid}.1`);
    mkdirSync(reused);
    // Ours, and any other a gateway killed earlier in this run left (crash tests).
    expect(sweepCgroups(base)).toBeGreaterThanOrEqual(2);
    await p.exited;
    expect(p.signalCode).toBe("SIGKILL");
    await until(() => !existsSync(dead) && !existsSync(reused), "the dead gateways' folders removed");
    // Ours (this process is alive, with the start time its folder names) is not touched.
    expect(existsSync(memcg!.dir)).toBe(true);
    expect(readdirSync(base)).toContain(`fleet-${process.pid}.${startTicks(process.pid)}`);
  });
});
