/**
 * Which keys of fleet.toml a running gateway cannot change without a restart: listeners
 * (hosts, ports, TLS files, packet limit), the span exporter, and process-wide choices made at
 * start. A hot
 * reload that changes one of them is refused with "needs restart: …" instead of claiming
 * it was applied. Auth and ACL keys (`allow_anonymous`, `devices`), `max_connections`, `max_keepalive`,
 * `connection_messages` and the
 * HTTP access keys and limits (`allowed_hosts`, `allow_unauthenticated`, `open_metrics`,
 * `max_concurrent_requests`, `max_body_bytes_in_flight`) are applied live by the gateway.
 */
import { canonicalJson } from "../hash.ts";
import type { FleetSpec } from "./types.ts";

/** Keys read once at start, by table. */
const RESTART_KEYS = {
  // The shard decides which agents live in this data dir and the broker session's name.
  fleet: ["data_dir", "synchronous", "sandbox", "warm_spares", "allow_weak_sandbox", "sandbox_uids", "shard"],
  // The persistence (and its queue bound) is built with the broker at start.
  broker: [
    "host",
    "mqtt_port",
    "ws_port",
    "tls_port",
    "wss_port",
    "tls",
    "use_identity_as_username",
    "max_packet_bytes",
    "persistence",
    "max_offline_messages",
    "max_offline_bytes",
    "max_offline_bytes_total",
    "session_expiry_days",
    "trust_dup",
    "sys_interval",
    // Embedded or external, and the external broker's url, login, client id and CA.
    "external",
  ],
  http: ["host", "port", "tls"],
  // The span exporter is built once at start.
  telemetry: ["otlp_endpoint", "service_name"],
} as const satisfies { [T in keyof FleetSpec]?: readonly (keyof FleetSpec[T])[] };

/** Compiled keys that stand for several keys of the file. */
const RENDERED: Record<string, string> = {
  "broker.tls": "broker.tls_*",
  "http.tls": "http.tls_*",
  "broker.external": "broker.url (with username, password_env, client_id, ca_file, mqtt_version)",
};

type Shard = FleetSpec["fleet"]["shard"];

function shardText(s: Shard): string {
  return s === null ? "none" : `"${s.index}/${s.count}"`;
}

/**
 * Why a changed `[fleet] shard` takes more than a restart, as the refused start says it (docs/shards.md):
 * a data dir keeps its shard, so another index needs that shard's data dir, another count `fleet reshard`.
 * Unsharded and "1/1" own the same agents: between them a restart does (the session's name changes).
 */
function shardChangeWhy(before: Shard, after: Shard): string | null {
  const count = (s: Shard) => s?.count ?? 1;
  if (count(before) === 1 && count(after) === 1) return null;
  if (before !== null && after !== null && before.count === after.count)
    return (
      `each shard keeps its own data dir: a restart is refused unless data_dir names shard ` +
      `${after.index}/${after.count}'s`
    );
  return "not by a restart either: a new shard count needs `fleet reshard`";
}

/** Keys a reload applies to the running broker without a restart. */
export const LIVE_BROKER_KEYS = [
  "allow_anonymous",
  "devices_file",
  "max_connections",
  "max_keepalive",
  "connection_messages",
] as const;

/** Keys of `[http]` a reload applies to the running server (the guard reads them per request). */
export const LIVE_HTTP_KEYS = [
  "allow_unauthenticated",
  "allowed_hosts",
  "open_metrics",
  "max_concurrent_requests",
  "max_body_bytes_in_flight",
] as const satisfies readonly (keyof FleetSpec["http"])[];

type BrokerKeys = Pick<FleetSpec["broker"], "host_default" | "allow_anonymous">;

/**
 * When fleet.toml sets no host, its default follows `allow_anonymous`, a key applied live. Turning
 * anonymous access off would widen the default to every address: the listener stays where it is
 * (still safe) until a restart, so that is no reason to refuse the reload. Turning it on narrows
 * the default to loopback: the listener must move, and the message says why. null: the host
 * changed otherwise.
 */
function defaultHostChange(
  before: BrokerKeys,
  after: BrokerKeys,
): { readonly restart: false } | { readonly restart: true; readonly why: string } | null {
  if (!before.host_default || !after.host_default) return null;
  if (before.allow_anonymous && !after.allow_anonymous) return { restart: false };
  return { restart: true, why: "its default follows allow_anonymous = true: the listener must move to loopback" };
}

/**
 * The changed keys that need a restart, as `table.key (old -> new)`. `ignore` names keys a
 * command-line flag overrides (e.g. `broker.mqtt_port` under `--mqtt-port`): the file's
 * value does not matter then.
 */
export function restartNeeded(before: FleetSpec, after: FleetSpec, ignore: readonly string[] = []): string[] {
  const out: string[] = [];
  // Without an exporter no telemetry key is read (service_name defaults to [fleet] name, which may change).
  const exporting = before.telemetry.otlp_endpoint !== null || after.telemetry.otlp_endpoint !== null;
  for (const [table, keys] of Object.entries(RESTART_KEYS) as [keyof typeof RESTART_KEYS, readonly string[]][]) {
    if (table === "telemetry" && !exporting) continue;
    const a = before[table] as unknown as Record<string, unknown>;
    const b = after[table] as unknown as Record<string, unknown>;
    for (const key of keys) {
      const path = `${table}.${key}`;
      if (ignore.includes(path)) continue;
      const was = canonicalJson(a[key] ?? null);
      const now = canonicalJson(b[key] ?? null);
      if (was === now) continue;
      if (path === "fleet.shard") {
        const why = shardChangeWhy(before.fleet.shard, after.fleet.shard);
        out.push(
          `fleet.shard (${shardText(before.fleet.shard)} -> ${shardText(after.fleet.shard)}${why ? `: ${why}` : ""})`,
        );
        continue;
      }
      if (path === "broker.host") {
        const change = defaultHostChange(before.broker, after.broker);
        if (change?.restart === false) continue;
        if (change) {
          out.push(`broker.host (${was} -> ${now}: ${change.why})`);
          continue;
        }
      }
      out.push(`${RENDERED[path] ?? path} (${was} -> ${now})`);
    }
  }
  // The replicator is built once at start from the whole table.
  const was = canonicalJson(before.replication ?? null);
  const now = canonicalJson(after.replication ?? null);
  if (was !== now && !ignore.includes("replication")) out.push("replication (the [replication] table changed)");
  // The fleet's name is read at start only by the span exporter and the replicator (its fleet there).
  const replicating = before.replication !== null || after.replication !== null;
  if ((exporting || replicating) && before.fleet.name !== after.fleet.name)
    out.push(`fleet.name (${canonicalJson(before.fleet.name)} -> ${canonicalJson(after.fleet.name)})`);
  return out;
}
