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

const tokens = z.number().int().nonnegative().optional();
/** The parts of an OpenAI-style chat completion the tool reads; anything else is ignored. */
const Completion = z.looseObject({
  choices: z.array(z.looseObject({ message: z.looseObject({ content: z.string().nullish() }).optional() })).optional(),
  usage: z.looseObject({ prompt_tokens: tokens, completion_tokens: tokens, total_tokens: tokens }).nullish(),
});

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
  if (left <= 0) return deny(`budget tokens_per_day (${ctx.type.budget.tokens_per_day}) exhausted`);
  const maxTokens = Math.min(req.max_tokens ?? 512, left);
  // Held now, settled on the answer: calls made at once share what is left, not each all of it.
  ctx.spendTokens(maxTokens);
  let held = maxTokens;
  const settle = (used: number) => {
    ctx.spendTokens(used - held);
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
      signal: AbortSignal.timeout(Math.min(conf.timeout_ms, ctx.type.budget.episode_timeout_ms)),
    });
    const body = await readText(res, MAX_HTTP_BODY);
    if (!res.ok || body === null) {
      settle(0);
      return failed(`llm endpoint answered ${res.status}`);
    }
    const completion = Completion.safeParse(parseJson(scrub(body)));
    if (!completion.success) {
      settle(0);
      return failed("llm endpoint answered something that is not a chat completion");
    }
    const data = completion.data;
    // An endpoint that reports no usage is charged the whole max_tokens it was allowed.
    const prompt = data.usage?.prompt_tokens ?? 0;
    const answered = data.usage ? (data.usage.completion_tokens ?? 0) : maxTokens;
    const usage = {
      prompt_tokens: prompt,
      completion_tokens: answered,
      total_tokens: data.usage?.total_tokens ?? prompt + answered,
    };
    settle(usage.total_tokens);
    return { ok: true, result: { text: data.choices?.[0]?.message?.content ?? "", usage } };
  } catch (err) {
    settle(0);
    return failed(scrub(err instanceof Error ? err.message : String(err)));
  }
}
