/**
 * The gateway: composes spec, store, broker, intake, scheduler, episode executor,
 * effects and HTTP into one process with an explicit lifecycle
 * ('created' -> 'starting' -> 'running' -> 'draining' -> 'stopped').
 */
import { mkdirSync, writeFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import pino, { type Logger } from "pino";
import { createEmbeddedBroker, type Broker } from "../broker/index.ts";
import { loadSpec } from "./spec/load.ts";
import type { SpecVersion } from "./spec/types.ts";
import { Store } from "./store/index.ts";
import { Scheduler } from "./scheduler.ts";
import { EpisodeExecutor } from "./episode.ts";
import { Effects } from "./effects.ts";
import { Intake } from "./intake.ts";
import { createRouter, type Route } from "./router.ts";
import { FleetEvents } from "./events.ts";
import { defaultSpawnOptions, describeSandbox, killAllEpisodes, liveEpisodeGroups, SparePool, type SpawnOptions } from "./runner.ts";
import { topics } from "./protocol.ts";
import { agentId, parseAgentId } from "./types.ts";
import { startHttp, type HttpServer } from "./http.ts";
import { FleetMetrics } from "./metrics.ts";
import { Timers } from "./timers.ts";
import { gcAll, gcPass, gcTotal, type GcReport } from "./gc.ts";
import { diffSpecs, SpecWatcher } from "./reload.ts";
import { SpecError } from "./spec/types.ts";
import { DeviceRegistry, deviceBrokerHooks } from "./devices.ts";
import type { StimulusId } from "./types.ts";

/** How to start a gateway. Flags override fleet.toml (SPEC §2). */
export interface GatewayOptions {
  readonly configPath: string;
  readonly dataDir?: string;
  readonly mqttPort?: number;
  readonly httpPort?: number;
  readonly logger?: Logger;
  readonly spawn?: SpawnOptions;
  /** Where secrets come from (default: the gateway's own environment). */
  readonly secrets?: Readonly<Record<string, string | undefined>>;
  readonly now?: () => number;
  readonly healthIntervalMs?: number;
  /** Background retention pass interval (default 60 s; 0 = off). */
  readonly gcIntervalMs?: number;
}

export type GatewayState = "created" | "starting" | "running" | "draining" | "stopped";

/** A running fleet. */
export class Gateway {
  state: GatewayState = "created";
  readonly events = new FleetEvents();
  readonly log: Logger;
  readonly startedAt = Date.now();
  store!: Store;
  broker!: Broker;
  scheduler!: Scheduler;
  effects!: Effects;
  intake!: Intake;
  http!: HttpServer;
  dataDir!: string;
  private current!: SpecVersion;
  private route!: (topic: string) => Route;
  private readonly retired = new Set<string>();
  private readonly queuedCounts = new Map<string, number>();
  /** Bumped on every operator lifecycle action, so a finishing episode knows whether to re-read status. */
  private readonly lifecycleStamps = new Map<string, number>();
  private healthTimer: ReturnType<typeof setInterval> | null = null;
  private gcTimer: ReturnType<typeof setInterval> | null = null;
  private gcRunning = false;
  timers!: Timers;
  private watcher: SpecWatcher | null = null;
  private reloading: Promise<void> = Promise.resolve();
  /** Last spec reload error, shown by status and /api/fleet. */
  specError: string | null = null;
  /** Prometheus registry and rolling rates of this gateway (/metrics, fleet/health). */
  metrics!: FleetMetrics;
  private readonly now: () => number;
  /** How episodes are spawned and isolated. */
  spawnOptions!: SpawnOptions;
  private spares: SparePool | null = null;

  constructor(readonly opts: GatewayOptions) {
    this.log = opts.logger ?? pino({ base: { svc: "fleet" } });
    this.now = opts.now ?? Date.now;
  }

  /** The spec version new episodes start on. */
  get spec(): SpecVersion {
    return this.current;
  }

  /** Start everything; resolves once MQTT and HTTP listen. */
  async start(): Promise<void> {
    if (this.state !== "created") return;
    this.state = "starting";
    this.current = await loadSpec(resolve(this.opts.configPath));
    const spec = this.current.spec;
    this.route = createRouter(spec);
    this.dataDir = resolve(this.opts.dataDir ?? spec.fleet.data_dir);
    mkdirSync(this.dataDir, { recursive: true });
    this.store = await Store.open(join(this.dataDir, "fleet.db"), { synchronous: spec.fleet.synchronous });
    this.metrics = new FleetMetrics(this, { now: this.now });
    await this.store.saveSpecVersion({ hash: this.current.hash, path: this.current.path, text: this.current.text, summary: "loaded at start", at: this.now() });
    await this.deployInstances();

    this.spawnOptions = this.opts.spawn ?? defaultSpawnOptions(spec.fleet.sandbox);
    if (this.spawnOptions.uid === null && !this.spawnOptions.bwrap) {
      this.log.warn("agent subprocesses are NOT isolated from the gateway (not root, no bubblewrap): they run with its uid and could read its /proc environ");
    }
    this.spares = new SparePool(spec.fleet.warm_spares, this.spawnOptions);
    const executor = new EpisodeExecutor({
      store: this.store,
      spec: () => this.current,
      spawn: this.spawnOptions,
      pool: this.spares,
      toolEnv: { secrets: this.opts.secrets ?? process.env, fetch, isRetired: (a) => this.retired.has(a) },
      events: this.events,
      log: this.log,
      now: this.now,
      stopping: () => this.state === "draining" || this.state === "stopped",
      lifecycleStamp: (a) => this.lifecycleStamps.get(a) ?? 0,
      hasQueued: (a) => (this.queuedCounts.get(a) ?? 0) > 0,
      publishCommitted: (episode, rows) => this.effects.publishCommitted(episode, rows),
    });
    this.scheduler = new Scheduler({ maxConcurrent: spec.fleet.max_concurrent_episodes, runTurn: (a) => executor.turn(a), now: this.now });
    this.intake = new Intake(
      this.store,
      {
        route: (t) => this.route(t),
        isRetired: (a) => this.retired.has(a),
        queued: (a) => this.queuedCounts.get(a) ?? 0,
        enqueued: (a) => this.noteQueued(a),
      },
      this.events,
      this.log,
      this.now,
    );
    this.wireEvents();

    for (const row of await this.store.agentCounts()) void row; // warm the connection
    for (const a of await this.store.listAgents({ status: "retired", limit: 1_000_000 }).then((r) => r.rows)) this.retired.add(a.id);
    for (const q of await this.store.queuedSummary()) {
      this.queuedCounts.set(q.agent, q.n);
      this.scheduler.enqueue(q.agent, q.n);
    }

    this.broker = createEmbeddedBroker({
      host: spec.broker.host,
      port: this.opts.mqttPort ?? spec.broker.mqtt_port,
      wsPort: spec.broker.ws_port,
      maxPacketBytes: spec.broker.max_packet_bytes,
      allowAnonymous: spec.broker.allow_anonymous,
      // Device credentials + topic ACLs from the devices file (re-read when it changes).
      ...(spec.broker.devices_file ? deviceBrokerHooks(new DeviceRegistry(spec.broker.devices_file, { log: this.log.child({ mod: "devices" }) })) : {}),
      intake: (msg) => (this.state === "running" ? this.intake.mqtt(msg) : Promise.resolve({ ok: false, reason: `gateway is ${this.state}` })),
      logger: this.log.child({ mod: "broker" }),
    });
    this.effects = new Effects(this.store, this.broker, this.log);
    await this.broker.start();
    this.http = startHttp(this, { host: spec.http.host, port: this.opts.httpPort ?? spec.http.port });
    this.state = "running";
    this.timers = new Timers({
      fire: (type, at, now) => this.fireTimer(type.name, at, now),
      lastFire: async (type) => {
        const v = await this.store.getMeta(`timer:${type}`);
        return v === null ? null : Number(v);
      },
      saveLastFire: (type, at) => this.store.setMeta(`timer:${type}`, String(at)),
      log: this.log.child({ mod: "timers" }),
      now: this.now,
    });
    await this.timers.update(spec);
    this.watcher = new SpecWatcher(this.current.path, () => void this.reload("file changed"));
    this.watcher.start(this.current.text);
    // Retained topics live in aedes' memory: re-publish them, then re-send unsent effects.
    await this.republishStatuses();
    void this.effects.kick();
    this.healthTimer = setInterval(() => void this.publishHealth(), this.opts.healthIntervalMs ?? 10_000);
    this.healthTimer.unref?.();
    const gcEvery = this.opts.gcIntervalMs ?? 60_000;
    if (gcEvery > 0) {
      this.gcTimer = setInterval(() => void this.backgroundGc(), gcEvery);
      this.gcTimer.unref?.();
    }
    void this.publishHealth();
    writeFileSync(join(this.dataDir, "gateway.json"), JSON.stringify({ mqtt_port: this.broker.port, http_port: this.http.port, pid: process.pid, gateway: this.store.gatewayId }) + "\n");
    this.log.info({ mqtt_port: this.broker.port, http_port: this.http.port, data_dir: this.dataDir, spec: this.current.hash.slice(0, 12), sandbox: describeSandbox(this.spawnOptions) }, `fleet "${spec.fleet.name}" running`);
  }

  /** Stop intake, let in-flight episodes finish (or kill them at the drain timeout), flush, close. */
  async stop(): Promise<void> {
    if (this.state === "stopped" || this.state === "draining") return;
    this.state = "draining";
    if (this.healthTimer) clearInterval(this.healthTimer);
    if (this.gcTimer) clearInterval(this.gcTimer);
    this.watcher?.stop();
    await this.timers?.stop();
    await this.broker?.stopIntake();
    this.scheduler?.stop();
    const drainMs = this.current?.spec.fleet.drain_timeout_ms ?? 10_000;
    const drained = await Promise.race([this.scheduler?.idle().then(() => true) ?? true, Bun.sleep(drainMs).then(() => false)]);
    if (!drained) {
      this.log.warn({ running: liveEpisodeGroups.size }, "drain timeout: aborting in-flight episodes (their stimuli stay queued)");
      killAllEpisodes();
      await Promise.race([this.scheduler.idle(), Bun.sleep(2000)]);
    }
    await this.spares?.close();
    await this.effects?.kick().catch(() => undefined);
    await this.effects?.flush();
    this.http?.stop();
    await this.broker?.close();
    await this.store?.close();
    try {
      rmSync(join(this.dataDir, "gateway.json"));
    } catch {
      // not written (failed start)
    }
    this.state = "stopped";
    this.log.info("fleet stopped");
  }

  /**
   * Hot redeploy: load fleet.toml again; an invalid file changes nothing (its error is kept
   * for status and /api/fleet). A valid change becomes a new spec version: new types and
   * instances start, removed types' agents are retired, changed types take effect from their
   * next episode (an in-flight episode finishes on the version it started on), timers re-plan.
   */
  reload(reason: string): Promise<void> {
    this.reloading = this.reloading.then(() => this.reloadNow(reason)).catch((err) => this.log.error({ err }, "reload failed"));
    return this.reloading;
  }

  private async reloadNow(reason: string): Promise<void> {
    if (this.state !== "running") return;
    let next;
    try {
      next = await loadSpec(this.current.path);
    } catch (err) {
      this.specError = err instanceof SpecError ? err.message : String(err);
      this.log.error({ reason }, `fleet.toml rejected, keeping spec ${this.current.hash.slice(0, 12)}: ${this.specError}`);
      return;
    }
    this.specError = null;
    if (next.hash === this.current.hash) return;
    const diff = diffSpecs(this.current.spec, next.spec);
    await this.store.saveSpecVersion({ hash: next.hash, path: next.path, text: next.text, summary: diff.summary, at: this.now() });
    const before = this.current;
    this.current = next;
    this.route = createRouter(next.spec);
    this.scheduler.setMaxConcurrent(next.spec.fleet.max_concurrent_episodes);
    await this.deployInstances();
    for (const type of diff.removed) await this.retireType(type, next.hash);
    for (const type of diff.added) await this.unretireType(type);
    await this.timers.update(next.spec);
    this.log.info({ reason, from: before.hash.slice(0, 12), to: next.hash.slice(0, 12) }, `redeployed: ${diff.summary}`);
  }

  private async retireType(type: string, hash: string): Promise<void> {
    const reason = `type ${type} removed from fleet.toml (spec ${hash.slice(0, 12)})`;
    for (const a of await this.store.listAgents({ type, limit: 1_000_000 }).then((r) => r.rows)) {
      if (a.status === "retired") continue;
      await this.store.setAgentStatus(a.id, "retired", reason);
      this.retired.add(a.id);
      this.events.emit("status", { agent: a.id, status: "retired", reason });
    }
  }

  /** A type that comes back brings back the agents its removal retired (not operator retirements). */
  private async unretireType(type: string): Promise<void> {
    for (const a of await this.store.listAgents({ type, status: "retired", limit: 1_000_000 }).then((r) => r.rows)) {
      if (!a.reason?.startsWith(`type ${type} removed`)) continue;
      await this.store.setAgentStatus(a.id, "active", null);
      this.retired.delete(a.id);
      this.events.emit("status", { agent: a.id, status: "idle", checkpoint: a.headHash });
      this.scheduler.wake(a.id);
    }
  }

  /** One timer fire: a stimulus for every deployed instance of the type, id from the scheduled time. */
  private async fireTimer(typeName: string, at: number, now: number): Promise<void> {
    const type = this.current.spec.agents[typeName];
    if (!type) return;
    const agents = await this.store.deployedOfType(typeName);
    if (agents.length === 0) return;
    const payload = new TextEncoder().encode(JSON.stringify({ scheduled_at: at, fired_at: now, timer: type.timer }));
    const targets = agents.flatMap((a) => {
      const id = agentId(typeName, a.key);
      return id ? [{ agent: id, type, key: a.key }] : [];
    });
    await this.intake.record(targets, "timer", null, payload, `timer:${at}` as StimulusId);
  }

  /** Retention now (`fleet gc`, POST /api/gc): all passes, or a dry run. */
  gc(opts: { dryRun: boolean; now?: number }): Promise<GcReport> {
    return gcAll(this.store, this.current.spec, { now: opts.now ?? this.now(), dryRun: opts.dryRun });
  }

  /** One bounded retention pass in the background; skipped if the previous one still runs. */
  private async backgroundGc(): Promise<void> {
    if (this.gcRunning || this.state !== "running") return;
    this.gcRunning = true;
    try {
      const r = await gcPass(this.store, this.current.spec, { now: this.now(), batch: 2000 });
      if (gcTotal(r) > 0) this.log.info({ ...r, ms: Math.round(r.ms) }, "retention pass");
    } catch (err) {
      this.log.error({ err }, "retention pass failed");
    } finally {
      this.gcRunning = false;
    }
  }

  /** Stimuli waiting for an agent. */
  queued(agent: string): number {
    return this.queuedCounts.get(agent) ?? 0;
  }

  /** Route a topic with the current spec (HTTP send, CLI). */
  routeTopic(topic: string): Route {
    return this.route(topic);
  }

  /** Operator lifecycle: pause, resume or retire an agent. */
  async setLifecycle(id: string, action: "pause" | "resume" | "retire"): Promise<{ ok: true } | { ok: false; reason: string }> {
    this.lifecycleStamps.set(id, (this.lifecycleStamps.get(id) ?? 0) + 1);
    const agent = await this.store.getAgent(id);
    if (!agent) return { ok: false, reason: `no agent ${id}` };
    if (action === "pause") {
      // Pausing must not bring a retired agent back (resume would then reactivate it).
      if (agent.status === "retired") return { ok: false, reason: `${id} is retired` };
      await this.store.setAgentStatus(id, "paused", "paused by operator");
      this.events.emit("status", { agent: id, status: "paused", reason: "paused by operator" });
    } else if (action === "resume") {
      if (agent.status === "retired") return { ok: false, reason: `${id} is retired` };
      if (agent.status === "paused" && agent.pausedUntil !== null && agent.reason?.startsWith("budget")) {
        await this.store.setMeta(`budget_override:${id}`, String(agent.pausedUntil));
      }
      await this.store.setAgentStatus(id, "active", null);
      this.events.emit("status", { agent: id, status: "idle", checkpoint: agent.headHash });
      this.scheduler.wake(id);
    } else {
      await this.store.setAgentStatus(id, "retired", "retired by operator");
      this.retired.add(id);
      this.events.emit("status", { agent: id, status: "retired", reason: "retired by operator" });
    }
    return { ok: true };
  }

  private noteQueued(agent: string): void {
    this.queuedCounts.set(agent, (this.queuedCounts.get(agent) ?? 0) + 1);
    this.scheduler.enqueue(agent);
  }

  private wireEvents(): void {
    this.events.on("episode", (e) => {
      if (e.status === "committed" || e.quarantined) {
        const n = (this.queuedCounts.get(e.agent) ?? 1) - 1;
        if (n <= 0) this.queuedCounts.delete(e.agent);
        else this.queuedCounts.set(e.agent, n);
      }
      else void this.broker.publish(topics.episodes, JSON.stringify({ episode: e.episode, agent: e.agent, stimulus: e.stimulus, status: "failed", kind: e.kind, checkpoint: e.checkpoint, ms: Math.round(e.ms) })).catch(() => undefined);
    });
    this.events.on("queued", (e) => this.noteQueued(e.agent));
    this.events.on("status", (e) => {
      const a = parseAgentId(e.agent);
      if (!a || !this.broker) return;
      const body: Record<string, unknown> = { status: e.status };
      if (e.reason) body.reason = e.reason;
      if (e.checkpoint) body.checkpoint = e.checkpoint;
      void this.broker.publish(topics.status(a.type, a.key), JSON.stringify(body), { qos: 1, retain: true }).catch(() => undefined);
    });
  }

  private async deployInstances(): Promise<void> {
    const list = [];
    for (const type of Object.values(this.current.spec.agents)) {
      for (const key of type.instances) {
        const id = agentId(type.name, key);
        if (id) list.push({ id, type: type.name, key });
      }
    }
    await this.store.ensureAgents(list, this.now());
  }

  private async republishStatuses(): Promise<void> {
    for (let offset = 0; ; offset += 1000) {
      const { rows } = await this.store.listAgents({ limit: 1000, offset });
      for (const a of rows) {
        const status = a.status === "active" ? "idle" : a.status;
        this.events.emit("status", { agent: a.id, status, ...(a.reason ? { reason: a.reason } : {}), checkpoint: a.headHash });
      }
      if (rows.length < 1000) return;
    }
  }

  /** Fleet-level summary: the body of `fleet/health` and part of /api/fleet. */
  async health() {
    const counts = await this.store.agentCounts();
    const byStatus: Record<string, number> = {};
    for (const c of counts) byStatus[c.status] = (byStatus[c.status] ?? 0) + c.n;
    const queued = [...this.queuedCounts.values()].reduce((a, b) => a + b, 0);
    const summary = await this.store.queuedSummary();
    const oldest = summary.reduce((m, q) => Math.min(m, q.oldest ?? Infinity), Infinity);
    return {
      fleet: this.current.spec.fleet.name,
      gateway: this.store.gatewayId,
      state: this.state,
      spec_version: this.current.hash,
      spec_error: this.specError,
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
      agents: { total: Object.values(byStatus).reduce((a, b) => a + b, 0), ...byStatus },
      running_episodes: this.scheduler.active,
      /** Idle warm spare processes (no agent code or state), by process group. */
      spares: this.spares?.pids() ?? [],
      queued_stimuli: queued,
      lag_ms: Number.isFinite(oldest) ? Math.max(0, this.now() - oldest) : 0,
      broker: this.broker.stats(),
      ...(await this.metrics.healthSummary()),
    };
  }

  private async publishHealth(): Promise<void> {
    if (this.state !== "running") return;
    try {
      await this.broker.publish(topics.health, JSON.stringify(await this.health()), { qos: 0, retain: true });
    } catch (err) {
      this.log.warn({ err }, "health publish failed");
    }
  }
}
