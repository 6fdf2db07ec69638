/**
 * Parsing untrusted text and values at the edges (HTTP, CLI, tool calls): one strict
 * integer parser and one way to word a zod failure. Both return results, never throw, and
 * every failure carries a code (what callers branch on) and a message naming the input.
 */
import type { z } from "zod";

/** A parsed value, or why the input was refused: `code` for callers, `message` for people. */
export type Parsed<T, C extends string = string> =
  | { readonly ok: true; readonly value: T }
  | { readonly ok: false; readonly code: C; readonly message: string };

/** Why `parseStrictInt` refused its input. */
export type IntProblem = "missing" | "not_integer" | "out_of_range";

/** Bounds (inclusive) and the name the message uses for the input. */
export interface IntBounds {
  readonly name: string;
  readonly min?: number;
  readonly max?: number;
}

const DECIMAL = /^(0|-?[1-9][0-9]*)$/;

/**
 * A base-10 integer written plainly: optional `-`, digits, no leading zeros, nothing else
 * (`Number()` would take "", " 7", "1e3", "0x10", "7.0", "-0" and "Infinity"). Safe and within
 * `[min, max]`.
 */
export function parseStrictInt(raw: string | null | undefined, bounds: IntBounds): Parsed<number, IntProblem> {
  const min = bounds.min ?? Number.MIN_SAFE_INTEGER;
  const max = bounds.max ?? Number.MAX_SAFE_INTEGER;
  const range = `an integer from ${min} to ${max}`;
  if (raw === null || raw === undefined || raw === "")
    return { ok: false, code: "missing", message: `${bounds.name} is required (${range})` };
  const value = Number(raw);
  if (!DECIMAL.test(raw) || !Number.isSafeInteger(value))
    return { ok: false, code: "not_integer", message: `${bounds.name} must be ${range}, got ${JSON.stringify(raw)}` };
  if (value < min || value > max)
    return { ok: false, code: "out_of_range", message: `${bounds.name} must be ${range}, got ${raw}` };
  return { ok: true, value };
}

/** `parseStrictInt`, with `dflt` for an absent or empty input. */
export function parseOptionalInt(
  raw: string | null | undefined,
  dflt: number,
  bounds: IntBounds,
): Parsed<number, IntProblem> {
  return raw === null || raw === undefined || raw === "" ? { ok: true, value: dflt } : parseStrictInt(raw, bounds);
}

/** A zod issue's path as people write it: `options.qos`, `messages[0].role`. */
export function formatPath(path: readonly PropertyKey[], names: readonly string[] = []): string {
  let out = "";
  for (const [i, seg] of path.entries()) {
    if (i === 0 && typeof seg === "number" && names[seg] !== undefined) out = names[seg];
    else if (typeof seg === "number") out += `[${seg}]`;
    else out += out === "" ? String(seg) : `.${String(seg)}`;
  }
  return out;
}

/**
 * The first problem of a zod failure as one line naming where it is: `what path message`.
 * `names` names the positions of a tuple (tool arguments).
 */
export function describeZodError(what: string, error: z.ZodError, names: readonly string[] = []): string {
  const issue = error.issues[0];
  if (!issue) return `${what} is invalid`;
  const where = formatPath(issue.path, names);
  const subject = where === "" ? what : `${what} ${where}`;
  if (issue.code === "unrecognized_keys") return `${subject} has unknown key(s) ${issue.keys.join(", ")}`;
  return `${subject} ${issue.message}`;
}

const LONE_SURROGATE = /\p{Surrogate}/u;

/**
 * Whether a string is well-formed Unicode: no lone surrogate (`"\ud800"` in JSON), which UTF-8
 * storage turns into U+FFFD, so two different ids holding one would be stored as the same id.
 */
export function isWellFormed(s: string): boolean {
  return !LONE_SURROGATE.test(s);
}
