/**
 * The zod schema of fleet.toml: every key, its type, its default and the message a wrong
 * value gets (a missing value always reads "is required"). load.ts parses with it, then
 * cross-checks what one key cannot know about another.
 */
import { Cron } from "croner";
import { z } from "zod";
import { centralUrlProblem } from "./central-url.ts";
import { parseDuration } from "./duration.ts";
import { topicFilterProblem } from "./topic-filter.ts";
import { MAX_TIMER_MS } from "../types.ts";
import type { BudgetSpec } from "./types.ts";

/** Tools an agent type may allowlist. */
export const TOOL_NAMES = ["publish", "http", "llm", "send"] as const;
/** Agent type and hook names: not `.` nor `..`, which a URL path drops. */
export const TYPE_NAME_RE = /^(?!\.\.?$)[A-Za-z0-9_.-]+$/;
/** Agent instance keys: not `.` nor `..`, which a URL path drops. */
export const AGENT_KEY_RE = /^(?!\.\.?$)[A-Za-z0-9_.:@-]+$/;
const ENV_NAME_RE = /^[A-Z_][A-Z0-9_]*$/;
/** A key template: key characters and `{n}` wildcard captures (n >= 1). */
const KEY_TEMPLATE_RE = /^(?:[A-Za-z0-9_.:@-]|\{[1-9][0-9]*\})+$/;

/** Budget applied to an agent type that leaves `[agents.<type>.budget]` (or parts of it) out. */
export const DEFAULT_BUDGET: BudgetSpec = Object.freeze({
  episodes_per_hour: 3600,
  tool_calls_per_episode: 20,
  tokens_per_day: 100_000,
  episode_timeout_ms: 5000,
  memory_mb: 256,
  tool_costs: Object.freeze({}),
  cost_per_day: 0,
  bytes_per_day: 268_435_456,
});

type Issue = { input?: unknown };
/** Schema-level message; a missing value always reads "is required". */
const says = (m: string) => ({ error: (iss: Issue) => (iss.input === undefined ? "is required" : m) });
const POS = says("must be a positive integer");
const NONNEG = says("must be a non-negative integer");
const posInt = (d: number) => z.int(POS).positive(POS).default(d);
const nonNegInt = (d: number) => z.int(NONNEG).min(0, NONNEG).default(d);
/** A delay a timer holds: past MAX_TIMER_MS, setTimeout fires at once (an episode would time out as it began). */
const TIMER = `must be at most ${MAX_TIMER_MS} ms (about 24.8 days, the longest delay a timer holds)`;
const posMs = (d: number) => z.int(POS).positive(POS).max(MAX_TIMER_MS, TIMER).default(d);
const nonNegMs = (d: number) => z.int(NONNEG).min(0, NONNEG).max(MAX_TIMER_MS, TIMER).default(d);
const MEM = says("must be an integer of at least 16");
const NONNEG_NUM = says("must be a non-negative number");
const nonNegNum = () => z.number(NONNEG_NUM).min(0, NONNEG_NUM);
const PORT = says("must be a port number (0-65535)");
const bool = (d: boolean) => z.boolean(says("must be true or false")).default(d);
const port = () => z.int(PORT).min(0, PORT).max(65535, PORT);
const str = () => z.string(says("must be a string")).min(1, "must not be empty");
/**
 * fleet.toml is kept whole as each spec version and replicated to the central server, where
 * everyone who reads the history would see credentials in a URL: secrets come from the environment.
 */
const REPLICATED_SECRETS =
  "(fleet.toml is stored and replicated as the spec version, where every reader of the center would see it): " +
  "give the server's token in auth_token_env, the name of an env var holding it";
const envName = () => str().regex(ENV_NAME_RE, "must be an environment variable name (A-Z, 0-9, _)");
/**
 * An `http_hosts` entry, `host` or `host:port`, as the http tool compares it with a URL: the host
 * lowercased and canonical (`127.1` is `127.0.0.1`, IPv6 in brackets), the port as written.
 */
const httpHost = () =>
  str().transform((entry, ctx) => {
    const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(entry);
    const [host, port] = bracketed
      ? [`[${bracketed[1]}]`, bracketed[2]]
      : entry.split(":").length > 2
        ? [null, undefined]
        : (entry.split(":") as [string, string | undefined]);
    const why = /[\s/?#@]/.test(entry)
      ? "must be a host name or address, with an optional :port, without scheme or path"
      : host === null
        ? `is an IPv6 address: write it in brackets ([${entry}], or [${entry}]:8080 with a port)`
        : port !== undefined && !(/^\d{1,5}$/.test(port) && Number(port) >= 1 && Number(port) <= 65535)
          ? "has a port that is not a number from 1 to 65535"
          : !URL.canParse(`http://${host}/`)
            ? "must be a host name or address, with an optional :port, without scheme or path"
            : null;
    if (why !== null || host === null) {
      ctx.addIssue({ code: "custom", message: `${JSON.stringify(entry)} ${why}` });
      return z.NEVER;
    }
    const name = new URL(`http://${host}/`).hostname;
    return port === undefined ? name : `${name}:${Number(port)}`;
  });
const list = <T extends z.ZodType>(item: T) => z.array(item, says("must be an array")).default([]);
const filter = () =>
  str().superRefine((f, ctx) => {
    const p = topicFilterProblem(f);
    if (p !== null)
      ctx.addIssue({ code: "custom", message: `is not a valid topic filter (${JSON.stringify(f)}): ${p}` });
  });
/** A sub-table whose keys all have defaults, so a missing table reads as `{}`. */
const table = <T extends z.core.$ZodLooseShape>(shape: T) =>
  z.strictObject(shape, says("must be a table")).prefault({} as never);
const tool = z.enum(TOOL_NAMES, says(`must be one of ${TOOL_NAMES.join(", ")}`));

const agentSchema = z.strictObject(
  {
    module: str(),
    subscribe: list(filter()),
    key: str().regex(KEY_TEMPLATE_RE, "must be key characters (A-Z a-z 0-9 _ . : @ -) and {n} captures").optional(),
    instances: list(
      str()
        .regex(AGENT_KEY_RE, "must be an agent key (A-Z a-z 0-9 _ . : @ -, not . or ..)")
        .max(128, "must be at most 128 bytes"),
    ),
    every: str()
      .refine((s) => (parseDuration(s) ?? 0) > 0, 'must be a positive duration like "30s", "5m" or "1h30m"')
      .optional(),
    cron: str()
      .superRefine((expr, ctx) => {
        const fields = expr.trim().split(/\s+/).length;
        const problem =
          !expr.startsWith("@") && fields !== 5 && fields !== 6 ? "must have 5 or 6 fields" : cronProblem(expr);
        if (problem !== null) ctx.addIssue({ code: "custom", message: `is not a valid cron expression: ${problem}` });
      })
      .optional(),
    catch_up: z.enum(["none", "one", "all"], says('must be "none", "one" or "all"')).default("one"),
    dedup: dedupRule().optional(),
    tools: list(tool),
    publish: list(filter()),
    http_hosts: list(httpHost()),
    secrets: list(envName()),
    config: z.record(z.string(), z.unknown(), says("must be a table")).default({}),
    max_queue: posInt(10_000),
    max_agents: nonNegInt(100_000),
    max_wakeups: posInt(100),
    budget: table({
      episodes_per_hour: posInt(DEFAULT_BUDGET.episodes_per_hour),
      tool_calls_per_episode: posInt(DEFAULT_BUDGET.tool_calls_per_episode),
      tokens_per_day: posInt(DEFAULT_BUDGET.tokens_per_day),
      episode_timeout_ms: posMs(DEFAULT_BUDGET.episode_timeout_ms),
      memory_mb: z.int(MEM).min(16, MEM).default(DEFAULT_BUDGET.memory_mb),
      tool_costs: z.partialRecord(tool, nonNegNum(), says("must be a table")).default({}),
      cost_per_day: nonNegNum().default(DEFAULT_BUDGET.cost_per_day),
      bytes_per_day: nonNegInt(DEFAULT_BUDGET.bytes_per_day),
    }),
    checkpoint: table({ keep: nonNegInt(50) }),
    retry: table({ max_attempts: posInt(3), backoff_ms: nonNegMs(1000) }),
    rollout: table({
      require_check: bool(false),
      canary: z
        .number(says("must be a number from 0 to 1"))
        .min(0, "must be a number from 0 to 1")
        .max(1, "must be a number from 0 to 1")
        .default(0),
      min_episodes: posInt(50),
      max_failure_rate: z
        .number(says("must be a number from 0 to 1"))
        .min(0, "must be a number from 0 to 1")
        .max(1, "must be a number from 0 to 1")
        .default(0.05),
      bake: str()
        .refine((s) => (parseDuration(s) ?? -1) >= 0, 'must be a duration like "0s", "10m" or "1h"')
        .default("10m"),
    }),
  },
  says("must be a table"),
);

const hookSchema = z.strictObject(
  {
    agent: str()
      .regex(/^[A-Za-z0-9_.-]+\/[A-Za-z0-9_.:@-]+$/, 'must be "<type>/<key>"')
      .optional(),
    type: str().regex(TYPE_NAME_RE, "must be an agent type name").optional(),
    key_field: str().optional(),
    dedup: dedupRule().optional(),
    secret_env: envName().optional(),
    max_body_bytes: posInt(1_048_576),
  },
  says("must be a table"),
);

const named = <T extends z.ZodType>(what: string, value: T) =>
  z
    .record(
      str().regex(TYPE_NAME_RE, `is not a valid ${what} name (use A-Z a-z 0-9 _ . -, not . or ..)`),
      value,
      says("must be a table"),
    )
    .default({});
const positive = () => z.number(says("must be a positive number")).positive(says("must be a positive number"));

/**
 * Warm spares kept per set of episode limits. An idle spare holds ~6 MB (PSS; 2.4 MB of it its own,
 * the rest Bun's pages shared with the others) and no CPU. Four, not two: a spare's replacement starts
 * in a group that yields (SPARE_GROUP_NICE), so while devices burst it barely starts, and with two the
 * third episode of a burst waited for a spare's start-up on a busy box. `bun scripts/bench-onset.ts`
 * (six quiet agents pinged 12.5 times a second through 10 bursts of 5,000 QoS 1 messages, two cores,
 * alternating runs): pings during bursts took 206-272 ms at p50 with two spares, 88-102 with four,
 * 113-124 with six, and the bursts were acknowledged in 427-523, 367-374 and 425-446 ms.
 */
export const DEFAULT_WARM_SPARES = 4;

/**
 * `[fleet] disk_free_limit_mb`'s default: RabbitMQ's `disk_free_limit` (50 MB). Room for what must still write
 * while outside stimuli are refused: the accepted stimuli's episodes, retention's deletes (their WAL frames),
 * an operator's reload.
 */
export const DEFAULT_DISK_FREE_LIMIT_MB = 50;

/** The whole file. */
export const fleetSchema = z.strictObject({
  fleet: table({
    name: str().default("fleet"),
    data_dir: str().default(".fleet"),
    max_concurrent_episodes: posInt(4),
    synchronous: z.enum(["full", "normal"], says('must be "full" or "normal"')).default("full"),
    drain_timeout_ms: nonNegMs(10_000),
    max_send_hops: nonNegInt(16),
    disk_free_limit_mb: nonNegInt(DEFAULT_DISK_FREE_LIMIT_MB),
    sandbox: z.enum(["auto", "bwrap", "uid", "none"], says('must be "auto", "bwrap", "uid" or "none"')).default("auto"),
    warm_spares: nonNegInt(DEFAULT_WARM_SPARES),
    allow_weak_sandbox: z.boolean(says("must be true or false")).default(false),
    /** "first:count" (checked and compiled in load.ts): the uids episode processes run as, one each (root). */
    sandbox_uids: str().default("1879048192:65536"),
    /** "i/N" (checked and compiled in load.ts): this gateway is shard i of N on an external broker. */
    shard: str().optional(),
  }),
  broker: table({
    /** Default: 127.0.0.1, or 0.0.0.0 when devices must log in (allow_anonymous = false); see load.ts. */
    host: str().optional(),
    mqtt_port: port().default(1883),
    ws_port: port().optional(),
    max_packet_bytes: posInt(262_144),
    max_connections: nonNegInt(5000),
    /** Seconds; 0: any keep alive, none included (load.ts checks it against url). */
    max_keepalive: z
      .int(NONNEG)
      .min(0, NONNEG)
      .max(65_535, says("must be at most 65535 (seconds), 0 for any"))
      .default(0),
    allow_anonymous: z.boolean(says("must be true or false")).default(true),
    allow_anonymous_network: bool(false),
    devices: str().optional(),
    tls_port: port().optional(),
    wss_port: port().optional(),
    tls_cert: str().optional(),
    tls_key: str().optional(),
    tls_ca: str().optional(),
    tls_crl: str().optional(),
    use_identity_as_username: bool(false),
    connection_messages: bool(false),
    persistence: z.enum(["libsql", "memory"], says('must be "libsql" or "memory"')).default("memory"),
    max_offline_messages: posInt(1000),
    max_offline_bytes: nonNegInt(0),
    max_offline_bytes_total: nonNegInt(0),
    /** Absent: sessions never expire (0 says the same); checked against url in load.ts. */
    session_expiry_days: z
      .number(says("must be a number of days, 0 for never"))
      .min(0, says("must be a number of days, 0 for never"))
      .optional(),
    trust_dup: bool(false),
    /** Seconds between refreshes of the `$SYS/broker/` tree; 0: none (broker/sys.ts). */
    sys_interval: nonNegInt(10),
    // External mode (docs/broker.md): the gateway is a client of an existing broker.
    url: str()
      .refine((u) => URL.canParse(u) && /^mqtts?:$/.test(new URL(u).protocol), 'must be an "mqtt://" or "mqtts://" URL')
      .optional(),
    username: str().optional(),
    password_env: envName().optional(),
    client_id: str()
      .regex(/^[A-Za-z0-9_.:@-]{1,64}$/, "must be 1-64 of A-Z a-z 0-9 _ . : @ -")
      .optional(),
    ca_file: str().optional(),
    mqtt_version: z.enum(["3.1.1", "5"], says('must be "3.1.1" or "5"')).default("3.1.1"),
  }),
  http: table({
    host: str().default("127.0.0.1"),
    port: port().default(8080),
    tls_cert: str().optional(),
    tls_key: str().optional(),
    allowed_hosts: list(str().regex(/^[^\s/:]+$/, "must be a host name, without scheme, port or path")),
    open_metrics: bool(false),
    allow_unauthenticated: bool(false),
    max_concurrent_requests: posInt(256),
    max_body_bytes_in_flight: posInt(16 * 1_048_576),
  }),
  llm: table({
    url: str()
      .refine((u) => URL.canParse(u), "must be a URL")
      .default("http://127.0.0.1:11434/v1"),
    model: str().default("llama3.2"),
    api_key_env: envName().optional(),
    timeout_ms: posMs(30_000),
  }),
  agents: named("agent type", agentSchema),
  hooks: named("hook", hookSchema),
  telemetry: table({
    otlp_endpoint: str()
      .refine((u) => URL.canParse(u) && /^https?:$/.test(new URL(u).protocol), "must be an http(s) URL")
      .optional(),
    service_name: str().optional(),
  }),
  retention: table({
    episodes_days: positive().default(30),
    dedup_days: positive().default(7),
    quarantine_days: z
      .number(says("must be a number of days, 0 for no limit"))
      .min(0, says("must be a number of days, 0 for no limit"))
      .default(30),
    redelivery_minutes: positive().default(60),
  }),
  replication: z
    .strictObject(
      {
        url: str().superRefine((u, ctx) => {
          const problem = centralUrlProblem(u, REPLICATED_SECRETS);
          if (problem !== null) ctx.addIssue({ code: "custom", message: problem });
        }),
        auth_token_env: envName().optional(),
        interval: str()
          .refine((s) => (parseDuration(s) ?? 0) > 0, 'must be a positive duration like "2s" or "1m"')
          .refine((s) => (parseDuration(s) ?? 0) <= MAX_TIMER_MS, "must be at most 24 days (a timer holds no longer)")
          .default("2s"),
        batch_rows: z.int(POS).positive(POS).max(10_000, "must be at most 10000").default(500),
        required: z.boolean(says("must be true or false")).default(true),
        max_backlog_mb: posInt(1024),
      },
      says("must be a table"),
    )
    .optional(),
});

/** fleet.toml as the schema outputs it: defaults filled, not yet cross-checked. */
export type RawFleet = z.output<typeof fleetSchema>;
/** One `[agents.<type>]` table as the schema outputs it. */
export type RawAgent = z.output<typeof agentSchema>;
/** One `[hooks.<name>]` table as the schema outputs it. */
export type RawHook = z.output<typeof hookSchema>;

/** Why croner rejects a cron expression (or that it never fires), or null when it is fine. */
/**
 * A `dedup` rule: a field path (`"id"`, `"device.seq"`) or a template of them (`"{device}:{seq}"`).
 * A brace out of place would otherwise be literal text of every id: one id for every message, all
 * but the first dropped as duplicates.
 */
function dedupRule() {
  return str().superRefine((rule, ctx) => {
    const problem = dedupRuleProblem(rule);
    if (problem !== null) ctx.addIssue({ code: "custom", message: problem });
  });
}

const badPath = (path: string) => path.split(".").some((part) => part.trim() === "");

function dedupRuleProblem(rule: string): string | null {
  if (!/[{}]/.test(rule))
    return badPath(rule) ? 'must be a field path ("id", "device.seq") or a template ("{device}:{seq}")' : null;
  let fields = 0;
  let bad: string | null = null;
  const rest = rule.replace(/\{([^{}]*)\}/g, (whole, path: string) => {
    fields++;
    if (badPath(path)) bad ??= `has a field ${whole} that is not a field path ("id", "device.seq")`;
    return "";
  });
  if (/[{}]/.test(rest)) return `has a brace that opens or closes no field (a template is "{device}:{seq}")`;
  return bad ?? (fields === 0 ? "has no field" : null);
}

function cronProblem(expr: string): string | null {
  try {
    const next = new Cron(expr, { paused: true }).nextRun();
    return next === null ? "it never fires" : null;
  } catch (err) {
    return err instanceof Error ? err.message.replace(/^CronPattern: /, "") : String(err);
  }
}
