/**
 * Response helpers shared by every HTTP handler. Errors are always
 * `{ "error": { "code", "message" } }` with a fitting status.
 */
import type { z } from "zod";
import { describeZodError, type Parsed, parseOptionalInt } from "../parse.ts";
import { readRequestBody } from "./limits.ts";
import { commitFailureKind } from "../store/index.ts";

/** JSON response helper. */
export function json(data: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(data), { status, headers: { "content-type": "application/json", ...headers } });
}

/** Consistent error body. */
export function httpError(status: number, code: string, message: string): Response {
  return json({ error: { code, message } }, status);
}

/**
 * The answer to an error no route handled. A commit the storage refused (a full disk, an I/O error)
 * is transient and recorded nothing: 503 `storage_unavailable` with Retry-After, so a webhook sender
 * or `fleet send` tries again (as a device does, refused its PUBACK). Anything else is a 500.
 */
export function unexpectedError(err: Error): Response {
  const kind = commitFailureKind(err);
  if (kind === "disk_full" || kind === "io" || kind === "readonly" || kind === "busy") {
    const message = `nothing was recorded: commits are failing (${kind}): ${err.message}; try again later`;
    return json({ error: { code: "storage_unavailable", message } }, 503, { "retry-after": "5" });
  }
  return httpError(500, "internal", err.message);
}

/** Default cap of an API request body. */
export const MAX_API_BODY = 1024 * 1024;

/** A request body parsed as JSON (empty body = null), or the error response to send. */
export async function readJson(
  req: Request,
  cap = MAX_API_BODY,
): Promise<{ ok: true; value: unknown; raw: Uint8Array } | { ok: false; res: Response }> {
  const body = await readRequestBody(req, cap);
  if (!body.ok) return body;
  const raw = body.bytes;
  try {
    // Not UTF-8 is not JSON (RFC 8259 §8.1): refused, as a webhook's body is, not patched with U+FFFD.
    return {
      ok: true,
      value: raw.byteLength ? JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(raw)) : null,
      raw,
    };
  } catch (err) {
    return { ok: false, res: httpError(400, "bad_json", `body is not JSON: ${(err as Error).message}`) };
  }
}

/** An integer query parameter in [min, max], its default when absent or empty, or a 400 naming it. */
export function intQuery(url: URL, name: string, dflt: number, min: number, max: number): number | Response {
  const v = parseOptionalInt(url.searchParams.get(name), dflt, { name, min, max });
  return v.ok ? v.value : httpError(400, "bad_query", v.message);
}

/** How a boolean query flag is spelled (docs/http-api.md): nothing else is taken. */
const FLAG_SPELLINGS: Readonly<Record<string, boolean>> = { "1": true, true: true, "0": false, false: false };

/** A boolean query flag: absent is false, `1`/`true` and `0`/`false` are what they say, anything else is refused. */
export function parseFlag(url: URL, name: string): Parsed<boolean, "bad_flag"> {
  const raw = url.searchParams.get(name);
  if (raw === null) return { ok: true, value: false };
  if (Object.hasOwn(FLAG_SPELLINGS, raw)) return { ok: true, value: FLAG_SPELLINGS[raw]! };
  return { ok: false, code: "bad_flag", message: `${name} must be 1, true, 0 or false, not ${JSON.stringify(raw)}` };
}

/** `parseFlag`, or the 400 `bad_query` naming the parameter. */
export function flagQuery(url: URL, name: string): boolean | Response {
  const v = parseFlag(url, name);
  return v.ok ? v.value : httpError(400, "bad_query", v.message);
}

/** A request body checked against `schema`, or a 400 `bad_request` naming the first bad field. */
export function parseBody<S extends z.ZodType>(
  schema: S,
  value: unknown,
): { ok: true; value: z.output<S> } | { ok: false; res: Response } {
  const r = schema.safeParse(value);
  return r.success
    ? { ok: true, value: r.data }
    : { ok: false, res: httpError(400, "bad_request", describeZodError("body", r.error)) };
}
