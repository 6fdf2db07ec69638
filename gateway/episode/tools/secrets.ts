/**
 * Scrubbing secret values out of what a tool hands back (the http tool's secrets, the llm tool's
 * API key): anything an endpoint echoes reaches the agent and the event log. A value is matched
 * as sent (header values are sent trimmed) and as it is, and in every spelling JSON has for it
 * (`\"`, `\\`, `\/`, `\n`, ..., any character as `\uXXXX`), so a body scrubbed as text still
 * parses, without the secret. Longer values are matched first: a secret that contains another is
 * scrubbed whole.
 */

/** Values shorter than this are left alone (they would scrub ordinary text). */
export const MIN_SCRUBBED_LENGTH = 4;

/** JSON's short escapes, by the character they stand for. */
const SHORT_ESCAPES: Readonly<Record<string, string>> = {
  '"': '\\"',
  "\\": "\\\\",
  "/": "\\/",
  "\b": "\\b",
  "\f": "\\f",
  "\n": "\\n",
  "\r": "\\r",
  "\t": "\\t",
};

const regexEscape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");

/** A pattern for one UTF-16 code unit as it is or as JSON may escape it. */
function unitPattern(unit: string): string {
  const hex = unit.charCodeAt(0).toString(16).padStart(4, "0");
  // \uXXXX with the hex digits in either case.
  const u = `\\\\u${[...hex].map((d) => (/[a-f]/.test(d) ? `[${d}${d.toUpperCase()}]` : d)).join("")}`;
  const short = SHORT_ESCAPES[unit];
  return `(?:${[regexEscape(unit), u, ...(short ? [regexEscape(short)] : [])].join("|")})`;
}

/**
 * A function that replaces each of `secrets`' values (and its trimmed value) with
 * `[secret:NAME]`, however JSON spells it; the identity when there is nothing to scrub.
 */
export function secretScrubber(
  secrets: readonly { readonly name: string; readonly value: string | undefined }[],
): (text: string) => string {
  const forms: { name: string; value: string }[] = [];
  for (const { name, value } of secrets)
    for (const v of new Set([value ?? "", (value ?? "").trim()]))
      if (v.length >= MIN_SCRUBBED_LENGTH) forms.push({ name, value: v });
  if (forms.length === 0) return (text) => text;
  forms.sort((a, b) => b.value.length - a.value.length);
  const pattern = forms.map((f) => `(${f.value.split("").map(unitPattern).join("")})`).join("|");
  const re = new RegExp(pattern, "g");
  return (text) =>
    text.replace(re, (...groups: unknown[]) => {
      const i = groups.slice(1, forms.length + 1).findIndex((g) => g !== undefined);
      return `[secret:${forms[i]?.name ?? "?"}]`;
    });
}
