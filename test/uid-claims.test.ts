/**
 * Gateways on one machine claim their sandbox uids (gateway/episode/uid-claims.ts): the default
 * range moves past one a running gateway holds, a range set in fleet.toml that overlaps one is
 * refused, a claim whose gateway is gone is not in the way, and gateways starting together take
 * turns. Root only: the claims folder is root's, and only a root gateway hands out uids.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import Database from "libsql";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  claimUids,
  commandSpawnOptions,
  startTicks,
  UID_CLAIMS_FILE,
  uidClaims,
  UidRangeTaken,
} from "../gateway/episode/index.ts";
import { DEFAULT_SANDBOX_UIDS } from "../gateway/spec/index.ts";

const IS_ROOT = process.getuid?.() === 0;
const BLOCK = DEFAULT_SANDBOX_UIDS.count;
const DEFAULT = DEFAULT_SANDBOX_UIDS;

let dir = "";
let sleepers: ReturnType<typeof Bun.spawn>[] = [];

/** A row in the claims file, as another process's claim would leave it. */
function plant(claim: { pid: number; start: string; first: number; count: number; owner: string }): void {
  uidClaims(dir); // makes the file and its table
  const db = new Database(join(dir, UID_CLAIMS_FILE));
  db.prepare("INSERT INTO claims (pid, start, first, count, owner) VALUES (?, ?, ?, ?, ?)").run(
    claim.pid,
    claim.start,
    claim.first,
    claim.count,
    claim.owner,
  );
  db.close();
}

/** A claim of a live process other than us (a sleeper stands in for another gateway). */
function otherGateway(first: number, count: number, owner = "/srv/other"): number {
  const proc = Bun.spawn(["sleep", "60"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
  sleepers.push(proc);
  plant({ pid: proc.pid, start: startTicks(proc.pid) ?? "", first, count, owner });
  return proc.pid;
}

const owners = () => uidClaims(dir).map((c) => c.owner);

/** The first line a process prints, or null when it exits first. */
async function firstLine(stream: ReadableStream<Uint8Array>): Promise<string | null> {
  let text = "";
  const decoder = new TextDecoder();
  for await (const chunk of stream) {
    text += decoder.decode(chunk, { stream: true });
    const end = text.indexOf("\n");
    if (end >= 0) return text.slice(0, end);
  }
  return null;
}

describe.if(IS_ROOT)("claiming sandbox uids among the gateways on one machine", () => {
  beforeEach(() => {
    dir = join(mkdtempSync(join(tmpdir(), "fleet-uid-claims-")), "claims");
    mkdirSync(dir, { mode: 0o755 });
  });
  afterEach(() => {
    for (const s of sleepers) s.kill("SIGKILL");
    sleepers = [];
    rmSync(join(dir, ".."), { recursive: true, force: true });
  });

  test("the first gateway gets the range it asks for; letting it go removes its claim", () => {
    const held = claimUids(DEFAULT, "/srv/a", dir);
    expect(held.range).toEqual(DEFAULT);
    expect(held.movedPast).toBeNull();
    expect(uidClaims(dir)).toEqual([
      { pid: process.pid, start: startTicks(process.pid)!, ...DEFAULT, owner: "/srv/a" },
    ]);
    held.release();
    expect(uidClaims(dir)).toEqual([]);
  });

  test("the default range moves to the next free block past those running gateways hold", () => {
    const first = otherGateway(DEFAULT.first, BLOCK, "/srv/one");
    otherGateway(DEFAULT.first + BLOCK + 10, 5, "/srv/two");
    const held = claimUids(DEFAULT, "/srv/three", dir);
    expect(held.range).toEqual({ first: DEFAULT.first + 2 * BLOCK, count: BLOCK });
    expect(held.movedPast).toMatchObject({ pid: first, owner: "/srv/one" });
    held.release();
  });

  test("a range set in fleet.toml that overlaps a running gateway's is refused, naming that gateway", () => {
    const pid = otherGateway(2_000_000_000, 100, "/srv/one");
    let thrown: unknown;
    try {
      claimUids({ first: 2_000_000_050, count: 100 }, "/srv/two", dir);
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(UidRangeTaken);
    expect(String(thrown)).toContain(`pid ${pid} (/srv/one)`);
    expect(String(thrown)).toContain("2000000000-2000000099");
    // Its claim is not left behind to stand in anyone's way.
    expect(owners()).toEqual(["/srv/one"]);
    // One beside it is fine.
    claimUids({ first: 2_000_000_100, count: 100 }, "/srv/two", dir).release();
  });

  test("the claim of a gateway that is gone (its pid exited, or now another process's) is removed, not obeyed", () => {
    const dead = Bun.spawnSync(["true"]).pid;
    plant({ pid: dead, start: "1", ...DEFAULT, owner: "/srv/dead" });
    // A live pid with another start time: the pid was reused.
    const sleeper = Bun.spawn(["sleep", "60"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
    sleepers.push(sleeper);
    plant({ pid: sleeper.pid, start: "1", ...DEFAULT, owner: "/srv/reused" });
    // This very process's pid, left by a command that held it before (killed before it let go).
    plant({ pid: process.pid, start: "1", ...DEFAULT, owner: "fleet replay" });
    const held = claimUids(DEFAULT, "/srv/new", dir);
    expect(held.range).toEqual(DEFAULT);
    expect(held.movedPast).toBeNull();
    expect(owners()).toEqual(["/srv/new"]);
    held.release();
  });

  test("a claims file that is not a database is an error naming it, not a range handed out unchecked", () => {
    writeFileSync(join(dir, UID_CLAIMS_FILE), `not a database ${"\u00ff".repeat(200)}`);
    expect(() => claimUids(DEFAULT, "/srv/a", dir)).toThrow(UID_CLAIMS_FILE);
  });

  test("gateways starting at the same moment take turns: each gets a block of its own", async () => {
    const claimer = fileURLToPath(new URL("./fixtures/sandbox/claim-uids.ts", import.meta.url));
    const releaseFile = join(dir, "..", "release");
    const at = Date.now() + 1500;
    const procs = Array.from({ length: 6 }, (_, i) =>
      Bun.spawn([process.execPath, claimer, dir, `/srv/g${i}`, String(at), releaseFile], {
        stdout: "pipe",
        stderr: "pipe",
      }),
    );
    try {
      const ranges = await Promise.all(
        procs.map(async (p) => {
          const line = await firstLine(p.stdout);
          if (line === null) throw new Error(await new Response(p.stderr).text());
          return JSON.parse(line) as { first: number; count: number };
        }),
      );
      const firsts = ranges.map((r) => r.first).sort((a, b) => a - b);
      expect(firsts).toEqual(Array.from({ length: 6 }, (_, i) => DEFAULT.first + i * BLOCK));
      expect(uidClaims(dir)).toHaveLength(6);
    } finally {
      writeFileSync(releaseFile, "");
    }
    expect(await Promise.all(procs.map((p) => p.exited))).toEqual([0, 0, 0, 0, 0, 0]);
    expect(uidClaims(dir)).toEqual([]);
  }, 30_000);

  test("a claimer killed with -9 while it holds the lock does not stop the next: the kernel lets go", async () => {
    uidClaims(dir);
    // A process that takes the claims file's write lock and never lets go, until killed.
    const holder = Bun.spawn(
      [
        process.execPath,
        "-e",
        `const D = require("libsql"); const db = new D(${JSON.stringify(join(dir, UID_CLAIMS_FILE))}); ` +
          'db.exec("BEGIN IMMEDIATE"); console.log("locked"); setInterval(() => {}, 1000);',
      ],
      { stdout: "pipe", stderr: "pipe" },
    );
    sleepers.push(holder);
    expect(await firstLine(holder.stdout)).toBe("locked");
    holder.kill("SIGKILL");
    await holder.exited;
    const held = claimUids(DEFAULT, "/srv/after", dir);
    expect(held.range).toEqual(DEFAULT);
    held.release();
  });

  test("a command that runs agent code (fleet replay) takes a free default block, held until it exits", () => {
    otherGateway(DEFAULT.first, BLOCK, "the gateway of /srv/one");
    const spawn = commandSpawnOptions("auto", {}, "fleet replay", dir);
    expect(spawn.uids?.range).toEqual({ first: DEFAULT.first + BLOCK, count: BLOCK });
    const mine = uidClaims(dir).filter((c) => c.pid === process.pid);
    expect(mine).toEqual([expect.objectContaining({ first: DEFAULT.first + BLOCK, owner: "fleet replay" })]);
  });

  test("the claims folder is root's alone: made 0700, and one an older version left readable to all is closed", () => {
    const fresh = join(dir, "fresh");
    claimUids(DEFAULT, "/srv/a", fresh).release();
    expect(statSync(fresh).mode & 0o777).toBe(0o700);
    chmodSync(fresh, 0o755);
    claimUids(DEFAULT, "/srv/a", fresh).release();
    expect(statSync(fresh).mode & 0o777).toBe(0o700);
  });

  test("a claims folder others can write is not used: anyone could plant a claim in it", () => {
    claimUids(DEFAULT, "/srv/a", dir).release();
    chmodSync(dir, 0o777);
    expect(() => claimUids(DEFAULT, "/srv/a", dir)).toThrow(/not a folder only root can write/);
  });
});
