/**
 * The IPC protocol between the gateway and an episode subprocess (agents/host/main.ts).
 * Every message is parsed at the edge with `parseChildMessage` / `parseParentMessage`;
 * past that, code trusts these types.
 *
 * Framing: one JSON message per line (`encodeMessage`). The gateway writes to the child's
 * stdin; the child writes to fd `CHILD_CHANNEL_FD`. The gateway reads that fd in chunks and
 * refuses a line past its cap before buffering it (Bun's `ipc` channel buffers whole messages).
 */

/** The child's end of its channel to the gateway (stdout stays the agent's, and is discarded). */
export const CHILD_CHANNEL_FD = 3;

/**
 * With this argument the child joins its episode's memory cgroup before it says "ready": the
 * gateway passes that cgroup's `cgroup.procs`, opened for writing, as fd `CGROUP_PROCS_FD`, and
 * the child writes "0" (itself) to it. Joining from inside costs the child the kernel's cgroup
 * migration (~0.2 ms of CPU and a few ms of waiting) and not the gateway's thread.
 */
export const JOIN_CGROUP_ARG = "--join-cgroup";
export const CGROUP_PROCS_FD = 4;

/**
 * What every episode process sets its `/proc/self/oom_score_adj` to as it starts (raising it needs no
 * privilege): when the whole box runs out of memory, the kernel's OOM killer takes episodes first,
 * not the gateway (its RSS is the largest on an idle box, and losing it stops every agent).
 */
export const EPISODE_OOM_SCORE_ADJ = 1000;

/**
 * `--nice=N`: the child lowers its own priority by N (capped at 19, as `nice -n N` does) before it
 * says "ready". The gateway passes it where the episode's session is a scheduling group whose nice
 * it sets (gateway/episode/sandbox.ts `sandboxCommand`): that group is what yields to the gateway,
 * so the `nice` wrapper's exec (~0.5 ms of CPU an episode) would buy nothing but the process's own nice.
 */
export const NICE_ARG = "--nice";

/** N of a `--nice=N` among `argv`, or null. */
export function niceArg(argv: readonly string[]): number | null {
  const digits = argv.find((a) => a.startsWith(`${NICE_ARG}=`))?.slice(NICE_ARG.length + 1) ?? "";
  return /^\d{1,2}$/.test(digits) && Number(digits) <= 39 ? Number(digits) : null;
}

/** Longest `ctx.log` line, in characters (the host truncates; the gateway refuses longer ones). */
export const MAX_LOG_CHARS = 4096;

/** Most bytes of one wake-up's payload (as JSON): it waits on disk until it fires. */
export const MAX_WAKE_PAYLOAD_BYTES = 64 * 1024;

/** Latest epoch ms a wake-up may be set for (the largest valid Date). */
export const MAX_WAKE_AT = 8.64e15;

/**
 * How deep JSON may nest, in anything that reaches an episode's event log: a payload nested deeper
 * is given to the agent as its text, a message from the subprocess nested deeper fails the episode
 * (`protocol`), an http tool's response body is not parsed. The log is stored as SQLite JSONB, whose
 * parser refuses nesting past 1000 levels: one such value would make every commit of its episode fail.
 */
export const MAX_JSON_DEPTH = 200;

/**
 * Whether JSON text (a string, or its UTF-8 bytes) nests arrays and objects deeper than `max`.
 * A scan of brackets outside strings: the text is assumed to be JSON (parsed already, or about to be).
 */
export function jsonNestedDeeper(text: string | Uint8Array, max = MAX_JSON_DEPTH): boolean {
  // Nesting past `max` takes more than `max` opening brackets.
  if (text.length <= max) return false;
  const at = typeof text === "string" ? (i: number) => text.charCodeAt(i) : (i: number) => text[i]!;
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = at(i);
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b || c === 0x5b) {
      if (++depth > max) return true;
    } else if (c === 0x7d || c === 0x5d) depth--;
  }
  return false;
}

/**
 * Why `state` would not come back from its checkpoint as the agent left it, naming where
 * (`state.readings is a Map`), or null when it would: state is plain JSON (agents/README.md), and
 * JSON turns a Map, a Set or a class instance into `{}`, a Date into a string, NaN into null, and
 * drops a function. An `undefined` key is dropped as documented; `undefined` as the state itself
 * (an `init` or `migrate` without a `return`) or in an array is refused. One walk of the value;
 * nesting past what the gateway accepts (MAX_JSON_DEPTH with the message around it), a cycle
 * among them, is refused too.
 */
export function stateProblem(state: unknown): string | null {
  const found = problemAt(state, 1);
  if (found === null) return null;
  // The path from the state down, its first 8 steps (a cycle's path is long and says nothing more).
  const steps = found.path.length;
  let path = "state";
  for (let i = steps - 1; i >= Math.max(0, steps - 8); i--) {
    const key = found.path[i]!;
    path +=
      typeof key === "number" ? `[${key}]` : /^[A-Za-z_$][\w$]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
  }
  return `${path}${steps > 8 ? "…" : ""} ${found.what}`;
}

/** What is wrong at `value` (`depth` levels of arrays and objects down), with its path reversed. */
function problemAt(value: unknown, depth: number): { what: string; path: (string | number)[] } | null {
  switch (typeof value) {
    case "string":
    case "boolean":
      return null;
    case "number":
      return Number.isFinite(value) ? null : { what: `is ${value}`, path: [] };
    case "undefined":
      return { what: "is undefined", path: [] };
    case "function":
      return { what: "is a function", path: [] };
    case "bigint":
      return { what: "is a BigInt", path: [] };
    case "symbol":
      return { what: "is a symbol", path: [] };
  }
  if (value === null) return null;
  // The state is one level inside the `done` message, which may nest MAX_JSON_DEPTH levels.
  if (depth >= MAX_JSON_DEPTH) return { what: `nests deeper than ${MAX_JSON_DEPTH - 1} levels (a cycle?)`, path: [] };
  const proto = Object.getPrototypeOf(value);
  if (Array.isArray(value) && proto === Array.prototype) {
    for (let i = 0; i < value.length; i++) {
      const found = problemAt(value[i], depth + 1);
      if (found !== null) {
        found.path.push(i);
        return found;
      }
    }
    return null;
  }
  if (proto !== Object.prototype && proto !== null) {
    const name = typeof proto?.constructor === "function" ? proto.constructor.name : "";
    const what = /^(Map|Set|Date|RegExp|Promise|WeakMap|WeakSet|Error)$/.test(name)
      ? `is a ${name}`
      : `is an instance of ${name || "a class"}`;
    return { what, path: [] };
  }
  const obj = value as Record<string, unknown>;
  for (const key in obj) {
    const v = obj[key];
    if (v === undefined) continue;
    const found = problemAt(v, depth + 1);
    if (found !== null) {
      found.path.push(key);
      return found;
    }
  }
  return null;
}

/** The id of the `n`th wake-up (1-based) an episode sets: unique per episode, the same in a replay. */
export function wakeIdOf(episode: string, n: number): string {
  return `${episode}.w${n}`;
}

/** A delay for `ctx.wakeIn`: milliseconds, or a number with a unit ("500ms", "10s", "5m", "2h", "1d"). */
export type WakeDelay = number | `${number}${"ms" | "s" | "m" | "h" | "d"}`;

const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** Milliseconds of a `WakeDelay`; throws a TypeError naming the bad value. */
export function wakeDelayMs(delay: WakeDelay): number {
  if (typeof delay === "number") {
    if (Number.isFinite(delay) && delay >= 0) return delay;
  } else if (typeof delay === "string") {
    const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(delay.trim());
    if (m) return Number(m[1]) * UNIT_MS[m[2] as keyof typeof UNIT_MS];
  }
  throw new TypeError(`wake delay must be milliseconds >= 0 or like "10s", "5m", "2h"; got ${shownValue(delay)}`);
}

/** When a wake-up `delay` after `now` is due; a TypeError naming the delay when that is past MAX_WAKE_AT. */
export function wakeDueAt(delay: WakeDelay, ms: number, now: number): number {
  const at = now + ms;
  if (at > MAX_WAKE_AT)
    throw new TypeError(
      `wake delay ${shownValue(delay)} is too long: it would be due after the latest time a wake-up may be set ` +
        `for (${MAX_WAKE_AT} ms, in the year 275760)`,
    );
  return at;
}

/** A wake time or delay as an error message shows it: NaN and Infinity as such, not JSON's null. */
export function shownValue(v: unknown): string {
  if (typeof v === "number" || typeof v === "bigint" || v === undefined) return String(v);
  if (typeof v === "string") return JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}...` : v);
  try {
    return JSON.stringify(v)?.slice(0, 80) ?? typeof v;
  } catch {
    return typeof v;
  }
}

/** Log levels of a `log` record. */
export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;

/** One message on the wire: its JSON and a newline (JSON text never holds a raw newline). */
export function encodeMessage(msg: ChildMessage | ParentMessage): string {
  return `${JSON.stringify(msg)}\n`;
}

/** An agent's identity as the subprocess sees it. */
export interface AgentRef {
  readonly type: string;
  readonly key: string;
  /** `<type>/<key>` */
  readonly id: string;
}

/** What woke the agent (agents/README.md). */
export interface Stimulus {
  readonly id: string;
  readonly kind: "mqtt" | "timer" | "webhook" | "inbox" | "manual" | "wake";
  readonly topic?: string;
  /** Parsed JSON when the payload was JSON, else the payload as a string. */
  readonly payload: unknown;
  /** Epoch milliseconds. */
  readonly received_at: number;
  /** Kind `wake` only: which wake-up fired, when it was due, and the episode that set it. */
  readonly wake?: WakeInfo;
}

/** What a `wake` stimulus says about its wake-up. */
export interface WakeInfo {
  readonly id: string;
  /** Epoch ms it was set for. */
  readonly due_at: number;
  /** The episode that set it. */
  readonly set_by: string;
}

/** One entry of an episode's event log, in the order it happened. */
export type EpisodeRecord =
  | { readonly k: "decide"; readonly name: string; readonly data: unknown }
  | { readonly k: "emit"; readonly data: unknown }
  | { readonly k: "send"; readonly to: string; readonly data: unknown }
  | { readonly k: "now"; readonly v: number }
  | { readonly k: "random"; readonly v: number }
  | { readonly k: "log"; readonly level: "debug" | "info" | "warn" | "error"; readonly msg: string }
  /** `ctx.wakeIn` / `ctx.wakeAt`: scheduled with the episode's commit. */
  | { readonly k: "wake"; readonly id: string; readonly at: number; readonly data: unknown }
  /** `ctx.cancelWake`: cancelled with the episode's commit (no-op for an id that is not pending). */
  | { readonly k: "cancel_wake"; readonly id: string }
  /** The episode migrated the agent's state from an older `version` of the code (docs/upgrading.md). */
  | { readonly k: "migrate"; readonly from: number; readonly to: number }
  /** The agent's pending wake-ups as the episode first looked at them (replay answers from it). */
  | { readonly k: "pending_wakes"; readonly ids: readonly string[] }
  | {
      readonly k: "tool";
      readonly call: number;
      readonly tool: string;
      readonly args: readonly unknown[];
      readonly ok: boolean;
      readonly result: unknown;
    };

/** Recorded inputs that make a replay deterministic. */
export interface ReplayInputs {
  readonly now: readonly number[];
  readonly random: readonly number[];
  /**
   * Tool results in the order the episode got them (concurrent calls complete out of call order),
   * each with its call id (1-based, in call order).
   */
  readonly tools: readonly {
    readonly call: number;
    readonly tool: string;
    readonly ok: boolean;
    readonly result: unknown;
  }[];
  /** The pending wake-ups the recorded episode saw, when it used wake-ups. */
  readonly pending_wakes?: readonly string[];
}

/** Gateway -> subprocess. */
export type ParentMessage =
  | {
      readonly t: "start";
      readonly episode: string;
      readonly agent: AgentRef;
      /** Absolute path of the agent module. */
      readonly module: string;
      readonly config: Readonly<Record<string, unknown>>;
      /** The last checkpoint's state, or null for a brand-new agent (run `init`). */
      readonly state: unknown;
      /** The code version that wrote `state` (its checkpoint's `state_version`; 1 when it records none). */
      readonly state_version?: number;
      readonly fresh: boolean;
      readonly stimulus: Stimulus;
      /** Present when replaying: tools are answered from here, `now`/`random` return these. */
      readonly replay: ReplayInputs | null;
      /** Limits the subprocess enforces on itself before the gateway has to. */
      readonly limits: { readonly max_records: number; readonly max_record_bytes: number };
      /** The agent's pending wake-ups (ids) and how many it may have pending at once. */
      readonly wakes: { readonly pending: readonly string[]; readonly max: number };
      /**
       * `check`: only load the module and check `config` against its schema; `done`'s state
       * is then a `ConfigCheck`. No agent code beyond the module's top level and schema runs.
       */
      readonly mode?: "check";
    }
  | { readonly t: "tool_result"; readonly call: number; readonly ok: boolean; readonly result: unknown };

/** The state a `check` run reports: the config schema's complaints, if any. */
export interface ConfigCheck {
  /** False when the module declares no config schema. */
  readonly schema: boolean;
  /** The module's `defineAgent({ version })` (1 when it sets none). */
  readonly version?: number;
  readonly issues: readonly { readonly path: readonly string[]; readonly message: string }[];
}

/** Most issues, path levels and message characters a check's answer holds (the host sends 20 of 500). */
const MAX_CHECK_ISSUES = 20;
const MAX_CHECK_PATH = 64;
const MAX_CHECK_MESSAGE = 500;

/**
 * A `check` run's `done` state as the host writes it, or null. The module's top level runs in that
 * process and can write to the channel before the host does: nothing else is taken.
 */
export function parseConfigCheck(raw: unknown): ConfigCheck | null {
  if (!isObj(raw)) return null;
  const { schema, version = 1, issues } = raw;
  if (typeof schema !== "boolean" || !isVersion(version)) return null;
  if (!Array.isArray(issues) || issues.length > MAX_CHECK_ISSUES) return null;
  const parsed: { path: string[]; message: string }[] = [];
  for (const i of issues) {
    if (!isObj(i)) return null;
    const { path, message } = i;
    if (!Array.isArray(path) || path.length > MAX_CHECK_PATH || !path.every((p) => typeof p === "string")) return null;
    if (typeof message !== "string" || message.length > MAX_CHECK_MESSAGE) return null;
    parsed.push({ path: path as string[], message });
  }
  return { schema, version, issues: parsed };
}

/** A state version of agent code (`defineAgent({ version })`, a migration's ends): an integer from 1. */
function isVersion(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 1;
}

/** Subprocess -> gateway. `records` batches are flushed before every tool call and at the end. */
export type ChildMessage =
  | { readonly t: "ready" }
  | { readonly t: "records"; readonly records: readonly EpisodeRecord[] }
  | { readonly t: "tool"; readonly call: number; readonly tool: string; readonly args: readonly unknown[] }
  /**
   * `version`: the code's `defineAgent({ version })`. A claim the gateway checks, never stamps: the new
   * checkpoint records the version the gateway read from the code itself (gateway/episode/state-version.ts).
   */
  | { readonly t: "done"; readonly state: unknown; readonly version?: number; readonly migrated_from?: number }
  | {
      readonly t: "error";
      /** `terminal`: the agent threw `TerminalError` (no retry will help). */
      readonly kind: "threw" | "terminal" | "invalid_module" | "invalid_state" | "flood";
      readonly message: string;
      readonly stack?: string;
    };

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * Parse a message from the subprocess; null when it is not a well-formed `ChildMessage`.
 * Live, `tool` records come only from the gateway (a child cannot forge a tool result);
 * in a replay the child answers tools from the recording and records them itself.
 */
export function parseChildMessage(raw: unknown, opts: { replay: boolean } = { replay: false }): ChildMessage | null {
  if (!isObj(raw)) return null;
  switch (raw.t) {
    case "ready":
      return { t: "ready" };
    case "records": {
      if (!Array.isArray(raw.records)) return null;
      const records: EpisodeRecord[] = [];
      for (const r of raw.records) {
        const rec = parseRecord(r, opts);
        if (!rec) return null;
        records.push(rec);
      }
      return { t: "records", records };
    }
    case "tool":
      if (typeof raw.call !== "number" || typeof raw.tool !== "string" || !Array.isArray(raw.args)) return null;
      return { t: "tool", call: raw.call, tool: raw.tool, args: raw.args };
    case "done": {
      if (
        (raw.version !== undefined && !isVersion(raw.version)) ||
        (raw.migrated_from !== undefined && !isVersion(raw.migrated_from))
      )
        return null;
      return {
        t: "done",
        state: raw.state,
        ...(raw.version === undefined ? {} : { version: raw.version as number }),
        ...(raw.migrated_from === undefined ? {} : { migrated_from: raw.migrated_from as number }),
      };
    }
    case "error": {
      const kinds = ["threw", "terminal", "invalid_module", "invalid_state", "flood"] as const;
      const kind = kinds.find((k) => k === raw.kind);
      if (!kind || typeof raw.message !== "string") return null;
      return { t: "error", kind, message: raw.message, stack: typeof raw.stack === "string" ? raw.stack : undefined };
    }
    default:
      return null;
  }
}

/**
 * One record as the child sent it, rebuilt from its known fields; null when any field is
 * not what the kind requires (a `log` with an unknown level, a `now` that is not a number, …).
 */
export function parseRecord(r: unknown, opts: { replay: boolean }): EpisodeRecord | null {
  if (!isObj(r)) return null;
  switch (r.k) {
    case "decide":
      return typeof r.name === "string" ? { k: "decide", name: r.name, data: r.data ?? null } : null;
    case "emit":
      return { k: "emit", data: r.data ?? null };
    case "send":
      return typeof r.to === "string" ? { k: "send", to: r.to, data: r.data ?? null } : null;
    case "now":
      return typeof r.v === "number" && Number.isFinite(r.v) ? { k: "now", v: r.v } : null;
    case "random":
      return typeof r.v === "number" && r.v >= 0 && r.v < 1 ? { k: "random", v: r.v } : null;
    case "log": {
      const level = LOG_LEVELS.find((l) => l === r.level);
      if (!level || typeof r.msg !== "string" || r.msg.length > MAX_LOG_CHARS) return null;
      return { k: "log", level, msg: r.msg };
    }
    case "wake": {
      if (
        typeof r.id !== "string" ||
        r.id.length > 200 ||
        typeof r.at !== "number" ||
        !(r.at >= 0 && r.at <= MAX_WAKE_AT)
      )
        return null;
      const data = r.data ?? null;
      if (Buffer.byteLength(JSON.stringify(data)) > MAX_WAKE_PAYLOAD_BYTES) return null;
      return { k: "wake", id: r.id, at: r.at, data };
    }
    case "cancel_wake":
      return typeof r.id === "string" && r.id.length <= 200 ? { k: "cancel_wake", id: r.id } : null;
    case "migrate":
      return isVersion(r.from) && isVersion(r.to) ? { k: "migrate", from: r.from, to: r.to } : null;
    case "pending_wakes":
      return Array.isArray(r.ids) && r.ids.every((id) => typeof id === "string")
        ? { k: "pending_wakes", ids: r.ids as string[] }
        : null;
    case "tool":
      // Live, the gateway writes tool records itself: a child cannot forge a result.
      if (!opts.replay) return null;
      if (
        typeof r.call !== "number" ||
        typeof r.tool !== "string" ||
        !Array.isArray(r.args) ||
        typeof r.ok !== "boolean"
      )
        return null;
      return { k: "tool", call: r.call, tool: r.tool, args: r.args, ok: r.ok, result: r.result ?? null };
    default:
      return null;
  }
}

/** Parse a message from the gateway; null when malformed. */
export function parseParentMessage(raw: unknown): ParentMessage | null {
  if (!isObj(raw)) return null;
  if (raw.t === "start" && isObj(raw.agent) && isObj(raw.stimulus) && typeof raw.module === "string")
    return raw as unknown as ParentMessage;
  if (raw.t === "tool_result" && typeof raw.call === "number" && typeof raw.ok === "boolean")
    return raw as unknown as ParentMessage;
  return null;
}
