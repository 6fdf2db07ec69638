/**
 * `agent-fleets/testing`: run an agent's episodes in-process, with no gateway, no broker
 * and no subprocess, against a recording fake `ctx`. Authors unit-test agents with
 * `bun test`:
 *
 * ```ts
 * import { testAgent, stimuli } from "agent-fleets/testing";
 * import doorWatcher from "./door-watcher.ts";
 *
 * const agent = testAgent(doorWatcher, { key: "d1", config: { open_after_ms: 60_000 }, tools: ["publish"] });
 * const run = await agent.run(stimuli.mqtt("doors/d1/state", { open: true }));
 * expect(run.decisions).toEqual([{ name: "opened", data: { at: 1000 } }]);
 * ```
 *
 * It keeps the gateway's rules that an author can trip over: tools outside the allowlist
 * throw `ToolDenied`, state must be plain JSON (`stateProblem`: else the run fails as the gateway's
 * episode does) and recorded values are copied as JSON, a throwing episode
 * leaves the state as it was (the checkpoint is not written), and `now()`/`random()` come
 * from an injectable clock and generator so a test is deterministic.
 */
import {
  type AgentRef,
  MAX_LOG_CHARS,
  MAX_WAKE_PAYLOAD_BYTES,
  shownValue,
  stateProblem,
  wakeDelayMs,
  wakeDueAt,
  wakeIdOf,
} from "../protocol.ts";
import {
  type AgentContext,
  type AgentDefinition,
  type AgentLog,
  type Stimulus,
  type TimerInfo,
  ToolDenied,
  ToolFailed,
  type Tools,
} from "./index.ts";
import { DEFAULT_TIMEOUT_MS, MAX_RECORD_BYTES, MAX_RECORDS, MAX_STATE_BYTES, publishDenial } from "./testing-rules.ts";

export { DEFAULT_TIMEOUT_MS, MAX_RECORD_BYTES, MAX_RECORDS, MAX_STATE_BYTES } from "./testing-rules.ts";

/** The names of the built-in tools (`ctx.send` is `ctx.tools.send`). */
export type ToolName = keyof Tools;

type SendFn = AgentContext<unknown>["send"];

/** Fakes for tool calls; each receives the call's arguments as the agent passed them. */
export type ToolFakes = {
  readonly [K in ToolName]?: (...args: Parameters<Tools[K]>) => unknown;
};

/**
 * A config as written, before the schema's defaults: any key may be left out, at any depth (what is
 * required is the schema's to say, and it says so on the first `run`).
 */
export type ConfigInput<C> = C extends readonly unknown[]
  ? C
  : C extends object
    ? { readonly [K in keyof C]?: ConfigInput<C[K]> }
    : C;

/** How to set up the fake agent. */
export interface TestAgentOptions<C> {
  /** Agent type (default "test"). */
  readonly type?: string;
  /** Instance key (default "k1"). */
  readonly key?: string;
  /**
   * The type's `config` table as fleet.toml would write it: keys the agent's schema fills in with
   * defaults may be left out (the schema runs on the first `run`, as the gateway runs it at deploy).
   */
  readonly config?: ConfigInput<C>;
  /** Start from this state instead of running `init`. */
  readonly state?: unknown;
  /**
   * The code version that wrote `state` (default: the agent's own `version`, so `state` is taken as
   * this code's shape): when it is below the agent's `version`, the first run migrates it with
   * `migrate` as the gateway does (docs/upgrading.md).
   */
  readonly stateVersion?: number;
  /** The type's `tools` allowlist (default: every built-in tool). `ctx.emit` is always allowed. */
  readonly tools?: readonly ToolName[];
  /**
   * The type's `publish` topic patterns (MQTT wildcards): when given, `publish` to a topic none of them
   * matches is denied (`ToolDenied`) as in the gateway; the agent's own `fleet/agents/<type>/<key>/…`
   * topics are allowed. Default: any topic.
   */
  readonly publish?: readonly string[];
  /** Results of tool calls (default: publish and send succeed; http and llm throw ToolFailed). */
  readonly fakes?: ToolFakes;
  /**
   * The type's `episode_timeout_ms` (default 5000, the gateway's): a run whose `init`, `migrate` and
   * `onStimulus` have not settled by then fails with `timeout: episode exceeded <ms> ms`, as the gateway
   * kills it. The agent's code may still be running afterwards; what it does to `ctx` then is ignored.
   */
  readonly timeoutMs?: number;
  /**
   * Clock for `ctx.now()` (default: starts at 1,000 and advances 1 ms per call). `stimuli.*` do not
   * read it: their `received_at` is `Date.now()` unless given as their `at` argument.
   */
  readonly now?: () => number;
  /** Generator for `ctx.random()` (default: a fixed sequence, so runs repeat). */
  readonly random?: () => number;
  /** The type's `max_wakeups` (default 100). */
  readonly maxWakeups?: number;
}

/** A wake-up the agent set and has not cancelled or had fired. */
export interface PendingWake {
  readonly id: string;
  readonly due_at: number;
  readonly payload: unknown;
  /** The (fake) episode that set it. */
  readonly set_by: string;
}

/** One recorded tool call. */
export interface ToolCall {
  readonly tool: ToolName;
  readonly args: readonly unknown[];
  readonly ok: boolean;
  /** What the agent got back, or the error it was thrown. */
  readonly result: unknown;
}

/** What one episode did. */
export interface EpisodeRun<S> {
  readonly stimulus: Stimulus;
  /**
   * "committed" when `onStimulus` resolved (state is the new checkpoint); "failed" when it threw,
   * timed out or left state the gateway would refuse. A failed run lists no `emits`, `published`,
   * `sent`, `wakes` or `cancelled`: the gateway delivers none of them (its `toolCalls` and `logs` stay).
   */
  readonly status: "committed" | "failed";
  /** The error it threw, when it failed. */
  readonly error: Error | null;
  /** The state after the episode (unchanged from before when it failed). */
  readonly state: S;
  /** The version this episode migrated the state from (`migrate` ran), else null. */
  readonly migratedFrom: number | null;
  readonly decisions: readonly { readonly name: string; readonly data: unknown }[];
  /** Payloads passed to `ctx.emit` (they go to `fleet/agents/<type>/<key>/out` after commit). */
  readonly emits: readonly unknown[];
  readonly toolCalls: readonly ToolCall[];
  /** Topic and payload of each allowed `publish` call. */
  readonly published: readonly { readonly topic: string; readonly payload: unknown }[];
  /** Target and payload of each allowed `send`. */
  readonly sent: readonly { readonly to: string; readonly payload: unknown }[];
  /** Wake-ups this episode set (scheduled only when it committed). */
  readonly wakes: readonly PendingWake[];
  /** Ids of wake-ups this episode cancelled. */
  readonly cancelled: readonly string[];
  readonly logs: readonly string[];
}

/** A fake agent instance whose state carries from one `run` to the next. */
export interface AgentUnderTest<S> {
  readonly agent: AgentRef;
  /** The current state (after `init` on the first run unless a state was given). */
  readonly state: S | undefined;
  /** The code version that wrote the current state (the agent's `version` once an episode committed). */
  readonly stateVersion: number;
  /** Run one episode for a stimulus. Never throws for an agent error: see `status`. */
  run(stimulus: Stimulus): Promise<EpisodeRun<S>>;
  /** Every episode run so far, oldest first. */
  readonly history: readonly EpisodeRun<S>[];
  /** Wake-ups pending now, soonest first. */
  readonly wakeups: readonly PendingWake[];
  /**
   * Fire a pending wake-up as the gateway would (a stimulus of kind `wake`): the one with
   * this id, or else the soonest. Throws when none is pending.
   */
  fireWake(id?: string): Promise<EpisodeRun<S>>;
}

const ALL_TOOLS: readonly ToolName[] = ["publish", "http", "llm", "send"];

function jsonCopy<T>(value: T, what: string): T {
  if (value === undefined) return null as T;
  const text = JSON.stringify(value);
  if (text === undefined) throw new TypeError(`${what} is not JSON-serialisable`);
  return JSON.parse(text) as T;
}

/**
 * `state` as its checkpoint would hold it; like the gateway, state that JSON would not give back as
 * it is (`stateProblem`) fails the episode, with the gateway's `invalid_state` message.
 */
function checkpointOf<S>(state: S, what: string): S {
  const problem = stateProblem(state);
  if (problem !== null) {
    const hint = problem === "state is undefined" ? " (a missing return?)" : "";
    throw new Error(`${what} cannot be checkpointed as JSON: ${problem}${hint}`);
  }
  const text = JSON.stringify(state);
  const bytes = Buffer.byteLength(text);
  if (bytes > MAX_STATE_BYTES)
    throw new Error(
      `too_large: ${what} is ${bytes} bytes as JSON, more than the ${MAX_STATE_BYTES} an episode may send the gateway`,
    );
  return JSON.parse(text) as S;
}

function defaultClock(): () => number {
  let t = 1_000;
  return () => t++;
}

function defaultRandom(): () => number {
  // A small LCG: deterministic, uniform enough for tests.
  let seed = 42;
  return () => {
    seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648;
    return seed / 2_147_483_648;
  };
}

/** Wrap an agent definition so its episodes run in-process. */
export function testAgent<S, C = Record<string, unknown>>(
  def: AgentDefinition<S, C>,
  opts: TestAgentOptions<C> = {},
): AgentUnderTest<S> {
  // Like the gateway, which refuses such a module at deploy (and fails its episodes as invalid_module).
  const made = def as Partial<AgentDefinition<S, C>> | null | undefined;
  if (made?.__fleetAgent !== true || typeof made.onStimulus !== "function")
    throw new TypeError("testAgent: the agent is not made by defineAgent() (the gateway refuses such a module)");
  const type = opts.type ?? "test";
  const key = opts.key ?? "k1";
  const agent: AgentRef = { type, key, id: `${type}/${key}` };
  let config = jsonCopy((opts.config ?? {}) as C, "config");
  let configChecked = def.config === undefined;
  /** Like the gateway: the config goes through the agent's schema first (a bad one is the test's error). */
  const checkConfig = async () => {
    if (configChecked || !def.config) return;
    const r = await def.config["~standard"].validate(config);
    if (r.issues) {
      const first = r.issues[0];
      const path = (first?.path ?? []).map((p) => String(typeof p === "object" && p !== null ? p.key : p));
      throw new TypeError(
        `config ${path.length > 0 ? `${path.join(".")} ` : ""}${first?.message} (the agent's config schema)`,
      );
    }
    config = r.value;
    configChecked = true;
  };
  const allowed = new Set(opts.tools ?? ALL_TOOLS);
  const now = opts.now ?? defaultClock();
  const random = opts.random ?? defaultRandom();
  let state: S | undefined = opts.state === undefined ? undefined : jsonCopy(opts.state as S, "initial state");
  let stateVersion = opts.stateVersion ?? def.version ?? 1;
  let episodes = 0;
  const history: EpisodeRun<S>[] = [];
  const maxWakeups = opts.maxWakeups ?? 100;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  let wakeups: PendingWake[] = [];

  async function run(stimulus: Stimulus): Promise<EpisodeRun<S>> {
    await checkConfig();
    episodes += 1;
    const decisions: { name: string; data: unknown }[] = [];
    const emits: unknown[] = [];
    const toolCalls: ToolCall[] = [];
    const published: { topic: string; payload: unknown }[] = [];
    const sent: { to: string; payload: unknown }[] = [];
    const logs: string[] = [];
    const wakes: PendingWake[] = [];
    const cancelled: string[] = [];
    const before = state;
    const episode = `test-episode-${episodes}`;
    const isPending = (id: string) =>
      (wakeups.some((w) => w.id === id) && !cancelled.includes(id)) || wakes.some((w) => w.id === id);
    const wakeAt = (at: number, payload: unknown): string => {
      if (typeof at !== "number" || !Number.isFinite(at) || at < 0)
        throw new TypeError(`wake time must be epoch milliseconds; got ${shownValue(at)}`);
      const data = jsonCopy(payload, "wake-up payload");
      if (new TextEncoder().encode(JSON.stringify(data)).length > MAX_WAKE_PAYLOAD_BYTES)
        throw new TypeError(`wake-up payload exceeds ${MAX_WAKE_PAYLOAD_BYTES} bytes`);
      const count = wakeups.length - cancelled.length + wakes.length;
      if (count >= maxWakeups)
        throw new ToolDenied("wake", `the agent already has ${count} wake-ups pending (max_wakeups ${maxWakeups})`);
      const id = wakeIdOf(episode, wakes.length + 1);
      record({ k: "wake", id, at: Math.round(at), data });
      wakes.push({ id, due_at: Math.round(at), payload: data, set_by: episode });
      return id;
    };

    /** After a timeout the gateway has killed the episode: its code touches nothing any more. */
    let ended = false;
    let recordCount = 0;
    let recordBytes = 0;
    /** Set once a limit is crossed; sticky, as in the gateway's host: an agent that catches it still fails. */
    let flood: string | null = null;
    /** One record of the episode's log, counted against the gateway's limits (its JSON as the host sends it). */
    const record = (entry: Record<string, unknown>) => {
      if (ended) throw new Error(`episode ${episode} has ended (it timed out)`);
      if (flood === null) {
        recordCount += 1;
        recordBytes += Buffer.byteLength(JSON.stringify(entry) ?? "null");
        if (recordCount > MAX_RECORDS) flood = `flood: episode wrote more than ${MAX_RECORDS} records`;
        else if (recordBytes > MAX_RECORD_BYTES) flood = `flood: episode records exceed ${MAX_RECORD_BYTES} bytes`;
      }
      if (flood !== null) throw new Error(flood);
    };
    const call = async (tool: ToolName, args: unknown[]): Promise<unknown> => {
      record({ k: "tool", tool, args });
      const jsonArgs = jsonCopy(args, `arguments of ${tool}`);
      const denied = !allowed.has(tool)
        ? new ToolDenied(tool, `tool ${tool} is not in this type's tools allowlist`)
        : tool === "publish"
          ? publishDenial(jsonArgs, agent, opts.publish ?? null)
          : null;
      if (denied) {
        toolCalls.push({ tool, args: jsonArgs, ok: false, result: denied });
        throw denied;
      }
      try {
        const fake = opts.fakes?.[tool] as ((...a: unknown[]) => unknown) | undefined;
        const result = jsonCopy(await (fake ? fake(...jsonArgs) : defaultTool(tool, jsonArgs)), `result of ${tool}`);
        toolCalls.push({ tool, args: jsonArgs, ok: true, result });
        if (tool === "publish") published.push({ topic: String(jsonArgs[0]), payload: jsonArgs[1] });
        if (tool === "send") sent.push({ to: String(jsonArgs[0]), payload: jsonArgs[1] });
        return result;
      } catch (err) {
        toolCalls.push({ tool, args: jsonArgs, ok: false, result: err });
        throw err;
      }
    };
    const tools: Tools = {
      publish: (topic, payload, options) =>
        call("publish", options === undefined ? [topic, payload] : [topic, payload, options]) as ReturnType<
          Tools["publish"]
        >,
      http: (url, init) => call("http", init === undefined ? [url] : [url, init]) as ReturnType<Tools["http"]>,
      llm: (request) => call("llm", [request]) as ReturnType<Tools["llm"]>,
      send: (to, payload) => call("send", [to, payload]) as ReturnType<SendFn>,
    };
    const send: SendFn = tools.send;
    const logAt =
      (level: string) =>
      (...args: unknown[]) => {
        // Cut as the gateway's episode host cuts a line.
        const line = args
          .map((a) => (typeof a === "string" ? a : JSON.stringify(a)))
          .join(" ")
          .slice(0, MAX_LOG_CHARS);
        record({ k: "log", level, msg: line });
        logs.push(level === "info" ? line : `[${level}] ${line}`);
      };
    const log: AgentLog = Object.assign(logAt("info"), {
      debug: logAt("debug"),
      info: logAt("info"),
      warn: logAt("warn"),
      error: logAt("error"),
    });

    let error: Error | null = null;
    let migratedFrom: number | null = null;
    const version = def.version ?? 1;
    /** The episode up to its new checkpoint (committed by the caller, and only if it came in time). */
    const episodeBody = async (): Promise<{ next: S; migrated: number | null }> => {
      let migrated: number | null = null;
      let current =
        state === undefined ? checkpointOf(await def.init({ agent, config }), "init() returned state that") : state;
      // Like the gateway: state an older version wrote is migrated inside the episode (a throw changes nothing).
      if (state !== undefined && stateVersion > version)
        throw new Error(
          `the agent's state was written by version ${stateVersion} of its code; this code is version ${version}`,
        );
      if (state !== undefined && stateVersion < version) {
        if (typeof def.migrate !== "function")
          throw new Error(
            `the agent's state was written by version ${stateVersion}; version ${version} of its code has no migrate()`,
          );
        const out = await def.migrate(jsonCopy(current, "state"), stateVersion);
        current = checkpointOf(out, `migrate() from version ${stateVersion} returned state that`);
        migrated = stateVersion;
      }
      const ctx: AgentContext<S, C> = {
        agent,
        state: jsonCopy(current, "state"),
        config,
        episode,
        decide: (name, data) => {
          const copy = jsonCopy(data, "decision data");
          record({ k: "decide", name: String(name), data: copy });
          decisions.push({ name: String(name), data: copy });
        },
        emit: (payload) => {
          const copy = jsonCopy(payload, "emitted payload");
          record({ k: "emit", data: copy });
          emits.push(copy);
        },
        send,
        tools,
        now: () => {
          const v = now();
          record({ k: "now", v });
          return v;
        },
        random: () => {
          const v = random();
          record({ k: "random", v });
          return v;
        },
        log,
        // As in the gateway: the time a delay counts from is read (and recorded) through ctx.now().
        wakeIn: (delay, payload) => {
          const ms = wakeDelayMs(delay);
          return wakeAt(wakeDueAt(delay, ms, ctx.now()), payload);
        },
        wakeAt: (at, payload) => wakeAt(at, payload),
        cancelWake: (id) => {
          if (!isPending(id)) return false;
          record({ k: "cancel_wake", id });
          const own = wakes.findIndex((w) => w.id === id);
          if (own >= 0) wakes.splice(own, 1);
          else cancelled.push(id);
          return true;
        },
      };
      await def.onStimulus(stimulus, ctx);
      if (flood !== null) throw new Error(flood);
      // Like the gateway: the new checkpoint is the state as JSON, written only on success.
      return { next: checkpointOf(ctx.state, "agent state"), migrated };
    };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const body = episodeBody();
    // Like the gateway, which kills the episode at its timeout: what the code does later is dropped.
    body.catch(() => {});
    try {
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timeout: episode exceeded ${timeoutMs} ms`)), timeoutMs);
      });
      const done = await Promise.race([body, timeout]);
      state = done.next;
      stateVersion = version;
      migratedFrom = done.migrated;
      // Like the gateway: wake-ups are scheduled and cancelled with the commit, not before.
      wakeups = [...wakeups.filter((w) => !cancelled.includes(w.id)), ...wakes].sort((a, b) => a.due_at - b.due_at);
    } catch (err) {
      error = err instanceof Error ? err : new Error(String(err));
      state = before;
    } finally {
      clearTimeout(timer);
      ended = true;
    }
    const result: EpisodeRun<S> = {
      stimulus,
      status: error === null ? "committed" : "failed",
      error,
      state: state as S,
      migratedFrom,
      decisions,
      // Like the gateway: a failed episode's emits, publishes and sends are never delivered.
      emits: error === null ? emits : [],
      toolCalls,
      published: error === null ? published : [],
      sent: error === null ? sent : [],
      wakes: error === null ? wakes : [],
      cancelled: error === null ? cancelled : [],
      logs,
    };
    history.push(result);
    return result;
  }

  return {
    agent,
    get stateVersion() {
      return stateVersion;
    },
    get state() {
      return state;
    },
    run,
    history,
    get wakeups() {
      return wakeups;
    },
    fireWake(id?: string) {
      const w = id === undefined ? wakeups[0] : wakeups.find((x) => x.id === id);
      if (!w) throw new Error(id === undefined ? "no wake-up is pending" : `wake-up ${id} is not pending`);
      wakeups = wakeups.filter((x) => x !== w);
      return run(stimuli.wake(w));
    },
  };
}

function defaultTool(tool: ToolName, args: readonly unknown[]): unknown {
  switch (tool) {
    case "publish":
      return { queued: true, topic: args[0] };
    case "send":
      return { queued: true, to: args[0] };
    case "http":
    case "llm":
      // A ToolFailed, as the gateway's call failing would be: an agent's fallback for it runs.
      throw new ToolFailed(tool, `no fake for tool ${tool}: pass fakes.${tool} to testAgent()`);
    default: {
      const never: never = tool;
      throw new Error(`unknown tool ${String(never)}`);
    }
  }
}

let seq = 0;
const stimulusId = (kind: string) => `${kind}:test-${++seq}`;

/** Build stimuli the way the gateway delivers them (payload already parsed). */
export const stimuli = {
  mqtt: (topic: string, payload: unknown, at = Date.now()): Stimulus => ({
    id: stimulusId("mqtt"),
    kind: "mqtt",
    topic,
    payload,
    received_at: at,
  }),
  /**
   * A timer fire: the payload the gateway sends (`scheduled_at`, `fired_at`, the type's timer as
   * `{ kind: "every", ms, catch_up }` or `{ kind: "cron", expr, catch_up }`).
   */
  timer: (at = Date.now(), timer: TimerInfo = { kind: "every", ms: 60_000, catch_up: "one" }): Stimulus => ({
    id: `timer:${at}`,
    kind: "timer",
    payload: { scheduled_at: at, fired_at: at, timer },
    received_at: at,
  }),
  webhook: (payload: unknown, at = Date.now()): Stimulus => ({
    id: stimulusId("webhook"),
    kind: "webhook",
    payload,
    received_at: at,
  }),
  inbox: (payload: unknown, at = Date.now()): Stimulus => ({
    id: stimulusId("inbox"),
    kind: "inbox",
    payload,
    received_at: at,
  }),
  manual: (payload: unknown, at = Date.now()): Stimulus => ({
    id: stimulusId("manual"),
    kind: "manual",
    payload,
    received_at: at,
  }),
  /** A due wake-up, as `fireWake` delivers it. */
  wake: (w: PendingWake, at = w.due_at): Stimulus => ({
    id: `wake:${w.id}`,
    kind: "wake",
    payload: w.payload,
    wake: { id: w.id, due_at: w.due_at, set_by: w.set_by },
    received_at: at,
  }),
};
