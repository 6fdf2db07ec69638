/**
 * The processes a bench measures: the real gateway (`bun gateway/cli/main.ts start`) and the
 * baseline brokers (scripts/bench/bare-broker.ts), each a subprocess so the publisher in
 * the bench process never shares their event loop. Both are torn down at exit.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { cpuProfileArgs } from "../../test/helpers/gateway.ts";
import { recordPerf, summarizeRecording } from "../perf-summary.ts";
import { ROOT, defer, descendantPids, killPid, procStatusKb, tempDir, until } from "./harness.ts";

/** The trivial agent every bench fleet runs. */
export const NOOP_AGENT = join(ROOT, "scripts/bench/noop-agent.ts");

/** A fleet.toml with one agent type `bench` subscribed to `bench/+/t`, keyed by the `+`. */
export function benchFleet(o: { maxConcurrent: number; instances?: readonly string[] }): string {
  const instances =
    o.instances && o.instances.length > 0
      ? `instances = [${o.instances.map((k) => JSON.stringify(k)).join(", ")}]\n`
      : "";
  return `[fleet]
name = "bench"
max_concurrent_episodes = ${o.maxConcurrent}

[broker]
host = "127.0.0.1"

[http]
host = "127.0.0.1"

[agents.bench]
module = ${JSON.stringify(NOOP_AGENT)}
subscribe = ["bench/+/t"]
key = "{1}"
dedup = "id"
${instances}
[agents.bench.budget]
episodes_per_hour = 1000000
episode_timeout_ms = 10000
memory_mb = 128
`;
}

/** A running gateway subprocess. */
export interface GatewayProc {
  readonly pid: number;
  readonly mqttPort: number;
  readonly httpPort: number;
  readonly dataDir: string;
  readonly logFile: string;
  /** Headers of an API call as the local operator (bearer token, JSON). */
  readonly headers: Readonly<Record<string, string>>;
  /** GET/POST the gateway's HTTP API, JSON in and out. */
  api<T = unknown>(path: string, method?: "GET" | "POST"): Promise<T>;
  /** Resident set size now, kB. */
  rssKb(): number | null;
  /** SIGTERM, wait for exit (SIGKILL it and its descendants after `graceMs`). */
  stop(graceMs?: number): Promise<void>;
}

/** Start `bun gateway/cli/main.ts start` on a fresh data dir; resolves once it wrote gateway.json. */
export async function startGateway(tag: string, fleetToml: string, opts: { dir?: string } = {}): Promise<GatewayProc> {
  // `dir`: start again on a data dir an earlier gateway of this run left (a restart).
  const dir = opts.dir ?? tempDir(tag);
  const config = join(dir, "fleet.toml");
  const dataDir = join(dir, "data");
  const logFile = join(dir, "gateway.log");
  writeFileSync(config, fleetToml);
  const prof = cpuProfileArgs(() => tag);
  const proc = Bun.spawn(
    [
      process.execPath,
      ...prof,
      join(ROOT, "gateway/cli/main.ts"),
      "start",
      "--config",
      config,
      "--data-dir",
      dataDir,
      "--mqtt-port",
      "0",
      "--http-port",
      "0",
    ],
    {
      cwd: ROOT,
      env: { ...process.env, FLEET_LOG_FORMAT: "json", ...perfEnv() },
      stdin: "ignore",
      stdout: Bun.file(logFile),
      stderr: Bun.file(join(dir, "gateway.err")),
    },
  );
  const stop = defer(async () => {
    await stopProc(proc, 15_000);
  });
  const infoFile = join(dataDir, "gateway.json");
  try {
    const info = await until(
      "the gateway to write gateway.json",
      () => {
        if (proc.exitCode !== null)
          throw new Error(
            `gateway exited with ${proc.exitCode}: ${readTail(join(dir, "gateway.err"))}${readTail(logFile)}`,
          );
        if (!existsSync(infoFile)) return null;
        try {
          return JSON.parse(readFileSync(infoFile, "utf8")) as { mqtt_port: number; http_port: number };
        } catch {
          return null; // caught mid-write: read it again
        }
      },
      120_000, // 10,000 instances on a loaded machine take a while to deploy
    );
    const base = `http://127.0.0.1:${info.http_port}`;
    // The gateway's per-run local admin token: what `fleet` on this machine uses too.
    const token = readFileSync(join(dataDir, "local-admin.token"), "utf8").trim();
    const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" };
    return {
      pid: proc.pid,
      mqttPort: info.mqtt_port,
      httpPort: info.http_port,
      dataDir,
      logFile,
      headers,
      async api<T>(path: string, method: "GET" | "POST" = "GET") {
        const res = await fetch(base + path, { method, headers });
        if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${await res.text()}`);
        return (await res.json()) as T;
      },
      rssKb: () => procStatusKb(proc.pid, "VmRSS"),
      stop: async (graceMs = 15_000) => {
        await stopProc(proc, graceMs);
        await stop();
      },
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

function readTail(file: string): string {
  try {
    return readFileSync(file, "utf8").slice(-2000);
  } catch {
    return "";
  }
}

async function stopProc(proc: Bun.Subprocess, graceMs: number): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  // Remember its episode subprocesses first: if it has to be SIGKILLed they would be orphaned.
  const descendants = descendantPids(proc.pid);
  killPid(proc.pid, "SIGTERM");
  const exited = await Promise.race([proc.exited.then(() => true), Bun.sleep(graceMs).then(() => false)]);
  if (!exited) {
    killPid(proc.pid, "SIGKILL");
    await proc.exited;
  }
  for (const pid of descendants) killPid(pid, "SIGKILL");
}

/** A baseline broker subprocess (`aedes`: plain aedes + net; `embedded`: createEmbeddedBroker, no-op intake). */
export async function startBareBroker(
  mode: "aedes" | "embedded",
): Promise<{ port: number; pid: number; stop(): Promise<void> }> {
  const proc = Bun.spawn([process.execPath, join(ROOT, "scripts/bench/bare-broker.ts"), mode], {
    cwd: ROOT,
    env: { ...process.env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "inherit",
  });
  const stop = defer(() => stopProc(proc, 5000));
  const reader = (proc.stdout as ReadableStream<Uint8Array>).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) {
      await stop();
      throw new Error(`bare broker (${mode}) exited before listening`);
    }
    text += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  const { port } = JSON.parse(text.split("\n")[0]!) as { port: number };
  return { port, pid: proc.pid, stop };
}

/**
 * Run the flooding device (./flooder.ts) in its own process: `count` QoS 1 messages to `topic` at once.
 * Resolves with its report (`acked in N ms, …`) once every PUBACK is back; rejects when it fails.
 */
export async function runFlooder(port: number, topic: string, count: number): Promise<string> {
  const flooder = Bun.spawn(
    [process.execPath, join(ROOT, "scripts/bench/flooder.ts"), String(port), topic, String(count)],
    {
      stdout: "pipe",
      stderr: "inherit",
    },
  );
  const out = (await new Response(flooder.stdout).text()).trim();
  if ((await flooder.exited) !== 0) throw new Error(`the flooder failed: ${out}`);
  return out;
}

/** BENCH_PERF_DIR=DIR: gateways write JavaScriptCore's JIT dump there, which names their JS in `perf` samples. */
function perfEnv(): Record<string, string> {
  const dir = process.env.BENCH_PERF_DIR;
  if (!dir) return {};
  mkdirSync(dir, { recursive: true });
  return { BUN_JSC_useJITDump: "1", BUN_JSC_jitDumpDirectory: dir };
}

/**
 * With BENCH_PERF_DIR, `perf record` of a gateway's threads from now until `finish()`, which writes
 * DIR/<tag>.perf.txt (scripts/perf-summary.ts: CPU by JS function). Null without it.
 */
export function perfRecording(tag: string, pid: number): { finish: () => Promise<void> } | null {
  const dir = process.env.BENCH_PERF_DIR;
  if (!dir) return null;
  const data = join(dir, `${tag}.perf.data`);
  const rec = recordPerf(pid, data);
  return {
    finish: async () => {
      await rec.stop();
      writeFileSync(join(dir, `${tag}.perf.txt`), `${summarizeRecording(data, pid, dir)}\n`);
    },
  };
}
