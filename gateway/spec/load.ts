/**
 * fleet.toml -> SpecVersion: parse (syntax errors carry line:column), validate with a strict
 * schema (errors name the dotted key path), fill defaults, cross-check, deep-freeze.
 */
import { dirname, resolve } from "node:path";
import { Cron } from "croner";
import { parse, TomlError } from "smol-toml";
import { z } from "zod";
import { blake3Hex } from "../hash.ts";
import { parseDuration } from "./duration.ts";
import { SpecError } from "./types.ts";
import type { AgentTypeSpec, BudgetSpec, FleetSpec, HookSpec, SpecVersion, TimerSpec } from "./types.ts";

/** Tools an agent type may allowlist. */
export const TOOL_NAMES = ["publish", "http", "llm", "send"] as const;
/** Agent type and hook names. */
export const TYPE_NAME_RE = /^[A-Za-z0-9_.-]+$/;
/** Agent instance keys. */
export const AGENT_KEY_RE = /^[A-Za-z0-9_.:@-]+$/;
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
});

/** Why an MQTT topic filter is unusable in fleet.toml, or null when it is fine. */
export function topicFilterProblem(filter: string): string | null {
  if (filter.length === 0) return "must not be empty";
  if (filter.startsWith("$")) return "must not start with $ (broker-internal topics)";
  if (filter.includes("\u0000")) return "must not contain NUL";
  const levels = filter.split("/");
  if (levels[0] === "fleet") return "must not be under fleet/ (the gateway's own namespace)";
  for (const [i, level] of levels.entries()) {
    if (level.includes("#") && (level !== "#" || i !== levels.length - 1)) {
      return "# must be a whole level and the last one"; // MQTT-4.7.1-1
    }
    if (level.includes("+") && level !== "+") return "+ must be a whole level"; // MQTT-4.7.1-2
  }
  return null;
}

/** Number of wildcard levels (`+` or `#`) in a topic filter, i.e. its `{n}` captures. */
export function wildcardCount(filter: string): number {
  return filter.split("/").filter((l) => l === "+" || l === "#").length;
}

// ---- schema -------------------------------------------------------------------------

type Issue = { input?: unknown };
/** Schema-level message; a missing value always reads "is required". */
const says = (m: string) => ({ error: (iss: Issue) => (iss.input === undefined ? "is required" : m) });
const POS = says("must be a positive integer");
const NONNEG = says("must be a non-negative integer");
const posInt = (d: number) => z.int(POS).positive(POS).default(d);
const nonNegInt = (d: number) => z.int(NONNEG).min(0, NONNEG).default(d);
const MEM = says("must be an integer of at least 16");
const NONNEG_NUM = says("must be a non-negative number");
const nonNegNum = () => z.number(NONNEG_NUM).min(0, NONNEG_NUM);
const PORT = says("must be a port number (0-65535)");
const port = () => z.int(PORT).min(0, PORT).max(65535, PORT);
const str = () => z.string(says("must be a string")).min(1, "must not be empty");
const envName = () => str().regex(ENV_NAME_RE, "must be an environment variable name (A-Z, 0-9, _)");
const list = <T extends z.ZodType>(item: T) => z.array(item, says("must be an array")).default([]);
const filter = () =>
  str().superRefine((f, ctx) => {
    const p = topicFilterProblem(f);
    if (p !== null) ctx.addIssue({ code: "custom", message: `is not a valid topic filter (${JSON.stringify(f)}): ${p}` });
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
    instances: list(str().regex(AGENT_KEY_RE, "must be an agent key (A-Z a-z 0-9 _ . : @ -)")),
    every: str().refine((s) => (parseDuration(s) ?? 0) > 0, 'must be a positive duration like "30s", "5m" or "1h30m"').optional(),
    cron: str().superRefine((expr, ctx) => {
      const fields = expr.trim().split(/\s+/).length;
      const problem = !expr.startsWith("@") && fields !== 5 && fields !== 6 ? "must have 5 or 6 fields" : cronProblem(expr);
      if (problem !== null) ctx.addIssue({ code: "custom", message: `is not a valid cron expression: ${problem}` });
    }).optional(),
    catch_up: z.enum(["none", "one", "all"], says('must be "none", "one" or "all"')).default("one"),
    dedup: str().optional(),
    tools: list(tool),
    publish: list(filter()),
    http_hosts: list(str().regex(/^[^\s/]+$/, "must be a host name, without scheme or path")),
    secrets: list(envName()),
    config: z.record(z.string(), z.unknown(), says("must be a table")).default({}),
    max_queue: posInt(10_000),
    budget: table({
      episodes_per_hour: posInt(DEFAULT_BUDGET.episodes_per_hour),
      tool_calls_per_episode: posInt(DEFAULT_BUDGET.tool_calls_per_episode),
      tokens_per_day: posInt(DEFAULT_BUDGET.tokens_per_day),
      episode_timeout_ms: posInt(DEFAULT_BUDGET.episode_timeout_ms),
      memory_mb: z.int(MEM).min(16, MEM).default(DEFAULT_BUDGET.memory_mb),
      tool_costs: z.partialRecord(tool, nonNegNum(), says("must be a table")).default({}),
      cost_per_day: nonNegNum().default(DEFAULT_BUDGET.cost_per_day),
    }),
    checkpoint: table({ keep: nonNegInt(50) }),
    retry: table({ max_attempts: posInt(3), backoff_ms: nonNegInt(1000) }),
  },
  says("must be a table"),
);

const hookSchema = z.strictObject(
  {
    agent: str().regex(/^[A-Za-z0-9_.-]+\/[A-Za-z0-9_.:@-]+$/, 'must be "<type>/<key>"').optional(),
    type: str().regex(TYPE_NAME_RE, "must be an agent type name").optional(),
    key_field: str().optional(),
    dedup: str().optional(),
    secret_env: envName().optional(),
    max_body_bytes: posInt(1_048_576),
  },
  says("must be a table"),
);

const named = <T extends z.ZodType>(what: string, value: T) =>
  z.record(str().regex(TYPE_NAME_RE, `is not a valid ${what} name (use A-Z a-z 0-9 _ . -)`), value, says("must be a table")).default({});
const positive = () => z.number(says("must be a positive number")).positive(says("must be a positive number"));

const fleetSchema = z.strictObject({
  fleet: table({
    name: str().default("fleet"),
    data_dir: str().default(".fleet"),
    max_concurrent_episodes: posInt(4),
    synchronous: z.enum(["full", "normal"], says('must be "full" or "normal"')).default("full"),
    drain_timeout_ms: nonNegInt(10_000),
    sandbox: z.enum(["auto", "bwrap", "uid", "none"], says('must be "auto", "bwrap", "uid" or "none"')).default("auto"),
    warm_spares: nonNegInt(2),
  }),
  broker: table({
    host: str().default("0.0.0.0"),
    mqtt_port: port().default(1883),
    ws_port: port().optional(),
    max_packet_bytes: posInt(262_144),
    allow_anonymous: z.boolean(says("must be true or false")).default(true),
    devices: str().optional(),
  }),
  http: table({ host: str().default("0.0.0.0"), port: port().default(8080) }),
  llm: table({
    url: str().refine((u) => URL.canParse(u), "must be a URL").default("http://127.0.0.1:11434/v1"),
    model: str().default("llama3.2"),
    api_key_env: envName().optional(),
    timeout_ms: posInt(30_000),
  }),
  agents: named("agent type", agentSchema),
  hooks: named("hook", hookSchema),
  retention: table({ episodes_days: positive().default(30), dedup_days: positive().default(7) }),
});
type RawFleet = z.output<typeof fleetSchema>;
type RawAgent = z.output<typeof agentSchema>;
type RawHook = z.output<typeof hookSchema>;

function cronProblem(expr: string): string | null {
  try {
    const next = new Cron(expr, { paused: true }).nextRun();
    return next === null ? "it never fires" : null;
  } catch (err) {
    return err instanceof Error ? err.message.replace(/^CronPattern: /, "") : String(err);
  }
}

// ---- errors ---------------------------------------------------------------------------

/** A schema or cross-check problem: where (key path segments) and what. */
type Problem = { path: readonly PropertyKey[]; message: string };

/** Dotted TOML key path; segments that are not bare keys are quoted, array indexes bracketed. */
export function formatKeyPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const seg of path) {
    if (typeof seg === "number") out += `[${seg}]`;
    else {
      const s = String(seg);
      out += (out === "" ? "" : ".") + (/^[A-Za-z0-9_-]+$/.test(s) ? s : JSON.stringify(s));
    }
  }
  return out;
}

/** Message for issues the schema does not word itself. */
function genericMessage(iss: z.core.$ZodRawIssue): string {
  if (iss.code === "invalid_type") return iss.input === undefined ? "is required" : `must be ${iss.expected === "object" ? "a table" : `a ${iss.expected}`}`;
  if (iss.code === "invalid_value") return `must be one of ${iss.values.map((v) => JSON.stringify(v)).join(", ")}`;
  return "is invalid";
}

function problemsOf(error: z.ZodError): Problem[] {
  return error.issues.flatMap((iss): Problem[] => {
    if (iss.code === "unrecognized_keys") return iss.keys.map((k) => ({ path: [...iss.path, k], message: "is not a known key" }));
    if (iss.code === "invalid_key") return [{ path: iss.path, message: iss.issues[0]?.message ?? iss.message }];
    return [{ path: iss.path, message: iss.message }];
  });
}

function specErrorOf(file: string, problems: readonly Problem[]): SpecError {
  const lines = problems.map((p) => (p.path.length === 0 ? p.message : `${formatKeyPath(p.path)} ${p.message}`));
  const first = problems[0];
  return new SpecError(file, lines.join("\n"), null, null, first && first.path.length > 0 ? formatKeyPath(first.path) : null);
}

// ---- compile ------------------------------------------------------------------------------

/** Compiles fleet.toml text (from `file`, used for errors and relative paths) into a frozen SpecVersion; throws SpecError. */
export async function compileSpec(text: string, file: string): Promise<SpecVersion> {
  let doc: unknown;
  try {
    doc = parse(text);
  } catch (err) {
    if (err instanceof TomlError) {
      const detail = err.message.split("\n")[0]?.replace(/^Invalid TOML document: /, "") ?? "invalid TOML";
      throw new SpecError(file, `invalid TOML: ${detail}`, err.line, err.column);
    }
    throw new SpecError(file, `invalid TOML: ${err instanceof Error ? err.message : String(err)}`);
  }
  const parsed = fleetSchema.safeParse(doc, { error: genericMessage });
  if (!parsed.success) throw specErrorOf(file, problemsOf(parsed.error));
  const problems: Problem[] = [];
  const spec = build(parsed.data, dirname(file), problems);
  if (problems.length > 0) throw specErrorOf(file, problems);
  return deepFreeze({ hash: await blake3Hex(text), path: file, text, spec });
}

/** Reads and compiles a fleet.toml file; a missing or unreadable file is a SpecError naming it. */
export async function loadSpec(path: string): Promise<SpecVersion> {
  let text: string;
  try {
    text = await Bun.file(path).text();
  } catch (err) {
    const code = (err as { code?: string }).code;
    throw new SpecError(path, code === "ENOENT" ? "file not found" : `cannot read file: ${err instanceof Error ? err.message : String(err)}`);
  }
  return compileSpec(text, path);
}

function build(raw: RawFleet, dir: string, problems: Problem[]): FleetSpec {
  const { devices, ws_port, ...broker } = raw.broker;
  if (!broker.allow_anonymous && devices === undefined) {
    const message = "is required when allow_anonymous = false (a devices file with credentials and ACL)";
    problems.push({ path: ["broker", "devices"], message });
  }
  const agents: Record<string, AgentTypeSpec> = {};
  for (const [name, a] of Object.entries(raw.agents)) agents[name] = buildAgent(name, a, dir, problems);
  const hooks: Record<string, HookSpec> = {};
  for (const [name, h] of Object.entries(raw.hooks)) hooks[name] = buildHook(name, h, raw.agents, problems);
  return {
    fleet: raw.fleet,
    broker: { ...broker, ws_port: ws_port ?? null, devices_file: devices === undefined ? null : resolve(dir, devices) },
    http: raw.http,
    llm: { ...raw.llm, api_key_env: raw.llm.api_key_env ?? null },
    agents,
    hooks,
    retention: raw.retention,
  };
}

function buildHook(name: string, h: RawHook, agents: RawFleet["agents"], problems: Problem[]): HookSpec {
  const at = (k: string) => ["hooks", name, k];
  if (h.agent !== undefined && (h.type !== undefined || h.key_field !== undefined)) {
    const message = "cannot be combined with agent; route to one agent or by type + key_field";
    problems.push({ path: at(h.type !== undefined ? "type" : "key_field"), message });
  } else if (h.agent === undefined && (h.type === undefined || h.key_field === undefined)) {
    const missing = h.type !== undefined ? "key_field" : h.key_field !== undefined ? "type" : "agent";
    problems.push({ path: at(missing), message: 'is required: set agent = "<type>/<key>", or type + key_field' });
  }
  const type = h.agent?.split("/")[0] ?? h.type;
  if (type !== undefined && !Object.hasOwn(agents, type)) {
    const message = `names agent type "${type}", which is not defined in [agents]`;
    problems.push({ path: at(h.agent !== undefined ? "agent" : "type"), message });
  }
  return {
    name,
    agent: h.agent ?? null,
    type: h.type ?? null,
    key_field: h.key_field ?? null,
    dedup: h.dedup ?? null,
    secret_env: h.secret_env ?? null,
    max_body_bytes: h.max_body_bytes,
  };
}

function buildAgent(name: string, a: RawAgent, dir: string, problems: Problem[]): AgentTypeSpec {
  const at = (...k: PropertyKey[]) => ["agents", name, ...k];
  let timer: TimerSpec | null = null;
  if (a.every !== undefined && a.cron !== undefined) {
    problems.push({ path: at("cron"), message: "cannot be combined with every; an agent type has one timer" });
  } else if (a.every !== undefined) {
    timer = { kind: "every", ms: parseDuration(a.every) ?? 0, catch_up: a.catch_up };
  } else if (a.cron !== undefined) {
    timer = { kind: "cron", expr: a.cron, catch_up: a.catch_up };
  }
  const key = a.key ?? (a.subscribe.some((f) => wildcardCount(f) > 0) ? "{1}" : "default");
  // {n} must resolve for whichever pattern matched, so the poorest pattern bounds n.
  const poorest = a.subscribe.reduce<string | null>((p, f) => (p === null || wildcardCount(f) < wildcardCount(p) ? f : p), null);
  const highest = Math.max(0, ...Array.from(key.matchAll(/\{(\d+)\}/g), (m) => Number(m[1])));
  if (highest > (poorest === null ? 0 : wildcardCount(poorest))) {
    const why = poorest === null ? "there are no subscribe patterns" : `${JSON.stringify(poorest)} has ${wildcardCount(poorest)} wildcard(s)`;
    const what = a.key === undefined ? `defaults to "${key}" (set it explicitly), which` : "";
    problems.push({ path: at("key"), message: `${what} references {${highest}} but ${why}`.trimStart() });
  }
  const tool_costs: Record<string, number> = {};
  for (const [t, c] of Object.entries(a.budget.tool_costs)) if (c !== undefined) tool_costs[t] = c;
  return {
    name,
    module: a.module,
    module_path: resolve(dir, a.module),
    subscribe: a.subscribe,
    key,
    instances: a.instances,
    timer,
    dedup: a.dedup ?? null,
    tools: a.tools,
    publish: a.publish,
    http_hosts: a.http_hosts,
    secrets: a.secrets,
    config: plainJson(a.config, at("config"), problems) as Record<string, unknown>,
    budget: { ...a.budget, tool_costs },
    checkpoint: a.checkpoint,
    retry: a.retry,
    max_queue: a.max_queue,
  };
}

/** Config is handed to agents as JSON: TOML dates become strings, nan/inf are rejected. */
function plainJson(v: unknown, path: PropertyKey[], problems: Problem[]): unknown {
  if (v instanceof Date) return v.toISOString();
  if (typeof v === "number" && !Number.isFinite(v)) problems.push({ path, message: "must be a finite number" });
  if (Array.isArray(v)) return v.map((x, i) => plainJson(x, [...path, i], problems));
  if (typeof v === "object" && v !== null) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plainJson(x, [...path, k], problems)]));
  }
  return v;
}

function deepFreeze<T>(v: T): T {
  if (typeof v === "object" && v !== null) {
    Object.freeze(v);
    for (const x of Object.values(v)) deepFreeze(x);
  }
  return v;
}
