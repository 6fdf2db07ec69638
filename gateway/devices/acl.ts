/**
 * Device topic ACLs (docs/mqtt.md, docs/devices.md): Mosquitto-style `pattern` lines where `%c`
 * is the client id and `%u` the username. Pure functions on strings.
 *
 * A substituted value is a literal: a client id or username that contains `/`, `+` or `#`
 * would widen (or reshape) the pattern, so such values match nothing.
 */
import { matchTopic } from "../../broker/topics.ts";
import { isWellFormed } from "../parse.ts";

/**
 * Why an ACL pattern is unusable, or null when it is fine. A subscribe pattern may name the broker's
 * `$SYS/broker/` tree (counts only: broker/sys.ts); every other `$` topic stays the broker's own.
 */
export function aclPatternProblem(pattern: string, use: "publish" | "subscribe" = "publish"): string | null {
  if (pattern.length === 0) return "must not be empty";
  if (pattern.includes("\u0000")) return "must not contain NUL";
  if (!isWellFormed(pattern)) return "must be valid Unicode (a lone surrogate is not: MQTT topics are UTF-8)";
  if (pattern.startsWith("$") && !(use === "subscribe" && pattern.startsWith("$SYS/broker/")))
    return use === "subscribe"
      ? "must not start with $ other than $SYS/broker/ (broker-internal topics stay protected)"
      : "must not start with $ ($SYS and broker-internal topics stay protected)";
  const bad = /%[^cu]|%$/.exec(pattern);
  if (bad)
    return `has an unknown substitution ${JSON.stringify(bad[0])} (use %c for the client id, %u for the username)`;
  const levels = pattern.split("/");
  for (const [i, level] of levels.entries()) {
    // MQTT-4.7.1-1 / -2 apply to patterns as to subscription filters.
    if (level.includes("#") && (level !== "#" || i !== levels.length - 1))
      return "# must be a whole level and the last one";
    if (level.includes("+") && level !== "+") return "+ must be a whole level";
  }
  return null;
}

/** A value that may stand in for `%c` or `%u`: one plain topic level. */
export function isSafeSubstitution(value: string): boolean {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: NUL is what this rejects (MQTT-4.7.3-2)
  return value.length > 0 && !/[/+#\u0000]/.test(value) && !value.startsWith("$");
}

/** Who a pattern is expanded for. */
export interface AclSubject {
  readonly clientId: string;
  readonly username: string;
}

/**
 * Expand `%c` / `%u` in a pattern; null when the pattern uses a value that is not a safe
 * literal (that pattern then grants nothing).
 */
export function substitute(pattern: string, who: AclSubject): string | null {
  if (pattern.includes("%c") && !isSafeSubstitution(who.clientId)) return null;
  if (pattern.includes("%u") && !isSafeSubstitution(who.username)) return null;
  return pattern.replace(/%([cu])/g, (_m, k: string) => (k === "c" ? who.clientId : who.username));
}

/**
 * Whether every topic the subscription `filter` can match is matched by `pattern`
 * (like Mosquitto's subscribe ACL check): `+` in the filter needs `+` or `#` in the
 * pattern, `#` in the filter needs `#`.
 */
export function patternCoversFilter(pattern: string, filter: string): boolean {
  // MQTT-4.7.2-1: a pattern starting with a wildcard does not reach '$' topics.
  if ((pattern.startsWith("+") || pattern.startsWith("#")) && filter.startsWith("$")) return false;
  const p = pattern.split("/");
  const f = filter.split("/");
  for (let i = 0; i < p.length; i++) {
    const pl = p[i];
    if (pl === "#") return true; // covers this level and below, and the parent (MQTT-4.7.1-2)
    const fl = f[i];
    if (fl === undefined) return false;
    if (fl === "#") return false;
    if (pl === "+") continue; // one level: a literal or a '+'
    if (fl === "+" || fl !== pl) return false;
  }
  return p.length === f.length;
}

/** Whether any pattern lets `who` publish to `topic`. */
export function aclAllowsPublish(patterns: readonly string[], who: AclSubject, topic: string): boolean {
  for (const pattern of patterns) {
    const expanded = substitute(pattern, who);
    if (expanded !== null && matchTopic(expanded, topic) !== null) return true;
  }
  return false;
}

/** Whether any pattern covers the subscription `filter` for `who`. */
export function aclAllowsSubscribe(patterns: readonly string[], who: AclSubject, filter: string): boolean {
  for (const pattern of patterns) {
    const expanded = substitute(pattern, who);
    if (expanded !== null && patternCoversFilter(expanded, filter)) return true;
  }
  return false;
}
