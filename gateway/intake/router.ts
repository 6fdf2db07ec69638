/**
 * The router: maps an MQTT topic to the agents it addresses. Each type's `subscribe`
 * filters and `key` template name an agent `<type>/<key>`; the inbox topic
 * `fleet/agents/<type>/<key>/inbox` names one directly. One message matching several
 * types yields one target per agent.
 */
import { compileFilter } from "../../broker/index.ts";
import type { AgentTypeSpec, FleetSpec } from "../spec/index.ts";
import { topics } from "../protocol.ts";
import { ownerShard } from "../shard.ts";
import { agentId, keyProblem, type AgentId, type StimulusId } from "../types.ts";

/** An agent a message is for. */
export interface Target {
  readonly agent: AgentId;
  readonly type: AgentTypeSpec;
  readonly key: string;
}

/** Routing result: targets, plus reasons for matches that could not become an agent. */
export interface Route {
  /** The agents this gateway owns (all of them unless `[fleet] shard` is set). */
  readonly targets: readonly Target[];
  readonly inbox: boolean;
  readonly problems: readonly string[];
  /** Agents the message is for that other shards own (not recorded here), with their shard index. */
  readonly elsewhere: readonly { readonly agent: AgentId; readonly shard: number }[];
  /**
   * A `ctx.send` another shard forwarded through the broker (`fleet/sends/...`): recorded with
   * this id and the agent's inbox topic, exactly as the sender's own shard would have.
   */
  readonly forwarded?: { readonly sid: StimulusId; readonly topic: string };
}

const INBOX = /^fleet\/agents\/([^/]+)\/([^/]+)\/inbox$/;

/** Fill a key template from wildcard captures: "{1}" is the first capture. */
export function renderKey(template: string, captures: readonly string[]): string | null {
  let missing = false;
  const key = template.replace(/\{(\d+)\}/g, (_m, n: string) => {
    const c = captures[Number(n) - 1];
    if (c === undefined) missing = true;
    // A '#' capture spans levels; '/' cannot appear in a key (it separates type and key).
    return (c ?? "").replaceAll("/", ".");
  });
  return missing || key === "" ? null : key;
}

/** A value quoted in a problem, cut so a long topic cannot flood logs or rows. */
function clip(s: string): string {
  return s.length > 160 ? `${s.slice(0, 160)}…` : s;
}

/** Compile a key template once: literal parts and capture indexes. */
function compileKey(template: string): (captures: readonly string[]) => string | null {
  if (template === "{1}") {
    // The common case: the first wildcard level is the key.
    return (c) => (c[0] === undefined || c[0] === "" ? null : c[0].replaceAll("/", "."));
  }
  return (c) => renderKey(template, c);
}

/**
 * Compile the routing table of a spec: filters and key templates are parsed once, not per
 * message, and the routes of recent topics are remembered (devices publish to the same topics
 * over and over). With `[fleet] shard` the targets other shards own move to `elsewhere`.
 */
export function createRouter(spec: FleetSpec): (topic: string) => Route {
  return rememberRoutes(shardRouter(spec));
}

/** How many topics a router remembers the route of, and the longest topic it keeps. */
export const ROUTE_MEMORY = { topics: 4096, topicChars: 256 } as const;

/**
 * `route` with the routes of the last `limits.topics` distinct topics kept (the oldest goes first).
 * A route depends on nothing but the spec and the topic, and a new spec gets a new router. Long
 * topics and forwarded sends (a topic each) are routed every time, so what a device publishes can
 * neither grow the memory past its bound nor fill it with topics that never come again.
 */
export function rememberRoutes(
  route: (topic: string) => Route,
  limits: { readonly topics: number; readonly topicChars: number } = ROUTE_MEMORY,
): (topic: string) => Route {
  const known = new Map<string, Route>();
  return (topic) => {
    const hit = known.get(topic);
    if (hit) return hit;
    const r = route(topic);
    if (r.forwarded || topic.length > limits.topicChars) return r;
    if (known.size >= limits.topics) known.delete(known.keys().next().value!);
    known.set(topic, r);
    return r;
  };
}

function shardRouter(spec: FleetSpec): (topic: string) => Route {
  const route = createFleetRouter(spec);
  const shard = spec.fleet.shard;
  if (shard === null || shard.count === 1) return route;
  return (topic) => {
    const r = route(topic);
    if (r.targets.length === 0) return r.inbox || shard.index === 1 ? r : { ...r, problems: [] };
    const targets: Target[] = [];
    const elsewhere: { agent: AgentId; shard: number }[] = [];
    for (const t of r.targets) {
      const owner = ownerShard(t.agent, shard.count);
      if (owner === shard.index) targets.push(t);
      else elsewhere.push({ agent: t.agent, shard: owner });
    }
    // A message no agent can take is recorded as rejected once for the fleet: by shard 1.
    return { ...r, targets, elsewhere, problems: r.inbox || shard.index === 1 ? r.problems : [] };
  };
}

/** Every agent a topic addresses, whichever shard owns it. */
function createFleetRouter(spec: FleetSpec): (topic: string) => Route {
  const types = Object.values(spec.agents).map((type) => ({
    type,
    filters: type.subscribe.map(compileFilter),
    key: compileKey(type.key),
  }));
  const sharded = spec.fleet.shard !== null;
  return (topic) => {
    if (sharded && topic.startsWith(topics.sendsPrefix)) return forwardedSend(spec, topic);
    const inbox = INBOX.exec(topic);
    if (inbox) {
      const [, typeName, key] = inbox as unknown as [string, string, string];
      const type = spec.agents[typeName];
      const id = agentId(typeName, key);
      if (!type) return refusedInbox(`no agent type "${typeName}" in this fleet`);
      if (!id) return refusedInbox(`"${clip(key)}" is not a valid agent key: it ${keyProblem(key) ?? ""}`);
      return { targets: [{ agent: id, type, key }], inbox: true, problems: [], elsewhere: [] };
    }
    const targets: Target[] = [];
    const problems: string[] = [];
    const seen = new Set<string>();
    const levels = topic.split("/");
    for (const { type, filters, key: keyOf } of types) {
      for (const filter of filters) {
        const captures = filter(levels);
        if (!captures) continue;
        const key = keyOf(captures);
        const id = key === null ? null : agentId(type.name, key);
        if (!id || key === null) {
          const why = key === null ? "" : `: key "${clip(key)}" ${keyProblem(key) ?? "is invalid"}`;
          problems.push(`topic "${clip(topic)}" gives no valid key for ${type.name} (template ${type.key})${why}`);
          break;
        }
        if (!seen.has(id)) {
          seen.add(id);
          targets.push({ agent: id, type, key });
        }
        break;
      }
    }
    return { targets, inbox: false, problems, elsewhere: [] };
  };
}

/** An inbox topic that names no agent of this fleet. */
function refusedInbox(problem: string): Route {
  return { targets: [], inbox: true, problems: [problem], elsewhere: [] };
}

const SEND = /^fleet\/sends\/([^/]+)\/([^/]+)\/([0-9A-Za-z-]{1,64})\/(\d{1,6})$/;

/**
 * `fleet/sends/<type>/<key>/<episode>/<n>`: the n-th send of a committed episode on another
 * shard (docs/shards.md). Its stimulus id is the one a send within one gateway gets, so a
 * re-published forward (outputs are at least once) is a duplicate, and nothing else.
 */
function forwardedSend(spec: FleetSpec, topic: string): Route {
  const m = SEND.exec(topic);
  const type = m ? spec.agents[m[1]!] : undefined;
  const id = m ? agentId(m[1]!, m[2]!) : null;
  if (!m || !type || !id) return refusedInbox(`"${clip(topic)}" is not a forwarded send to an agent of this fleet`);
  return {
    targets: [{ agent: id, type, key: m[2]! }],
    inbox: true,
    problems: [],
    elsewhere: [],
    forwarded: { sid: `inbox:${m[3]}:${m[4]}` as StimulusId, topic: topics.inbox(m[1]!, m[2]!) },
  };
}
