/**
 * `llm({ messages | prompt, max_tokens? })`: a chat completion from the fleet's
 * OpenAI-compatible endpoint (`[llm]`). Tokens are metered against `tokens_per_day`;
 * `max_tokens` is capped at what is left of it, and a call with nothing left is denied.
 */
import { z } from "zod";
import { readText, MAX_HTTP_BODY } from "./http.ts";
import { secretScrubber } from "./secrets.ts";
import { arity, deny, failed, parseToolArgs, type ToolContext, type ToolOutcome } from "./types.ts";

const NAMES = ["request"] as const;

const message = z.strictObject(
  {
    role: z.enum(["system", "user", "assistant"], { error: "must be system, user or assistant" }),
    content: z.string({ error: "must be a string" }),
  },
  { error: "must be an object { role, content }" },
);

/** The llm tool's argument: one request with messages or a prompt. */
export const LlmArgs = z.tuple(
  [
    z
      .strictObject(
        {
          messages: z.array(message, { error: "must be an array" }).min(1, "must not be empty").optional(),
          prompt: z.string({ error: "must be a string" }).optional(),
          max_tokens: z.int({ error: "must be an integer" }).positive("must be positive").optional(),
        },
        { error: "must be an object { messages | prompt, max_tokens? }" },
      )
      .refine((r) => r.messages !== undefined || r.prompt !== undefined, "needs messages or prompt"),
  ],
  arity(NAMES),
);

/**
 * The parts of an OpenAI-style chat completion the tool reads; anything else is ignored. `usage` is
 * read apart (./llm.ts `charge`): counts of the wrong type do not cost the agent its answer.
 */
const Completion = z.looseObject({
  choices: z.array(z.looseObject({ message: z.looseObject({ content: z.string().nullish() }).optional() })).optional(),
  usage: z.unknown().optional(),
});

const count = (v: unknown): number | null | undefined =>
  v === undefined || v === null ? undefined : Number.isSafeInteger(v) && (v as number) >= 0 ? (v as number) : null;

/**
 * What a call is charged for the usage it reports: the larger of total_tokens and prompt + completion
 * (a total below its parts is not believed); the whole of what it held when it reports none, or counts
 * that are not non-negative integers, or no completion count.
 */
export function charge(
  usage: unknown,
  held: number,
): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  const none = { prompt_tokens: 0, completion_tokens: held, total_tokens: held };
  if (typeof usage !== "object" || usage === null) return none;
  const u = usage as Record<string, unknown>;
  const [prompt, completion, total] = [count(u.prompt_tokens), count(u.completion_tokens), count(u.total_tokens)];
  if (prompt === null || completion === null || total === null || completion === undefined) return none;
  const parts = (prompt ?? 0) + completion;
  return { prompt_tokens: prompt ?? 0, completion_tokens: completion, total_tokens: Math.max(total ?? 0, parts) };
}

/** Tokens held by each episode's llm calls in flight (for the reason of a denial). */
const inFlight = new WeakMap<ToolContext, number>();

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Ask the endpoint, or deny the call when the day's tokens are spent. */
export async function llm(ctx: ToolContext, raw: readonly unknown[]): Promise<ToolOutcome> {
  const parsed = parseToolArgs("llm", NAMES, LlmArgs, raw);
  if (!parsed.ok) return parsed.outcome;
  const [req] = parsed.args;
  const messages = req.messages ?? [{ role: "user", content: req.prompt ?? "" }];
  const left = ctx.tokensLeft();
  if (left <= 0) {
    const holding = inFlight.get(ctx) ?? 0;
    const why = holding > 0 ? `: ${holding} held by llm calls in flight until they are answered` : "";
    return deny(`budget tokens_per_day (${ctx.type.budget.tokens_per_day}) exhausted${why}`);
  }
  const maxTokens = Math.min(req.max_tokens ?? 512, left);
  // Held now, settled on the answer: calls made at once share what is left, not each all of it.
  ctx.spendTokens(maxTokens);
  inFlight.set(ctx, (inFlight.get(ctx) ?? 0) + maxTokens);
  let held = maxTokens;
  const settle = (used: number) => {
    ctx.spendTokens(used - held);
    inFlight.set(ctx, (inFlight.get(ctx) ?? 0) - maxTokens);
    held = used;
  };
  const conf = ctx.spec.llm;
  const headers: Record<string, string> = { "content-type": "application/json" };
  const key = conf.api_key_env ? ctx.env.secrets[conf.api_key_env] : undefined;
  if (key) headers.authorization = `Bearer ${key}`;
  // The key is never visible to agents: scrubbed from what an endpoint echoes (docs/fleet-toml.md).
  const scrub = secretScrubber(conf.api_key_env ? [{ name: conf.api_key_env, value: key }] : []);
  try {
    const res = await ctx.env.fetch(`${conf.url.replace(/\/$/, "")}/chat/completions`, {
      method: "POST",
      headers,
      body: JSON.stringify({ model: conf.model, messages, max_tokens: maxTokens }),
      signal: AbortSignal.any([
        ctx.signal,
        AbortSignal.timeout(Math.min(conf.timeout_ms, ctx.type.budget.episode_timeout_ms)),
      ]),
    });
    // An error status: the endpoint says it did not answer, nothing is charged.
    if (!res.ok) {
      settle(0);
      return failed(`llm endpoint answered ${res.status}`);
    }
    // It answered: what it spent is unknown unless it reports it, so the call is charged what it held.
    const body = await readText(res, MAX_HTTP_BODY);
    if (body === null) {
      settle(maxTokens);
      return failed(`llm response larger than ${MAX_HTTP_BODY} bytes`);
    }
    const completion = Completion.safeParse(parseJson(scrub(body)));
    if (!completion.success) {
      settle(maxTokens);
      return failed("llm endpoint answered something that is not a chat completion");
    }
    const data = completion.data;
    const usage = charge(data.usage, maxTokens);
    settle(usage.total_tokens);
    return { ok: true, result: { text: data.choices?.[0]?.message?.content ?? "", usage } };
  } catch (err) {
    // Timed out, or cut off by the episode's end, after sending (before or during the answer): the
    // endpoint may have spent what it held.
    settle(err instanceof Error && (err.name === "TimeoutError" || ctx.signal.aborted) ? maxTokens : 0);
    return failed(scrub(err instanceof Error ? err.message : String(err)));
  }
}
