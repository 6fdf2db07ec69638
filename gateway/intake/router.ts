/**
 * The router: maps an MQTT topic to the agents it addresses. Each type's `subscribe`
 * filters and `key` template name an agent `<type>/<key>`; the inbox topic
 * `fleet/agents/<type>/<key>/inbox` names one directly. One message matching several
 * types yields one target per agent.
 */
import { compileFilter } from "../../broker/index.ts";
import type { AgentTypeSpec, FleetSpec } from "../spec/index.ts";
import { agentId, keyProblem, type AgentId } from "../types.ts";

/** An agent a message is for. */
export interface Target {
  readonly agent: AgentId;
  readonly type: AgentTypeSpec;
  readonly key: string;
}

/** Routing result: targets, plus reasons for matches that could not become an agent. */
export interface Route {
  readonly targets: readonly Target[];
  readonly inbox: boolean;
  readonly problems: readonly string[];
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

/** Compile the routing table of a spec: filters and key templates are parsed once, not per message. */
export function createRouter(spec: FleetSpec): (topic: string) => Route {
  const types = Object.values(spec.agents).map((type) => ({
    type,
    filters: type.subscribe.map(compileFilter),
    key: compileKey(type.key),
  }));
  return (topic) => {
    const inbox = INBOX.exec(topic);
    if (inbox) {
      const [, typeName, key] = inbox as unknown as [string, string, string];
      const type = spec.agents[typeName];
      const id = agentId(typeName, key);
      if (!type) return { targets: [], inbox: true, problems: [`no agent type "${typeName}" in this fleet`] };
      if (!id) {
        const why = keyProblem(key) ?? "";
        return { targets: [], inbox: true, problems: [`"${clip(key)}" is not a valid agent key: it ${why}`] };
      }
      return { targets: [{ agent: id, type, key }], inbox: true, problems: [] };
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
    return { targets, inbox: false, problems };
  };
}
