/**
 * The sandbox ledger (gateway/episode/leftovers.ts): what the next start of a data dir reaps of
 * a run killed with -9, with real process groups.
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SandboxLedger, startTicks, ticksNow } from "../gateway/episode/index.ts";
import { bootId } from "../gateway/pids.ts";
import { zombie } from "./helpers/gateway.ts";

const dir = mkdtempSync(join(tmpdir(), "fleet-ledger-test-"));
const started: number[] = [];
afterAll(() => {
  for (const pid of started)
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // gone
    }
  rmSync(dir, { recursive: true, force: true });
});

/** A process in a group of its own, like a host process. */
function group(cmd: string[]): ReturnType<typeof Bun.spawn> {
  const p = Bun.spawn(cmd, { detached: true, stdio: ["ignore", "ignore", "ignore"] });
  started.push(p.pid);
  return p;
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

test("the next start kills a group still alive and leaves alone one that ended (not marked in the file)", async () => {
  const file = join(dir, "sandboxes-reap");
  const run = new SandboxLedger(file);
  run.sweep();
  const stuck = group(["sleep", "60"]);
  const done = group(["sleep", "0"]);
  run.add(stuck.pid);
  run.add(done.pid);
  await done.exited;
  run.remove(done.pid);
  run.close();
  expect(readFileSync(file, "utf8")).not.toContain(`- ${done.pid}`); // ended groups cost no write
  const next = new SandboxLedger(file).sweep();
  expect(next).toEqual({ killed: [stuck.pid], roots: 0, ownerAlive: false });
  await stuck.exited;
  expect(alive(stuck.pid)).toBe(false);
});

test("a ledger whose gateway was killed but not reaped yet (a zombie) does not hold the data dir", async () => {
  const z = await zombie();
  started.push(z.parent);
  const pid = z.pid;
  const file = join(dir, "sandboxes-zombie");
  writeFileSync(file, `gateway ${pid} ${startTicks(pid)}\n`);
  expect(new SandboxLedger(file).sweep().ownerAlive).toBe(false);
  // A live owner still does.
  const parent = started.at(-1)!;
  writeFileSync(file, `gateway ${parent} ${startTicks(parent)}\n`);
  expect(new SandboxLedger(file).sweep().ownerAlive).toBe(true);
});

test("a long run's ledger stays small: it is compacted to the groups alive", async () => {
  const file = join(dir, "sandboxes-compact");
  const run = new SandboxLedger(file);
  run.sweep();
  const p = group(["sleep", "60"]);
  for (let i = 0; i < 3000; i++) {
    run.add(p.pid);
    run.remove(p.pid);
  }
  run.add(p.pid);
  run.close();
  const lines = readFileSync(file, "utf8").split("\n").filter(Boolean);
  expect(lines.length).toBeLessThan(1100);
  expect(new SandboxLedger(file).sweep().killed).toEqual([p.pid]);
});

test("a group is reaped by the start window its entry names; a pid started outside it is left alone", async () => {
  const file = join(dir, "sandboxes-window");
  const run = new SandboxLedger(file);
  run.sweep();
  const p = group(["sleep", "60"]);
  run.add(p.pid);
  run.close();
  const started = Number(startTicks(p.pid));
  const [from, to] = readFileSync(file, "utf8")
    .split("\n")
    .find((l) => l.startsWith(`+ ${p.pid} `))!
    .split(" ")
    .slice(2);
  expect(Number(from)).toBeLessThanOrEqual(started);
  expect(Number(to)).toBeGreaterThanOrEqual(started);
  expect(Number(to)).toBeLessThanOrEqual(Number(ticksNow()) + 1);
  // The same pid, as if reused by a process that started well after the entry's window: left alone.
  writeFileSync(file, `+ ${p.pid} ${started - 900} ${started - 400}\n`);
  expect(new SandboxLedger(file).sweep().killed).toEqual([]);
  expect(alive(p.pid)).toBe(true);
  // A ledger an older release wrote names the start time itself, and is still honoured.
  writeFileSync(file, `+ ${p.pid} ${started}\n`);
  expect(new SandboxLedger(file).sweep().killed).toEqual([p.pid]);
  await p.exited;
  expect(alive(p.pid)).toBe(false);
});

test("a ledger written before a reboot holds nothing and kills nothing, whatever has its pids now", async () => {
  const boot = bootId();
  if (boot === null) return; // no /proc: the entries are judged by pid and start time alone
  const p = group(["sleep", "60"]);
  const ticks = Number(startTicks(p.pid));
  const file = join(dir, "sandboxes-reboot");
  // As a power cut leaves it: an owner and a group whose pids, at much the same times after boot, are live now.
  const before = (id: string) =>
    writeFileSync(file, `boot ${id}\ngateway ${p.pid} ${startTicks(p.pid)}\n+ ${p.pid} ${ticks - 10} ${ticks + 10}\n`);
  before("00000000-0000-4000-8000-000000000000");
  expect(new SandboxLedger(file).sweep()).toEqual({ killed: [], roots: 0, ownerAlive: false });
  expect(alive(p.pid)).toBe(true);
  // The ledger a sweep writes names this boot.
  expect(readFileSync(file, "utf8").split("\n")[0]).toBe(`boot ${boot}`);
  // The same entries written in this boot: the owner holds the data dir.
  before(boot);
  expect(new SandboxLedger(file).sweep().ownerAlive).toBe(true);
  // Without the owner, the group is reaped.
  writeFileSync(file, `boot ${boot}\n+ ${p.pid} ${ticks - 10} ${ticks + 10}\n`);
  expect(new SandboxLedger(file).sweep().killed).toEqual([p.pid]);
  await p.exited;
  expect(alive(p.pid)).toBe(false);
});
