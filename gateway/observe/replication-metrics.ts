/**
 * Replication series of `/metrics` (docs/replication.md): the backlog the central server has
 * not confirmed (rows, bytes, seconds), the confirmed cursor, what was pushed, failures by
 * kind and when the last one was, rows lost to retention. Present only when `[replication]` is configured.
 */
import { Counter, Gauge, type Registry } from "prom-client";
import type { ReplicationStatus } from "../replication/index.ts";

/** A counter that follows a monotonic number kept by the replicator. */
function follow(registry: Registry, name: string, help: string, labels: string[], read: () => [string[], number][]) {
  const seen = new Map<string, number>();
  return new Counter({
    name,
    help,
    labelNames: labels,
    registers: [registry],
    collect() {
      for (const [values, v] of read()) {
        const k = values.join("\n");
        const before = seen.get(k) ?? 0;
        if (v > before) this.inc(Object.fromEntries(labels.map((l, i) => [l, values[i]!])), v - before);
        seen.set(k, Math.max(before, v));
      }
    },
  });
}

/** Register the replication series; `read` returns null when replication is off. */
export function replicationMetrics(registry: Registry, read: () => ReplicationStatus | null): void {
  const registers = [registry];
  const gauge = (name: string, help: string, value: (s: ReplicationStatus) => number) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        const s = read();
        if (s) this.set(value(s));
      },
    });
  gauge(
    "fleet_replication_backlog_rows",
    "Rows the central server has not confirmed (replication queue entries).",
    (s) => s.backlog.rows,
  );
  gauge("fleet_replication_backlog_bytes", "Approximate size of the unconfirmed rows.", (s) => s.backlog.bytes);
  gauge(
    "fleet_replication_lag_seconds",
    "Age of the oldest unconfirmed row; 0 when the center is caught up.",
    (s) => s.backlog.lag_s,
  );
  gauge("fleet_replication_up", "1 while the last push to the central server succeeded, else 0.", (s) =>
    s.consecutive_failures === 0 && s.state === "streaming" ? 1 : 0,
  );
  gauge(
    "fleet_replication_over_backlog",
    "1 while the backlog is past max_backlog_mb (retention no longer waits).",
    (s) => (s.over_backlog ? 1 : 0),
  );
  gauge("fleet_replication_last_push_timestamp_seconds", "When the last batch was confirmed.", (s) =>
    s.last_push_at === null ? 0 : s.last_push_at / 1000,
  );
  gauge(
    "fleet_replication_confirmed_seq",
    "The durable cursor: the newest replication queue entry the central server confirmed.",
    (s) => s.cursor.confirmed_seq,
  );
  gauge("fleet_replication_queued_seq", "The newest replication queue entry written.", (s) => s.cursor.queued_seq);
  gauge(
    "fleet_replication_last_error_timestamp_seconds",
    "When the current run of failures last failed; 0 while pushes succeed.",
    (s) => (s.last_error === null ? 0 : s.last_error.at / 1000),
  );
  follow(registry, "fleet_replication_pushed_rows_total", "Rows confirmed by the central server.", [], () => {
    const s = read();
    return s ? [[[], s.pushed_rows]] : [];
  });
  follow(
    registry,
    "fleet_replication_lost_rows_total",
    "Rows collected locally before the center confirmed them.",
    [],
    () => {
      const s = read();
      return s ? [[[], s.lost_rows]] : [];
    },
  );
  follow(
    registry,
    "fleet_replication_errors_total",
    "Failed pushes by kind (unreachable|auth|schema|rejected|config|local).",
    ["kind"],
    () => {
      const s = read();
      return s ? Object.entries(s.errors).map(([k, v]) => [[k], v]) : [];
    },
  );
}
