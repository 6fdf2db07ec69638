/**
 * `http(url, { method?, headers?, body?, timeout_ms? })`: an HTTP call from the gateway to a
 * host in the type's `http_hosts`. Header values may name the type's secrets as
 * `{{secret:NAME}}`; their values are substituted here and scrubbed from what comes back.
 * Redirects are not followed (they could lead outside the allowlist).
 */
import { z } from "zod";
import { jsonNestedDeeper } from "../../../agents/protocol.ts";
import { readBodyCapped } from "../../body.ts";
import type { AgentTypeSpec } from "../../spec/index.ts";
import { secretScrubber } from "./secrets.ts";
import { arity, deny, failed, parseToolArgs, type ToolContext, type ToolOutcome } from "./types.ts";

const NAMES = ["url", "init"] as const;
/** Largest response body handed to the agent. */
export const MAX_HTTP_BODY = 1024 * 1024;
/**
 * Headers the gateway sets, not the agent: `host` would reach another virtual host behind an allowed
 * address than the one `http_hosts` allows, and the connection's own headers (RFC 9110 7.6.1, hop by
 * hop) are the gateway's to set.
 */
const RESERVED_HEADER =
  /^(?:host|connection|keep-alive|upgrade|te|trailer|transfer-encoding|content-length|proxy-[a-z0-9-]*)$/i;
/** RFC 9110 method token. */
const METHOD_RE = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** The http tool's arguments. */
export const HttpArgs = z.tuple(
  [
    z.string({ error: "must be a string" }).transform((url, ctx) => {
      try {
        return new URL(url);
      } catch {
        ctx.addIssue({ code: "custom", message: `must be an absolute URL, got ${JSON.stringify(url)}` });
        return z.NEVER;
      }
    }),
    z
      .strictObject(
        {
          method: z.string({ error: "must be a string" }).regex(METHOD_RE, "must be an HTTP method").optional(),
          headers: z
            .record(z.string(), z.string({ error: "must be a string" }), { error: "must be an object of strings" })
            .optional(),
          body: z.string({ error: "must be a string" }).optional(),
          timeout_ms: z.int({ error: "must be an integer" }).positive("must be positive").optional(),
        },
        { error: "must be an object { method?, headers?, body?, timeout_ms? }" },
      )
      .optional(),
  ],
  arity(NAMES),
);

/** Make the call, or deny it before anything leaves the gateway. */
export async function http(ctx: ToolContext, raw: readonly unknown[]): Promise<ToolOutcome> {
  const parsed = parseToolArgs("http", NAMES, HttpArgs, raw);
  if (!parsed.ok) return parsed.outcome;
  const [url, init] = parsed.args;
  const { type, env } = ctx;
  if (url.protocol !== "http:" && url.protocol !== "https:") return deny(`scheme ${url.protocol} is not allowed`);
  const host = url.port ? `${url.hostname}:${url.port}` : url.hostname;
  // Entries are normalised at load (gateway/spec): a bare host allows every port, host:port that port,
  // the scheme's default included (`example.com:443` allows https://example.com/).
  const port = url.port || (url.protocol === "https:" ? "443" : "80");
  if (!type.http_hosts.some((h) => h === url.hostname || h === `${url.hostname}:${port}`))
    return deny(`host ${host} is not in agents.${type.name}.http_hosts`);
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(init?.headers ?? {})) {
    if (RESERVED_HEADER.test(k)) return deny(`header ${k} is set by the gateway, not by the agent`);
    const value = inject(type, env.secrets, v);
    if (typeof value !== "string") return deny(value.denied);
    headers[k] = value;
  }
  const redact = secretScrubber(type.secrets.map((name) => ({ name, value: env.secrets[name] })));
  const timeout = Math.min(init?.timeout_ms ?? 10_000, type.budget.episode_timeout_ms);
  try {
    const res = await env.fetch(url, {
      method: init?.method ?? "GET",
      headers,
      body: init?.body,
      signal: AbortSignal.any([ctx.signal, AbortSignal.timeout(timeout)]),
      redirect: "manual",
    });
    const body = await readText(res, MAX_HTTP_BODY);
    if (body === null) return failed(`response larger than ${MAX_HTTP_BODY} bytes`);
    // Scrubbed as text in every JSON spelling of each secret, so the parsed json is scrubbed too.
    const text = redact(body);
    let json: unknown;
    try {
      // Nested past what an event log can hold: the agent gets the body text only.
      json = jsonNestedDeeper(text) ? undefined : JSON.parse(text);
    } catch {
      json = undefined;
    }
    return {
      ok: true,
      result: {
        status: res.status,
        headers: responseHeaders(res.headers, redact),
        body: text,
        ...(json === undefined ? {} : { json }),
      },
    };
  } catch (err) {
    return failed(redact(err instanceof Error ? err.message : String(err)));
  }
}

/** Replace `{{secret:NAME}}` with the value, only for names this type may use. */
function inject(
  type: AgentTypeSpec,
  secrets: Readonly<Record<string, string | undefined>>,
  text: string,
): string | { denied: string } {
  let denied: string | null = null;
  const out = text.replace(/\{\{secret:([A-Z_][A-Z0-9_]*)\}\}/g, (_m, name: string) => {
    if (!type.secrets.includes(name)) denied ??= `secret ${name} is not in agents.${type.name}.secrets`;
    // An unset variable would send an empty credential (a bare "Bearer "): refuse the call instead.
    else if (!secrets[name]) denied ??= `secret ${name} is not set in the gateway's environment`;
    return secrets[name] ?? "";
  });
  return denied ? { denied } : out;
}

/**
 * Response headers by lowercase name, scrubbed. A repeated header is one value, joined with ", " (RFC
 * 9110 5.3), but for `set-cookie`, whose values may hold commas (RFC 6265 3): joined with a newline, which
 * no header value contains.
 */
function responseHeaders(headers: Headers, redact: (text: string) => string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of headers) if (k !== "set-cookie") out[k] = redact(v);
  const cookies = headers.getSetCookie();
  if (cookies.length > 0) out["set-cookie"] = redact(cookies.join("\n"));
  return out;
}

/** A response body as text, or null past `cap` bytes. */
export async function readText(res: Response, cap: number): Promise<string | null> {
  const bytes = await readBodyCapped(res, cap);
  return bytes === null ? null : new TextDecoder().decode(bytes);
}
