/**
 * Helpers for the policy end-to-end tests (test/e2e.policy.test.ts) and the policy bench
 * (scripts/bench-policy.ts), on top of the shared gateway harness: fixture paths, fleet.toml
 * blocks, a process-table reader (orphans, zombies, rlimits), local HTTP servers standing in
 * for a third-party API and an OpenAI-compatible LLM endpoint, a latency prober that
 * measures stimulus -> `out` time, and percentiles.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import { claimUids, DEFAULT_UID_BLOCKS } from "../../gateway/episode/index.ts";
import { DEFAULT_SANDBOX_UIDS } from "../../gateway/spec/index.ts";
import { ROOT, subscribe, within, type Subscription } from "./gateway.ts";
import { fleetHeader as loopbackHeader, q } from "./toml.ts";

/** argv of an episode host process: the built runtime (gateway/episode/host-runtime.ts) or its sources. */
const HOST_SCRIPT = /(?:agents\/host\/main\.ts|\/fleet-host-\d+\/host-[0-9a-f]+\.js)$/;

/** Offenders every suite shares live once, in test/fixtures/agents. */
const SHARED = { hog: "agents/hog", spin: "agents/loops" } as const;

/** Absolute path of a policy fixture agent (world-readable: episodes run as other uids). */
export const policyAgent = (
  name: "steady" | "scripted" | "probe" | "hog" | "spin" | "forkbomb" | "fdleak" | "snoop" | "logger",
): string =>
  join(ROOT, "test/fixtures", `${name in SHARED ? SHARED[name as keyof typeof SHARED] : `policy/${name}`}.ts`);

/**
 * Whether `uid` is one the sandbox runs episodes as (root, the default `[fleet] sandbox_uids`, or a
 * block above it where another gateway on the machine held the default: gateway/episode/uid-claims.ts).
 */
export function isSandboxUid(uid: number | null | undefined): boolean {
  const { first, count } = DEFAULT_SANDBOX_UIDS;
  return typeof uid === "number" && uid >= first && uid < first + DEFAULT_UID_BLOCKS * count;
}

/** Whether gateways here claim sandbox uids: root, and a usable claims folder (/run/fleet/uid-claims). */
export function uidClaimsWork(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    claimUids({ first: 4_000_000_000, count: 1 }, "a test's probe of the uid claims").release();
    return true;
  } catch {
    return false;
  }
}

/** `[fleet]`, `[broker]` and `[http]` on loopback with a 5 s drain; ports come from the harness flags. */
export function fleetHeader(name: string, o: { maxConcurrent?: number; extra?: string; fleet?: string } = {}): string {
  return loopbackHeader(name, { drainTimeoutMs: 5000, ...o });
}

/** One `[agents.<name>]` block subscribed to `<name>/+/in`, keyed by the `+`. */
export function agentBlock(
  name: string,
  module: string,
  o: {
    tools?: string[];
    publish?: string[];
    httpHosts?: string[];
    secrets?: string[];
    budget?: Record<string, number | string>;
    extra?: string;
    instances?: string[];
  } = {},
): string {
  const list = (xs: string[] | undefined) => `[${(xs ?? []).map(q).join(", ")}]`;
  const budget = o.budget
    ? `\n[agents.${name}.budget]\n${Object.entries(o.budget)
        .map(([k, v]) => `${k} = ${typeof v === "string" ? v : String(v)}`)
        .join("\n")}\n`
    : "";
  return `
[agents.${name}]
module = ${q(module)}
subscribe = [${q(`${name}/+/in`)}]
key = "{1}"
dedup = "id"
tools = ${list(o.tools)}
publish = ${list(o.publish)}
http_hosts = ${list(o.httpHosts)}
secrets = ${list(o.secrets)}
${o.instances ? `instances = ${list(o.instances)}\n` : ""}${o.extra ?? ""}${budget}`;
}

// ---- processes ----------------------------------------------------------------------------

/** One row of the process table. */
export interface Proc {
  readonly pid: number;
  readonly ppid: number;
  readonly uid: number;
  /** R, S, Z, ... */
  readonly state: string;
  /** Clock ticks since boot: with the pid, identifies a process across pid reuse. */
  readonly start: number;
  /** Process group: a warm spare's whole tree shares the spare's pid as its group. */
  readonly pgid: number;
  readonly argv: readonly string[];
}

/** The whole process table as this process can see it. */
export function processTable(): Proc[] {
  const out: Proc[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // Fields after the parenthesised command (which may hold spaces): state ppid ... starttime (22nd).
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const status = readFileSync(`/proc/${name}/status`, "utf8");
      const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1] ?? -1);
      let argv: string[] = [];
      try {
        argv = readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0").filter(Boolean);
      } catch {
        // zombie or gone
      }
      out.push({
        pid: Number(name),
        ppid: Number(f[1]),
        pgid: Number(f[2]),
        uid,
        state: f[0] ?? "?",
        start: Number(f[19]),
        argv,
      });
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

/** Every descendant of `pid` in `table`. */
export function descendantsOf(pid: number, table: readonly Proc[] = processTable()): Proc[] {
  const byParent = new Map<number, Proc[]>();
  for (const p of table) {
    const siblings = byParent.get(p.ppid);
    if (siblings) siblings.push(p);
    else byParent.set(p.ppid, [p]);
  }
  const out: Proc[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    for (const c of byParent.get(queue.shift()!) ?? []) {
      out.push(c);
      queue.push(c.pid);
    }
  }
  return out;
}

const key = (p: Proc) => `${p.pid}:${p.start}`;

/**
 * Samples the gateway's process tree while it runs: every process any episode started is
 * remembered, so after the episodes end a test can prove none of them survived (orphans
 * reparent away from the gateway, so looking at its tree afterwards would miss them).
 */
export class ProcessWatch {
  readonly seen = new Map<string, Proc>();
  /** `/proc/<pid>/limits` of the first episode host process seen (`bun <host script>`: built, or its sources). */
  hostLimits: string | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;

  constructor(private readonly gatewayPid: number) {}

  /**
   * Sample every `everyMs`, or 4x as long as the last scan took: under a fork bomb a scan reads
   * thousands of /proc entries, and a watch scanning back to back would take a core from the
   * episodes it watches (they run at nice 19, below this process).
   */
  start(everyMs = 25): this {
    const tick = () => {
      const began = performance.now();
      this.sample();
      this.timer = setTimeout(tick, Math.max(everyMs, 4 * (performance.now() - began)));
    };
    tick();
    return this;
  }

  sample(): void {
    for (const p of descendantsOf(this.gatewayPid)) {
      if (!this.seen.has(key(p))) this.seen.set(key(p), p);
      // The host process itself (`bun <script>`), not a wrapper naming the script (bwrap, prlimit, nice).
      if (this.hostLimits === null && HOST_SCRIPT.test(p.argv[1] ?? "") && p.uid !== 0) {
        try {
          this.hostLimits = readFileSync(`/proc/${p.pid}/limits`, "utf8");
        } catch {
          // gone meanwhile
        }
      }
    }
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Processes seen earlier that are still alive (same pid and start time). */
  /** Seen processes still alive, except those in the given process groups (idle warm spares). */
  survivors(exceptGroups: ReadonlySet<number> = new Set()): Proc[] {
    const alive = new Map(processTable().map((p) => [key(p), p]));
    return [...this.seen.keys()].flatMap((k) =>
      alive.has(k) && !exceptGroups.has(alive.get(k)!.pgid) ? [alive.get(k)!] : [],
    );
  }
}

/** Live processes running `/bin/sleep <marker>` (the fork bomb's sleepers). */
export function sleepersWith(marker: string, table: readonly Proc[] = processTable()): Proc[] {
  return table.filter((p) => p.argv.length === 2 && p.argv[0]!.endsWith("sleep") && p.argv[1] === marker);
}

/** Zombie children of `pid` (exited, never reaped). */
export function zombiesOf(pid: number, table: readonly Proc[] = processTable()): Proc[] {
  return table.filter((p) => p.ppid === pid && p.state === "Z");
}

/** The soft value of one limit in a `/proc/<pid>/limits` text, e.g. "Max open files". */
export function limitOf(limits: string, name: string): string | null {
  const line = limits.split("\n").find((l) => l.startsWith(name));
  return line ? (line.slice(name.length).trim().split(/\s+/)[0] ?? null) : null;
}

// ---- local servers -------------------------------------------------------------------------

/** One request a local server saw. */
export interface SeenRequest {
  readonly method: string;
  readonly path: string;
  readonly headers: Record<string, string>;
  readonly body: string;
}

/** A local stand-in for a third-party HTTP API: echoes what it received, in the body and in a header. */
export function startEchoServer(): { port: number; requests: SeenRequest[]; stop(): void } {
  const requests: SeenRequest[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      const seen = {
        method: req.method,
        path: url.pathname,
        headers: Object.fromEntries(req.headers),
        body: await req.text(),
      };
      requests.push(seen);
      // A careless API reflecting the credential back, in the body and in a header.
      return Response.json(
        { echo: seen.headers.authorization ?? null, path: seen.path },
        { headers: { "x-echo-authorization": seen.headers.authorization ?? "" } },
      );
    },
  });
  return { port: server.port!, requests, stop: () => void server.stop(true) };
}

/**
 * A local OpenAI-compatible `POST /v1/chat/completions` that answers with fixed usage; a
 * request whose last message contains "slow" is answered after `slowMs` (an episode that is
 * still running when a test kills the gateway).
 */
export function startLlmServer(
  usage: { prompt_tokens: number; completion_tokens: number },
  slowMs = 3000,
): { port: number; requests: SeenRequest[]; stop(): void } {
  const requests: SeenRequest[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      const seen = {
        method: req.method,
        path: url.pathname,
        headers: Object.fromEntries(req.headers),
        body: await req.text(),
      };
      requests.push(seen);
      if (req.method !== "POST" || url.pathname !== "/v1/chat/completions")
        return new Response("not found", { status: 404 });
      const body = JSON.parse(seen.body) as { model: string; messages: { content: string }[] };
      if (body.messages.at(-1)?.content.includes("slow")) await Bun.sleep(slowMs);
      return Response.json({
        id: `chatcmpl-${requests.length}`,
        object: "chat.completion",
        created: Math.floor(Date.now() / 1000),
        model: body.model,
        choices: [
          { index: 0, message: { role: "assistant", content: `answer ${requests.length}` }, finish_reason: "stop" },
        ],
        usage: { ...usage, total_tokens: usage.prompt_tokens + usage.completion_tokens },
      });
    },
  });
  return { port: server.port!, requests, stop: () => void server.stop(true) };
}

// ---- latency --------------------------------------------------------------------------------

/** The q-quantile (0..1) of samples, nearest rank; NaN when empty. */
export function percentile(samples: readonly number[], q: number): number {
  if (samples.length === 0) return NaN;
  const s = [...samples].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

/**
 * Sends stimuli to one agent at a steady pace and measures stimulus -> `out` latency: from
 * just before the QoS 1 publish to the arrival of the `out` message carrying the same id.
 */
export class Pinger {
  /** id -> when it was sent / when its output arrived (performance.now). */
  readonly sent = new Map<string, number>();
  readonly arrived = new Map<string, number>();
  private n = 0;
  private running = false;
  private loop: Promise<void> = Promise.resolve();
  private sub!: Subscription;

  private constructor(
    private readonly pub: MqttClient,
    readonly agent: string,
    private readonly prefix: string,
  ) {}

  /** `agent` is `<type>/<key>`; stimuli go to `<type>/<key>/in` (see `agentBlock`). */
  static async create(pub: MqttClient, sub: MqttClient, agent: string, prefix = "p"): Promise<Pinger> {
    const p = new Pinger(pub, agent, prefix);
    p.sub = await subscribe(sub, `fleet/agents/${agent}/out`);
    sub.on("message", (_topic, payload) => {
      try {
        const id = (JSON.parse(payload.toString()) as { data?: { id?: unknown } }).data?.id;
        if (typeof id === "string" && p.sent.has(id) && !p.arrived.has(id)) p.arrived.set(id, performance.now());
      } catch {
        // not ours
      }
    });
    return p;
  }

  /** Send one stimulus now; returns its id. */
  ping(): string {
    const id = `${this.prefix}${this.n++}`;
    this.sent.set(id, performance.now());
    this.pub.publish(`${this.agent}/in`, JSON.stringify({ id }), { qos: 1 });
    return id;
  }

  /** Ping every `everyMs` until `stop()`. */
  start(everyMs: number): void {
    if (this.running) return;
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        this.ping();
        await Bun.sleep(everyMs);
      }
    })();
  }

  /** Stop pinging and wait (bounded) until every ping sent so far has its output. */
  async stop(timeoutMs = 60_000): Promise<void> {
    this.running = false;
    await this.loop;
    await this.settle(timeoutMs);
  }

  /** Wait (60 s at most: the suite may load the machine) until every ping sent so far has its output. */
  settle(timeoutMs = 60_000): Promise<void> {
    return within(
      (async () => {
        while ([...this.sent.keys()].some((id) => !this.arrived.has(id))) await Bun.sleep(20);
      })(),
      timeoutMs,
      `outputs of ${this.agent} (${this.sent.size - this.arrived.size} missing)`,
    );
  }

  /** Latencies (ms) of pings sent in [from, to) (performance.now), in send order; missing outputs are Infinity. */
  latencies(from = -Infinity, to = Infinity): number[] {
    const out: number[] = [];
    for (const [id, at] of this.sent) if (at >= from && at < to) out.push((this.arrived.get(id) ?? Infinity) - at);
    return out;
  }

  async close(): Promise<void> {
    this.running = false;
    await this.sub.close();
  }
}

/** A one-line summary of latency samples. */
export function describeLatency(xs: readonly number[]): string {
  const f = (n: number) => (Number.isFinite(n) ? n.toFixed(0) : "inf");
  return (
    `n=${xs.length} p50=${f(percentile(xs, 0.5))} p95=${f(percentile(xs, 0.95))} ` +
    `p99=${f(percentile(xs, 0.99))} max=${f(Math.max(...xs))} ms`
  );
}
