/**
 * Code bundles (docs/upgrading.md) in-process: what `buildBundle` puts in a bundle and leaves
 * out, how `BundleFiles` materialises stored code (read-only, checked against its hash), how a
 * failed build refuses a redeploy only where working code would be replaced, and how retention
 * keeps a bundle while anything names it.
 */
import { afterAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  realpathSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import pino from "pino";
import { HOST_MODULES, PROTOCOL_SPECIFIER, SDK_ENTRY, SDK_SPECIFIER } from "../agents/host/index.ts";
import {
  BundleFiles,
  BundleMissing,
  type BundleScope,
  buildBundle,
  bundleDir,
  inSourceTerms,
  parseSourceMap,
  pinCode,
  versionOf,
  withBundles,
} from "../gateway/code/index.ts";
import { agentFiles, startTicks, sweepProcessDirs } from "../gateway/episode/index.ts";
import { blake3Hex } from "../gateway/hash.ts";
import { gcPass, verifyStore } from "../gateway/ops/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { Store, tables } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "fleet-bundles-"));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const ROOT = join(import.meta.dir, "..");

/** A bundle's scope when no fleet.toml is in play: the module's own folder tree (/proc, /sys, /dev still refused). */
function scopeOf(module: string): BundleScope {
  return { roots: [dirname(module)], refused: [] };
}
const silent = pino({ level: "silent" });
const DAY = 86_400_000;

/**
 * `<dir>/agents/lab.ts`, which calls `check` of `./lib.ts`: the throw is on line 4, column 19 of
 * lib.ts; the call on line 5, column 12 of lab.ts. Returns lab.ts's path.
 */
function writeLab(dir: string): string {
  mkdirSync(join(dir, "agents"));
  writeFileSync(
    join(dir, "agents/lib.ts"),
    [
      "// a helper",
      "export function check(cfg: { field?: { x: number } }): number {",
      "  // note",
      '  if (!cfg.field) throw new Error("no field");',
      "  return cfg.field.x;",
      "}",
      "",
    ].join("\n"),
  );
  writeFileSync(
    join(dir, "agents/lab.ts"),
    [
      `import { defineAgent } from ${JSON.stringify(SDK_ENTRY)};`,
      'import { check } from "./lib.ts";',
      "",
      "export default defineAgent({ init: () => ({}), onStimulus(_s, ctx) {",
      "  ctx.emit(check({}));",
      "} });",
      "",
    ].join("\n"),
  );
  return join(dir, "agents/lab.ts");
}

/** An agent module importing a local helper and the SDK (by package name and by path). */
function writeAgent(dir: string, word: string): string {
  writeFileSync(join(dir, "word.ts"), `export const word = ${JSON.stringify(word)};\n`);
  const file = join(dir, "agent.ts");
  writeFileSync(
    file,
    `import { defineAgent } from "agent-fleets";
import { ToolDenied } from ${JSON.stringify(SDK_ENTRY)};
import { word } from "./word.ts";
export default defineAgent({ init: () => ({}), onStimulus(_s, ctx) { ctx.emit({ word, denied: ToolDenied.name }); } });
`,
  );
  return file;
}

describe("buildBundle", () => {
  test("bundles local imports in and leaves the SDK to the host runtime, by its package name", async () => {
    const dir = tempDir();
    const r = await buildBundle(writeAgent(dir, "alpha"), HOST_MODULES, scopeOf(join(dir, "agent.ts")));
    if (!r.ok) throw new Error(r.error);
    expect(r.code).toContain('"alpha"');
    expect(r.code).not.toContain("./word.ts");
    expect(r.code).toContain(`from "${SDK_SPECIFIER}"`);
    expect(r.code).not.toContain(SDK_ENTRY);
    expect(r.code).not.toContain("class ToolDenied");
    expect(r.hash).toBe(await blake3Hex(r.code));
    // The same code bundles to the same hash; different code to another.
    const again = await buildBundle(join(dir, "agent.ts"), HOST_MODULES, scopeOf(join(dir, "agent.ts")));
    expect(again.ok && again.hash).toBe(r.hash);
    writeAgent(dir, "beta");
    const other = await buildBundle(join(dir, "agent.ts"), HOST_MODULES, scopeOf(join(dir, "agent.ts")));
    expect(other.ok && other.hash).not.toBe(r.hash);
  });

  test("the same module bundled in two installs (the repo, a copy of agents/ elsewhere) is the same code", async () => {
    const copy = join(tempDir(), "install");
    cpSync(join(ROOT, "agents"), join(copy, "agents"), { recursive: true });
    const modules = {
      [join(copy, "agents/sdk/index.ts")]: SDK_SPECIFIER,
      [join(copy, "agents/protocol.ts")]: PROTOCOL_SPECIFIER,
    };
    const here = await buildBundle(
      join(ROOT, "agents/examples/anomaly.ts"),
      HOST_MODULES,
      scopeOf(join(ROOT, "agents/examples/anomaly.ts")),
    );
    const there = await buildBundle(join(copy, "agents/examples/anomaly.ts"), modules, scopeOf(copy));
    if (!here.ok || !there.ok) throw new Error("bundling failed");
    expect(there.hash).toBe(here.hash);
    expect(here.code).toContain(`from "${SDK_SPECIFIER}"`);
    expect(here.code).not.toContain(ROOT);
    expect(there.code).not.toContain(copy);
  });

  test("a module that does not parse, imports a missing file or does not exist is an error naming why", async () => {
    const dir = tempDir();
    writeFileSync(join(dir, "bad.ts"), "export default {\n");
    writeFileSync(join(dir, "missing.ts"), 'import x from "./nope.ts";\nexport default x;\n');
    const bad = await buildBundle(join(dir, "bad.ts"), HOST_MODULES, scopeOf(join(dir, "bad.ts")));
    const missing = await buildBundle(join(dir, "missing.ts"), HOST_MODULES, scopeOf(join(dir, "missing.ts")));
    const none = await buildBundle(join(dir, "none.ts"), HOST_MODULES, scopeOf(join(dir, "none.ts")));
    expect(bad.ok).toBe(false);
    expect(!missing.ok && missing.error).toContain("nope.ts");
    expect(!none.ok && none.error).toContain("none.ts");
  });

  test("its source map leads each line of the code back to the file, line and column it came from", async () => {
    const dir = tempDir();
    writeLab(dir);
    const r = await buildBundle(join(dir, "agents/lab.ts"), HOST_MODULES, scopeOf(join(dir, "agents/lab.ts")));
    if (!r.ok) throw new Error(r.error);
    expect(r.hash).toBe(await blake3Hex(r.code));
    expect(r.code).not.toContain("debugId");
    expect(r.code).not.toContain("agents/lib.ts");
    const map = parseSourceMap(r.map ?? "");
    expect(map).not.toBeNull();
    // Where the code has them, 1-based columns as in Bun's stacks.
    const lines = r.code.split("\n");
    const position = (token: string) => {
      const line = lines.findIndex((l) => l.includes(token));
      expect(line).toBeGreaterThanOrEqual(0);
      return `${line + 1}:${lines[line]!.indexOf(token) + 1}`;
    };
    const file = join(dir, "bundles", `${r.hash}.js`);
    const stack =
      `Error: no field\n    at check (${file}:${position("throw new Error")})\n` +
      `    at onStimulus (${file}:${position("check({})")})`;
    const names = { fleetDir: dir, module: "agents/lab.ts" };
    expect(inSourceTerms(stack, file, map, names)).toBe(
      "Error: no field\n    at check (agents/lib.ts:4:19)\n    at onStimulus (agents/lab.ts:5:12)",
    );
    // The file alone is the module; a position the map does not cover keeps the bundle's; no map, the same.
    expect(inSourceTerms(`${file} has no default export`, file, map, names)).toBe(
      "agents/lab.ts has no default export",
    );
    expect(inSourceTerms(`at ${file}:9999:1`, file, map, names)).toBe("at agents/lab.ts (bundle line 9999:1)");
    expect(inSourceTerms(`at ${file}:3:1`, file, null, names)).toBe("at agents/lab.ts (bundle line 3:1)");
    // A source outside the fleet's folder keeps its absolute path.
    expect(
      inSourceTerms(`at x (${file}:${position("throw new Error")})`, file, map, { ...names, fleetDir: "/elsewhere" }),
    ).toBe(`at x (${join(dir, "agents/lib.ts")}:4:19)`);
  });
});

describe("source maps stored with their bundles", () => {
  test("a process that did not build a bundle names positions by its stored map, saying which bundle", async () => {
    const dir = tempDir();
    const module = writeLab(dir);
    const sv = await compileSpec(
      `[fleet]\nname = "maps"\n\n[agents.t]\nmodule = ${JSON.stringify(module)}\n`,
      join(dir, "fleet.toml"),
    );
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    try {
      // The gateway that built it stores the map with the code.
      const building = new BundleFiles(
        join(dir, "b1"),
        (h) => store.bundleCode(h),
        silent,
        (h) => store.bundleMap(h),
      );
      const deps = { sink: store, files: building, hostModules: HOST_MODULES, now: () => 1, log: silent };
      const pinned = await pinCode(sv, null, deps);
      if (!pinned.ok) throw new Error(pinned.problems.join("\n"));
      const hash = pinned.sv.bundles.t!;
      expect(parseSourceMap((await store.bundleMap(hash)) ?? "")).not.toBeNull();
      expect((await building.sourceMap(hash))?.built).toBe(true);

      // Another process (a restart after lab.ts changed, with a rollout still running this code) reads it back.
      const later = new BundleFiles(
        join(dir, "b2"),
        (h) => store.bundleCode(h),
        silent,
        (h) => store.bundleMap(h),
      );
      const found = await later.sourceMap(hash);
      expect(found?.built).toBe(false);
      const lines = (await store.bundleCode(hash))!.split("\n");
      const at = lines.findIndex((l) => l.includes("throw new Error"));
      const file = join(dir, "b2", `${hash}.js`);
      const frame = `at check (${file}:${at + 1}:${lines[at]!.indexOf("throw new Error") + 1})`;
      const names = { fleetDir: dir, module: "agents/lab.ts", storedBundle: hash };
      expect(inSourceTerms(frame, file, found?.map ?? null, names)).toBe(
        `at check (agents/lib.ts:4:19 in bundle ${hash.slice(0, 12)})`,
      );
      // A bundle unknown to the store has no map.
      expect(await later.sourceMap("e".repeat(64))).toBeNull();
    } finally {
      await store.close();
    }
  });

  test("a bundle stored without a map (before migration 36) gets one when its code is built again", async () => {
    const dir = tempDir();
    const module = writeLab(dir);
    const built = await buildBundle(module, HOST_MODULES, scopeOf(module));
    if (!built.ok || built.map === null) throw new Error("no bundle with a map");
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    try {
      await store.saveBundle({ hash: built.hash, module, code: built.code, at: 1 });
      expect(await store.bundleMap(built.hash)).toBeNull();
      await store.saveBundle({ hash: built.hash, module, code: built.code, at: 2, map: built.map });
      expect(await store.bundleMap(built.hash)).toBe(built.map);
      // A map once kept is not replaced.
      await store.saveBundleMap(built.hash, "{}");
      expect(await store.bundleMap(built.hash)).toBe(built.map);
    } finally {
      await store.close();
    }
  });
});

describe("Bun macros in agent code", () => {
  /** A module that imports `pwn` from a file that marks `ran` when it runs, under import attributes `attrs`. */
  function macroAgent(dir: string, attrs: string): { module: string; ran: string } {
    const ran = join(dir, "RAN");
    writeFileSync(
      join(dir, "lib.ts"),
      `import { writeFileSync } from "node:fs";\n` +
        `export function pwn() { writeFileSync(${JSON.stringify(ran)}, "x"); return 1; }\n`,
    );
    const module = join(dir, "agent.ts");
    writeFileSync(module, `import { pwn } from "./lib.ts" ${attrs};\nexport const v = pwn();\n`);
    return { module, ran };
  }

  test.each([
    ['with { type: "macro" }'],
    ["assert { type: 'macro' }"],
    ['with { "type": "macro" }'],
    ['with { type: "m\\u0061cro" }'],
    ['with /* hidden */ { type: "macro" }'],
  ])("%s: bundling and the sandbox's import scan refuse it, and it never runs in the gateway", (attrs) => {
    const dir = tempDir();
    const { module, ran } = macroAgent(dir, attrs);
    return (async () => {
      const built = await buildBundle(module, HOST_MODULES, scopeOf(module));
      expect(built.ok).toBe(false);
      expect(!built.ok && built.error).toContain("import attributes");
      expect(agentFiles(module).files).toEqual([realpathSync(module)]);
      expect(existsSync(ran)).toBe(false);
    })();
  });

  test('plain data imports (with { type: "json" }) bundle as before', async () => {
    const dir = tempDir();
    writeFileSync(join(dir, "data.json"), '{"n": 7}');
    const module = join(dir, "agent.ts");
    writeFileSync(module, 'import data from "./data.json" with { type: "json" };\nexport const n = data.n;\n');
    const built = await buildBundle(module, HOST_MODULES, scopeOf(module));
    expect(built.ok && built.code).toContain("7");
  });
});

describe("files agent code may bundle", () => {
  /** A fleet in `dir` (data dir `.fleet`, the default) whose type `t` runs `agent.ts` importing `spec` as `type`. */
  async function importing(dir: string, spec: string, type = "text") {
    const module = join(dir, "agent.ts");
    writeFileSync(
      module,
      `import { defineAgent } from "agent-fleets";\n` +
        `import data from ${JSON.stringify(spec)} with { type: ${JSON.stringify(type)} };\n` +
        "export default defineAgent({ init: () => ({}),\n" +
        "  onStimulus(_s, ctx) { ctx.emit({ data: String(data) }); } });\n",
    );
    const sv = await compileSpec(
      `[fleet]\nname = "scope"\n\n[agents.t]\nmodule = "agent.ts"\n`,
      join(dir, "fleet.toml"),
    );
    return versionOf(sv, HOST_MODULES);
  }

  test("/proc/self/environ is refused, naming the import and the rule; nothing of it is bundled", async () => {
    const version = await importing(tempDir(), "/proc/self/environ");
    expect(version.sv.bundles).toEqual({});
    expect(version.unbundled).toHaveLength(1);
    const error = version.unbundled[0]!.error;
    expect(error).toContain('import "/proc/self/environ"');
    expect(error).toContain("agent code may not import the gateway's files, /proc, /sys or /dev");
  });

  test("a file of the data dir inside the fleet.toml folder is refused, by a relative path too", async () => {
    const dir = tempDir();
    mkdirSync(join(dir, ".fleet"));
    writeFileSync(join(dir, ".fleet/local-admin.token"), "SECRET-TOKEN\n");
    const version = await importing(dir, "./.fleet/local-admin.token");
    expect(version.unbundled[0]?.error).toContain(`inside the gateway's data dir (${join(dir, ".fleet")})`);
    // A data dir named by the caller (the gateway's --data-dir) is refused wherever it is.
    mkdirSync(join(dir, "elsewhere"));
    writeFileSync(join(dir, "elsewhere/tokens.json"), "{}");
    const sv = await compileSpec(
      `[fleet]\nname = "scope"\n\n[agents.t]\nmodule = "agent.ts"\n`,
      join(dir, "fleet.toml"),
    );
    writeFileSync(join(dir, "agent.ts"), 'import t from "./elsewhere/tokens.json";\nexport default t;\n');
    expect((await versionOf(sv, HOST_MODULES)).unbundled).toEqual([]);
    const named = await versionOf(sv, HOST_MODULES, join(dir, "elsewhere"));
    expect(named.unbundled[0]?.error).toContain("inside the gateway's data dir");
  });

  test("a symlink inside the tree is judged by where it points: outside is refused", async () => {
    const dir = tempDir();
    const outside = tempDir();
    writeFileSync(join(outside, "secret.txt"), "SECRET\n");
    symlinkSync(join(outside, "secret.txt"), join(dir, "looks-local.txt"));
    const version = await importing(dir, "./looks-local.txt");
    expect(version.unbundled[0]?.error).toContain(`import "./looks-local.txt" (${realpathSync(outside)}/secret.txt)`);
    expect(version.unbundled[0]?.error).toContain("is outside the folders agent code may import from");
  });

  test("text and JSON files inside the tree bundle as before", async () => {
    const dir = tempDir();
    mkdirSync(join(dir, "data"));
    writeFileSync(join(dir, "data/table.json"), '{"rows": 41}');
    writeFileSync(join(dir, "data/note.txt"), "a note");
    const json = await importing(dir, "./data/table.json", "json");
    expect(json.unbundled).toEqual([]);
    const text = await importing(dir, "./data/note.txt");
    expect(text.unbundled).toEqual([]);
    const built = await buildBundle(join(dir, "agent.ts"), HOST_MODULES, scopeOf(join(dir, "agent.ts")));
    expect(built.ok && built.code).toContain("a note");
  });
});

/** Whether a folder of /var/tmp can be made immutable here (root, a file system with the attribute). */
function immutableWorks(): boolean {
  const dir = mkdtempSync("/var/tmp/fleet-chattr-");
  try {
    const ok = Bun.spawnSync(["chattr", "+i", dir], { stderr: "ignore" }).exitCode === 0;
    if (ok) Bun.spawnSync(["chattr", "-i", dir]);
    return ok;
  } catch {
    return false; // no chattr
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("bundle folders in the temp dir", () => {
  test("a data dir under /tmp keeps its bundles out of /tmp, whoever runs the agents (warm spares see them)", () => {
    for (const uids of [null, {}]) {
      const dir = bundleDir("/tmp/fleet-x/data", { uids });
      expect(dir.startsWith("/tmp/")).toBe(false);
      expect(dir).toContain("fleet-bundles-");
    }
  });

  test("as another uid, agents read bundles beside the data dir, made 0755 whatever the umask (systemd's 0077)", () => {
    const base = mkdtempSync("/var/tmp/fleet-bd-");
    chmodSync(base, 0o755);
    const data = join(base, "data");
    mkdirSync(data, { mode: 0o700 });
    const umask = process.umask(0o077);
    try {
      expect(bundleDir(data, { uids: null })).toBe(join(data, "bundles"));
      expect(bundleDir(data, { uids: {} })).toBe(`${data}.bundles`);
      expect(statSync(`${data}.bundles`).mode & 0o777).toBe(0o755);
      // Beside a data dir that is not there, nothing is made: the temp dir serves.
      expect(bundleDir(join(base, "absent/data"), { uids: {} })).toContain("fleet-bundles-");
      expect(existsSync(join(base, "absent"))).toBe(false);
    } finally {
      process.umask(umask);
      rmSync(base, { recursive: true, force: true });
    }
  });

  // Immutable (chattr +i, root on ext4 and the like): not even root makes a folder in it, as under
  // ProtectSystem=strict's read-only mount.
  test.skipIf(!immutableWorks())(
    "where the data dir's parent cannot be written (a service confined to its data dir), the temp dir serves",
    () => {
      const base = mkdtempSync("/var/tmp/fleet-bd-");
      chmodSync(base, 0o755);
      const data = join(base, "data");
      mkdirSync(data, { mode: 0o700 });
      expect(Bun.spawnSync(["chattr", "+i", base]).exitCode).toBe(0);
      try {
        const dir = bundleDir(data, { uids: {} });
        expect(dir).toContain("fleet-bundles-");
        expect(existsSync(`${data}.bundles`)).toBe(false);
      } finally {
        Bun.spawnSync(["chattr", "-i", base]);
        rmSync(base, { recursive: true, force: true });
      }
    },
  );

  test("one whose gateway is gone (killed with -9) is removed when another is made; a live one's is kept", () => {
    const base = mkdtempSync(join(tmpdir(), "fleet-sweep-"));
    const sleeper = Bun.spawn(["sleep", "60"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
    try {
      const dead = Bun.spawnSync(["true"]).pid;
      const names = {
        live: `fleet-bundles-${sleeper.pid}.${startTicks(sleeper.pid)}-aaaaaa`,
        dead: `fleet-bundles-${dead}.12345-bbbbbb`,
        reused: `fleet-bundles-${sleeper.pid}.1-cccccc`,
        unnamed: "fleet-bundles-dddddd",
      };
      for (const name of Object.values(names)) {
        mkdirSync(join(base, name));
        writeFileSync(join(base, name, "x.js"), "");
      }
      sweepProcessDirs(base, "fleet-bundles-");
      expect(readdirSync(base).sort()).toEqual([names.live, names.unnamed].sort());
    } finally {
      sleeper.kill("SIGKILL");
      rmSync(base, { recursive: true, force: true });
    }
  });
});

describe("BundleFiles", () => {
  test("materialises stored code once, read-only, at <dir>/<hash>.js", async () => {
    const dir = join(tempDir(), "bundles");
    const code = "export default 42;\n";
    const hash = await blake3Hex(code);
    let reads = 0;
    const files = new BundleFiles(dir, async (h) => {
      reads++;
      return h === hash ? code : null;
    });
    const path = await files.file(hash);
    expect(path).toBe(join(dir, `${hash}.js`));
    expect(statSync(path).mode & 0o777).toBe(0o444);
    expect(await Bun.file(path).text()).toBe(code);
    expect(await files.file(hash)).toBe(path);
    expect(reads).toBe(1);
  });

  test("a file another process placed meanwhile stays as it is (a sandbox may bind it); no temp is left", async () => {
    const dir = join(tempDir(), "b");
    const code = "export default 7;\n";
    const hash = await blake3Hex(code);
    const path = join(dir, `${hash}.js`);
    let placedIno = -1;
    // The store's read is where another process (a CLI on the same data dir) gets to write the file first.
    const files = new BundleFiles(dir, async () => {
      mkdirSync(dir, { recursive: true });
      writeFileSync(path, code, { mode: 0o444 });
      placedIno = statSync(path).ino;
      return code;
    });
    expect(await files.file(hash)).toBe(path);
    expect(statSync(path).ino).toBe(placedIno);
    expect(readdirSync(dir)).toEqual([`${hash}.js`]);
  });

  test("a file on disk whose bytes do not hash to its name is rewritten from the store, and logged", async () => {
    const dir = join(tempDir(), "b");
    const code = "export default 'stored';\n";
    const hash = await blake3Hex(code);
    const path = join(dir, `${hash}.js`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path, "export default 'edited';\n", { mode: 0o444 });
    const warned: object[] = [];
    const files = new BundleFiles(dir, async () => code, { warn: (obj) => warned.push(obj) });
    expect(await files.file(hash)).toBe(path);
    expect(await Bun.file(path).text()).toBe(code);
    expect(statSync(path).mode & 0o777).toBe(0o444);
    expect(warned).toEqual([{ bundle: hash, path }]);
  });

  test("refuses a bundle the store lacks, stored code not matching its hash, a name that is no hash", async () => {
    const files = new BundleFiles(join(tempDir(), "b"), async () => "export default 'tampered';\n");
    const none = new BundleFiles(join(tempDir(), "b"), async () => null);
    await expect(files.file("a".repeat(64))).rejects.toThrow("does not match its hash");
    await expect(none.file("b".repeat(64))).rejects.toThrow("not in the store");
    await expect(none.file("../../etc/passwd")).rejects.toBeInstanceOf(BundleMissing);
  });
});

describe("pinCode", () => {
  const toml = (module: string) => `[fleet]\nname = "pin"\n\n[agents.t]\nmodule = ${JSON.stringify(module)}\n`;
  /** What pinning needs, its stored bundles' hashes going to `saved`. */
  const pinDeps = (dir: string, saved: string[]) => ({
    sink: { saveBundle: async (b: { hash: string }) => void saved.push(b.hash), saveBundleMap: async () => {} },
    files: new BundleFiles(join(dir, "b"), async () => null),
    hostModules: HOST_MODULES,
    now: () => 1,
    log: silent,
  });

  test("names each type's bundle in the spec version, whose hash then covers the code", async () => {
    const dir = tempDir();
    const module = writeAgent(dir, "one");
    const saved: string[] = [];
    const deps = pinDeps(dir, saved);
    const sv = await compileSpec(toml(module), join(dir, "fleet.toml"));
    const one = await pinCode(sv, null, deps);
    if (!one.ok) throw new Error(one.problems.join());
    expect(Object.keys(one.sv.bundles)).toEqual(["t"]);
    expect(saved).toEqual([one.sv.bundles.t!]);
    expect(one.sv.textHash).toBe(sv.hash);
    expect(one.sv.hash).not.toBe(sv.hash);
    // The stored bundle is materialised from the code in hand.
    expect(await Bun.file(await deps.files.file(one.sv.bundles.t!)).text()).toContain('"one"');

    writeAgent(dir, "two");
    const two = await pinCode(sv, one.sv, deps);
    expect(two.ok && two.sv.hash).not.toBe(one.sv.hash);

    // A broken edit refuses the version that would replace working code...
    writeFileSync(join(dir, "word.ts"), "export const word = (;\n");
    const broken = await pinCode(sv, one.sv, deps);
    expect(!broken.ok && broken.problems[0]).toContain("agents.t.module cannot be bundled");
    // It names the file the error is in, with its line and column (word.ts, imported by the module).
    expect(!broken.ok && broken.problems[0]).toContain(`${join(dir, "word.ts")}:1:`);
    // ...but at start (nothing to replace) the type runs from its file and fails there as before.
    const atStart = await pinCode(sv, null, deps);
    expect(atStart.ok && atStart.sv.bundles).toEqual({});
    expect(atStart.ok && atStart.sv.hash).toBe(sv.hash);
    // A reload that leaves a type running from its file (as it started) is not refused for it...
    const still = await pinCode(sv, atStart.ok ? atStart.sv : null, deps);
    expect(still.ok).toBe(true);
  });

  test("a stored bundle naming the SDK by an install path (older releases) is kept for the same code", async () => {
    const dir = tempDir();
    const module = writeAgent(dir, "one");
    const sv = await compileSpec(toml(module), join(dir, "fleet.toml"));
    const built = await buildBundle(module, HOST_MODULES, scopeOf(module));
    if (!built.ok) throw new Error(built.error);
    const older = async (code: string) => {
      const hash = await blake3Hex(code);
      const saved: string[] = [];
      const deps = { ...pinDeps(dir, saved), files: new BundleFiles(join(tempDir(), "b"), async () => code) };
      const pinned = await pinCode(sv, await withBundles(sv, { t: hash }), deps);
      return { hash, saved, pinned: pinned.ok ? pinned.sv : null };
    };
    const legacy = built.code.replace(`from "${SDK_SPECIFIER}"`, `from "/old-install/agents/sdk/index.ts"`);
    expect(legacy).not.toBe(built.code);
    const same = await older(legacy);
    expect(same.pinned?.bundles).toEqual({ t: same.hash });
    expect(same.saved).toEqual([]);
    // Code that differs in anything else is new code.
    const other = await older(legacy.replace('"one"', '"uno"'));
    expect(other.pinned?.bundles).toEqual({ t: built.hash });
    expect(other.saved).toEqual([built.hash]);
  });

  test("a redeploy that adds a type whose module is missing or does not bundle is refused", async () => {
    const dir = tempDir();
    const module = writeAgent(dir, "one");
    const deps = pinDeps(dir, []);
    const running = await pinCode(await compileSpec(toml(module), join(dir, "fleet.toml")), null, deps);
    if (!running.ok) throw new Error(running.problems.join());
    for (const [added, problem] of [
      [join(dir, "missing.ts"), "agents.u.module cannot be bundled"],
      [join(dir, "broken.ts"), "agents.u.module cannot be bundled"],
    ] as const) {
      writeFileSync(join(dir, "broken.ts"), "export default (;\n");
      const text = `${toml(module)}\n[agents.u]\nmodule = ${JSON.stringify(added)}\n`;
      const next = await pinCode(await compileSpec(text, join(dir, "fleet.toml")), running.sv, deps);
      expect(!next.ok && next.problems).toEqual([expect.stringContaining(problem)]);
    }
  });

  test("versionOf gives the hash pinning would, stores nothing, and names a module that does not bundle", async () => {
    const dir = tempDir();
    const module = writeAgent(dir, "one");
    const sv = await compileSpec(toml(module), join(dir, "fleet.toml"));
    const saved: string[] = [];
    const pinned = await pinCode(sv, null, pinDeps(dir, saved));
    const version = await versionOf(sv, HOST_MODULES);
    expect(pinned.ok && pinned.sv.hash).toBe(version.sv.hash);
    expect(version.sv.bundles).toEqual(pinned.ok ? pinned.sv.bundles : {});
    expect(version.unbundled).toEqual([]);
    expect(saved).toHaveLength(1);

    writeFileSync(join(dir, "word.ts"), "export const word = (;\n");
    const broken = await versionOf(sv, HOST_MODULES);
    expect(broken.sv.hash).toBe(sv.hash);
    expect(broken.unbundled.map((u) => u.type)).toEqual(["t"]);
    expect(broken.unbundled[0]!.error.length).toBeGreaterThan(0);
  });
});

describe("retention of bundles", () => {
  test("bundle_uses counts the episodes naming each bundle through inserts, changes and deletes", async () => {
    const dir = tempDir();
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    try {
      const hashes = { "1": await blake3Hex("// 1"), "2": await blake3Hex("// 2") };
      const h = (c: string) => hashes[c as keyof typeof hashes] ?? c.repeat(64);
      for (const c of ["1", "2"]) await store.saveBundle({ hash: h(c), module: `/m/${c}.ts`, code: `// ${c}`, at: 1 });
      const episode = (i: number, bundle: string | null) =>
        store.db.insert(tables.episodes).values({
          id: `ep-${i}`,
          agent: "t/a" as AgentId,
          stimulusSeq: i,
          stimulusId: `id:${i}`,
          specVersion: h("a"),
          status: "committed",
          attempt: 1,
          startedAt: i,
          endedAt: i,
          eventsHash: h("e"),
          eventCount: 0,
          bundle,
        });
      const uses = async () =>
        Object.fromEntries((await store.db.select().from(tables.bundleUses).all()).map((u) => [u.bundle, u.episodes]));
      for (const [i, b] of [h("1"), h("1"), h("2"), null].entries()) await episode(i + 1, b);
      expect(await uses()).toEqual({ [h("1")]: 2, [h("2")]: 1 });
      await store.client.execute("UPDATE episodes SET bundle = NULL WHERE id = 'ep-3'");
      await store.client.execute(
        "UPDATE episodes SET bundle = (SELECT bundle FROM episodes WHERE id = 'ep-1') " + "WHERE id = 'ep-4'",
      );
      expect(await uses()).toEqual({ [h("1")]: 3 });
      await store.client.execute("DELETE FROM episodes WHERE id IN ('ep-1', 'ep-2')");
      expect(await uses()).toEqual({ [h("1")]: 1 });
      expect((await verifyStore(store)).problems).toEqual([]);
      // A count that went wrong is a verify problem: retention would trust it.
      await store.client.execute("UPDATE bundle_uses SET episodes = 5");
      expect((await verifyStore(store)).problems).toEqual([
        {
          agent: "",
          record: `bundle ${h("1").slice(0, 16)}`,
          problem: "named by 1 episode(s), counted 5 in bundle_uses",
        },
      ]);
      await store.client.execute("UPDATE bundle_uses SET episodes = 1");
      await store.client.execute("DELETE FROM episodes");
      expect(await uses()).toEqual({});
    } finally {
      await store.close();
    }
  });

  test("an offline gc long after the last deploy keeps the newest spec version's bundles", async () => {
    const store = await Store.open(join(tempDir(), "fleet.db"), { synchronous: "normal" });
    try {
      const now = Date.UTC(2026, 0, 10);
      const old = now - 60 * DAY;
      for (const c of ["6", "7"]) await store.saveBundle({ hash: c.repeat(64), module: "/m.ts", code: c, at: old });
      const version = (hash: string, at: number, bundle: string) =>
        store.saveSpecVersion({
          hash: hash.repeat(64),
          path: "/f",
          text: hash,
          summary: "",
          at,
          bundles: { t: bundle },
        });
      await version("d", old - DAY, "6".repeat(64));
      await version("e", old, "7".repeat(64)); // the newest, 60 days old: no gateway runs to name it
      const spec = (await compileSpec('[fleet]\nname = "gc"\n', "/f")).spec;
      expect((await gcPass(store, spec, { now })).bundlesDeleted).toBe(1);
      const left = (await store.client.execute("SELECT hash FROM bundles")).rows.map((x) => x.hash);
      expect(left).toEqual(["7".repeat(64)]);
    } finally {
      await store.close();
    }
  });

  test("keeps a bundle while an episode, the running spec or a recent spec version names it", async () => {
    const dir = tempDir();
    const store = await Store.open(join(dir, "fleet.db"), { synchronous: "normal" });
    try {
      const now = Date.UTC(2026, 0, 10);
      const old = now - 60 * DAY;
      const h = (c: string) => c.repeat(64);
      // `twin` shares the first 8 bytes of h("1"), saved after it: episodes name it by all 32 bytes.
      const twin = `${"1".repeat(16)}${"f".repeat(48)}`;
      for (const [c, hash] of [...["1", "2", "3", "4", "5"].map((c) => [c, h(c)]), ["twin", twin]])
        await store.saveBundle({ hash: hash!, module: `/m/${c}.ts`, code: `// ${c}`, at: old });
      for (const [i, bundle] of [h("1"), twin].entries())
        await store.db.insert(tables.episodes).values({
          id: `ep-${i + 1}`,
          agent: "t/a" as AgentId,
          stimulusSeq: i + 1,
          stimulusId: `id:${i + 1}`,
          specVersion: h("a"),
          status: "committed",
          attempt: 1,
          startedAt: now - DAY,
          endedAt: now - DAY,
          eventsHash: h("e"),
          eventCount: 0,
          bundle,
        });
      await store.saveSpecVersion({
        hash: h("b"),
        path: "/f",
        text: "",
        summary: "",
        at: now - DAY,
        bundles: { t: h("2") },
      });
      await store.saveSpecVersion({
        hash: h("c"),
        path: "/f",
        text: "x",
        summary: "",
        at: old,
        bundles: { t: h("4") },
      });
      // The episode names its bundle by the hash's first 8 bytes (store/hashes.ts `bundleColumn`).
      const raw = await store.client.execute("SELECT lower(hex(bundle)) AS b FROM episodes ORDER BY id");
      expect(raw.rows.map((x) => x.b)).toEqual(["1".repeat(16), twin]);
      expect((await store.getEpisode("ep-1"))?.bundle).toBe(h("1"));
      expect((await store.getEpisode("ep-2"))?.bundle).toBe(twin);
      const spec = (await compileSpec('[fleet]\nname = "gc"\n', "/f")).spec;
      const dry = await gcPass(store, spec, { now, dryRun: true, keepBundles: [h("3")] });
      expect(dry.bundlesDeleted).toBe(2);
      const r = await gcPass(store, spec, { now, keepBundles: [h("3")] });
      expect(r.bundlesDeleted).toBe(2);
      const left = (await store.client.execute("SELECT hash FROM bundles ORDER BY hash")).rows.map((x) => x.hash);
      expect(left).toEqual([h("1"), twin, h("2"), h("3")]);
    } finally {
      await store.close();
    }
  });
});
