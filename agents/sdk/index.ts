/**
 * The SDK an agent author imports. An agent module's default export is
 * `defineAgent({ init, onStimulus })`; it runs in its own subprocess (agents/host/main.ts)
 * and reaches the outside world only through `ctx`.
 */
import type { AgentRef, WakeDelay } from "../protocol.ts";

export type { AgentRef, WakeDelay, WakeInfo } from "../protocol.ts";

/** What every stimulus carries. */
interface StimulusBase {
  /** The dedup id: the same id for the same agent starts at most one episode. */
  readonly id: string;
  /** Epoch milliseconds when the gateway recorded it. */
  readonly received_at: number;
}

/**
 * What woke the agent, discriminated by `kind`. `payload` is the parsed JSON when the
 * message was JSON, else the raw string.
 */
export type Stimulus =
  /** A device's MQTT publish on a topic the type subscribes to. */
  | (StimulusBase & { readonly kind: "mqtt"; readonly topic: string; readonly payload: unknown })
  /** A timer fire (`every` or `cron`); the id is `timer:<scheduled ms>`. */
  | (StimulusBase & {
      readonly kind: "timer";
      readonly topic?: undefined;
      readonly payload: { readonly scheduled_at: number; readonly fired_at: number; readonly timer: TimerInfo };
    })
  /** `POST /hooks/<name>`: the request body. */
  | (StimulusBase & { readonly kind: "webhook"; readonly topic?: string; readonly payload: unknown })
  /** Another agent's `ctx.send`, or a device publishing to `fleet/agents/<type>/<key>/inbox`. */
  | (StimulusBase & { readonly kind: "inbox"; readonly topic?: string; readonly payload: unknown })
  /** `fleet send`, `POST /api/send` or `POST /api/agents/<t>/<k>/stimuli`. */
  | (StimulusBase & { readonly kind: "manual"; readonly topic?: string; readonly payload: unknown })
  /**
   * A wake-up this agent set with `ctx.wakeIn` / `ctx.wakeAt`: `payload` is what it passed
   * (null when nothing), `wake` says which one, when it was due and which episode set it.
   * The id is `wake:<wake id>`.
   */
  | (StimulusBase & {
      readonly kind: "wake";
      readonly topic?: undefined;
      readonly payload: unknown;
      readonly wake: { readonly id: string; readonly due_at: number; readonly set_by: string };
    });

/** The type's timer, as a timer stimulus carries it (`every` or `cron` in fleet.toml, and its `catch_up`). */
export type TimerInfo =
  | { readonly kind: "every"; readonly ms: number; readonly catch_up: "none" | "one" | "all" }
  | { readonly kind: "cron"; readonly expr: string; readonly catch_up: "none" | "one" | "all" };

/** `ctx.log(...)` logs at info; `ctx.log.debug|info|warn|error(...)` at that level. */
export interface AgentLog {
  (...args: unknown[]): void;
  debug(...args: unknown[]): void;
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
}

/** Options of the `publish` tool. */
export interface PublishOptions {
  readonly retain?: boolean;
  readonly qos?: 0 | 1;
}

/** What the `http` tool accepts: a subset of `RequestInit` that survives JSON. */
export interface HttpInit {
  readonly method?: string;
  /** Header values may contain `{{secret:NAME}}`; the gateway substitutes the type's secrets. */
  readonly headers?: Readonly<Record<string, string>>;
  readonly body?: string;
  readonly timeout_ms?: number;
}

/** What the `http` tool returns. */
export interface HttpResult {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  readonly body: string;
  /** Parsed body when the response was JSON. */
  readonly json?: unknown;
}

/** One chat message for the `llm` tool. */
export interface ChatMessage {
  readonly role: "system" | "user" | "assistant";
  readonly content: string;
}

/** What the `llm` tool returns. */
export interface LlmResult {
  readonly text: string;
  readonly usage: { readonly prompt_tokens: number; readonly completion_tokens: number; readonly total_tokens: number };
}

/** The built-in tools. Each call is gated by the type's `tools` allowlist and budget. */
export interface Tools {
  publish(
    topic: string,
    payload: unknown,
    options?: PublishOptions,
  ): Promise<{ readonly queued: true; readonly topic: string }>;
  http(url: string, init?: HttpInit): Promise<HttpResult>;
  llm(request: {
    readonly messages?: readonly ChatMessage[];
    readonly prompt?: string;
    readonly max_tokens?: number;
  }): Promise<LlmResult>;
  /** The same call as `ctx.send`: deliver to another agent's inbox after the episode commits. */
  send(agentId: string, payload: unknown): Promise<{ readonly queued: true; readonly to: string }>;
}

/** Everything an episode may touch. */
export interface AgentContext<S, C = Record<string, unknown>> {
  readonly agent: AgentRef;
  /** Mutable state; whatever it holds when `onStimulus` resolves becomes the next checkpoint. */
  state: S;
  readonly config: C;
  readonly episode: string;
  /** Record a decision in the episode log. */
  decide(name: string, data?: unknown): void;
  /** Publish to `fleet/agents/<type>/<key>/out` after the episode commits. */
  emit(payload: unknown): void;
  /** Deliver to another agent's inbox after the episode commits (uses the `send` tool). */
  send(agentId: string, payload: unknown): Promise<{ readonly queued: true; readonly to: string }>;
  readonly tools: Tools;
  /** Wall-clock time in ms; recorded so replays see the same value. */
  now(): number;
  /** Uniform [0, 1); recorded so replays see the same value. */
  random(): number;
  /** Log a line into the episode log (and the gateway log): `ctx.log(...)` or `ctx.log.warn(...)`. */
  readonly log: AgentLog;
  /**
   * Wake this agent after `delay` (ms, or "10s", "5m", "2h", "1d") with a stimulus of kind
   * `wake` carrying `payload`. Durable: scheduled when the episode commits (a failed episode
   * schedules nothing), kept across restarts, fired once. Returns the wake-up's id. Throws
   * `ToolDenied` when the agent already has its type's `max_wakeups` pending.
   */
  wakeIn(delay: WakeDelay, payload?: unknown): string;
  /** Like `wakeIn`, at an absolute time (epoch ms; a past time fires at once). */
  wakeAt(epochMs: number, payload?: unknown): string;
  /** Cancel a pending wake-up (with the episode's commit). True when it was pending: then it never runs. */
  cancelWake(id: string): boolean;
}

/**
 * A config schema: any Standard Schema (https://standardschema.dev) — a zod 4 schema,
 * valibot, arktype. Only the `~standard.validate` entry point is used.
 */
export interface ConfigSchema<Output = unknown> {
  readonly "~standard": {
    readonly version: 1;
    readonly vendor: string;
    readonly validate: (value: unknown) => ConfigSchemaResult<Output> | Promise<ConfigSchemaResult<Output>>;
    readonly types?: { readonly input: unknown; readonly output: Output } | undefined;
  };
}

/** What a config schema's `validate` returns. */
export type ConfigSchemaResult<Output> =
  | { readonly value: Output; readonly issues?: undefined }
  | {
      readonly issues: readonly {
        readonly message: string;
        readonly path?: readonly (PropertyKey | { readonly key: PropertyKey })[] | undefined;
      }[];
    };

/** The config type a schema produces. */
export type ConfigOf<T> = T extends ConfigSchema<infer O> ? O : never;

/** An agent definition, as `defineAgent` returns it. */
export interface AgentDefinition<S, C = Record<string, unknown>> {
  /** State of a brand-new agent. */
  init(ctx: { readonly agent: AgentRef; readonly config: C }): S | Promise<S>;
  onStimulus(stimulus: Stimulus, ctx: AgentContext<S, C>): void | Promise<void>;
  /**
   * The type's `config` table is checked against this at `fleet validate` and at every
   * deploy (a mismatch refuses the deploy, naming the key path), and `ctx.config` is what
   * it returns (defaults filled in).
   */
  readonly config?: ConfigSchema<C>;
  /**
   * Version of the state shape this code reads and writes (default 1; docs/upgrading.md). Each
   * checkpoint records the version that wrote it; raising it makes `migrate` run once per agent.
   */
  readonly version: number;
  /**
   * Turn state written by version `fromVersion` (< `version`) into this version's shape. Runs in
   * the agent's first episode on the new code, inside that episode: a throw fails the episode and
   * leaves the old checkpoint as it was (retried, then quarantined, like any failure).
   */
  readonly migrate?: (state: unknown, fromVersion: number) => S | Promise<S>;
  readonly __fleetAgent: true;
}

/**
 * Declare an agent. The state type `S` must be JSON-serialisable. With `config` (a zod
 * schema, or any Standard Schema), `ctx.config` is typed and checked before deploy.
 */
export function defineAgent<S, C = Record<string, unknown>>(def: {
  config?: ConfigSchema<C>;
  /** State version (a positive integer, default 1); raise it together with `migrate`. */
  version?: number;
  /** Migrate state written by an older `version` (see `AgentDefinition.migrate`). */
  migrate?: (state: unknown, fromVersion: number) => S | Promise<S>;
  init: (ctx: { readonly agent: AgentRef; readonly config: C }) => S | Promise<S>;
  onStimulus: (stimulus: Stimulus, ctx: AgentContext<S, C>) => void | Promise<void>;
}): AgentDefinition<S, C> {
  const version = def.version ?? 1;
  if (!Number.isSafeInteger(version) || version < 1)
    throw new TypeError(`defineAgent: version must be a positive integer; got ${JSON.stringify(def.version)}`);
  return {
    init: def.init,
    onStimulus: def.onStimulus,
    ...(def.config ? { config: def.config } : {}),
    version,
    ...(def.migrate ? { migrate: def.migrate } : {}),
    __fleetAgent: true,
  };
}

/**
 * Thrown inside the agent when a tool call is refused (not allowlisted, topic or host not
 * allowed, budget exhausted). The agent may catch it and go on; the refusal is recorded.
 */
export class ToolDenied extends Error {
  override readonly name = "ToolDenied";
  constructor(
    readonly tool: string,
    readonly reason: string,
  ) {
    super(`tool ${tool} denied: ${reason}`);
  }
}

/**
 * Throw this when retrying cannot help (a malformed reading, a config the agent cannot
 * use): the episode fails, the checkpoint stays as it was, and the stimulus is quarantined
 * at once instead of being retried.
 */
export class TerminalError extends Error {
  override readonly name = "TerminalError";
}

/** Thrown inside the agent when an allowed tool call failed (HTTP error, endpoint down). */
export class ToolFailed extends Error {
  override readonly name = "ToolFailed";
  constructor(
    readonly tool: string,
    readonly reason: string,
  ) {
    super(`tool ${tool} failed: ${reason}`);
  }
}
