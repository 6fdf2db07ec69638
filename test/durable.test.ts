/**
 * Files the gateway and the CLI write themselves (the devices file, tokens.json, a backup, a restored
 * fleet.db) survive a power cut, not only a kill -9: each is synced before the rename or link that
 * names it, and its folder after (gateway/durable.ts). A power cut cannot be pulled in a test, so
 * the writer runs under strace, whose log shows the order of the system calls.
 */
import { afterAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, isAbsolute, join } from "node:path";
import { writeFileDurably } from "../gateway/durable.ts";
import { NOBODY, NOBODY_ENV, nobodyCanRun, runCommand } from "./helpers/gateway.ts";
import { ROOT, SyntheticFleet } from "./helpers/ops.ts";

const WRITER = join(import.meta.dir, "fixtures/durable/write.ts");
const root = mkdtempSync(join(tmpdir(), "fleet-durable-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** One traced call: its name, the paths it names (resolved against its dir fds), and its result. */
interface Call {
  readonly name: string;
  readonly paths: string[];
  readonly ok: boolean;
}

/** strace -y prints a descriptor as `N</path>`; a `*at` call's name is relative to the descriptor before it. */
function parseCall(line: string): Call | null {
  const m = /^\d+\s+(\w+)\((.*)\)\s+= (-?\d+)/.exec(line);
  if (!m) return null;
  const tokens = [...m[2]!.matchAll(/(\d+<([^>]*)>|AT_FDCWD|"((?:[^"\\]|\\.)*)")/g)];
  const paths: string[] = [];
  let base: string | null = null;
  for (const t of tokens) {
    if (t[2] !== undefined) {
      // A descriptor: a path of its own (fsync), or the folder of the name after it (renameat, linkat).
      base = t[2];
      paths.push(t[2]);
    } else if (t[0] === "AT_FDCWD") base = null;
    else {
      const name = t[3]!;
      if (base !== null && !isAbsolute(name)) paths[paths.length - 1] = join(base, name);
      else paths.push(name);
      base = null;
    }
  }
  return { name: m[1]!.replace(/at2?$/, ""), paths, ok: Number(m[3]) >= 0 };
}

/** Run the writer fixture under strace; the calls that sync, rename or link, in order. */
async function traced(...args: string[]): Promise<Call[]> {
  const log = join(root, `strace-${Date.now()}-${Math.random().toString(36).slice(2)}.log`);
  const r = await runCommand(
    [
      "strace",
      "-f",
      "-y",
      "-qq",
      "-e",
      "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat",
      "-o",
      log,
      process.execPath,
      WRITER,
      ...args,
    ],
    { cwd: ROOT, env: { PATH: process.env.PATH ?? "/usr/bin:/bin" }, timeoutMs: 60_000 },
  );
  if (r.code !== 0) throw new Error(`writer ${args[0]} exited ${r.code}: ${r.stderr}`);
  return readFileSync(log, "utf8")
    .split("\n")
    .map(parseCall)
    .filter((c): c is Call => c?.ok === true);
}

/**
 * Where in `calls` the file that becomes `file` was synced, renamed or linked to it, and its folder synced:
 * the contract is sync < name < folder sync. `via` is the temporary name it was written under.
 */
function order(calls: Call[], file: string): { via: string; synced: number; named: number; folder: number } {
  const named = calls.findIndex((c) => (c.name === "rename" || c.name === "link") && c.paths[1] === file);
  expect(named).toBeGreaterThanOrEqual(0);
  const via = calls[named]!.paths[0]!;
  const synced = calls.findLastIndex((c, i) => i < named && c.name === "fsync" && c.paths[0] === via);
  const folder = calls.findIndex((c, i) => i > named && c.name === "fsync" && c.paths[0] === dirname(file));
  return { via, synced, named, folder };
}

function expectSyncedThenNamed(calls: Call[], file: string): string {
  const o = order(calls, file);
  expect(o.synced).toBeGreaterThanOrEqual(0);
  expect(o.synced).toBeLessThan(o.named);
  expect(o.folder).toBeGreaterThan(o.named);
  return o.via;
}

describe("writeFileDurably", () => {
  test("replaces the file whole with the mode given, and leaves no temporary file", () => {
    const dir = join(root, "plain");
    mkdirSync(dir);
    const file = join(dir, "list.json");
    writeFileSync(file, "old\n", { mode: 0o644 });
    writeFileDurably(file, "new\n", 0o600);
    expect(readFileSync(file, "utf8")).toBe("new\n");
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(readdirSync(dir)).toEqual(["list.json"]);
  });

  test("a write that cannot be renamed into place leaves the old entry and no temporary file", () => {
    const dir = join(root, "blocked");
    mkdirSync(join(dir, "taken"), { recursive: true });
    writeFileSync(join(dir, "taken", "inside"), "kept");
    // A folder where the file should go: the rename fails (EISDIR), nothing is replaced.
    expect(() => writeFileDurably(join(dir, "taken"), "text", 0o600)).toThrow();
    expect(readFileSync(join(dir, "taken", "inside"), "utf8")).toBe("kept");
    expect(readdirSync(dir)).toEqual(["taken"]);
  });

  test.skipIf(process.getuid?.() !== 0)(
    "a file another user owns stays theirs (root editing the service user's file, which it must still read)",
    () => {
      const file = join(root, "owned.json");
      writeFileSync(file, "old\n", { mode: 0o600 });
      chownSync(file, 4242, 4343);
      writeFileDurably(file, "new\n", 0o600);
      const st = statSync(file);
      expect({ uid: st.uid, gid: st.gid, mode: st.mode & 0o777 }).toEqual({ uid: 4242, gid: 4343, mode: 0o600 });
      expect(readFileSync(file, "utf8")).toBe("new\n");
    },
  );

  test.if(process.getuid?.() === 0 && nobodyCanRun(ROOT))(
    "in a folder its user may write but not read (no fsync of the folder there), the file is still written",
    async () => {
      const base = mkdtempSync(join(tmpdir(), "fleet-durable-nobody-"));
      try {
        chmodSync(base, 0o755);
        const dir = join(base, "drop");
        mkdirSync(dir);
        chownSync(dir, NOBODY.uid, NOBODY.gid);
        chmodSync(dir, 0o300); // write and search, no read: opening it to sync fails with EACCES
        const r = await runCommand([process.execPath, WRITER, "write", join(dir, "f.txt"), "dropped"], {
          ...NOBODY,
          cwd: ROOT,
          env: NOBODY_ENV,
        });
        expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: "" });
        expect(readFileSync(join(dir, "f.txt"), "utf8")).toBe("dropped");
      } finally {
        rmSync(base, { recursive: true, force: true });
      }
    },
  );

  test("syncs the new bytes before the rename that names them, and the folder after it", async () => {
    const file = join(root, "traced.txt");
    const calls = await traced("write", file, "hello");
    const via = expectSyncedThenNamed(calls, file);
    expect(via).toStartWith(join(root, ".traced.txt."));
    expect(readFileSync(file, "utf8")).toBe("hello");
  });
});

describe("what the CLI writes is synced before it is named", () => {
  test("a device added: the devices file", async () => {
    const file = join(root, "devices", "devices.json");
    mkdirSync(dirname(file), { recursive: true });
    const calls = await traced("device", file, "sensor-1");
    expectSyncedThenNamed(calls, file);
    expect(readFileSync(file, "utf8")).toContain("sensor-1");
  });

  test("a token added: tokens.json", async () => {
    const file = join(root, "tokens", "tokens.json");
    mkdirSync(dirname(file), { recursive: true });
    const calls = await traced("token", file, "reader");
    expectSyncedThenNamed(calls, file);
    expect(readFileSync(file, "utf8")).toContain('"reader"');
  });

  test("a backup, whose copy VACUUM INTO does not sync, and the data dir a restore fills", async () => {
    const dir = join(root, "fleet");
    const fleet = await SyntheticFleet.create(dir, {
      types: [{ name: "meter", keys: ["m1"] }],
      keep: 0,
      episodesDays: 30,
      dedupDays: 7,
    });
    await fleet.commit(3, Date.now() - 60_000, 1000);
    await fleet.close();
    const backup = join(root, "backups", "fleet-copy.db");
    const made = await traced("backup", fleet.dbPath, backup);
    // Written in a scratch folder beside it, linked in under its name.
    expect(dirname(expectSyncedThenNamed(made, backup))).toStartWith(join(root, "backups", ".fleet-backup-"));

    const data = join(root, "restored");
    const restored = await traced("restore", backup, data);
    const target = join(data, "fleet.db");
    expect(expectSyncedThenNamed(restored, target)).toBe(`${target}.restoring`);
    expect(existsSync(target)).toBe(true);
  });
});
