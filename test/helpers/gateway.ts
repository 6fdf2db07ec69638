/**
 * End-to-end harness: runs the real gateway as a separate process exactly as a user does
 * (`bun gateway/cli/main.ts start --config F --data-dir D --mqtt-port 0 --http-port 0`), runs
 * CLI commands against its data dir, and talks MQTT to it with mqtt.js and raw sockets.
 * Every wait is bounded; nothing sleeps for a fixed time where an event can be awaited.
 */
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createClient, type Client as DbClient } from "@libsql/client";
import { connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import { idBytesSql, STATUS_COMMITTED } from "../../gateway/store/index.ts";

/** The repository root (where gateway/cli/main.ts lives). */
export const ROOT = resolve(import.meta.dir, "../..");
/** Absolute path of a test fixture agent module (world-readable: episodes run as other uids). */
export const fixture = (name: string): string => join(ROOT, "test/fixtures/agents", `${name}.ts`);
/** Absolute path of a shipped agent module. */
export const shippedAgent = (name: string): string => join(ROOT, "agents/examples", `${name}.ts`);

const BUN = process.execPath;
const CLI = join(ROOT, "gateway/cli/main.ts");

// ---- waiting ----------------------------------------------------------------------------

/**
 * Poll `probe` until it returns something other than undefined/null/false, or fail after
 * `timeoutMs` with a message naming `what` (and the last value seen, for debugging).
 */
export async function waitFor<T>(
  probe: () => T | undefined | null | false | Promise<T | undefined | null | false>,
  timeoutMs: number,
  what = "condition",
  intervalMs = 50,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown = null;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== null && v !== false) return v;
      lastErr = null;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() >= deadline) {
      const detail = lastErr ? ` (last error: ${lastErr instanceof Error ? lastErr.message : String(lastErr)})` : "";
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    }
    await Bun.sleep(intervalMs);
  }
}

/** Race a promise against a deadline. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

// ---- CLI --------------------------------------------------------------------------------

/** What a CLI run produced. `json` is the parsed stdout when it was JSON. */
export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
  readonly json: any;
}

/** Run a command to its exit (killed after `timeoutMs`), with its stdout and stderr. */
export async function runCommand(
  cmd: readonly string[],
  opts: { cwd?: string; env?: Record<string, string>; uid?: number; gid?: number; timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const { timeoutMs = 30_000, ...spawn } = opts;
  const proc = Bun.spawn([...cmd], { ...spawn, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  clearTimeout(timer);
  return { code, stdout, stderr };
}

/** Run `bun gateway/cli/main.ts <args>` from the repository root and wait (bounded) for it to exit. */
export async function runCli(
  args: readonly string[],
  opts: { env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<CliResult> {
  const { code, stdout, stderr } = await runCommand([BUN, CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, FLEET_LOG_FORMAT: "json", ...opts.env },
    timeoutMs: opts.timeoutMs,
  });
  let json: unknown;
  try {
    json = JSON.parse(stdout);
  } catch {
    // not JSON (human output or an error)
  }
  return { code, stdout, stderr, json };
}

/** `init` with `Authorization: Bearer <token>` and, unless set, `content-type: application/json`. */
export function authed(token: string, init: RequestInit = {}): RequestInit {
  const headers = new Headers(init.headers);
  headers.set("authorization", `Bearer ${token}`);
  if (!headers.has("content-type")) headers.set("content-type", "application/json");
  return { ...init, headers };
}

// ---- the gateway process ----------------------------------------------------------------

/** Ports and pid the gateway wrote to `<data-dir>/gateway.json`. */
export interface GatewayInfo {
  readonly mqtt_port: number;
  readonly http_port: number;
  readonly pid: number;
  /** Its start time in clock ticks since boot (/proc/<pid>/stat), where /proc shows it. */
  readonly pid_start?: string;
  /** The boot it runs in (/proc/sys/kernel/random/boot_id). */
  readonly boot_id?: string;
  /** Present when configured: MQTT over WebSocket, over TLS and over secure WebSocket. */
  readonly ws_port?: number;
  readonly mqtts_port?: number;
  readonly wss_port?: number;
  /** True when `[http]` serves HTTPS. */
  readonly https?: boolean;
}

/** Options of a test fleet. */
export interface FleetOptions {
  /** Extra environment for the gateway process (e.g. a secret the agents must never see). */
  readonly env?: Record<string, string>;
}

/** Temp dirs made by this process; removed by `cleanupAll` unless FLEET_E2E_KEEP is set. */
const madeDirs = new Set<string>();

/** A temp dir removed with the fleets at `cleanupAll`. */
export function scratchDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  madeDirs.add(dir);
  return dir;
}
/** Every fleet made by this process, so `cleanupAll` can stop stragglers. */
const fleets = new Set<TestFleet>();

/**
 * BENCH_PROFILE_DIR=DIR: Bun's flags that make a gateway write DIR/<name>.cpuprofile when it stops
 * (scripts/profile-summary.ts reads it), every BENCH_PROFILE_INTERVAL_US µs if set; else none
 * (and `name` is not asked for).
 */
export function cpuProfileArgs(name: () => string): string[] {
  const dir = process.env.BENCH_PROFILE_DIR;
  if (!dir) return [];
  const every = process.env.BENCH_PROFILE_INTERVAL_US;
  return [
    "--cpu-prof",
    `--cpu-prof-dir=${dir}`,
    `--cpu-prof-name=${name()}.cpuprofile`,
    ...(every ? [`--cpu-prof-interval=${every}`] : []),
  ];
}

/**
 * One fleet under test: a temp dir holding fleet.toml, the data dir and the gateway log.
 * `start()` / `stop()` / `kill()` may be called repeatedly (restarts share the data dir).
 */
export class TestFleet {
  readonly dir: string;
  readonly configPath: string;
  readonly dataDir: string;
  readonly logPath: string;
  private proc: ReturnType<typeof Bun.spawn> | null = null;
  info: GatewayInfo | null = null;
  private readonly clients = new Set<MqttClient>();

  constructor(
    toml: string,
    private readonly opts: FleetOptions = {},
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "fleet-e2e-"));
    madeDirs.add(this.dir);
    this.configPath = join(this.dir, "fleet.toml");
    this.dataDir = join(this.dir, "data");
    this.logPath = join(this.dir, "gateway.log");
    writeFileSync(this.configPath, toml);
    fleets.add(this);
  }

  /** True while the gateway process runs. */
  get running(): boolean {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** The running gateway's pid. */
  get pid(): number {
    if (!this.proc) throw new Error("gateway not started");
    return this.proc.pid;
  }

  get mqttPort(): number {
    if (!this.info) throw new Error("gateway not started");
    return this.info.mqtt_port;
  }

  get httpUrl(): string {
    if (!this.info) throw new Error("gateway not started");
    return `${this.info.https ? "https" : "http"}://127.0.0.1:${this.info.http_port}`;
  }

  /** The running gateway's per-run local admin token (the one `fleet` itself uses). */
  get token(): string {
    return readFileSync(join(this.dataDir, "local-admin.token"), "utf8").trim();
  }

  /** `fetch` a path of the running gateway's HTTP API as the local operator. */
  fetch(path: string, init: RequestInit = {}): Promise<Response> {
    return fetch(this.httpUrl + path, authed(this.token, init));
  }

  /** The last lines of the gateway log, for failure messages. */
  logTail(lines = 40): string {
    try {
      return readFileSync(this.logPath, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  /** Start the gateway and wait until gateway.json names this process and /readyz answers 200. */
  async start(timeoutMs = 30_000): Promise<GatewayInfo> {
    if (this.running) throw new Error("gateway already running");
    const fd = openSync(this.logPath, "a");
    writeFileSync(fd, `---- start ${new Date().toISOString()} ----\n`);
    const proc = Bun.spawn(
      [
        BUN,
        ...cpuProfileArgs(() => /^name\s*=\s*"([^"]+)"/m.exec(readFileSync(this.configPath, "utf8"))?.[1] ?? "fleet"),
        CLI,
        "start",
        "--config",
        this.configPath,
        "--data-dir",
        this.dataDir,
        "--mqtt-port",
        "0",
        "--http-port",
        "0",
      ],
      {
        cwd: ROOT,
        env: { ...process.env, FLEET_LOG_FORMAT: "json", FLEET_LOG_LEVEL: "debug", ...this.opts.env },
        stdin: "ignore",
        stdout: fd,
        stderr: fd,
      },
    );
    closeSync(fd);
    this.proc = proc;
    this.info = null;
    const file = join(this.dataDir, "gateway.json");
    // A gateway that exits (a refused spec) ends the wait at once, not at the timeout.
    const exited = proc.exited.then(() => {
      throw new Error(`gateway exited (code ${proc.exitCode}, signal ${proc.signalCode})`);
    });
    exited.catch(() => undefined);
    try {
      const info = await Promise.race([
        exited,
        waitFor(
          () => {
            if (proc.exitCode !== null || proc.signalCode !== null)
              throw new Error(`gateway exited (code ${proc.exitCode}, signal ${proc.signalCode})`);
            if (!existsSync(file)) return undefined;
            const g = JSON.parse(readFileSync(file, "utf8")) as GatewayInfo;
            // A kill -9 leaves the previous run's file behind: only ours counts.
            return g.pid === proc.pid ? g : undefined;
          },
          timeoutMs,
          "gateway.json",
        ),
      ]);
      const scheme = info.https ? "https" : "http";
      await waitFor(
        // The harness only probes readiness here; TLS tests check the certificate themselves.
        async () =>
          (await fetch(`${scheme}://127.0.0.1:${info.http_port}/readyz`, { tls: { rejectUnauthorized: false } }))
            .status === 200,
        timeoutMs,
        "/readyz 200",
      );
      this.info = info;
      return info;
    } catch (err) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        throw new Error(`gateway did not start: ${(err as Error).message}\n${this.logTail()}`);
      }
      proc.kill("SIGKILL");
      await proc.exited;
      throw new Error(`gateway did not become ready: ${(err as Error).message}\n${this.logTail()}`);
    }
  }

  /** SIGTERM; resolves with the exit code (bounded: SIGKILL and throw past the timeout). */
  async stop(timeoutMs = 30_000): Promise<number> {
    const proc = this.proc;
    if (!proc) throw new Error("gateway not started");
    this.closeClients();
    if (!this.running) return proc.exitCode ?? -1;
    proc.kill("SIGTERM");
    try {
      return await within(proc.exited, timeoutMs, "gateway exit after SIGTERM");
    } catch (err) {
      await this.kill();
      throw new Error(`${(err as Error).message}\n${this.logTail()}`);
    }
  }

  /**
   * kill -9 the gateway; the gateway does not get to clean up. Returns the pids of its
   * descendants (episode subprocesses) as they were just before. Unless `reap` is false
   * they are killed too, by pid, so a crash test leaves nothing behind.
   */
  async kill(opts: { reap?: boolean } = {}): Promise<number[]> {
    const proc = this.proc;
    if (!proc || !this.running) return [];
    const descendants = descendantsOf(proc.pid);
    proc.kill("SIGKILL");
    await within(proc.exited, 10_000, "gateway exit after SIGKILL");
    if (opts.reap !== false) reap(descendants);
    this.closeClients();
    return descendants;
  }

  /** The gateway's descendant processes now (episode subprocesses and their wrappers). */
  descendants(): number[] {
    return this.running ? descendantsOf(this.pid) : [];
  }

  /** Run a CLI command against this fleet's data dir with `--json`. */
  cli(...args: string[]): Promise<CliResult> {
    return runCli([...args, "--data-dir", this.dataDir, "--json"]);
  }

  /** An mqtt.js client connected to this gateway (closed on stop/kill/cleanup). */
  async mqtt(opts: IClientOptions = {}): Promise<MqttClient> {
    const c = await connectMqtt(this.mqttPort, opts);
    this.clients.add(c);
    c.on("close", () => this.clients.delete(c));
    return c;
  }

  /** Read-only SQL against the fleet's libSQL file (works while the gateway runs: WAL). */
  async query<T = Record<string, unknown>>(sql: string, args: (string | number | null)[] = []): Promise<T[]> {
    const db = openDbFile(join(this.dataDir, "fleet.db"));
    try {
      await db.execute("PRAGMA busy_timeout = 5000");
      const rs = await db.execute({ sql, args });
      return rs.rows.map((r) => ({ ...r }) as T);
    } finally {
      db.close();
    }
  }

  /** The `decide` events of one episode (its outputs, sends and denials), in order, parsed. */
  async decisions(episode: string): Promise<{ name: string; data: unknown }[]> {
    const rows = await this.query<{ data: string }>(
      `SELECT data FROM events WHERE episode = ${idBytesSql("?1")} AND kind = 'decide' ORDER BY seq`,
      [episode],
    );
    return rows.map((r) => JSON.parse(String(r.data)));
  }

  /** Episodes of an agent via `fleet episodes <agent> --json`, newest first. */
  async episodes(agent: string, limit = 10_000): Promise<EpisodeJson[]> {
    const r = await this.cli("episodes", agent, "--limit", String(limit));
    // An agent not created yet has no episodes (the command says `no agent X`, exit 1).
    if (r.code === 1 && r.stderr.includes(`no agent ${agent}`)) return [];
    if (r.code !== 0) throw new Error(`fleet episodes ${agent} exited ${r.code}: ${r.stderr}`);
    return (r.json as { episodes: EpisodeJson[] }).episodes;
  }

  /** One agent via `fleet agents --json`, or undefined. */
  async agent(id: string): Promise<AgentJson | undefined> {
    const r = await this.cli("agents", "--limit", "10000");
    if (r.code !== 0) throw new Error(`fleet agents exited ${r.code}: ${r.stderr}`);
    return (r.json as { agents: AgentJson[] }).agents.find((a) => a.id === id);
  }

  /** How many committed episodes `agent` has, counted in the store (what the waits poll). */
  async committedCount(agent: string): Promise<number> {
    const [row] = await this.query<{ n: number }>(
      `SELECT count(*) AS n FROM episodes WHERE agent = ? AND status = ${STATUS_COMMITTED}`,
      [agent],
    );
    return Number(row?.n ?? 0);
  }

  /**
   * Wait (bounded) until `probe` holds for `agent`'s episodes as `fleet episodes` lists them; returns what
   * it returned. The list is read again only when the agent's rows in the store changed (an episode row is
   * written once, at its commit or failure, and removed only by retention), so the wait costs a count per
   * poll rather than a CLI process.
   */
  async waitEpisodes<T>(
    agent: string,
    probe: (episodes: EpisodeJson[]) => T | undefined | null | false,
    timeoutMs: number,
    what: string,
    intervalMs = 100,
  ): Promise<T> {
    let read: string | null = null;
    return waitFor(
      async () => {
        const [row] = await this.query<{ stamp: string }>(
          "SELECT count(*) || ':' || coalesce(max(rowid), 0) AS stamp FROM episodes WHERE agent = ?",
          [agent],
        );
        const stamp = String(row?.stamp);
        if (stamp === read) return undefined;
        const got = probe(await this.episodes(agent));
        read = stamp;
        return got;
      },
      timeoutMs,
      what,
      intervalMs,
    );
  }

  /**
   * Wait (bounded) until `agent` has `n` committed episodes; returns them, newest first, as
   * `fleet episodes` lists them. The wait polls a count in the store: a CLI process per poll cost
   * a second of CPU on a slow box, and on a busy one the waits grew and the polls with them.
   */
  async waitCommitted(agent: string, n: number, timeoutMs = 30_000): Promise<EpisodeJson[]> {
    let seen = 0;
    try {
      return await waitFor(
        async () => {
          seen = await this.committedCount(agent);
          if (seen < n) return undefined;
          const listed = (await this.episodes(agent)).filter((e) => e.status === "committed");
          return listed.length >= n ? listed : undefined;
        },
        timeoutMs,
        `${n} committed episode(s) of ${agent}`,
        100,
      );
    } catch (err) {
      throw new Error(`${(err as Error).message}; saw ${seen}\n${this.logTail(20)}`);
    }
  }

  closeClients(): void {
    for (const c of this.clients) c.end(true);
    this.clients.clear();
  }

  /** Stop (or kill) the gateway; leaves the directory for `cleanupAll`. */
  async dispose(): Promise<void> {
    this.closeClients();
    if (this.running) {
      try {
        await this.stop(15_000);
      } catch {
        await this.kill();
      }
    }
    fleets.delete(this);
  }
}

/** An episode as `fleet episodes --json` prints it. */
export interface EpisodeJson {
  id: string;
  agent: string;
  stimulus: string;
  status: "committed" | "failed";
  error_kind: string | null;
  error: string | null;
  attempt: number;
  checkpoint: string | null;
  parent: string | null;
  started_at: number;
  ms: number;
}

/** An agent as `fleet agents --json` prints it. */
export interface AgentJson {
  id: string;
  type: string;
  key: string;
  status: string;
  reason: string | null;
  checkpoint: string | null;
  seq: number;
  episodes: number;
  failures: number;
}

/** Stop every fleet still running and remove temp dirs (keep them with FLEET_E2E_KEEP=1). */
export async function cleanupAll(): Promise<void> {
  for (const f of [...fleets]) await f.dispose();
  if (process.env.FLEET_E2E_KEEP) return;
  for (const d of madeDirs) rmSync(d, { recursive: true, force: true });
  madeDirs.clear();
}

/** Open a libSQL file directly (tests that tamper with or inspect the store). */
export function openDbFile(path: string): DbClient {
  return createClient({ url: `file:${path}` });
}

/**
 * Read `table` of the SQLite file at `path` on a connection of another process, closed for real (libSQL
 * closes a connection once it is collected), as a CLI's is: the last connection to close deletes the WAL.
 */
export async function readInAnotherProcess(path: string, table: string): Promise<void> {
  const script =
    `import { createClient } from "@libsql/client";` +
    `const c = createClient({ url: ${JSON.stringify(`file:${path}`)} });` +
    `await c.execute("SELECT count(*) FROM ${table}"); c.close(); Bun.gc(true); await Bun.sleep(20); Bun.gc(true);`;
  const child = Bun.spawn([process.execPath, "-e", script], { cwd: ROOT, stderr: "pipe" });
  const code = await child.exited;
  if (code !== 0) throw new Error(`the reader exited ${code}: ${await new Response(child.stderr).text()}`);
}

// ---- processes --------------------------------------------------------------------------

/** `/proc/<pid>/stat` fields after the command: [state, ppid, pgrp, ...]; null when gone. */
function statFields(pid: number): string[] | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command is parenthesised and may itself hold spaces or parentheses.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return null;
  }
}

/** All descendants of `root` (children first), from one scan of /proc. */
export function descendantsOf(root: number): number[] {
  const byParent = new Map<number, number[]>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const f = statFields(Number(name));
    if (!f) continue;
    const ppid = Number(f[1]);
    byParent.set(ppid, [...(byParent.get(ppid) ?? []), Number(name)]);
  }
  const out: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of byParent.get(queue.shift()!) ?? []) {
      out.push(child);
      queue.push(child);
    }
  }
  return out;
}

/** The user `nobody`, for the tests whose paths differ for a gateway that is not root. */
export const NOBODY = { uid: 65534, gid: 65534 } as const;
/** The environment those runs get: this Bun on PATH, a HOME nobody may use. */
export const NOBODY_ENV = { PATH: `${dirname(process.execPath)}:/usr/bin:/bin`, HOME: "/tmp" };

/** Whether nobody can read the checkout at `cwd` and run this Bun binary (else such tests skip). */
export function nobodyCanRun(cwd: string): boolean {
  const r = Bun.spawnSync([process.execPath, "-e", "require('node:fs').readFileSync('package.json')"], {
    ...NOBODY,
    env: NOBODY_ENV,
    cwd,
  });
  return r.exitCode === 0;
}

/** Whether a pid is alive (zombies count as gone). */
export function alive(pid: number): boolean {
  const f = statFields(pid);
  return f !== null && f[0] !== "Z";
}

/**
 * A zombie: a child of `sleep 30` (which never reaps it) that has exited; its pid once in state Z, and
 * the parent's (`end()` kills it, and so the zombie). The child ends only once its parent shell has
 * exec'd `sleep 30`: had it ended before, the shell could reap it (under load it did, and the pid was gone).
 */
export async function zombie(): Promise<{ pid: number; parent: number; end: () => void }> {
  const child = `(while [ "$(cat /proc/$$/comm)" != sleep ]; do sleep 0.01; done) & echo $!; exec sleep 30`;
  const parent = Bun.spawn(["sh", "-c", child], { stdout: "pipe", detached: true });
  const end = () => reap([parent.pid]);
  try {
    const first = await parent.stdout.getReader().read(); // the line, not the stream: sleep 30 holds it open
    const pid = Number(new TextDecoder().decode(first.value).trim());
    for (let i = 0; i < 500 && statFields(pid)?.[0] !== "Z"; i++) await Bun.sleep(20);
    if (statFields(pid)?.[0] !== "Z") throw new Error(`pid ${pid} did not become a zombie`);
    return { pid, parent: parent.pid, end };
  } catch (err) {
    end();
    throw err;
  }
}

/** CPU time a process has used, in clock ticks (utime + stime). */
export function cpuTicks(pid: number): number {
  const f = statFields(pid);
  return f ? Number(f[11]) + Number(f[12]) : 0;
}

/** SIGKILL these pids (and the process groups they lead), ignoring those already gone. */
export function reap(pids: readonly number[]): void {
  for (const pid of pids) {
    if (!alive(pid)) continue;
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // not a group leader
    }
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

// ---- MQTT -------------------------------------------------------------------------------

/** Connect an mqtt.js client (no reconnects: a dropped connection must stay visible). */
export function connectMqtt(port: number, opts: IClientOptions = {}): Promise<MqttClient> {
  return within(
    connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 10_000, ...opts }),
    15_000,
    "MQTT connect",
  );
}

/** Publish with QoS 1; resolves once the PUBACK arrived (bounded). */
export async function publishQos1(
  client: MqttClient,
  topic: string,
  payload: string | Uint8Array | object,
  timeoutMs = 15_000,
): Promise<void> {
  const body = typeof payload === "string" || payload instanceof Uint8Array ? payload : JSON.stringify(payload);
  await within(client.publishAsync(topic, body as string | Buffer, { qos: 1 }), timeoutMs, `PUBACK for ${topic}`);
}

/** One received message. */
export interface Received {
  readonly topic: string;
  readonly payload: Buffer;
  readonly text: string;
  /** Parsed JSON, or undefined when the payload is not JSON. */
  readonly json: any;
  readonly retain: boolean;
}

function toReceived(topic: string, payload: Buffer, retain: boolean): Received {
  const text = payload.toString("utf8");
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { topic, payload, text, json, retain };
}

/** Matches a topic against an MQTT filter. */
function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (t[i] === undefined) return false;
    if (f[i] !== "+" && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

/** Messages on a filter, recorded from the moment the subscription was granted. */
export class Subscription {
  readonly messages: Received[] = [];
  private readonly waiters = new Set<() => void>();
  private readonly onMessage: (topic: string, payload: Buffer, packet: { retain?: boolean }) => void;

  constructor(
    private readonly client: MqttClient,
    readonly filter: string,
  ) {
    this.onMessage = (topic, payload, packet) => {
      if (!topicMatches(filter, topic)) return;
      this.messages.push(toReceived(topic, payload, packet.retain === true));
      for (const w of this.waiters) w();
    };
    client.on("message", this.onMessage);
  }

  /** Resolve with the first truthy value of `probe(messages)`, re-checked on every message (bounded). */
  until<T>(
    probe: (msgs: readonly Received[]) => T | undefined | null | false,
    timeoutMs: number,
    what = `messages on ${this.filter}`,
  ): Promise<T> {
    let check = () => {};
    const p = new Promise<T>((resolve) => {
      check = () => {
        const v = probe(this.messages);
        if (v === undefined || v === null || v === false) return;
        this.waiters.delete(check);
        resolve(v);
      };
      this.waiters.add(check);
      check();
    });
    return within(p, timeoutMs, what).catch((err: Error) => {
      this.waiters.delete(check);
      const seen = this.messages
        .slice(-10)
        .map((m) => `  ${m.topic} ${m.text.slice(0, 200)}`)
        .join("\n");
      throw new Error(`${err.message}; last messages:\n${seen || "  (none)"}`);
    });
  }

  /** Wait for a message matching `pred`. */
  next(pred: (m: Received) => boolean, timeoutMs: number, what?: string): Promise<Received> {
    return this.until((msgs) => msgs.find(pred), timeoutMs, what);
  }

  async close(): Promise<void> {
    this.client.off("message", this.onMessage);
    this.waiters.clear();
    if (this.client.connected) await this.client.unsubscribeAsync(this.filter).catch(() => undefined);
  }
}

/** Subscribe (QoS 1) and start recording messages on `filter`. */
export async function subscribe(client: MqttClient, filter: string): Promise<Subscription> {
  const sub = new Subscription(client, filter);
  await within(client.subscribeAsync(filter, { qos: 1 }), 10_000, `SUBACK for ${filter}`);
  return sub;
}

/** Subscribe to `filter` and collect messages until `pred(messages)` holds (bounded). */
export async function collect(
  client: MqttClient,
  filter: string,
  pred: (msgs: readonly Received[]) => boolean,
  timeoutMs: number,
): Promise<Received[]> {
  const sub = await subscribe(client, filter);
  try {
    await sub.until((msgs) => pred(msgs) && true, timeoutMs, `messages on ${filter}`);
    return [...sub.messages];
  } finally {
    await sub.close();
  }
}

// ---- raw MQTT bytes (for what well-behaved clients refuse to send) ------------------------

/** The Remaining Length field of a fixed header: a variable byte integer (MQTT 3.1.1 §2.2.3). */
export function remainingLength(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return out;
}

function utf8Field(s: string): Buffer {
  const b = Buffer.from(s, "utf8");
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}

/** An MQTT 3.1.1 CONNECT packet (clean session, keepalive 60 s). */
export function connectPacket(clientId: string): Buffer {
  const body = Buffer.concat([utf8Field("MQTT"), Buffer.from([4, 0x02, 0, 60]), utf8Field(clientId)]);
  return Buffer.concat([Buffer.from([0x10, ...remainingLength(body.length)]), body]);
}

/** A PUBLISH packet; QoS 1 carries packet id `id` (1 unless given). */
export function publishPacket(topic: string, payload: Buffer | string, qos: 0 | 1, id = 1): Buffer {
  const parts = [utf8Field(topic)];
  if (qos === 1) parts.push(Buffer.from([id >> 8, id & 0xff]));
  parts.push(typeof payload === "string" ? Buffer.from(payload) : payload);
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([0x30 | (qos << 1), ...remainingLength(body.length)]), body]);
}

/** A raw TCP MQTT session: what came back and whether the server closed it. */
export class RawMqtt {
  private received = Buffer.alloc(0);
  closed = false;
  private readonly changed = new Set<() => void>();

  private constructor(readonly socket: Socket) {
    socket.on("data", (d: Buffer) => {
      this.received = Buffer.concat([this.received, d]);
      for (const w of this.changed) w();
    });
    socket.on("close", () => {
      this.closed = true;
      for (const w of this.changed) w();
    });
    socket.on("error", () => undefined);
  }

  /** Open a socket and complete CONNECT/CONNACK. */
  static async connect(port: number, clientId: string): Promise<RawMqtt> {
    const socket = netConnect({ host: "127.0.0.1", port });
    await within(
      new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject)),
      10_000,
      "TCP connect",
    );
    const raw = new RawMqtt(socket);
    socket.write(connectPacket(clientId));
    await raw.until(() => raw.received.length >= 4 || raw.closed, 10_000, "CONNACK");
    if (raw.received[0] !== 0x20 || raw.received[3] !== 0)
      throw new Error(`connection refused: ${raw.received.toString("hex")}`);
    raw.received = raw.received.subarray(4);
    return raw;
  }

  write(bytes: Buffer): void {
    if (!this.closed) this.socket.write(bytes);
  }

  /** How many PUBACKs for packet id `id` arrived since CONNACK. */
  pubacks(id: number): number {
    const ack = Buffer.from([0x40, 0x02, id >> 8, id & 0xff]);
    let n = 0;
    for (let i = this.received.indexOf(ack); i >= 0; i = this.received.indexOf(ack, i + 1)) n++;
    return n;
  }

  /** Close the socket. */
  close(): void {
    this.socket.end();
  }

  /** Whether a PUBACK arrived since CONNACK. */
  get pubacked(): boolean {
    return this.received.includes(Buffer.from([0x40, 0x02]));
  }

  /** Wait (bounded) until the server closes the connection; throws when it stays open. */
  waitClosed(timeoutMs = 10_000): Promise<void> {
    return this.until(() => this.closed, timeoutMs, "the server to close the connection");
  }

  until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    let check = () => {};
    const p = new Promise<void>((resolve) => {
      check = () => {
        if (!cond()) return;
        this.changed.delete(check);
        resolve();
      };
      this.changed.add(check);
      check();
    });
    return within(p, timeoutMs, what).finally(() => this.changed.delete(check));
  }

  destroy(): void {
    this.socket.destroy();
  }
}

// ---- small utilities ---------------------------------------------------------------------

/** A seeded PRNG (mulberry32): the crash test's "random" moments are reproducible. */
export { seeded } from "./seeded.ts";

/** Start a long-running helper process (e.g. mosquitto_sub) whose stdout lines are collected. */
export function spawnLines(cmd: string[]): {
  lines: string[];
  until(pred: (lines: readonly string[]) => boolean, timeoutMs: number, what: string): Promise<void>;
  stop(): Promise<void>;
} {
  const proc = Bun.spawn(cmd, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  void (async () => {
    const dec = new TextDecoder();
    let buf = "";
    for await (const chunk of proc.stdout as ReadableStream<Uint8Array>) {
      buf += dec.decode(chunk, { stream: true });
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
      for (const w of waiters) w();
    }
  })();
  return {
    lines,
    until(pred, timeoutMs, what) {
      let check = () => {};
      const p = new Promise<void>((resolve) => {
        check = () => {
          if (pred(lines)) {
            waiters.delete(check);
            resolve();
          }
        };
        waiters.add(check);
        check();
      });
      return within(p, timeoutMs, what).catch((err: Error) => {
        waiters.delete(check);
        throw new Error(`${err.message}; ${cmd[0]} printed:\n${lines.slice(-10).join("\n") || "(nothing)"}`);
      });
    },
    async stop() {
      proc.kill("SIGTERM");
      await within(proc.exited, 5000, `${cmd[0]} exit`).catch(() => proc.kill("SIGKILL"));
    },
  };
}

/** Conditions re-checked whenever `notify()` is called (acks, messages, kills): event-driven waits. */
export class Signal {
  private readonly checks = new Set<() => void>();

  notify(): void {
    for (const check of [...this.checks]) check();
  }

  /** Resolve once `cond()` holds; re-checked on every `notify()` (bounded). */
  wait(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    let check = () => {};
    const p = new Promise<void>((resolve) => {
      check = () => {
        if (!cond()) return;
        this.checks.delete(check);
        resolve();
      };
      this.checks.add(check);
      check();
    });
    return within(p, timeoutMs, what).finally(() => this.checks.delete(check));
  }
}
