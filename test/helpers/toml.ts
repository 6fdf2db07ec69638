/**
 * fleet.toml building blocks the suites share: the loopback header, one agent type table,
 * and the agent types several suites deploy (the throws fixture, the shipped temp-monitor).
 */
import { join } from "node:path";
import { fixture, ROOT, shippedAgent } from "./gateway.ts";

/** A TOML basic string (JSON string syntax is valid TOML for these values). */
export const q = (s: string): string => JSON.stringify(s);

/** What `fleetHeader` adds beyond the loopback defaults. */
export interface HeaderOptions {
  /** `max_concurrent_episodes` (default 4). */
  readonly maxConcurrent?: number;
  /** `drain_timeout_ms`; left to the spec default when absent. */
  readonly drainTimeoutMs?: number;
  /** The broker's `max_packet_bytes`; left to the spec default when absent. */
  readonly maxPacketBytes?: number;
  /** More `[fleet]` lines, e.g. `sandbox = "uid"`. */
  readonly fleet?: string;
  /** More `[broker]` lines, e.g. a devices file. */
  readonly broker?: string;
  /** Text after `[http]`, e.g. more tables. */
  readonly extra?: string;
}

/** `[fleet]`, `[broker]` and `[http]` on loopback; the ports come from the harness flags. */
export function fleetHeader(name: string, o: HeaderOptions = {}): string {
  const lines = [
    "[fleet]",
    `name = ${q(name)}`,
    `max_concurrent_episodes = ${o.maxConcurrent ?? 4}`,
    o.drainTimeoutMs === undefined ? null : `drain_timeout_ms = ${o.drainTimeoutMs}`,
    o.fleet ?? null,
    "",
    "[broker]",
    'host = "127.0.0.1"',
    o.maxPacketBytes === undefined ? null : `max_packet_bytes = ${o.maxPacketBytes}`,
    o.broker ?? null,
    "",
    "[http]",
    'host = "127.0.0.1"',
    o.extra ?? null,
  ];
  return `${lines.filter((l) => l !== null).join("\n")}\n`;
}

/** Keys of one agent type beyond module and subscribe. */
export interface AgentTypeOptions {
  /** Key template (default `{1}`, the first wildcard). */
  readonly key?: string;
  /** Payload field that names a stimulus (dedup). */
  readonly dedup?: string;
  readonly instances?: readonly string[];
  /** More lines for the table, or further tables (`[agents.<name>.retry]`). */
  readonly extra?: string;
}

/** One `[agents.<name>]` table. */
export function agentType(
  name: string,
  module: string,
  subscribe: readonly string[],
  o: AgentTypeOptions = {},
): string {
  return `
[agents.${name}]
module = ${q(module)}
subscribe = [${subscribe.map(q).join(", ")}]
key = ${q(o.key ?? "{1}")}
${o.dedup ? `dedup = ${q(o.dedup)}\n` : ""}${
  o.instances ? `instances = [${o.instances.map(q).join(", ")}]\n` : ""
}${o.extra ?? ""}`;
}

/** The counter fixture keyed by the topic's `+`, deduplicated by `id`. */
export function counterType(
  name: string,
  subscribe: string,
  o: { instances?: readonly string[]; extra?: string } = {},
): string {
  return agentType(name, fixture("counter"), [subscribe], { dedup: "id", ...o });
}

/** `thrower`: the throws fixture, failing every episode; one attempt, so it is quarantined at once. */
export function throwerType(subscribe: string): string {
  return agentType("thrower", fixture("throws"), [subscribe], {
    dedup: "id",
    extra: "\n[agents.thrower.retry]\nmax_attempts = 1\nbackoff_ms = 10\n",
  });
}

/** The shipped temp-monitor on `sensors/+/temperature`: alerts above 80 (hysteresis 2) on `alerts/#`. */
export function tempMonitorType(name: string, o: { instances?: readonly string[]; extra?: string } = {}): string {
  const tools = 'tools = ["publish"]\npublish = ["alerts/#"]\nconfig = { threshold = 80.0, hysteresis = 2.0 }\n';
  return agentType(name, shippedAgent("temp-monitor"), ["sensors/+/temperature"], {
    dedup: "id",
    instances: o.instances,
    extra: tools + (o.extra ?? ""),
  });
}

/**
 * A two-agent chain: `relay/<key>` (from `door/<key>/event`) sends every stimulus to
 * `alerter/d1`, which decides `alert` and publishes to `alerts/d1`.
 */
export function relayChainTypes(): string {
  return (
    agentType("relay", join(ROOT, "test/fixtures/sources/relay.ts"), ["door/+/event"], {
      extra: `tools = ["send"]\nconfig = { to = ${q("alerter/d1")} }\n`,
    }) +
    agentType("alerter", join(ROOT, "test/fixtures/ops/alerter.ts"), ["alerter/+/never"], {
      instances: ["d1"],
      extra: 'tools = ["publish"]\npublish = ["alerts/#"]\n',
    })
  );
}
