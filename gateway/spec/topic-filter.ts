/**
 * MQTT topic filters as fleet.toml may use them (subscribe and publish patterns): what makes
 * one unusable, and how many `{n}` key captures its wildcards provide.
 */

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
