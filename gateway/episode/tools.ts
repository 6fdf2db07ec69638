/**
 * The tool gate: every tool call of an episode arrives here from the subprocess. It checks
 * the type's allowlist and per-episode budget, runs the tool in the gateway (secrets are
 * injected here, never in the child), and collects deferred effects (publish, send) that
 * are committed with the episode. Denials are results, not exceptions.
 */
import { matchTopic, checkDevicePublishTopic } from "../../broker/index.ts";
import type { AgentRef } from "../../agents/protocol.ts";
import type { AgentTypeSpec, FleetSpec } from "../spec/index.ts";
import { parseAgentId } from "../types.ts";
import { readBodyCapped } from "../body.ts";

/** A publish waiting for the episode to commit. */
export interface PendingPublish {
  readonly topic: string;
  readonly payload: string;
  readonly qos: 0 | 1;
  readonly retain: boolean;
}

/** An inbox message waiting for the episode to commit. */
export interface PendingSend {
  readonly to: { type: string; key: string; id: string };
  readonly payload: string;
}

/** What a tool call returns to the subprocess. */
export type ToolOutcome =
  | { ok: true; result: unknown }
  | { ok: false; result: { error: "denied" | "failed"; reason: string } };

/** Outside resources the gate needs; injected for tests. */
export interface ToolEnv {
  /** Secret values by env name (the gateway's environment). */
  readonly secrets: Readonly<Record<string, string | undefined>>;
  readonly fetch: typeof fetch;
  /** Agents whose stimuli are refused (retired); a send to one is denied. */
  readonly isRetired?: (agent: string) => boolean;
}

const deny = (reason: string): ToolOutcome => ({ ok: false, result: { error: "denied", reason } });
const failed = (reason: string): ToolOutcome => ({ ok: false, result: { error: "failed", reason } });

const MAX_HTTP_BODY = 1024 * 1024;

/** Encode a payload the way outputs are published: strings as-is, everything else JSON. */
export function encodePayload(payload: unknown): string {
  return typeof payload === "string" ? payload : (JSON.stringify(payload) ?? "null");
}

/** One episode's tool gate. */
export class ToolGate {
  calls = 0;
  tokens = 0;
  cost = 0;
  readonly publishes: PendingPublish[] = [];
  readonly sends: PendingSend[] = [];

  constructor(
    private readonly agent: AgentRef,
    private readonly type: AgentTypeSpec,
    private readonly spec: FleetSpec,
    private readonly env: ToolEnv,
    /** Tokens left today before this episode; the llm tool is denied past it. */
    private readonly tokensLeft: number,
  ) {}

  /** Handle one call from the subprocess. */
  async handle(_call: number, tool: string, args: readonly unknown[]): Promise<ToolOutcome> {
    this.calls += 1;
    if (!this.type.tools.includes(tool)) return deny(`tool "${tool}" is not in agents.${this.type.name}.tools`);
    const limit = this.type.budget.tool_calls_per_episode;
    if (this.calls > limit) return deny(`budget tool_calls_per_episode (${limit}) exhausted`);
    this.cost += this.type.budget.tool_costs[tool] ?? 0;
    switch (tool) {
      case "publish":
        return this.publish(args);
      case "send":
        return this.send(args);
      case "http":
        return this.http(args);
      case "llm":
        return this.llm(args);
      default:
        return deny(`unknown tool "${tool}"`);
    }
  }

  private publish(args: readonly unknown[]): ToolOutcome {
    const [topic, payload, opts] = args as [unknown, unknown, { retain?: unknown; qos?: unknown } | undefined];
    if (typeof topic !== "string") return deny("publish topic must be a string");
    const own = `fleet/agents/${this.agent.type}/${this.agent.key}/`;
    // Own topics skip the fleet/ namespace rule, never the MQTT ones (MQTT-3.3.2-2: no wildcards in a topic name).
    const shape = !topic.startsWith(own)
      ? checkDevicePublishTopic(topic)
      : // biome-ignore lint/suspicious/noControlCharactersInRegex: NUL is what this rejects (MQTT-4.7.3-2)
        /[+#\u0000]/.test(topic)
        ? { ok: false as const, reason: "wildcard or NUL in publish topic" }
        : { ok: true as const };
    if (!shape.ok) return deny(`topic "${topic}": ${shape.reason}`);
    if (!topic.startsWith(own) && !this.type.publish.some((f) => matchTopic(f, topic) !== null)) {
      return deny(`topic "${topic}" is not allowed by agents.${this.type.name}.publish`);
    }
    const qos = opts?.qos === 0 ? 0 : 1;
    this.publishes.push({ topic, payload: encodePayload(payload), qos, retain: opts?.retain === true });
    return { ok: true, result: { queued: true, topic } };
  }

  private send(args: readonly unknown[]): ToolOutcome {
    const [to, payload] = args;
    const target = typeof to === "string" ? parseAgentId(to) : null;
    if (!target) return deny(`"${String(to)}" is not an agent id <type>/<key>`);
    if (!this.spec.agents[target.type]) return deny(`no agent type "${target.type}" in this fleet`);
    if (this.env.isRetired?.(target.id)) return deny(`agent ${target.id} is retired`);
    this.sends.push({ to: target, payload: encodePayload(payload) });
    return { ok: true, result: { queued: true, to: target.id } };
  }

  /** Replace `{{secret:NAME}}` with the value, only for names this type may use. */
  private inject(text: string): string | { denied: string } {
    let denied: string | null = null;
    const out = text.replace(/\{\{secret:([A-Z_][A-Z0-9_]*)\}\}/g, (_m, name: string) => {
      if (!this.type.secrets.includes(name)) denied = `secret ${name} is not in agents.${this.type.name}.secrets`;
      return this.env.secrets[name] ?? "";
    });
    return denied ? { denied } : out;
  }

  /** Scrub secret values from anything recorded or returned. */
  private redact(text: string): string {
    let out = text;
    for (const name of this.type.secrets) {
      const v = this.env.secrets[name];
      if (v && v.length >= 4) out = out.split(v).join(`[secret:${name}]`);
    }
    return out;
  }

  private async http(args: readonly unknown[]): Promise<ToolOutcome> {
    const [url, init] = args as [
      unknown,
      { method?: string; headers?: Record<string, string>; body?: string; timeout_ms?: number } | undefined,
    ];
    if (typeof url !== "string") return deny("http url must be a string");
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      return deny(`"${url}" is not a URL`);
    }
    if (parsed.protocol !== "http:" && parsed.protocol !== "https:")
      return deny(`scheme ${parsed.protocol} is not allowed`);
    const host = parsed.port ? `${parsed.hostname}:${parsed.port}` : parsed.hostname;
    if (!this.type.http_hosts.some((h) => h === host || h === parsed.hostname))
      return deny(`host ${host} is not in agents.${this.type.name}.http_hosts`);
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(init?.headers ?? {})) {
      const value = this.inject(String(v));
      if (typeof value !== "string") return deny(value.denied);
      headers[k] = value;
    }
    const timeout = Math.min(init?.timeout_ms ?? 10_000, this.type.budget.episode_timeout_ms);
    try {
      const res = await this.env.fetch(parsed, {
        method: init?.method ?? "GET",
        headers,
        body: init?.body,
        signal: AbortSignal.timeout(timeout),
        redirect: "manual",
      });
      const body = await readText(res, MAX_HTTP_BODY);
      if (body === null) return failed(`response larger than ${MAX_HTTP_BODY} bytes`);
      const text = this.redact(body);
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      return {
        ok: true,
        result: {
          status: res.status,
          headers: Object.fromEntries([...res.headers].map(([k, v]) => [k, this.redact(v)])),
          body: text,
          ...(json === undefined ? {} : { json }),
        },
      };
    } catch (err) {
      return failed(this.redact(err instanceof Error ? err.message : String(err)));
    }
  }

  private async llm(args: readonly unknown[]): Promise<ToolOutcome> {
    const req = (args[0] ?? {}) as { messages?: unknown; prompt?: unknown; max_tokens?: unknown };
    const messages = Array.isArray(req.messages)
      ? req.messages
      : typeof req.prompt === "string"
        ? [{ role: "user", content: req.prompt }]
        : null;
    if (!messages) return deny("llm needs messages or prompt");
    const left = this.tokensLeft - this.tokens;
    if (left <= 0) return deny(`budget tokens_per_day (${this.type.budget.tokens_per_day}) exhausted`);
    const maxTokens = Math.min(typeof req.max_tokens === "number" ? req.max_tokens : 512, left);
    const llm = this.spec.llm;
    const headers: Record<string, string> = { "content-type": "application/json" };
    const key = llm.api_key_env ? this.env.secrets[llm.api_key_env] : undefined;
    if (key) headers.authorization = `Bearer ${key}`;
    try {
      const res = await this.env.fetch(`${llm.url.replace(/\/$/, "")}/chat/completions`, {
        method: "POST",
        headers,
        body: JSON.stringify({ model: llm.model, messages, max_tokens: maxTokens }),
        signal: AbortSignal.timeout(Math.min(llm.timeout_ms, this.type.budget.episode_timeout_ms)),
      });
      const body = await readText(res, MAX_HTTP_BODY);
      if (!res.ok || body === null) return failed(`llm endpoint answered ${res.status}`);
      const data = JSON.parse(body) as {
        choices?: { message?: { content?: string } }[];
        usage?: Record<string, number>;
      };
      const usage = {
        prompt_tokens: data.usage?.prompt_tokens ?? 0,
        completion_tokens: data.usage?.completion_tokens ?? 0,
        total_tokens:
          data.usage?.total_tokens ?? (data.usage?.prompt_tokens ?? 0) + (data.usage?.completion_tokens ?? 0),
      };
      this.tokens += usage.total_tokens;
      return { ok: true, result: { text: data.choices?.[0]?.message?.content ?? "", usage } };
    } catch (err) {
      return failed(err instanceof Error ? err.message : String(err));
    }
  }
}

async function readText(res: Response, cap: number): Promise<string | null> {
  const bytes = await readBodyCapped(res, cap);
  return bytes === null ? null : new TextDecoder().decode(bytes);
}
