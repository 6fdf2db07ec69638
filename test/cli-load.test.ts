/**
 * What a `fleet` command loads. Users' scripts and the tests call the CLI thousands of times, and every module
 * a call imports costs its parse and evaluation (the whole gateway: ~0.4 s of CPU on a small box). A read
 * loads the store and its views; `--help` loads the CLI alone; only `start` loads the broker, the episode
 * runner and the HTTP server. The list comes from the process itself: a preload writes `require.cache`
 * (every module Bun evaluated, ES modules included) to a file as the command exits.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Store } from "../gateway/store/index.ts";
import { ROOT } from "./helpers/gateway.ts";

let dir: string;
let dataDir: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "fleet-cli-load-"));
  dataDir = join(dir, "data");
  const store = await Store.open(join(dataDir, "fleet.db"), { synchronous: "normal" });
  await store.close();
  writeFileSync(
    join(dir, "preload.ts"),
    'process.on("exit", () => require("node:fs").writeFileSync(process.env.LOADED_FILE, ' +
      'Object.keys(require.cache).join("\\n")));\n',
  );
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Run `fleet <args>` on the empty data dir; its exit code and the modules it evaluated (paths). */
async function loaded(args: readonly string[]): Promise<{ code: number; modules: string[] }> {
  const file = join(dir, `loaded-${args[0]}.txt`);
  const proc = Bun.spawn(
    [process.execPath, "--preload", join(dir, "preload.ts"), join(ROOT, "gateway/cli/main.ts"), ...args],
    {
      cwd: dir,
      env: { PATH: process.env.PATH ?? "", LOADED_FILE: file, FLEET_DATA_DIR: dataDir },
      stdout: "ignore",
      stderr: "ignore",
    },
  );
  const code = await proc.exited;
  return { code, modules: readFileSync(file, "utf8").split("\n").filter(Boolean) };
}

/** The modules of the running gateway's parts that a command may not load. */
const GATEWAY_PARTS = [
  "/broker/",
  "/gateway/episode/",
  "/gateway/http/",
  "/gateway/intake/",
  "/gateway/fleet/",
  "/gateway/observe/",
  "/gateway/replication/",
  "/gateway/gateway.ts",
  "/node_modules/aedes/",
  "/node_modules/prom-client/",
  "/node_modules/pino/",
  "/node_modules/mqtt/",
  "/node_modules/zod/",
  "/node_modules/@libsql/hrana-client/",
];

const parts = (modules: readonly string[]) => GATEWAY_PARTS.filter((part) => modules.some((m) => m.includes(part)));

describe("what a fleet command loads", () => {
  test("--help loads the CLI's own files and no package", async () => {
    const { code, modules } = await loaded(["--help"]);
    expect(code).toBe(0);
    expect(modules.some((m) => m.endsWith("/gateway/cli/usage.ts"))).toBe(true);
    expect(modules.filter((m) => m.includes("/node_modules/"))).toEqual([]);
    expect(modules.filter((m) => m.includes("/gateway/store/"))).toEqual([]);
  });

  // The empty fleet answers each: no such agent or episode is exit 1, after the command ran to its end.
  const reads: [string[], number][] = [
    [["status"], 0],
    [["agents"], 0],
    [["episodes", "t/k"], 1],
    [["show", "0123"], 1],
    [["verify"], 0],
    [["token", "list"], 0],
  ];
  for (const [args, exit] of reads) {
    test(`${args.join(" ")} reads the data dir with the store alone, none of the running gateway's parts`, async () => {
      const { code, modules } = await loaded(args);
      expect(code).toBe(exit);
      expect(modules.some((m) => m.endsWith("/gateway/store/index.ts"))).toBe(true);
      expect(parts(modules)).toEqual([]);
    });
  }

  test("device add and list load the devices registry and the broker's topic rules, not the broker", async () => {
    const config = join(dir, "devices-fleet.toml");
    writeFileSync(config, '[fleet]\nname = "load"\n[broker]\ndevices = "devices.toml"\n');
    const add = await loaded(["device", "add", "sensor-1", "--config", config]);
    const list = await loaded(["device", "list", "--config", config]);
    for (const { code, modules } of [add, list]) {
      expect(code).toBe(0);
      expect(modules.some((m) => m.endsWith("/gateway/devices/registry.ts"))).toBe(true);
      // The broker's light doors (scripts/lint-imports.ts LIGHT_DOORS), nothing behind its index.
      expect(modules.filter((m) => m.includes("/broker/")).map((m) => m.slice(m.lastIndexOf("/broker/")))).toEqual(
        expect.arrayContaining(["/broker/topics.ts"]),
      );
      expect(modules.filter((m) => m.includes("/broker/") && !/\/broker\/(topics|types)\.ts$/.test(m))).toEqual([]);
      expect(
        parts(modules).filter((p) => !["/broker/", "/node_modules/zod/", "/node_modules/pino/"].includes(p)),
      ).toEqual([]);
      expect(
        modules.filter((m) => m.includes("/node_modules/aedes") || m.includes("/node_modules/mqtt-packet/")),
      ).toEqual([]);
    }
    expect(readFileSync(join(dir, "devices.toml"), "utf8")).toContain("sensor-1");
  });

  test("start loads the gateway (the list above is of modules that exist and can be loaded)", async () => {
    // A start refused for a fleet.toml that does not load: it has imported the gateway by then.
    writeFileSync(join(dir, "fleet.toml"), "[fleet\n");
    const { code, modules } = await loaded(["start", "--config", join(dir, "fleet.toml")]);
    expect(code).toBe(1);
    expect(parts(modules)).toEqual(
      GATEWAY_PARTS.filter(
        (p) => !["/gateway/replication/", "/node_modules/mqtt/", "/node_modules/@libsql/hrana-client/"].includes(p),
      ),
    );
  });
});
