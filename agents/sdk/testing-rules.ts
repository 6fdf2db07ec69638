/**
 * The gateway's rules that `agent-fleets/testing` (./testing.ts) applies as the gateway does, where
 * the gateway's own code cannot come along into an author's `bun test`: the episode timeout's
 * default, the size of the state an episode may send back, and what the `publish` tool accepts
 * (gateway/episode/tools/publish.ts; test/sdk-testing.test.ts holds the two to the same answers).
 */
import { ToolDenied } from "./index.ts";

/** The gateway's default `episode_timeout_ms` (gateway/spec DEFAULT_BUDGET). */
export const DEFAULT_TIMEOUT_MS = 5000;

/** Most records (decisions, emits, log lines, tool calls, wake-ups, clock reads) of one episode (CHILD_LIMITS). */
export const MAX_RECORDS = 10_000;

/** Most bytes of one episode's records, as JSON (gateway/episode CHILD_LIMITS.max_record_bytes). */
export const MAX_RECORD_BYTES = 8 * 1024 * 1024;

/**
 * Most bytes of state (as JSON) an episode can send back: the gateway refuses a message from the
 * subprocess past its record limit and a small envelope, and fails the episode as `too_large`.
 */
export const MAX_STATE_BYTES = MAX_RECORD_BYTES;

/**
 * Why the gateway would deny `publish(...args)` for agent `type/key` with these `publish` patterns,
 * or null when it would queue it. `patterns` null: any topic (the kit was not given the type's list).
 */
export function publishDenial(
  args: readonly unknown[],
  agent: { readonly type: string; readonly key: string },
  patterns: readonly string[] | null,
): ToolDenied | null {
  const [topic, , options] = args;
  const deny = (reason: string) => new ToolDenied("publish", reason);
  if (args.length < 2 || args.length > 3)
    return deny(`publish takes (topic, payload, options), got ${args.length} argument(s)`);
  if (typeof topic !== "string") return deny("publish topic must be a string");
  if (options !== undefined) {
    if (typeof options !== "object" || options === null || Array.isArray(options))
      return deny("publish options must be an object { retain?, qos? }");
    const o = options as Record<string, unknown>;
    const unknown = Object.keys(o).filter((k) => k !== "retain" && k !== "qos");
    if (unknown.length > 0) return deny(`publish options has unknown key(s) ${unknown.join(", ")}`);
    if (o.retain !== undefined && typeof o.retain !== "boolean")
      return deny("publish options.retain must be true or false");
    if (o.qos !== undefined && o.qos !== 0 && o.qos !== 1) return deny("publish options.qos must be 0 or 1");
  }
  const own = `fleet/agents/${agent.type}/${agent.key}/`;
  const shape = topicProblem(topic, topic.startsWith(own));
  if (shape !== null) return deny(`topic "${topic}": ${shape}`);
  if (topic.startsWith(own)) {
    if (["out", "status", "inbox"].includes(topic.slice(own.length)))
      return deny(`topic "${topic}" is the gateway's to publish (ctx.emit writes out)`);
    return null;
  }
  if (patterns !== null && !patterns.some((p) => topicMatches(p, topic)))
    return deny(`topic "${topic}" is not allowed by agents.${agent.type}.publish`);
  return null;
}

/** What MQTT (and the broker, for a topic not the agent's own) refuses in a topic an agent publishes to. */
function topicProblem(topic: string, own: boolean): string | null {
  if (topic.length === 0) return "empty topic";
  if (topic.includes("+") || topic.includes("#")) return "wildcard in publish topic";
  if (topic.includes("\u0000")) return "null character in topic";
  if (new TextEncoder().encode(topic).length > 65_535) return "topic longer than 65535 bytes";
  const levels = topic.split("/");
  if (levels.length > 100) return "topic of more than 100 levels";
  if (own) return null;
  if (topic.startsWith("$")) return "topics starting with '$' are reserved";
  const inbox = levels.length === 5 && levels[1] === "agents" && levels[2] && levels[3] && levels[4] === "inbox";
  if ((topic === "fleet" || topic.startsWith("fleet/")) && !inbox)
    return "devices may only publish to fleet/agents/<type>/<key>/inbox under fleet/";
  return null;
}

/** Whether MQTT topic filter `filter` (`+` one level, `#` the rest) matches `topic`. */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
}
