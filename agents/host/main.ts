/**
 * The episode subprocess. Spawned fresh for every episode by the gateway with a scrubbed
 * environment; it never opens the database. It waits for one `start` message, loads the
 * agent module, runs `init` (brand-new agent) and `onStimulus`, streams the episode's
 * records, asks the gateway for every tool call, and reports the final state.
 */
import { closeSync, writeFileSync, writeSync } from "node:fs";
import { getPriority, setPriority } from "node:os";
import {
  CGROUP_PROCS_FD,
  CHILD_CHANNEL_FD,
  EPISODE_OOM_SCORE_ADJ,
  JOIN_CGROUP_ARG,
  niceArg,
  encodeMessage,
  jsonNestedDeeper,
  MAX_JSON_DEPTH,
  MAX_LOG_CHARS,
  MAX_WAKE_AT,
  MAX_WAKE_PAYLOAD_BYTES,
  parseParentMessage,
  stateProblem,
  type WakeDelay,
  shownValue,
  wakeDelayMs,
  wakeDueAt,
  wakeIdOf,
  type ChildMessage,
  type ConfigCheck,
  type EpisodeRecord,
  type ParentMessage,
} from "../protocol.ts";
import * as protocol from "../protocol.ts";
import * as sdk from "../sdk/index.ts";
import {
  type AgentContext,
  type AgentDefinition,
  type ConfigSchema,
  type Stimulus,
  TerminalError,
  ToolDenied,
  ToolFailed,
} from "../sdk/index.ts";
import { LEGACY_HOST_IMPORT, legacyHostSpecifier, PROTOCOL_SPECIFIER, SDK_SPECIFIER } from "./modules.ts";
import { ReplayAnswers } from "./replay-answers.ts";

type Start = Extract<ParentMessage, { t: "start" }>;

/**
 * Defined when the gateway built this file into one script (gateway/episode/host-runtime.ts): the
 * paths of the SDK and the protocol this script was built from.
 */
declare const FLEET_HOST_MODULES: { sdk: string; protocol: string } | undefined;

/**
 * The SDK and the protocol an agent imports get this process's own copies: `instanceof ToolDenied`
 * in an agent meets the class thrown here, and nothing is loaded twice. Bundles import them by fixed
 * specifiers (./modules.ts); a module run from its file by their paths in this install (answered here
 * when built; from the sources they are the very files loaded here); bundles stored by older releases
 * by the paths of the install that built them, which may have moved or gone since.
 */
const own: Record<string, object> = { [SDK_SPECIFIER]: sdk, [PROTOCOL_SPECIFIER]: protocol };
if (typeof FLEET_HOST_MODULES !== "undefined") {
  own[FLEET_HOST_MODULES.sdk] = sdk;
  own[FLEET_HOST_MODULES.protocol] = protocol;
}
Bun.plugin({
  name: "fleet-host-runtime",
  setup(build) {
    for (const [specifier, exports] of Object.entries(own))
      build.module(specifier, () => ({ exports: exports as Record<string, unknown>, loader: "object" }));
    build.onResolve({ filter: LEGACY_HOST_IMPORT }, (args) => ({
      path: legacyHostSpecifier(args.path) ?? SDK_SPECIFIER,
      namespace: "fleet-host",
    }));
    build.onLoad({ filter: /.*/, namespace: "fleet-host" }, (args) => ({
      exports: (own[args.path] ?? sdk) as Record<string, unknown>,
      loader: "object",
    }));
  },
});

/*
 * Bun's own I/O, not node:fs / process.stdin: those two modules cost ~25 ms of start-up per
 * episode (measured: 57 vs 33 ms for an empty script that reads stdin and writes fd 3).
 */
const channel = Bun.file(CHILD_CHANNEL_FD).writer();

/**
 * One message to the gateway on the channel fd, in order (a full pipe is written as it drains).
 * `flush` false leaves it buffered for the next message's flush: one write (and one wake-up of
 * the gateway) for both.
 */
function send(msg: ChildMessage, flush = true): void {
  channel.write(encodeMessage(msg));
  if (!flush) return;
  const written = channel.flush();
  // Rejects only when the pipe broke: the gateway is gone and nobody will read the rest.
  if (typeof written !== "number") written.catch(() => process.exit(70));
}

/** Resolves once everything sent is in the pipe. */
async function drained(): Promise<void> {
  await channel.flush();
}

class Flood extends Error {}

/**
 * How long a record waits in the buffer, at most, while the agent is between tool calls: an episode
 * that hangs (awaits what never settles) and is killed at its timeout still leaves what it logged.
 */
const IDLE_FLUSH_MS = 50;

/**
 * Buffers records and flushes them before each tool call and at the end, preserving order; and
 * IDLE_FLUSH_MS after a record was buffered, when no tool call is unanswered. Not while one is: live,
 * the gateway appends a call's record when it answers, so the agent's records made meanwhile belong
 * after it (where replay puts them, `sendAhead`); they are sent once the call is answered.
 */
class Recorder {
  private buffer: EpisodeRecord[] = [];
  private count = 0;
  private bytes = 0;
  private idleFlush: Timer | null = null;
  /** Set once a limit is crossed; sticky, so an agent that catches the error still fails. */
  flood: string | null = null;
  constructor(private readonly limits: Start["limits"]) {}

  push(record: EpisodeRecord): void {
    if (this.flood !== null) throw new Flood(this.flood);
    this.count += 1;
    // Encoding here is what the gateway will receive and store; measure it once (UTF-8 bytes, as
    // the gateway counts them), refuse floods early.
    this.bytes += Buffer.byteLength(JSON.stringify(record) ?? "null");
    if (this.count > this.limits.max_records) this.flood = `episode wrote more than ${this.limits.max_records} records`;
    else if (this.bytes > this.limits.max_record_bytes)
      this.flood = `episode records exceed ${this.limits.max_record_bytes} bytes`;
    if (this.flood !== null) throw new Flood(this.flood);
    this.buffer.push(record);
    this.idleFlush ??= setTimeout(() => this.flushIfIdle(), IDLE_FLUSH_MS).unref();
  }

  private flushIfIdle(): void {
    this.idleFlush = null;
    if (this.buffer.length === 0) return;
    if (unanswered.size > 0) this.idleFlush = setTimeout(() => this.flushIfIdle(), IDLE_FLUSH_MS).unref();
    else this.flush();
  }

  /**
   * Count `record` and send it at once, ahead of what is buffered: a replayed tool call's record, at
   * the place the gateway appends it live (when the call is answered, before the agent's records
   * since its last call, which are sent with its next call or its end).
   */
  sendAhead(record: EpisodeRecord): void {
    const buffered = this.buffer;
    this.buffer = [];
    try {
      this.push(record);
      this.flush();
    } finally {
      this.buffer = buffered;
    }
  }

  /** Send what is buffered (`now` false: with the next message sent). */
  flush(now = true): void {
    if (this.buffer.length === 0) return;
    send({ t: "records", records: this.buffer }, now);
    this.buffer = [];
  }
}

/** The running episode's recorder: what it buffered is sent ahead of the episode's error too (`fail`). */
let recorder: Recorder | null = null;

const pendingTools = new Map<number, (r: { ok: boolean; result: unknown }) => void>();
/** Tool calls sent and not answered yet: the episode ends only once each is (the agent may not await one). */
const unanswered = new Set<Promise<unknown>>();
let started = false;

/** Levels of nesting a record's message adds around its value: `{ t, records: [{ k, data }] }`. */
const RECORD_WRAP = 3;

/**
 * The JSON copy of a value the agent passed; `wrap`: levels the message that carries it adds, so
 * a value the gateway would refuse as nested past MAX_JSON_DEPTH is refused here, at the call.
 */
function asJson(value: unknown, what: string, wrap = 0): unknown {
  if (value === undefined) return null;
  const text = JSON.stringify(value);
  if (text === undefined) throw new TypeError(`${what} is not JSON-serialisable`);
  if (wrap > 0 && jsonNestedDeeper(text, MAX_JSON_DEPTH - wrap))
    throw new TypeError(`${what} nests deeper than ${MAX_JSON_DEPTH - wrap} levels (arrays and objects)`);
  return JSON.parse(text);
}

function toolError(tool: string, result: unknown): Error {
  const r = (result ?? {}) as { error?: string; reason?: string };
  const reason = r.reason ?? "unknown reason";
  return r.error === "denied" ? new ToolDenied(tool, reason) : new ToolFailed(tool, reason);
}

async function run(start: Start): Promise<void> {
  const rec = new Recorder(start.limits);
  recorder = rec;
  const replay = start.replay;
  let nowIdx = 0;
  let randIdx = 0;
  let call = 0;
  const answers = replay ? new ReplayAnswers(replay.tools) : null;

  let loaded: { default?: AgentDefinition<unknown> };
  try {
    loaded = await loadAgent(start.module);
  } catch (err) {
    // A check (`fleet validate`, a deploy) says a module that throws when loaded can never run. Not so
    // a package the sandbox cannot resolve from the module's source: episodes run its bundle.
    if (start.mode !== "check" || (err instanceof Error && err.name === "ResolveMessage")) throw err;
    const why = err instanceof Error ? err.message : String(err);
    send({ t: "error", kind: "invalid_module", message: `${start.module} throws when loaded: ${why}` });
    return;
  }
  const def = loaded.default;
  if (def?.__fleetAgent !== true || typeof def.onStimulus !== "function") {
    send({
      t: "error",
      kind: "invalid_module",
      message: `${start.module} has no default export made by defineAgent()`,
    });
    return;
  }

  // The type's config, checked against the module's schema (if it has one) before any agent code.
  const checked = await checkConfig(def, start.config);
  if (start.mode === "check") {
    const check: ConfigCheck = { schema: def.config !== undefined, version: def.version ?? 1, issues: checked.issues };
    send({ t: "done", state: check });
    return;
  }
  if (checked.issues.length > 0) {
    const first = checked.issues[0]!;
    send({
      t: "error",
      kind: "terminal",
      message: `config ${[first.path.join("."), first.message].filter(Boolean).join(" ")} (the agent's config schema)`,
    });
    return;
  }
  const config = checked.value;

  const callTool = async (tool: string, args: unknown[]): Promise<unknown> => {
    call += 1;
    const id = call;
    const jsonArgs = asJson(args, `arguments of ${tool}`, 1) as unknown[];
    let outcome: { ok: boolean; result: unknown };
    // Flushed before every call, live and in replay alike, so an agent that throws after a
    // tool call leaves the same records behind in both (replay compares them).
    rec.flush();
    if (answers) {
      const answer = answers.answer(id, tool);
      unanswered.add(answer);
      const recorded = await answer.finally(() => unanswered.delete(answer));
      outcome = recorded ?? {
        ok: false,
        result: { error: "failed", reason: "replay: no recorded result for this call" },
      };
    } else {
      const answer = new Promise<{ ok: boolean; result: unknown }>((resolve) => {
        pendingTools.set(id, resolve);
        send({ t: "tool", call: id, tool, args: jsonArgs });
      });
      unanswered.add(answer);
      outcome = await answer.finally(() => unanswered.delete(answer));
    }
    // In replay the tool record is produced here (and sent at once, as the gateway appends
    // it live); live, the gateway records the call it ran.
    if (answers) rec.sendAhead({ k: "tool", call: id, tool, args: jsonArgs, ok: outcome.ok, result: outcome.result });
    if (!outcome.ok) throw toolError(tool, outcome.result);
    return outcome.result;
  };

  const tools = {
    publish: (topic: string, payload: unknown, options?: unknown) =>
      callTool("publish", options === undefined ? [topic, payload] : [topic, payload, options]),
    http: (url: string, init?: unknown) => callTool("http", init === undefined ? [url] : [url, init]),
    llm: (request: unknown) => callTool("llm", [request]),
    send: (agentId: string, payload: unknown) => callTool("send", [agentId, payload]),
  } as AgentContext<unknown>["tools"];
  const sendTo = tools.send;
  const logAt =
    (level: "debug" | "info" | "warn" | "error") =>
    (...args: unknown[]) => {
      const msg = args
        .map((a) => (typeof a === "string" ? a : safeStringify(a)))
        .join(" ")
        .slice(0, MAX_LOG_CHARS);
      rec.push({ k: "log", level, msg });
    };
  const log = Object.assign(logAt("info"), {
    debug: logAt("debug"),
    info: logAt("info"),
    warn: logAt("warn"),
    error: logAt("error"),
  });

  // Wake-ups: the pending set is read (and recorded, for replay) the first time it matters.
  let pending: Set<string> | null = null;
  let wakesSet = 0;
  const pendingWakes = (): Set<string> => {
    if (pending === null) {
      const ids = replay?.pending_wakes ?? start.wakes.pending;
      pending = new Set(ids);
      rec.push({ k: "pending_wakes", ids: [...ids] });
    }
    return pending;
  };
  const wakeAt = (at: number, payload: unknown): string => {
    if (typeof at !== "number" || !(at >= 0 && at <= MAX_WAKE_AT))
      throw new TypeError(`wake time must be epoch milliseconds; got ${shownValue(at)}`);
    const data = asJson(payload, "wake-up payload", RECORD_WRAP);
    if (Buffer.byteLength(JSON.stringify(data)) > MAX_WAKE_PAYLOAD_BYTES)
      throw new TypeError(`wake-up payload exceeds ${MAX_WAKE_PAYLOAD_BYTES} bytes`);
    const ids = pendingWakes();
    if (ids.size >= start.wakes.max)
      throw new ToolDenied(
        "wake",
        `the agent already has ${ids.size} wake-ups pending (max_wakeups ${start.wakes.max})`,
      );
    const id = wakeIdOf(start.episode, ++wakesSet);
    ids.add(id);
    rec.push({ k: "wake", id, at: Math.round(at), data });
    return id;
  };

  const ctx: AgentContext<unknown> = {
    agent: start.agent,
    state: start.state,
    config,
    episode: start.episode,
    decide: (name, data) =>
      rec.push({ k: "decide", name: String(name), data: asJson(data, "decision data", RECORD_WRAP) }),
    emit: (payload) => rec.push({ k: "emit", data: asJson(payload, "emitted payload", RECORD_WRAP) }),
    send: sendTo,
    tools,
    now: () => {
      const v = replay ? (replay.now[nowIdx++] ?? Date.now()) : Date.now();
      rec.push({ k: "now", v });
      return v;
    },
    random: () => {
      const v = replay ? (replay.random[randIdx++] ?? Math.random()) : Math.random();
      rec.push({ k: "random", v });
      return v;
    },
    log,
    wakeIn: (delay: WakeDelay, payload?: unknown) => {
      const ms = wakeDelayMs(delay);
      return wakeAt(wakeDueAt(delay, ms, ctx.now()), payload);
    },
    wakeAt: (at: number, payload?: unknown) => wakeAt(at, payload),
    cancelWake: (id: string) => {
      const was = pendingWakes().delete(String(id));
      if (was) rec.push({ k: "cancel_wake", id: String(id) });
      return was;
    },
  };

  // State written by an older version of the code is migrated first, inside this episode (docs/upgrading.md).
  const version = def.version ?? 1;
  let migratedFrom: number | undefined;
  if (start.fresh) {
    ctx.state = await def.init({ agent: start.agent, config });
    if (!stateIsJson(ctx.state, "init() returned state that")) return;
  } else {
    const from = start.state_version ?? 1;
    if (from > version) {
      send({
        t: "error",
        kind: "invalid_state",
        message: `the agent's state was written by version ${from} of its code; this code is version ${version}`,
      });
      return;
    }
    if (from < version) {
      if (typeof def.migrate !== "function") {
        send({
          t: "error",
          kind: "invalid_state",
          message: `the agent's state was written by version ${from}; version ${version} of its code has no migrate()`,
        });
        return;
      }
      rec.push({ k: "migrate", from, to: version });
      ctx.state = await def.migrate(ctx.state, from);
      if (!stateIsJson(ctx.state, `migrate() from version ${from} returned state that`)) return;
      migratedFrom = from;
    }
  }
  // The gateway builds each kind's stimulus in the shape the SDK documents (agents/sdk).
  await def.onStimulus(start.stimulus as unknown as Stimulus, ctx);
  // A call the agent did not await is answered (and recorded by the gateway) before the episode
  // ends: the gateway fails an episode that ends with a call unanswered.
  while (unanswered.size > 0) await Promise.allSettled([...unanswered]);
  if (rec.flood !== null) throw new Flood(rec.flood);
  // Checked, not copied: state that passes is sent as it is (JSON.stringify drops its undefined keys).
  if (!stateIsJson(ctx.state, "agent state")) return;
  rec.flush(false);
  send({
    t: "done",
    state: ctx.state,
    version,
    ...(migratedFrom === undefined ? {} : { migrated_from: migratedFrom }),
  });
}

/**
 * Whether `state` can be checkpointed as it is (`stateProblem`); if not, the episode fails as
 * `invalid_state` naming the path, and nothing is checkpointed. `what` says whose state it is.
 */
function stateIsJson(state: unknown, what: string): boolean {
  let problem: string | null;
  try {
    problem = stateProblem(state);
  } catch (err) {
    problem = `state cannot be read: ${err instanceof Error ? err.message : String(err)}`;
  }
  if (problem === null) return true;
  const hint = problem === "state is undefined" ? " (a missing return?)" : "";
  sendError({ kind: "invalid_state", message: `${what} cannot be checkpointed as JSON: ${problem}${hint}` });
  return false;
}

/**
 * The agent's module, by `require` where it can be: `import()` goes through Bun's event loop, and
 * a child's first turn of that loop costs ~2 ms of CPU (a garbage collection, helper threads
 * started), while a turn that never awaits anything but promises ends before the loop ever runs.
 * Bun requires ES modules too; one with a top-level await that is really pending cannot be
 * required, which Bun reports having started it, and `import()` then waits for that same
 * evaluation (the module's code runs once).
 */
async function loadAgent(path: string): Promise<{ default?: AgentDefinition<unknown> }> {
  try {
    return require(path);
  } catch (err) {
    if (!(err instanceof TypeError && /require\(\) async module/.test(err.message))) throw err;
    return await import(Bun.pathToFileURL(path).href);
  }
}

/** `config` checked against the module's schema: the parsed value, or the schema's issues with their key paths. */
async function checkConfig(
  def: AgentDefinition<unknown>,
  config: Readonly<Record<string, unknown>>,
): Promise<{ value: Readonly<Record<string, unknown>>; issues: ConfigCheck["issues"] }> {
  const schema = def.config as ConfigSchema | undefined;
  if (!schema) return { value: config, issues: [] };
  const std = schema["~standard"];
  if (typeof std?.validate !== "function")
    return {
      value: config,
      issues: [{ path: [], message: "is checked by a config schema without ~standard.validate" }],
    };
  const r = await std.validate(config);
  if (r.issues)
    return {
      value: config,
      issues: r.issues.slice(0, 20).map((i) => ({
        path: (i.path ?? []).map((p) => String(typeof p === "object" && p !== null ? p.key : p)),
        message: String(i.message).slice(0, 500),
      })),
    };
  return { value: (r.value ?? {}) as Readonly<Record<string, unknown>>, issues: [] };
}

function safeStringify(v: unknown): string {
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

function fail(err: unknown): void {
  // By name too: an agent bundled with its own copy of the SDK throws another class object.
  const terminal = err instanceof TerminalError || (err instanceof Error && err.name === "TerminalError");
  const kind = err instanceof Flood ? "flood" : terminal ? "terminal" : "threw";
  const e = err instanceof Error ? err : new Error(String(err));
  sendError({ kind, message: e.message, stack: e.stack?.slice(0, 4000) });
}

/**
 * End the episode with an error, after the records the agent made since its last tool call: a failed
 * episode's log keeps its ctx.log lines, decisions and the rest (shown, never acted on), within the
 * same caps (a flood's record past the cap was never buffered), and a replay, failing the same way,
 * leaves the same records.
 */
function sendError(error: Omit<Extract<ChildMessage, { t: "error" }>, "t">): void {
  recorder?.flush(false);
  send({ t: "error", ...error });
}

function onMessage(raw: unknown): void {
  const msg = parseParentMessage(raw);
  if (!msg) return;
  if (msg.t === "tool_result") {
    const resolve = pendingTools.get(msg.call);
    pendingTools.delete(msg.call);
    resolve?.({ ok: msg.ok, result: msg.result });
    return;
  }
  if (started) return;
  started = true;
  // The gateway kills this process group as soon as `done` or `error` arrives, so an
  // agent's stray timers or sockets cannot keep the episode alive.
  run(msg).catch(fail).then(awaitEnd);
}

/**
 * The episode's last message is written: wait, blocked in read(2), for the gateway to kill this
 * process group. Back in Bun's event loop, its first turn (~2 ms of CPU: a garbage collection,
 * helper threads started) would run in the milliseconds before the kill arrives, and so would the
 * agent's stray timers. Lines still arriving (a late tool result) are ignored; stdin's end means
 * the gateway is gone.
 */
function awaitEnd(): void {
  whenFlushed(() => {
    while (prompt("") !== null);
    process.exit(70);
  });
}

/** Run `next` once everything sent is in the pipe: at once when it is (blocking before would deadlock the pipe). */
function whenFlushed(next: () => void): void {
  const flushed = channel.flush();
  if (typeof flushed === "number") next();
  else flushed.then(next, () => process.exit(70));
}

/** Messages from the gateway: one JSON per line on stdin. */
async function readStdin(): Promise<void> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of Bun.stdin.stream()) {
    pending += decoder.decode(chunk, { stream: true });
    for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        continue; // not JSON: ignored, as a malformed message is
      }
      onMessage(msg);
    }
  }
}

process.on("unhandledRejection", (err) => {
  fail(err);
  void drained().finally(() => process.exit(1));
});

/**
 * Say "ready", then wait for the start. It is read with `prompt()`, which blocks in read(2): a
 * spare waits without waking, and an episode whose turn never awaits a timer or I/O ends without
 * Bun's event loop ever running: its first turn costs a child ~2 ms of CPU (measured, one episode
 * of the bench agent, medians of 25: 11.4 ms of CPU with this and `loadAgent`'s require, 14.5 ms
 * with an async stdin reader and import()). `prompt()` reads ahead and keeps what follows the
 * line, so nothing may follow the start before this process speaks again: the gateway sends
 * only tool results after it, each in answer to a call.
 */
function awaitStart(): void {
  channel.write(encodeMessage({ t: "ready" }));
  // Blocking before "ready" is in the pipe would wait for a start that can never come.
  whenFlushed(awaitStartLine);
}

function awaitStartLine(): void {
  // Lines before the start (not JSON, or not a start) are ignored, as malformed ones are later;
  // prompt() returns what it read ahead of them next.
  while (!started) {
    // prompt() writes its (empty) question to stdout, which the gateway does not read.
    const line = prompt("");
    // null: stdin ended before the start came (the gateway died or ended this spare).
    if (line === null) process.exit(70);
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      continue;
    }
    onMessage(msg);
  }
  // Tool results, and the end of stdin, are read once the event loop runs: stdin ends when the
  // gateway died (kill -9) and cannot kill our group. Nobody will ever read our result, so do
  // not linger on the agent's timers or a tool call that will never be answered.
  setImmediate(() => void readStdin().finally(() => process.exit(70)));
}

// Its priority first, where the gateway asks (NICE_ARG): below the gateway's, as `nice -n` would start it.
const lowerBy = niceArg(process.argv);
if (lowerBy !== null) lowerPriority(lowerBy);
// The OOM killer's first choice on a box out of memory, before the gateway (EPISODE_OOM_SCORE_ADJ).
raiseOomScore();

// The episode's memory cgroup next (the gateway passes its cgroup.procs): everything the agent's
// code allocates, and every process it starts, is then counted against memory_mb. Not there, no run.
// (No top-level await: Bun compiles no bytecode for a script that has one.)
if (process.argv.includes(JOIN_CGROUP_ARG)) void joinCgroup().then(awaitStart);
else awaitStart();

function raiseOomScore(): void {
  try {
    writeFileSync("/proc/self/oom_score_adj", String(EPISODE_OOM_SCORE_ADJ));
  } catch {
    // No writable /proc here (a box without it): the kernel chooses as it would have.
  }
}

function lowerPriority(by: number): void {
  try {
    setPriority(Math.min(19, getPriority() + by));
  } catch (err) {
    process.stderr.write(`the episode could not lower its priority: ${String(err)}\n`);
    process.exit(70);
  }
}

async function joinCgroup(): Promise<void> {
  try {
    // Written and closed here, synchronously: a FileSink would dup the descriptor and close its copy
    // when it gets to it, after the agent's code may have started (seen as fd 8 on a loaded machine).
    writeSync(CGROUP_PROCS_FD, "0");
    closeSync(CGROUP_PROCS_FD);
  } catch (err) {
    process.stderr.write(`the episode could not join its memory cgroup: ${String(err)}\n`);
    process.exit(70);
  }
}
