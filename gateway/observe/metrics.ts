/**
 * Prometheus metrics of one gateway (`GET /metrics`, docs/http-api.md) and the summary that
 * `fleet/health` carries. A registry per gateway, never prom-client's global one.
 *
 * Labels are agent *types* (and small fixed sets: outcome, source, status, budget), never
 * agent keys: 10,000 agents make as many series as one. Event-driven series (episodes,
 * stimuli, commits) move from the `FleetEvents` bus; gauges that need the database read a
 * cached per-type snapshot on scrape, so a scrape costs a few aggregate queries at most
 * once a second.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { BrokerStats } from "../../broker/index.ts";
import type { FleetEvents } from "../events.ts";
import type { DiskStatus } from "./disk.ts";
import { RollingCounts } from "./rates.ts";
import {
  AGENT_STATUSES,
  BUDGETS,
  SnapshotCache,
  readSnapshot,
  type FleetSnapshot,
  type TypeQueueCount,
} from "./snapshot.ts";
import type { SpecVersion } from "../spec/index.ts";
import type { Store } from "../store/index.ts";
import type { ReplicationStatus } from "../replication/index.ts";
import { replicationMetrics } from "./replication-metrics.ts";

/** prom-client's event loop lag sampler cannot be left out; its metrics are dropped, so it samples once an hour. */
const LAG_SAMPLER_IDLE_MS = 3_600_000;

/** What the metrics read from the gateway (the `Gateway` class satisfies it). */
export interface MetricsHost {
  readonly events: FleetEvents;
  readonly store: Store;
  readonly spec: SpecVersion;
  readonly specError: string | null;
  readonly scheduler: { readonly active: number; readonly capacity: number; readonly pacedAgents: number } | undefined;
  readonly broker: { stats(): BrokerStats; subscriptionCount?(): number } | undefined;
  /** Episode subprocess groups alive now. */
  subprocesses(): number;
  /** How far the clock reads earlier than the newest time seen or recorded, ms (gateway.ts). */
  clockBehindMs?(): number;
  /** The data disk's free space against its reserve ([fleet] disk_free_limit_mb), or null before start. */
  diskStatus?(): DiskStatus | null;
  /** Stimuli waiting per type, from memory (the queue book); left out, the store is counted. */
  queues?(): readonly TypeQueueCount[];
  /** Replication status, null when `[replication]` is not configured. */
  replication?(): ReplicationStatus | null;
  /** Spans the OTLP collector did not take, by reason; null without `[telemetry] otlp_endpoint`. */
  telemetryDropped?(): Readonly<Record<string, number>> | null;
}

/** Options; tests inject the clock. */
export interface MetricsOptions {
  readonly now?: () => number;
  /** How long a database snapshot is reused, ms (default 1000). */
  readonly snapshotTtlMs?: number;
  /** Collect prom-client's default process metrics (default true). */
  readonly processMetrics?: boolean;
}

const EPISODE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
/** From a few ms (a free slot) to an hour (a paused agent, a budget window). */
const WAIT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600];
const COMMIT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];

/** Rolling fleet-level rates over the last minute. */
export interface FleetRates {
  readonly window_s: number;
  readonly episodes: number;
  readonly failures: number;
  readonly episodes_per_min: number;
  readonly failures_per_min: number;
  /** failures / episodes in the window; 0 when nothing ran. */
  readonly failure_ratio: number;
  readonly stimuli: number;
  readonly duplicates: number;
}

/** A counter that mirrors a monotonic number kept elsewhere (broker counters). */
function mirrorCounter(registry: Registry, name: string, help: string, read: () => number | undefined): Counter {
  let seen = 0;
  return new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const v = read();
      if (v === undefined) return;
      if (v < seen) seen = 0; // the source restarted
      if (v > seen) this.inc(v - seen);
      seen = v;
    },
  });
}

/** The metrics of one gateway. */
export class FleetMetrics {
  readonly registry = new Registry();
  /** The `fleet_replication_*` series, exported only while replication runs (`[replication]` configured). */
  private readonly replicationRegistry = new Registry();
  private readonly now: () => number;
  private readonly snapshots: SnapshotCache;
  private readonly rates: RollingCounts<"episodes" | "failures" | "stimuli" | "duplicates">;
  private readonly unsubscribe: (() => void)[] = [];
  private readonly commitSeconds: Histogram;

  constructor(
    private readonly host: MetricsHost,
    opts: MetricsOptions = {},
  ) {
    const now = (this.now = opts.now ?? Date.now);
    this.snapshots = new SnapshotCache(
      () => readSnapshot(host.store, host.spec.spec, now(), host.queues?.bind(host)),
      now,
      opts.snapshotTtlMs ?? 1000,
    );
    this.rates = new RollingCounts(["episodes", "failures", "stimuli", "duplicates"], now, 60);
    const registers = [this.registry];
    if (opts.processMetrics ?? true) {
      // The event loop lag's sampler runs whether or not it is exported: at prom-client's 10 ms
      // it woke the gateway 100 times a second (~8 ms of CPU a second on an idle gateway).
      collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: LAG_SAMPLER_IDLE_MS });
      // Under Bun these cost ~100 ms a scrape (a JSC heap walk) or report nonsense (event
      // loop lag min 2^63 ns, mean NaN): drop them, keep the process_* and heap totals.
      for (const name of this.registry.getMetricsAsArray().map((m) => (m as unknown as { name: string }).name)) {
        if (name.startsWith("nodejs_heap_space_size_") || name.startsWith("nodejs_eventloop_lag"))
          this.registry.removeSingleMetric(name);
      }
    }

    // ---- facts from the event bus --------------------------------------------------
    const episodes = new Counter({
      name: "fleet_episodes_total",
      help: "Episodes that ended, by agent type and outcome (committed|failed).",
      labelNames: ["type", "outcome"],
      registers,
    });
    const failures = new Counter({
      name: "fleet_episode_failures_total",
      help: "Failed episodes by agent type and failure kind (threw|timeout|oom|crashed|...).",
      labelNames: ["type", "kind"],
      registers,
    });
    const quarantined = new Counter({
      name: "fleet_stimuli_quarantined_total",
      help: "Stimuli quarantined after their last retry failed, by agent type.",
      labelNames: ["type"],
      registers,
    });
    const duration = new Histogram({
      name: "fleet_episode_duration_seconds",
      help: "Episode wall time (subprocess start to result), by agent type.",
      labelNames: ["type"],
      buckets: EPISODE_BUCKETS,
      registers,
    });
    const starts = new Counter({
      name: "fleet_episode_starts_total",
      help:
        "Episode processes started, by agent type and start (warm: a spare started ahead of need; cold: " +
        "spawned for it, e.g. no spare left, or a flooded agent leaving the spares to others).",
      labelNames: ["type", "start"],
      registers,
    });
    // Counted per message on the intake path: a prom-client inc hashes its labels each time, so
    // the counts wait here, by source, and go in when the counter is read.
    const stimuliPending = new Map<string, number>();
    new Counter({
      name: "fleet_stimuli_total",
      help: "Stimuli accepted (durably queued) by source (mqtt|timer|webhook|inbox|manual|wake).",
      labelNames: ["source"],
      registers,
      collect() {
        for (const [source, n] of stimuliPending) this.inc({ source }, n);
        stimuliPending.clear();
      },
    });
    const dedup = new Counter({
      name: "fleet_dedup_hits_total",
      help: "Stimuli dropped as duplicates of one already recorded, by source and agent type.",
      labelNames: ["source", "type"],
      registers,
    });
    const rejectedMessages = new Counter({
      name: "fleet_intake_rejected_messages_total",
      help:
        "Messages that matched a subscription but named no valid " +
        "agent; recorded with the reason (GET /api/rejected).",
      registers,
    });
    const refusedAgents = new Counter({
      name: "fleet_agents_refused_total",
      help:
        "Stimuli refused because they would create one agent more than its type's max_agents " +
        "(a device topic, inbox or send to a new key), by agent type.",
      labelNames: ["type"],
      registers,
    });
    const refused = new Counter({
      name: "fleet_intake_refused_total",
      help:
        "Stimuli intake refused for an agent, by source (mqtt|webhook|inbox|manual|wake|timer), agent type and " +
        "reason (queue_full|retired|draining|max_agents; send_hops: a send past [fleet] max_send_hops; disk_low: " +
        "the data disk below [fleet] disk_free_limit_mb). A refused " +
        "wake-up is tried again; a refused timer fire is lost for that agent; a refused send is a ToolDenied.",
      labelNames: ["source", "type", "reason"],
      registers,
    });
    const statusChanges = new Counter({
      name: "fleet_agent_status_changes_total",
      help: "Agent status transitions published, by new status (idle|running|paused|draining|retired|failed).",
      labelNames: ["status"],
      registers,
    });
    const infraFailures = new Counter({
      name: "fleet_infra_failures_total",
      help: "Episodes that could not start for reasons of the machine (not counted against the agent), by agent type.",
      labelNames: ["type"],
      registers,
    });
    const degraded = new Gauge({
      name: "fleet_degraded",
      help:
        "1 while episode subprocesses cannot be started (out of processes, fds, memory; " +
        "sandbox set-up failing), else 0.",
      registers,
    });
    degraded.set(0);
    this.commitSeconds = new Histogram({
      name: "fleet_db_commit_seconds",
      help: "Duration of each group commit (one transaction, one fsync).",
      buckets: COMMIT_BUCKETS,
      registers,
    });

    const retained = new Counter({
      name: "fleet_retention_collected_total",
      help:
        "Rows background retention collected, by kind (episodes|checkpoints|tombstoned|stimuli|quarantine_expired|" +
        "usage_rows|bundles; tombstoned: checkpoints past keep that lost their state; quarantine_expired: stimuli " +
        "quarantined longer than quarantine_days, dropped).",
      labelNames: ["kind"],
      registers,
    });
    for (const kind of ["episodes", "checkpoints", "tombstoned", "stimuli", "usage_rows", "bundles"])
      retained.inc({ kind }, 0);
    const wait = new Histogram({
      name: "fleet_stimulus_wait_seconds",
      help:
        "How long each stimulus waited from being recorded to the start of the episode that settled it " +
        "(committed it, or failed its last attempt), by agent type; once per stimulus (schedule-to-start: " +
        "queueing behind other stimuli, paused agents, budget windows, earlier attempts and their backoff).",
      labelNames: ["type"],
      buckets: WAIT_BUCKETS,
      registers,
    });
    const retentionSeconds = new Histogram({
      name: "fleet_retention_round_seconds",
      help: "Time the gateway's thread spent in each background retention round (once a minute).",
      buckets: COMMIT_BUCKETS,
      registers,
    });
    const retentionBehind = new Gauge({
      name: "fleet_retention_behind",
      help:
        "1 when the last retention round stopped at its pass limit with rows still due " +
        "(history grows past the retention window), else 0.",
      registers,
    });
    retentionBehind.set(0);

    this.unsubscribe.push(
      host.events.on("episode", (e) => {
        episodes.inc({ type: e.type, outcome: e.status });
        duration.observe({ type: e.type }, e.ms / 1000);
        // Once per stimulus, by the episode that settled it (committed, or its last attempt failed): its
        // wait includes the attempts before and their backoff. A retried attempt is not a stimulus.
        if (e.status === "committed" || e.quarantined) wait.observe({ type: e.type }, e.waitMs / 1000);
        this.rates.add("episodes");
        if (e.status === "failed") {
          failures.inc({ type: e.type, kind: e.kind ?? "unknown" });
          this.rates.add("failures");
          if (e.quarantined) quarantined.inc({ type: e.type });
        }
      }),
      host.events.on("intake", (e) => {
        if (e.accepted > 0) {
          stimuliPending.set(e.source, (stimuliPending.get(e.source) ?? 0) + e.accepted);
          this.rates.add("stimuli", e.accepted);
        }
        if (e.duplicates > 0) {
          for (const type of e.duplicateTypes ?? []) dedup.inc({ source: e.source, type });
          this.rates.add("duplicates", e.duplicates);
        }
      }),
      host.events.on("status", (e) => {
        // A republish (every start, each broker reconnect) restores retained topics: it changes nothing.
        if (!e.republished) statusChanges.inc({ status: e.status });
      }),
      host.events.on("spawn", (e) => starts.inc({ type: e.type, start: e.start })),
      host.events.on("rejectedMessage", (e) => rejectedMessages.inc(e.count)),
      host.events.on("agentRefused", (e) => refusedAgents.inc({ type: e.type })),
      host.events.on("refused", (e) => refused.inc({ source: e.source, type: e.type, reason: e.code })),
      host.events.on("retention", (e) => {
        for (const [kind, n] of Object.entries(e.collected)) if (n > 0) retained.inc({ kind }, n);
        retentionSeconds.observe(e.ms / 1000);
        retentionBehind.set(e.behind ? 1 : 0);
      }),
      host.events.on("infra", (e) => {
        degraded.set(e.state === "degraded" ? 1 : 0);
        if (e.state === "degraded") infraFailures.inc({ type: e.type ?? "unknown" });
      }),
    );
    // Pre-create the outcome series so a fresh gateway exposes zeros rather than nothing.
    for (const type of Object.keys(host.spec.spec.agents)) {
      for (const outcome of ["committed", "failed"]) episodes.inc({ type, outcome }, 0);
      for (const start of ["warm", "cold"]) starts.inc({ type, start }, 0);
      refusedAgents.inc({ type }, 0);
    }
    this.observeCommits(host.store);

    // ---- gauges read on scrape -----------------------------------------------------
    const snap = () => this.snapshots.get();
    const perType = (name: string, help: string, pick: (s: FleetSnapshot, type: string) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ["type"],
        registers,
        async collect() {
          const s = await snap();
          this.reset(); // a type removed by a redeploy must not linger
          for (const type of s.types.keys()) this.set({ type }, pick(s, type));
        },
      });

    new Gauge({
      name: "fleet_agents",
      help: "Agents by status (idle|paused|draining|failed|retired; running agents count as idle) and type.",
      labelNames: ["status", "type"],
      registers,
      async collect() {
        const s = await snap();
        this.reset();
        for (const [type, t] of s.types)
          for (const status of AGENT_STATUSES) this.set({ status, type }, t.agents[status]);
      },
    });
    perType(
      "fleet_agents_budget_paused",
      "Agents paused by a budget (they resume when the window ends), by type.",
      (s, t) => s.types.get(t)!.budgetPaused,
    );
    new Gauge({
      name: "fleet_stimuli_quarantined",
      help: "Stimuli in quarantine now, waiting for an operator's retry or drop (fleet quarantine).",
      registers,
      async collect() {
        this.set(await host.store.countQuarantined());
      },
    });
    new Gauge({
      name: "fleet_queue_depth",
      help: "Stimuli waiting in all agents' queues (including ones waiting for a retry or a paused agent).",
      registers,
      async collect() {
        let n = 0;
        for (const t of (await snap()).types.values()) n += t.queued;
        this.set(n);
      },
    });
    new Gauge({
      name: "fleet_queue_oldest_age_seconds",
      help: "Age of the oldest waiting stimulus (the fleet's lag); 0 when nothing waits.",
      registers,
      async collect() {
        const s = await snap();
        let oldest = Infinity;
        for (const t of s.types.values()) if (t.oldestQueuedAt !== null) oldest = Math.min(oldest, t.oldestQueuedAt);
        this.set(Number.isFinite(oldest) ? Math.max(0, s.at - oldest) / 1000 : 0);
      },
    });
    perType("fleet_type_queue_depth", "Stimuli waiting, by agent type.", (s, t) => s.types.get(t)!.queued);
    perType("fleet_type_queue_oldest_age_seconds", "Age of the oldest waiting stimulus, by agent type.", (s, t) => {
      const at = s.types.get(t)!.oldestQueuedAt;
      return at === null ? 0 : Math.max(0, s.at - at) / 1000;
    });
    perType(
      "fleet_budget_episodes_hour_used",
      "Episodes booked in the current hour window, summed over the type's agents.",
      (s, t) => s.types.get(t)!.used.episodesHour,
    );
    perType(
      "fleet_budget_tool_calls_hour_used",
      "Tool calls booked in the current hour window, summed over the type's agents.",
      (s, t) => s.types.get(t)!.used.toolCallsHour,
    );
    perType(
      "fleet_budget_tokens_day_used",
      "LLM tokens booked today, summed over the type's agents.",
      (s, t) => s.types.get(t)!.used.tokensDay,
    );
    perType(
      "fleet_budget_cost_day_used",
      "Cost units booked today, summed over the type's agents.",
      (s, t) => s.types.get(t)!.used.costDay,
    );
    perType(
      "fleet_budget_bytes_day_used",
      "Bytes stored by episodes today (event logs, checkpoint states, outputs), summed over the type's agents.",
      (s, t) => s.types.get(t)!.used.bytesDay,
    );
    new Gauge({
      name: "fleet_budget_max_ratio",
      help: "Use/limit of the agent of this type closest to its budget (1 = that agent is paused), by budget.",
      labelNames: ["type", "budget"],
      registers,
      async collect() {
        const s = await snap();
        this.reset();
        for (const [type, t] of s.types) for (const budget of BUDGETS) this.set({ type, budget }, t.maxRatio[budget]);
      },
    });
    new Gauge({
      name: "fleet_budget_limit",
      help: "Per-agent limit of each budget, by type (0 = unlimited).",
      labelNames: ["type", "budget"],
      registers,
      async collect() {
        const s = await snap();
        this.reset();
        for (const [type, t] of s.types)
          for (const budget of BUDGETS)
            this.set({ type, budget }, Number.isFinite(t.limits[budget]) ? t.limits[budget] : 0);
      },
    });
    replicationMetrics(this.replicationRegistry, () => host.replication?.() ?? null);
    const spansSeen = new Map<string, number>();
    new Counter({
      name: "fleet_telemetry_spans_dropped_total",
      help:
        "Episode spans lost because the OTLP collector did not take them, by reason " +
        "(rejected|timeout|unreachable).",
      labelNames: ["reason"],
      registers,
      collect() {
        for (const [reason, v] of Object.entries(host.telemetryDropped?.() ?? {})) {
          const before = spansSeen.get(reason) ?? 0;
          if (v > before) this.inc({ reason }, v - before);
          spansSeen.set(reason, Math.max(before, v));
        }
      },
    });
    new Gauge({
      name: "fleet_episodes_running",
      help: "Episodes running now.",
      registers,
      collect() {
        this.set(host.scheduler?.active ?? 0);
      },
    });
    new Gauge({
      name: "fleet_clock_behind_seconds",
      help:
        "How far the system clock reads earlier than the newest time the gateway saw or its data dir recorded " +
        "(0: it does not; a box without a real-time clock before NTP sets it).",
      registers,
      collect() {
        this.set((host.clockBehindMs?.() ?? 0) / 1000);
      },
    });
    new Gauge({
      name: "fleet_disk_free_bytes",
      help: "Free space on the data dir's disk, as df's Avail (what an unprivileged writer may still use).",
      registers,
      collect() {
        const free = host.diskStatus?.()?.free_bytes;
        if (free !== null && free !== undefined) this.set(free);
      },
    });
    new Gauge({
      name: "fleet_disk_low",
      help:
        "1 while the data dir's disk has less free space (with fleet.db's free pages, which the next writes reuse) " +
        "than [fleet] disk_free_limit_mb: stimuli from outside " +
        'the fleet are refused (fleet_intake_refused_total{reason="disk_low"}).',
      registers,
      collect() {
        this.set(host.diskStatus?.()?.low ? 1 : 0);
      },
    });
    new Gauge({
      name: "fleet_subprocesses_alive",
      help: "Episode subprocess groups alive now.",
      registers,
      collect() {
        this.set(host.subprocesses());
      },
    });
    new Gauge({
      name: "fleet_episode_slots",
      help:
        "Episodes flooded agents (a backlog while others have work) may run at once now: " +
        "max_concurrent_episodes, a quarter of it during an intake burst.",
      registers,
      collect() {
        this.set(host.scheduler?.capacity ?? 0);
      },
    });
    new Gauge({
      name: "fleet_episodes_paced",
      help:
        "Agents that are not flooded whose next episode waits for devices first's pace now: during an " +
        "intake burst their episodes start at a pace (docs/sandbox.md).",
      registers,
      collect() {
        this.set(host.scheduler?.pacedAgents ?? 0);
      },
    });
    new Gauge({
      name: "fleet_broker_clients",
      help: "Connected MQTT clients.",
      registers,
      collect() {
        this.set(host.broker?.stats().clients ?? 0);
      },
    });
    mirrorCounter(
      this.registry,
      "fleet_broker_messages_in_total",
      "Device publishes accepted by the broker's intake.",
      () => host.broker?.stats().messagesIn,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_messages_out_total",
      "PUBLISH packets the broker forwarded to clients.",
      () => host.broker?.stats().messagesOut,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_refused_total",
      "Device publishes the broker refused (rules, ACL, intake refusal), permanent or transient.",
      () => host.broker?.stats().refused,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_dropped_total",
      "Device publishes refused for good (rules, ACL, unknown inbox, retired agent): acknowledged and dropped.",
      () => host.broker?.stats().dropped,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_offline_dropped_total",
      "Messages not queued for a clean = false client: its queue was full (max_offline_messages, " +
        "max_offline_bytes or max_offline_bytes_total).",
      () => host.broker?.stats().offlineDropped,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_bytes_received_total",
      "Bytes the embedded broker received from client connections (MQTT, every listener).",
      () => host.broker?.stats().bytesIn,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_bytes_sent_total",
      "Bytes the embedded broker sent to client connections (MQTT, every listener).",
      () => host.broker?.stats().bytesOut,
    );
    new Gauge({
      name: "fleet_broker_offline_queued_messages",
      help: "Messages the embedded broker holds in clean = false sessions' queues (queued + in flight).",
      registers,
      collect() {
        this.set(host.broker?.stats().offlineQueued ?? 0);
      },
    });
    new Gauge({
      name: "fleet_broker_offline_queued_bytes",
      help: "Their payload bytes: what max_offline_bytes_total bounds.",
      registers,
      collect() {
        this.set(host.broker?.stats().offlineQueuedBytes ?? 0);
      },
    });
    new Gauge({
      name: "fleet_broker_subscriptions",
      help:
        "Subscriptions the embedded broker holds: connected clients' and away persistent sessions' " +
        "($SYS/broker/subscriptions/count).",
      registers,
      collect() {
        this.set(host.broker?.subscriptionCount?.() ?? 0);
      },
    });
    new Gauge({
      name: "fleet_broker_retained_messages",
      help: "Retained messages the embedded broker holds ($SYS/broker/retained messages/count).",
      registers,
      collect() {
        this.set(host.broker?.stats().retainedMessages ?? 0);
      },
    });
    new Gauge({
      name: "fleet_broker_sessions",
      help: "Persistent (clean session 0) sessions the embedded broker holds, connected or not.",
      registers,
      collect() {
        this.set(host.broker?.stats().sessions ?? 0);
      },
    });
    mirrorCounter(
      this.registry,
      "fleet_broker_sessions_expired_total",
      "Persistent sessions ended because their client stayed away longer than [broker] session_expiry_days.",
      () => host.broker?.stats().sessionsExpired,
    );
    new Gauge({
      name: "fleet_broker_connections",
      help: "Open MQTT connections (TCP, TLS, WebSocket; before and after CONNECT).",
      registers,
      collect() {
        this.set(host.broker?.stats().connections ?? 0);
      },
    });
    mirrorCounter(
      this.registry,
      "fleet_broker_connections_refused_total",
      "MQTT connections refused because [broker] max_connections were open (CONNACK 3).",
      () => host.broker?.stats().connectionsRefused,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_logins_refused_total",
      "MQTT CONNECTs refused for a wrong or unknown user name, secret or client id (CONNACK 4 / 5).",
      () => host.broker?.stats().loginsRefused,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_logins_busy_total",
      "MQTT CONNECTs refused unverified: too many logins for that user name were waiting (CONNACK 3).",
      () => host.broker?.stats().loginsBusy,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_invalid_packets_total",
      "MQTT connections closed for breaking an input rule (invalid UTF-8, will QoS 3, ...).",
      () => host.broker?.stats().invalid,
    );
    mirrorCounter(
      this.registry,
      "fleet_broker_oversized_packets_total",
      "MQTT connections closed for a packet larger than [broker] max_packet_bytes (or a malformed length).",
      () => host.broker?.stats().oversized,
    );
    new Gauge({
      name: "fleet_spec_info",
      help:
        "The spec version new episodes start on (value 1); " +
        "`reload_error` is 1 while the last fleet.toml edit was rejected.",
      labelNames: ["fleet", "version", "reload_error"],
      registers,
      collect() {
        this.reset();
        this.set(
          {
            fleet: host.spec.spec.fleet.name,
            version: host.spec.hash.slice(0, 12),
            reload_error: host.specError ? "1" : "0",
          },
          1,
        );
      },
    });
  }

  /** Time every group commit of `store` and count failed ones (keeps any observer already installed). */
  private observeCommits(store: Store): void {
    const prev = store.writer.onCommit;
    store.writer.onCommit = (ms, jobs) => {
      prev?.(ms, jobs);
      this.commitSeconds.observe(ms / 1000);
    };
    const failures = new Counter({
      name: "fleet_commit_failures_total",
      help:
        "Write jobs whose commit failed, by kind " +
        "(disk_full|io|readonly|busy|constraint|other); nothing was acknowledged for them.",
      labelNames: ["kind"],
      registers: [this.registry],
    });
    for (const kind of ["disk_full", "io", "readonly", "busy", "constraint", "other"]) failures.inc({ kind }, 0);
    const prevFailure = store.writer.onFailure;
    store.writer.onFailure = (kind, err) => {
      prevFailure?.(kind, err);
      failures.inc({ kind });
    };
    new Gauge({
      name: "fleet_storage_ok",
      help:
        "1 while commits succeed, 0 while they fail for a storage " +
        "reason (full disk, I/O error); /readyz answers 503 then.",
      registers: [this.registry],
      collect() {
        this.set(store.writer.health.failing ? 0 : 1);
      },
    });
  }

  /**
   * The Prometheus text exposition. Without replication its series are left out, not exported at 0:
   * `fleet_replication_up 0` would fire the alert meant for a gateway whose center is unreachable.
   */
  async text(): Promise<string> {
    const main = await this.registry.metrics();
    if (!this.host.replication?.()) return main;
    return `${main.endsWith("\n") ? main : `${main}\n`}${await this.replicationRegistry.metrics()}`;
  }

  /** Content type of `text()`. */
  get contentType(): string {
    return this.registry.contentType;
  }

  /** Episode and failure rates over the last minute. */
  rollingRates(): FleetRates {
    const episodes = this.rates.sum("episodes");
    const failures = this.rates.sum("failures");
    const perMin = 60 / this.rates.windowS;
    return {
      window_s: this.rates.windowS,
      episodes,
      failures,
      episodes_per_min: episodes * perMin,
      failures_per_min: failures * perMin,
      failure_ratio: episodes > 0 ? failures / episodes : 0,
      stimuli: this.rates.sum("stimuli"),
      duplicates: this.rates.sum("duplicates"),
    };
  }

  /**
   * What `fleet/health` adds to the gateway's counts: rates over the last minute, per-type
   * agents/queue/lag/budget, the fleet's budget burn (the highest use/limit ratio of any
   * agent), subprocesses alive and DB commit latency. The same numbers as `/metrics`.
   */
  async healthSummary() {
    const s = await this.snapshots.get();
    const types: Record<string, unknown> = {};
    let burn = 0;
    for (const [name, t] of s.types) {
      const typeBurn = Math.max(...BUDGETS.map((b) => t.maxRatio[b]));
      burn = Math.max(burn, typeBurn);
      types[name] = {
        agents: t.agents,
        budget_paused: t.budgetPaused,
        queued: t.queued,
        lag_ms: t.oldestQueuedAt === null ? 0 : Math.max(0, s.at - t.oldestQueuedAt),
        episodes_hour: t.used.episodesHour,
        episodes_hour_limit: t.limits.episodes_per_hour,
        tokens_day: t.used.tokensDay,
        cost_day: t.used.costDay,
        bytes_day: t.used.bytesDay,
        budget_burn: round(typeBurn),
      };
    }
    const st = this.host.store.writer.stats;
    const h = this.host.store.writer.health;
    return {
      rates: this.rollingRates(),
      budget_burn: round(burn),
      types,
      subprocesses: this.host.subprocesses(),
      db: {
        commits: st.commits,
        last_commit_ms: round(st.lastCommitMs),
        mean_commit_ms: st.commits ? round(st.totalCommitMs / st.commits) : 0,
        /** False while commits fail for a storage reason (full disk, I/O error): /readyz is 503 then. */
        ok: !h.failing,
        failing_since: h.since,
        failure_kind: h.kind,
        error: h.error,
        commit_failures: { ...st.failures },
      },
    };
  }

  /** Stop listening to the event bus. */
  close(): void {
    for (const off of this.unsubscribe.splice(0)) off();
  }
}

const round = (n: number) => Math.round(n * 1000) / 1000;
