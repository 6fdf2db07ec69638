/**
 * The gateway: composes spec, store, broker, intake, scheduler, episode executor,
 * effects and HTTP into one process with an explicit lifecycle
 * ('created' -> 'starting' -> 'running' -> 'draining' -> 'stopped'). The parts it wires
 * live next door: roster.ts (agents in memory, operator lifecycle), redeploy.ts (hot
 * reload of fleet.toml), background.ts (timers, retention, health) and status-topics.ts.
 */
import { existsSync, readFileSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import pino, { type Logger } from "pino";
import type { Broker, ClientInfo, IntakeVerdict, PublishedMessage } from "../broker/index.ts";
import { BrokerLink, type TlsPem } from "./broker-link.ts";
import { canonicalJson } from "./hash.ts";
import { compileSpec, LIVE_HTTP_KEYS, loadSpec, restartNeeded, SpecError } from "./spec/index.ts";
import type { AgentTypeSpec, FleetSpec, SpecVersion, TlsFiles } from "./spec/index.ts";
import { commitFaultFromEnv, Store, secureDataDir, writePrivateFile } from "./store/index.ts";
import {
  FloodRule,
  IntakePressure,
  QuietLane,
  QuietPace,
  Scheduler,
  burstSlots,
  pressesIntake,
} from "./fleet/index.ts";
import { checkConfigs, configProblemsError, EpisodeExecutor, typesToCheck } from "./episode/index.ts";
import { Effects } from "./episode/index.ts";
import { Intake } from "./intake/index.ts";
import { createRouter, type Route } from "./intake/index.ts";
import { FleetEvents } from "./events.ts";
import { bootId, startTicks } from "./pids.ts";
import {
  agentFiles,
  claimUids,
  defaultSpawnOptions,
  describeSandbox,
  hostBuildProblem,
  hostScript,
  idleSpawnOptions,
  inGroupAt,
  BURST_GROUP_NICE,
  moduleStamp,
  moduleVersion,
  ProcessTable,
  runEpisode,
  runsAsUids,
  type Degraded,
  type HeldUids,
  InfraHealth,
  SandboxLedger,
  SparePool,
  sharedUidWarning,
  UidRangeTaken,
  uidSpan,
  weakSandboxWarning,
  type SpawnOptions,
} from "./episode/index.ts";
import { startHttp, type AuditEntry, type HttpServer } from "./http/index.ts";
import {
  diffTokens,
  LOCAL_TOKEN_NAME,
  parseTokenSnapshot,
  removeLocalToken,
  TOKENS_AUDITED_META,
  TOKENS_FILE,
  TokenAuth,
  tokenAuditRecords,
  type TokenChange,
  tokenSnapshot,
  writeLocalToken,
} from "./auth/index.ts";
import { appendAudit, appendAuditWithMeta } from "./store/index.ts";
import { DiskReserve, type DiskStatus, FleetMetrics } from "./observe/index.ts";
import type { EpisodeTelemetry } from "./telemetry/index.ts";
import type { Timers, WakeClock } from "./intake/index.ts";
import { gcAll, resolveQuarantined, type GcOutcome, type QuarantineAction } from "./ops/index.ts";
import { findEpisode, replayEpisode, type ReplayResult, type TraceMiss } from "./ops/index.ts";
import { deployCheck, loweredVersion, reloadGate, storedSpec, storedVersion } from "./ops/index.ts";
import { intakeFilters, sessionsToDrop, shardChangeRefusal, storedShard } from "./ops/index.ts";
import type { DeployCheckOptions, DeployCheckReport } from "./ops/index.ts";
import { diffSpecs, SpecWatcher } from "./fleet/index.ts";
import { agentCapNotices, QueueBook, Roster, type LifecycleResult } from "./fleet/index.ts";
import { canaryConfigRefusal, deployInstances, Redeploy, Rollouts } from "./fleet/index.ts";
import { fleetTimers, fleetWakeups, Housekeeping } from "./fleet/index.ts";
import {
  publishFacts,
  readiness,
  republishStatuses,
  StorageWatch,
  type FactsState,
  type Readiness,
} from "./observe/index.ts";
import type { Replicator, ReplicationStatus } from "./replication/index.ts";
import {
  BundleFiles,
  buildBundle,
  bundleDir,
  codeChanges,
  inSourceTerms,
  pinCode,
  type Pinned,
  specScope,
} from "./code/index.ts";
import { HOST_MODULES, HOST_PATHS } from "../agents/host/index.ts";
import { shardFleetName, shardLabel } from "./shard.ts";
import { OperatorError } from "./errors.ts";

/** Read a listener's PEM files (paths were checked readable when the spec loaded). */
function readTls(files: TlsFiles): TlsPem {
  return {
    cert: readFileSync(files.cert, "utf8"),
    key: readFileSync(files.key, "utf8"),
    ca: files.ca === null ? null : readFileSync(files.ca, "utf8"),
    crl: files.crl ? readFileSync(files.crl, "utf8") : null,
  };
}

/** How to start a gateway. Flags override fleet.toml (docs/cli.md). */
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

import { type AgentId, type GatewayState, type LifecycleAction, parseAgentId, shownStatus } from "./types.ts";

export type { GatewayState };

/** `start` on a data dir another live gateway runs on (its sandbox ledger names it): nothing was touched. */
export class DataDirInUse extends OperatorError {
  override readonly name = "DataDirInUse";
  constructor(readonly dataDir: string) {
    super(`another gateway is running on the data dir ${dataDir}`);
  }
}

/** `start` with a `[fleet] shard` other than the data dir's (docs/shards.md): refused before anything is written. */
export class ShardChanged extends OperatorError {
  override readonly name = "ShardChanged";
}

/** The module's import-closure stamp (its files' mtimes), or nothing when its files cannot be read. */
function stampOf(module: string): string {
  try {
    return moduleStamp(module);
  } catch {
    return "";
  }
}

/** A clock this far behind the data dir's newest record is logged and shown (systemd status, /api/fleet). */
const CLOCK_BEHIND_WARN_MS = 60_000;

/** A running fleet. */
export class Gateway {
  state: GatewayState = "created";
  readonly events: FleetEvents;
  readonly log: Logger;
  readonly startedAt = Date.now();
  store!: Store;
  broker!: Broker;
  scheduler!: Scheduler;
  effects!: Effects;
  intake!: Intake;
  http!: HttpServer;
  dataDir!: string;
  timers!: Timers;
  wakeups!: WakeClock;
  /** Prometheus registry and rolling rates of this gateway (/metrics, fleet/health). */
  metrics!: FleetMetrics;
  /** How episodes are spawned and isolated. */
  spawnOptions!: SpawnOptions;
  /** Stored code bundles as files for the sandbox (gateway/code). */
  bundles!: BundleFiles;
  /** The state version each bundle's code declares (`codeVersion`), by bundle hash (or module file and stamp). */
  private readonly codeVersions = new Map<string, Promise<number | null>>();
  /** Canary rollouts of new code (docs/upgrading.md). */
  rollouts: Rollouts | null = null;
  /** Who may call the HTTP API: the tokens file plus this run's local CLI token. */
  tokens!: TokenAuth;
  private current!: SpecVersion;
  private route!: (topic: string) => Route;
  private roster!: Roster;
  /** The one owner of what is queued for each agent, and of admission (gateway/fleet/queue-book.ts). */
  private book!: QueueBook;
  /** Devices first: intake bursts lower the episode slots (gateway/fleet/devices-first.ts). */
  private pressure!: IntakePressure;
  private redeploy: Redeploy | null = null;
  /** Per removed type, the spec version its draining agents run on (./fleet/roster.ts). */
  private readonly drainSpecs = new Map<string, SpecVersion>();
  private housekeeping: Housekeeping | null = null;
  /** The start's background re-publish of every agent's status; resolves with how many it published. */
  republished: Promise<number> = Promise.resolve(0);
  /** Whether a status could not be published (./observe/status-topics.ts). */
  private facts: FactsState = { statusMissed: false };
  private watcher: SpecWatcher | null = null;
  private spares: SparePool | null = null;
  /** This gateway's sandbox uids among the gateways on this machine (root), let go at stop. */
  private heldUids: HeldUids | null = null;
  private storageWatch: StorageWatch | null = null;
  /** The data disk's free-space reserve, `[fleet] disk_free_limit_mb` (observe/disk.ts). */
  private disk: DiskReserve | null = null;
  private executor: EpisodeExecutor | null = null;
  /** What the broker is told: its device auth, the reload keys it takes live (null until it is made). */
  private link: BrokerLink | null = null;
  private telemetry: EpisodeTelemetry | null = null;
  /** This gateway's episode and spare process groups (killed at the drain timeout). */
  private readonly procs = new ProcessTable();
  /** Whether episode subprocesses can be started (an infra failure makes the gateway degraded). */
  private readonly infra = new InfraHealth();
  /** Pushes records to the central server (`[replication]`); null when not configured. */
  private replicator: Replicator | null = null;
  /** The gateway's clock (epoch ms); tests shift it. */
  readonly now: () => number;
  /** Resolves when start() reaches "running" or fails (then the state says which). */
  private readonly started: Promise<void>;
  private markStarted: () => void = () => {};
  private tokenWatch: ReturnType<typeof setInterval> | null = null;
  /** This run's sandbox ledger, taken with the data dir (`claimDataDir`). */
  private ledger: SandboxLedger | null = null;

  constructor(readonly opts: GatewayOptions) {
    this.log = opts.logger ?? pino({ base: { svc: "fleet" } });
    this.events = new FleetEvents(this.log);
    this.now = opts.now ?? Date.now;
    this.started = new Promise((resolve) => {
      this.markStarted = resolve;
    });
  }

  /** The spec version new episodes start on. */
  get spec(): SpecVersion {
    return this.current;
  }

  /** Last spec reload error, shown by status and /api/fleet. */
  get specError(): string | null {
    return this.redeploy?.error ?? null;
  }

  /** Start everything; resolves once MQTT and HTTP listen. */
  async start(): Promise<void> {
    if (this.state !== "created") return;
    this.state = "starting";
    try {
      await this.startParts();
    } catch (err) {
      await this.abandonStart();
      throw err;
    } finally {
      this.markStarted();
    }
  }

  /**
   * After a start that failed: let go of what it took that outlives it in this process (the
   * sandbox uids it claimed on the machine, warm spares, listeners, the database). A process
   * that goes on (a test, a supervisor embedding the gateway) would otherwise hold them until
   * it exits. Files of the data dir are left as they are: the failure may be that another
   * gateway runs on it.
   */
  private async abandonStart(): Promise<void> {
    const quietly = async (what: string, step: () => unknown) => {
      try {
        await step();
      } catch (err) {
        this.log.warn({ err }, `after the failed start: ${what} failed`);
      }
    };
    this.state = "stopped";
    this.stopPeriodic();
    this.pressure?.stop();
    this.scheduler?.stop();
    if (this.tokenWatch) clearInterval(this.tokenWatch);
    await quietly("stopping the timers", () => this.timers?.stop());
    await quietly("stopping the wake-ups", () => this.wakeups?.stop());
    await this.releaseParts(quietly);
  }

  /**
   * Let go of the processes, uids, listeners and the database the gateway holds, in order: the
   * warm spares before the uids they run as, the broker before the database. `step` runs each
   * part (a failed start's clean-up logs a failure and goes on to the next).
   */
  private async releaseParts(
    step: (what: string, part: () => unknown) => Promise<void> = async (_what, part) => void (await part()),
  ): Promise<void> {
    await step("closing the warm spares", () => this.spares?.close());
    this.ledger?.close();
    this.heldUids?.release();
    await step("re-publishing statuses", () => this.republished);
    await step("stopping the effects", () => this.effects?.stop());
    // A push in flight gets the drain's bound too: a center that does not answer does not hold the stop.
    const grace = this.current?.spec.fleet.drain_timeout_ms;
    await step("stopping the replicator", () => this.replicator?.stop(grace));
    await step("stopping the HTTP API", () => this.http?.stop());
    await step("closing the broker", () => this.broker?.close());
    await this.telemetry?.close().catch((err: unknown) => this.log.warn({ err }, "telemetry: final export failed"));
    await step("closing the database", () => this.store?.close());
  }

  private async startParts(): Promise<void> {
    const configPath = resolve(this.opts.configPath);
    const file = await loadSpec(configPath).catch((err: unknown) => this.lastRunSpec(err));
    this.adopt(file);
    const spec = this.current.spec;
    this.dataDir = resolve(this.opts.dataDir ?? spec.fleet.data_dir);
    // Private to the gateway's user (0700, files 0600), older data dirs included: agents run as another uid.
    secureDataDir(this.dataDir);
    // Another gateway running on the data dir is refused before anything here writes to its database.
    const ledger = this.claimDataDir();
    this.ledger = ledger;
    this.store = await Store.open(join(this.dataDir, "fleet.db"), {
      synchronous: spec.fleet.synchronous,
      commitFault: commitFaultFromEnv(process.env) ?? undefined,
      upgrade: true,
    });
    const upgraded = this.store.upgraded;
    if (upgraded)
      this.log.info(upgraded, `data dir upgraded from schema ${upgraded.from} to ${upgraded.to} (${upgraded.ms} ms)`);
    // The shard decides which agents the data dir holds and which broker session it reads: another one
    // would strand some agents' messages or run them on two gateways.
    const shardChange = shardChangeRefusal(this.dataDir, await storedShard(this.store), spec.fleet.shard);
    if (shardChange) throw new ShardChanged(shardChange);
    this.storageWatch = new StorageWatch(this.store, this.log);
    this.storageWatch.onRecovered = () => this.storageRecovered();
    this.storageWatch.start();
    const store = this.store;
    this.disk = new DiskReserve(
      this.dataDir,
      () => this.current.spec.fleet.disk_free_limit_mb,
      this.log,
      () => store.freePageBytes(),
    );
    await this.disk.poll();
    this.disk.start();
    this.clockHighWater = await this.store.newestRecordedAt();
    this.watchClock();
    this.metrics = new FleetMetrics(this, { now: this.now });
    if (spec.telemetry.otlp_endpoint !== null) {
      // Loaded only when asked for: importing the OpenTelemetry SDK costs every start (and CLI call) ~60 ms.
      const { EpisodeTelemetry } = await import("./telemetry/index.ts");
      this.telemetry = new EpisodeTelemetry(this.store, {
        endpoint: spec.telemetry.otlp_endpoint,
        serviceName: spec.telemetry.service_name,
        fleet: spec.fleet.name,
        gateway: this.store.gatewayId,
        log: this.log.child({ mod: "telemetry" }),
      });
      this.telemetry.attach(this.events);
    }
    this.bundles = new BundleFiles(
      () => bundleDir(this.dataDir, this.spawnOptions),
      (hash) => this.store.bundleCode(hash),
      this.log.child({ mod: "bundles" }),
      (hash) => this.store.bundleMap(hash),
    );
    // The checks at start (a lowered state version, the deploy gate) load agent code in the sandbox
    // before the pipeline is built: its spawn options, without the sandbox ledger until then.
    this.spawnOptions ??=
      this.opts.spawn ??
      defaultSpawnOptions(spec.fleet.sandbox, {
        allowWeak: spec.fleet.allow_weak_sandbox,
        uids: spec.fleet.sandbox_uids,
      });
    const starting = await this.startingVersion(this.current);
    this.startRefusal = starting.refused ?? this.unreadableFile;
    if (this.startRefusal) this.log.error(`fleet.toml ${this.startRefusal}`);
    this.adopt(starting.sv);
    await this.store.saveSpecVersion({
      hash: this.current.hash,
      path: this.current.path,
      text: this.current.text,
      summary: "loaded at start",
      at: this.now(),
      bundles: this.current.bundles,
    });
    await deployInstances(this.store, this.current, this.now());
    this.rollouts = new Rollouts({
      store: this.store,
      log: this.log.child({ mod: "rollout" }),
      now: this.now,
      agentsOf: async (type) =>
        (
          await this.store.client.execute({ sql: "SELECT id FROM agents WHERE type = ? ORDER BY id", args: [type] })
        ).rows.map((r) => String(r.id)),
      retry: async (seq) => void (await this.resolveQuarantined(seq, "retry")),
      wake: (agents) => {
        for (const a of agents) this.scheduler?.notify(a as AgentId);
      },
    });
    await this.rollouts.start(this.current);
    await this.startReplication(spec);

    this.buildPipeline(spec, ledger);
    const problems = await checkConfigs(typesToCheck(spec, null), this.spawnOptions, this.spares ?? undefined, {
      modules: false,
    });
    if (problems.length > 0) throw configProblemsError(this.current, problems);
    this.facts = publishFacts(this.events, () => this.broker);

    for (const row of await this.store.agentCounts()) void row; // warm the connection
    // Types fleet.toml dropped or brought back while the gateway was stopped: as a hot reload would,
    // written before the queues load (loading them starts turns, and a turn would retire the agent
    // of a type it cannot find, refusing what it has queued).
    if (starting.previous && starting.previous.hash !== this.current.hash) {
      const diff = diffSpecs(starting.previous.spec, this.current.spec);
      for (const type of diff.removed) await this.roster.drainTypeAtStart(type, this.current.hash);
      for (const type of diff.added) await this.roster.unretireType(type);
    }
    await this.book.load(this.store);
    // Agents that were draining when the gateway stopped: those with nothing left retire now.
    await this.roster.finishDrains();
    // Rollouts judged from here on (a rollback retries stimuli and wakes agents: the queues are loaded now).
    this.rollouts?.watch();

    // Sessions of shards a reshard left out of the layout: shard 1's first start ends them (docs/shards.md).
    const drop = spec.broker.external ? await sessionsToDrop(this.store, spec.broker.external.client_id) : [];
    this.link = new BrokerLink({
      log: this.log,
      dataDir: this.dataDir,
      mqttPort: this.opts.mqttPort,
      secrets: this.secrets,
      store: this.store,
      intake: (msg, client) => this.brokerIntake(msg, client),
      outputsReconnected: () => this.outputsReconnected(),
    });
    this.broker = this.link.create(spec, drop, spec.broker.tls ? readTls(spec.broker.tls) : null);
    this.effects = new Effects(this.store, this.broker, this.log, {
      forwardHops: (episode) => this.store.forwardHops(episode, 4 * (this.current.spec.fleet.max_send_hops + 1)),
    });
    await this.broker.start();
    await this.link.startWatches();
    this.tokens = new TokenAuth(join(this.dataDir, TOKENS_FILE), {
      log: this.log.child({ mod: "auth" }),
      onChange: (c) => void this.auditTokenChange(c),
    });
    this.tokens.allow(writeLocalToken(this.dataDir), LOCAL_TOKEN_NAME, "admin");
    await this.auditTokensUnseen();
    // Requests re-read a changed file at once; this also records edits while no request comes.
    this.tokenWatch = setInterval(() => this.tokens.refresh(), 1000);
    this.tokenWatch.unref();
    if (spec.http.allow_unauthenticated)
      this.log.warn({ host: spec.http.host }, "HTTP API and dashboard need no token ([http] allow_unauthenticated)");
    this.http = startHttp(this, {
      // Access keys apply live; host, port and TLS are restart keys (spec/restart.ts).
      http: () => this.current.spec.http,
      port: this.opts.httpPort ?? spec.http.port,
      tls: spec.http.tls ? readTls(spec.http.tls) : null,
    });
    this.timers = fleetTimers(this, this.now);
    this.redeploy = this.createRedeploy();
    this.redeploy.error = this.startRefusal;
    this.redeploy.read = file;
    this.state = "running";
    await this.timers.update(spec);
    this.wakeups = fleetWakeups(this, this.now);
    await this.wakeups.start();
    this.watcher = new SpecWatcher(this.current.path, () => void this.redeploy?.reload("file changed", false), {
      codeFiles: () => this.codeFiles(),
    });
    // Primed with the file as read at start, not the running spec's text (a refused file's
    // predecessor): a reload only when the file changes, so a refusal at start stays the spec error.
    this.watcher.start(this.unreadableText ?? file.text);
    // Statuses may have changed while the gateway was down (an episode killed mid-run): re-publish
    // them (retained, in broker.db or in aedes' memory), in the background: with 100,000 agents
    // that is 100,000 publishes, which need not hold up the start. Then re-send unsent effects.
    this.republished = republishStatuses(this.store, this.events, () => this.state !== "running").catch(
      (err: unknown) => {
        this.log.error({ err }, "re-publishing agent statuses failed");
        return 0;
      },
    );
    void this.effects.kick();
    this.housekeeping = new Housekeeping(this, {
      now: this.now,
      healthIntervalMs: this.opts.healthIntervalMs ?? 10_000,
      gcIntervalMs: this.opts.gcIntervalMs ?? 60_000,
    });
    this.housekeeping.start();
    const pidStart = startTicks(process.pid);
    const boot = bootId();
    writePrivateFile(
      join(this.dataDir, "gateway.json"),
      `${JSON.stringify({
        mqtt_port: this.broker.port,
        http_port: this.http.port,
        ...(spec.broker.external ? { broker_url: spec.broker.external.url } : {}),
        ...(this.broker.wsPort === null ? {} : { ws_port: this.broker.wsPort }),
        ...(this.broker.tlsPort === null ? {} : { mqtts_port: this.broker.tlsPort }),
        ...(this.broker.wssPort === null ? {} : { wss_port: this.broker.wssPort }),
        ...(spec.http.tls ? { https: true } : {}),
        pid: process.pid,
        // Its start time: a reused pid is not this gateway (pids.ts processRuns).
        ...(pidStart === null ? {} : { pid_start: pidStart }),
        ...(boot === null ? {} : { boot_id: boot }),
        gateway: this.store.gatewayId,
        ...(spec.fleet.shard ? { shard: shardLabel(spec.fleet.shard) } : {}),
      })}\n`,
    );
    this.log.info(
      {
        mqtt_port: this.broker.port,
        http_port: this.http.port,
        ...(spec.broker.external ? { broker_url: spec.broker.external.url } : {}),
        ws_port: this.broker.wsPort,
        mqtts_port: this.broker.tlsPort,
        wss_port: this.broker.wssPort,
        https: spec.http.tls !== null,
        data_dir: this.dataDir,
        ...(spec.fleet.shard ? { shard: shardLabel(spec.fleet.shard) } : {}),
        spec: this.current.hash.slice(0, 12),
        sandbox: describeSandbox(this.spawnOptions),
      },
      `fleet "${spec.fleet.name}" running`,
    );
  }

  /**
   * Commits succeed again after failing (a full disk was freed): agents whose turns failed meanwhile
   * run now, not when their backoff ends, and a reload the failure cut short is tried again.
   */
  private storageRecovered(): void {
    for (const agent of this.executor?.failedTurnAgents() ?? []) this.scheduler.wake(agent);
    void this.redeploy?.retryFailed();
  }

  /** Stop the work the gateway does on its own from time to time, and its watches of files. */
  private stopPeriodic(): void {
    this.housekeeping?.stop();
    this.rollouts?.stop();
    this.storageWatch?.stop();
    this.disk?.stop();
    this.link?.stopWatches();
    this.watcher?.stop();
  }

  /** Stop intake, let in-flight episodes finish (or kill them at the drain timeout), flush, close. */
  async stop(): Promise<void> {
    if (this.state === "stopped" || this.state === "draining") return;
    this.state = "draining";
    // No episode starts from here on, first: the steps below may start one otherwise (the end of a
    // burst lifts the devices-first cap, and a turn that ends while they wait starts the next).
    this.scheduler?.stop();
    this.stopPeriodic();
    await this.timers?.stop();
    await this.wakeups?.stop();
    await this.broker?.stopIntake();
    this.pressure?.stop();
    const drainMs = this.current?.spec.fleet.drain_timeout_ms ?? 10_000;
    const drained = await Promise.race([
      this.scheduler?.idle().then(() => true) ?? true,
      Bun.sleep(drainMs).then(() => false),
    ]);
    if (!drained) {
      this.log.warn(
        { running: this.procs.running },
        "drain timeout: aborting in-flight episodes (their stimuli stay queued)",
      );
      this.procs.killAll();
      await Promise.race([this.scheduler.idle(), Bun.sleep(2000)]);
    }
    await this.releaseParts();
    if (this.tokenWatch) clearInterval(this.tokenWatch);
    if (this.dataDir) removeLocalToken(this.dataDir);
    try {
      rmSync(join(this.dataDir, "gateway.json"));
    } catch {
      // not written (failed start)
    }
    this.state = "stopped";
    this.log.info("fleet stopped");
  }

  /** The data disk's free space against `[fleet] disk_free_limit_mb` (metrics), or null before start. */
  diskStatus(): DiskStatus | null {
    return this.disk?.status() ?? null;
  }

  /** `/readyz`: running, commits are not failing for a storage reason, and an external broker is connected. */
  readiness(): Readiness {
    const r = readiness(this.state, this.store);
    if (!r.ready) return r;
    // Taking nothing from outside while the data disk is low: a balancer should send devices elsewhere.
    const low = this.disk?.refusal();
    if (low) return { ready: false, state: r.state, reason: low };
    const degraded = this.infra.degraded;
    // Episodes that cannot start (the machine's failure) make the gateway not ready too.
    if (degraded) return { ready: false, state: r.state, reason: `episodes cannot start: ${degraded.reason}` };
    // Cut off from an external broker, the gateway receives nothing (docs/http-api.md).
    const ext = this.broker?.stats().external;
    if (ext?.takenOver)
      return {
        ready: false,
        state: r.state,
        reason: "broker: another client keeps taking over this gateway's session",
      };
    if (ext && ext.disconnectedSince !== null)
      return {
        ready: false,
        state: r.state,
        reason: `broker: disconnected since ${new Date(ext.disconnectedSince).toISOString()}`,
      };
    return r;
  }

  /**
   * One line for a service manager (systemd's `STATUS=`): readiness, episodes running, the queue and its lag, and
   * the last reload's error while there is one.
   */
  serviceStatus(): string {
    const r = this.readiness();
    const lag = this.lagMs();
    const state = r.ready ? "ready" : `not ready (${r.reason ?? r.state})`;
    const queued = this.book.total();
    const running = this.scheduler.active;
    const line = `${state}: ${running} episode(s) running, ${queued} stimuli queued, lag ${(lag / 1000).toFixed(1)} s`;
    // After `systemctl reload`, `systemctl status` says whether the edit was refused, and why.
    const behind = this.clockBehindMs();
    const clock = behind > CLOCK_BEHIND_WARN_MS ? `; clock behind the data dir by ${Math.round(behind / 1000)} s` : "";
    const refused = this.specError;
    return refused === null ? line + clock : `${line}${clock}; fleet.toml: ${refused.slice(0, 300)}`;
  }

  /**
   * How far the clock reads earlier than the newest time the gateway saw or its data dir recorded, in ms (0: it
   * does not). An edge box without a real-time clock boots at an old time until NTP sets it; meanwhile
   * timestamps, budget windows, timers and retention follow the clock that is wrong.
   */
  clockBehindMs(): number {
    const now = this.now();
    if (now > this.clockHighWater) this.clockHighWater = now;
    return this.clockHighWater - now;
  }

  /** Log once when the clock falls behind by more than a minute, and once when it has caught up. */
  private watchClock(): void {
    const behind = this.clockBehindMs();
    if (behind > CLOCK_BEHIND_WARN_MS && !this.clockBehind) {
      this.clockBehind = true;
      this.log.error(
        { behind_ms: behind, newest: new Date(this.clockHighWater).toISOString() },
        `the system clock reads ${new Date(this.now()).toISOString()}, ${Math.round(behind / 1000)} s earlier than ` +
          "the newest time this data dir recorded: timestamps, budget windows, timers and retention follow it; " +
          "set the clock (NTP, an RTC)",
      );
    } else if (behind <= CLOCK_BEHIND_WARN_MS && this.clockBehind) {
      this.clockBehind = false;
      this.log.info("the system clock has caught up with the data dir's newest time");
    }
  }

  /** How long the oldest queued stimulus has waited, ms (0: none queued). */
  private lagMs(): number {
    const oldest = this.book.oldestReceivedAt();
    return oldest === null ? 0 : Math.max(0, this.now() - oldest);
  }

  /** How long the oldest write waiting for its commit has waited (0: none): the watchdog's gate (systemd.ts). */
  commitStallMs(): number {
    return this.store.writer.stalledMs();
  }

  /** Hot redeploy (redeploy.ts): load fleet.toml again; a no-op unless the gateway runs. */
  reload(reason: string): Promise<void> {
    return this.redeploy?.reload(reason) ?? Promise.resolve();
  }

  /**
   * Retention now (`fleet gc`, POST /api/gc): all passes, or a dry run, on the gateway's clock. A collection
   * reports the free pages it left in fleet.db, and the data disk's reserve looks again at once (they count).
   */
  async gc(opts: { dryRun: boolean }): Promise<GcOutcome> {
    const report = await gcAll(this.store, this.current.spec, {
      now: this.now(),
      dryRun: opts.dryRun,
      keepUnconfirmed: this.keepUnconfirmed(),
      keepBundles: this.bundlesInUse(),
    });
    if (opts.dryRun) return report;
    // The reserve's look reads the free pages: a read that fails leaves them out of the answer, not the collection.
    const dbFreeBytes = await this.disk?.poll();
    return dbFreeBytes === undefined ? report : { ...report, dbFreeBytes };
  }

  /** Code bundles episodes may run now: retention keeps them. */
  bundlesInUse(): string[] {
    return [...Object.values(this.current.bundles), ...(this.rollouts?.inUse() ?? [])];
  }

  /** Retention spares rows the central server has not confirmed (`[replication] required`, under max_backlog_mb). */
  keepUnconfirmed(): boolean {
    return this.replicator?.keepUnconfirmed() ?? false;
  }

  /** Spans the OTLP collector did not take, by reason; null without `[telemetry] otlp_endpoint`. */
  telemetryDropped(): Readonly<Record<string, number>> | null {
    return this.telemetry?.dropped ?? null;
  }

  /** Replication status for health, metrics and the dashboard; null when not configured. */
  replication(): ReplicationStatus | null {
    return this.replicator?.status() ?? null;
  }

  /** Append an operator action to the audit log (durable when it resolves). */
  audit(entry: AuditEntry): Promise<void> {
    return appendAudit(this.store, { ...entry, at: this.now() });
  }

  /**
   * Tokens added to or removed from the tokens file (`fleet token add|revoke` while running), recorded
   * with the file as audited (TOKENS_AUDITED_META) in one transaction.
   */
  private async auditTokenChange(c: TokenChange): Promise<void> {
    const records = tokenAuditRecords(c, "tokens-file", this.now());
    await appendAuditWithMeta(this.store, records, TOKENS_AUDITED_META, tokenSnapshot(c.tokens)).catch((err: unknown) =>
      this.log.error({ err }, "recording a change of the tokens file in the audit log failed"),
    );
  }

  /**
   * At start: changes to the tokens file the audit log has not recorded (one made just before the last
   * stop or crash, before the gateway saw it) are recorded now. A data dir without the record (an older
   * release) takes the file as it is.
   */
  private async auditTokensUnseen(): Promise<void> {
    const seen = await this.store.getMeta(TOKENS_AUDITED_META);
    const change = diffTokens(seen === null ? this.tokens.tokens : parseTokenSnapshot(seen), this.tokens.tokens);
    if (seen === null || change.added.length + change.removed.length > 0) await this.auditTokenChange(change);
  }

  /** Where secrets come from (tools, webhooks): the options, else the gateway's environment. */
  get secrets(): Readonly<Record<string, string | undefined>> {
    return this.opts.secrets ?? process.env;
  }

  /** Why episodes cannot start now, or null (/readyz, health). */
  degraded(): Degraded | null {
    return this.infra.degraded;
  }

  /** Stimuli waiting per type and their lag, from the queue book (metrics, the dashboard). */
  queues() {
    return this.book.byType();
  }

  /** Episode subprocess groups alive now. */
  subprocesses(): number {
    return this.procs.running;
  }

  /**
   * Retry or drop a quarantined stimulus. A retry is admitted like a new stimulus; back in
   * the queue it runs now (it is older than the head that may be waiting for its backoff).
   */
  /** Promote or abort a type's canary rollout by hand (`fleet rollout`). */
  async decideRollout(type: string, action: "promote" | "abort"): Promise<{ ok: boolean; message: string }> {
    if (!this.rollouts) return { ok: false, message: "the gateway is not running" };
    return this.rollouts.decide(type, action, "an operator");
  }

  resolveQuarantined(seq: number, action: "retry" | "drop"): Promise<QuarantineAction> {
    return resolveQuarantined(
      this.store,
      seq,
      action,
      {
        // An agent whose type left the spec is retired: the book refuses it before max_queue matters.
        admit: (agent) =>
          this.book.admit(agent, this.current.spec.agents[parseAgentId(agent)?.type ?? ""]?.max_queue ?? Infinity),
        recorded: (agent, seq, receivedAt) => {
          this.book.recorded(agent, seq, receivedAt);
          this.scheduler.wake(agent);
        },
        released: (agent) => this.book.released(agent),
      },
      this.now(),
    );
  }

  /**
   * Replay a recorded episode (id or unique prefix) in a fresh sandboxed subprocess, as
   * `fleet replay` does: on its recorded inputs, never touching the fleet's state.
   */
  async replay(idOrPrefix: string): Promise<ReplayResult | TraceMiss> {
    const found = await findEpisode(this.store, idOrPrefix);
    if ("code" in found) return found;
    return replayEpisode(this.store, found.id, this.spawnOptions, undefined, undefined, (h) => this.bundles.file(h));
  }

  /**
   * The replay gate (`POST /api/deploy/check`): `toml` (else the fleet.toml file as it is now,
   * relative paths against its folder) checked against the running spec. Throws SpecError.
   */
  async deployCheck(toml: string | null, opts: DeployCheckOptions): Promise<DeployCheckReport> {
    const path = this.current.path;
    const candidate = toml === null ? await loadSpec(path) : await compileSpec(toml, path);
    const scope = specScope(candidate, this.dataDir);
    const build = async (modulePath: string) => {
      const r = await buildBundle(modulePath, HOST_MODULES, scope);
      if (!r.ok) return { error: r.error };
      this.bundles.remember(r.hash, r.code);
      return { hash: r.hash, file: () => this.bundles.file(r.hash) };
    };
    return deployCheck(this.store, this.current, candidate, this.spawnOptions, { ...opts, build, live: true });
  }

  /** Stimuli waiting for an agent. */
  queued(agent: string): number {
    return this.book?.queued(agent as AgentId) ?? 0;
  }

  /** Route a topic with the current spec (HTTP send, CLI). */
  routeTopic(topic: string): Route {
    return this.route(topic);
  }

  /** Operator lifecycle: pause, resume or retire an agent (`drain`: after its queued stimuli ran). */
  setLifecycle(id: AgentId, action: LifecycleAction, opts: { drain?: boolean } = {}): Promise<LifecycleResult> {
    return this.roster.setLifecycle(id, action, opts);
  }

  /**
   * The newest stored spec version that has `type`: what a removed type's agents drain on.
   * Spec versions never change, so the answer is kept.
   */
  private async drainSpec(type: string): Promise<SpecVersion | null> {
    const known = this.drainSpecs.get(type);
    if (known) return known;
    for (const row of await this.store.listSpecVersions(1000)) {
      const sv = await storedVersion(row).catch(() => null);
      if (!sv?.spec.agents[type]) continue;
      this.drainSpecs.set(type, sv);
      return sv;
    }
    return null;
  }

  /** Fleet-level summary: the body of `fleet/health` and part of /api/fleet. */
  async health() {
    this.watchClock();
    const counts = await this.store.agentCounts();
    const byStatus: Record<string, number> = {};
    // As every view shows a status: the stored `active` is `idle`.
    for (const c of counts) byStatus[shownStatus(c.status)] = (byStatus[shownStatus(c.status)] ?? 0) + c.n;
    const queued = this.book.total();
    return {
      fleet: this.current.spec.fleet.name,
      gateway: this.store.gatewayId,
      /** `"i/N"` when this gateway is one shard of the fleet, else null. */
      shard: this.current.spec.fleet.shard ? shardLabel(this.current.spec.fleet.shard) : null,
      state: this.state,
      spec_version: this.current.hash,
      spec_error: this.specError,
      /** A reload checking a new version before it applies it (`step`: config check, deploy check), else null. */
      spec_pending: this.redeploy?.pending ?? null,
      /** Each type's newest canary rollout of new code (docs/upgrading.md). */
      rollouts: (await this.rollouts?.view()) ?? [],
      /** Same as /readyz: false while commits fail (full disk, I/O error), with the reason. */
      readiness: this.readiness(),
      rejected_messages: await this.store.countRejected(),
      /** Poison stimuli waiting for an operator (`fleet quarantine`), now. */
      quarantined_stimuli: await this.store.countQuarantined(),
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
      /** How far the clock reads earlier than the newest time seen or recorded (0: it does not). */
      clock_behind_ms: this.clockBehindMs(),
      /** The data disk's free space and its reserve ([fleet] disk_free_limit_mb); `low`: refusing outside stimuli. */
      disk: this.diskStatus(),
      /** When this summary was made (ms since the epoch): a retained copy's age (`fleet reshard` reads it). */
      at: Date.now(),
      agents: { total: Object.values(byStatus).reduce((a, b) => a + b, 0), ...byStatus },
      running_episodes: this.scheduler.active,
      /** Null while episodes start; else why they cannot (the machine's failure, not the agents'). */
      degraded: this.infra.degraded,
      /** Idle warm spare processes (no agent code or state), by process group. */
      spares: this.spares?.pids() ?? [],
      queued_stimuli: queued,
      lag_ms: this.lagMs(),
      broker: this.broker.stats(),
      replication: this.replication(),
      ...(await this.metrics.healthSummary()),
    };
  }

  /**
   * `[replication]` on: the local triggers record, the replicator pushes in the background
   * (the center may be down: that only grows the backlog). Off: the queue is dropped.
   * Read at start; a change to `[replication]` takes a restart.
   */
  private async startReplication(spec: FleetSpec): Promise<void> {
    if (!spec.replication) {
      // A fleet that never replicated has no queue to drop: its start loads none of the replicator's code.
      if ((await this.store.getMeta("replication")) !== "on") return;
      const { disableReplication } = await import("./replication/index.ts");
      if (await disableReplication(this.store))
        this.log.warn("[replication] removed from fleet.toml: replication queue dropped, retention no longer waits");
      return;
    }
    const { Replicator } = await import("./replication/index.ts");
    this.replicator = new Replicator({
      store: this.store,
      spec: spec.replication,
      // Each shard replicates as a fleet of its own; the central view joins them (docs/shards.md).
      fleet: shardFleetName(spec.fleet.name, spec.fleet.shard),
      env: this.secrets,
      log: this.log,
      now: this.now,
    });
    await this.replicator.start();
  }

  /**
   * Claim `[fleet] sandbox_uids` among the gateways on this machine, where episodes run as uids
   * (./episode/uid-claims.ts): the default range moves past one another gateway holds, a range set
   * in fleet.toml that overlaps one is refused (UidRangeTaken). Null where no uids are handed out,
   * or where the claims folder cannot be used (said in the log).
   */
  private claimSandboxUids(spec: FleetSpec): HeldUids | null {
    if (!runsAsUids(spec.fleet.sandbox)) return null;
    let held: HeldUids;
    try {
      held = claimUids(spec.fleet.sandbox_uids, `the gateway of ${this.dataDir}`);
    } catch (err) {
      if (err instanceof UidRangeTaken) throw err;
      this.log.warn(
        `could not check which sandbox uids other gateways on this machine hand out (${String(err)}): ` +
          `episodes run as ${uidSpan(spec.fleet.sandbox_uids)}, which no other gateway may use`,
      );
      return null;
    }
    const past = held.movedPast;
    if (past)
      this.log.warn(
        { holder_pid: past.pid, holder: past.owner },
        `the default sandbox_uids ${uidSpan(past)} are held by pid ${past.pid} (${past.owner}): ` +
          `episodes here run as ${uidSpan(held.range)}`,
      );
    return held;
  }

  /**
   * Take the data dir: refuse it while the gateway its sandbox ledger names still runs (DataDirInUse),
   * else reap the sandboxes a kill -9 of the previous run left behind and start this run's ledger.
   */
  private claimDataDir(): SandboxLedger {
    const ledger = new SandboxLedger(join(this.dataDir, "sandboxes"));
    const swept = ledger.sweep();
    if (swept.ownerAlive) throw new DataDirInUse(this.dataDir);
    if (swept.killed.length > 0 || swept.roots > 0)
      this.log.warn(
        { groups: swept.killed, roots: swept.roots },
        `reaped ${swept.killed.length} sandbox process group(s) and ${swept.roots} staging folder(s) ` +
          "left by a previous run",
      );
    return ledger;
  }

  /** Spawning, the episode executor, the scheduler, the roster and intake, wired to each other. */
  private buildPipeline(spec: FleetSpec, ledger: SandboxLedger): void {
    this.heldUids = this.opts.spawn ? null : this.claimSandboxUids(spec);
    const base =
      this.opts.spawn ??
      defaultSpawnOptions(spec.fleet.sandbox, {
        allowWeak: spec.fleet.allow_weak_sandbox,
        uids: this.heldUids?.range ?? spec.fleet.sandbox_uids,
      });
    this.spawnOptions = { ...base, ledger };
    const weak = weakSandboxWarning(this.spawnOptions);
    if (weak) this.log.warn(weak);
    // Episodes, and up to twice the warm spares (SparePool).
    const alive = spec.fleet.max_concurrent_episodes + 2 * spec.fleet.warm_spares;
    const shared = sharedUidWarning(this.spawnOptions, alive);
    if (shared) this.log.warn(shared);
    // Builds the host runtime now (once per process), not on the first episode's path.
    hostScript(this.spawnOptions.bun);
    const slow = hostBuildProblem();
    if (slow) this.log.warn(`episodes run the host runtime from its sources (slower start-up): ${slow}`);
    const spawnOptions = this.spawnOptions;
    const floodSpawn = spawnOptions.nice ? idleSpawnOptions(spawnOptions) : spawnOptions;
    const burstSpawn = inGroupAt(spawnOptions, BURST_GROUP_NICE);
    const lane = new QuietLane();
    const spares = new SparePool(spec.fleet.warm_spares, spawnOptions, this.procs);
    this.spares = spares;
    this.book = new QueueBook({
      onQueued: (a) => this.scheduler.notify(a),
      onDrained: (a) => void this.roster.finishDrain(a).catch((err: unknown) => this.log.error({ err }, "drain")),
      onCapped: agentCapNotices(this.log.child({ mod: "intake" }), this.events, this.now),
    });
    const floods = new FloodRule({
      queued: (a) => this.book.queued(a),
      contendingAgents: () => this.scheduler.contendingAgents,
      now: this.now,
    });
    const executor = new EpisodeExecutor({
      store: this.store,
      spec: () => this.current,
      // Fairness: an agent with a backlog while others have work (a flood: ./fleet/flood.ts) starts
      // cold at SCHED_IDLE. It leaves the warm spares to agents waiting on a stimulus or two, and its
      // processes yield the CPU to theirs. An agent a little behind (pinged about as fast as its
      // episodes run) is not a flood, nor is one with a backlog and no one to yield to.
      run: async (start, limits, onTool) => {
        const agent = start.agent.id as AgentId;
        const flooded = floods.flooded(agent);
        floods.started(agent);
        // Devices first for the others too: one holds the lane, one beside it yields during a burst (QuietLane).
        const { yields, leave } = flooded ? { yields: false, leave: () => undefined } : lane.enter(this.pressure.burst);
        try {
          const r = flooded
            ? await runEpisode(start, limits, onTool, floodSpawn, undefined, this.procs)
            : await runEpisode(start, limits, onTool, yields ? burstSpawn : spawnOptions, spares, this.procs);
          this.events.emit("spawn", { type: start.agent.type, start: r.start ?? "cold" });
          return r;
        } finally {
          leave();
        }
      },
      toolEnv: {
        secrets: this.secrets,
        fetch,
        admit: (a, max, cap) => this.book.admit(a, max, cap),
        sendHops: (sid, maxSteps) => this.store.sendHops(sid, maxSteps),
        sendRefused: (agent, code, reason) => this.intake.sendRefused(agent, code, reason),
      },
      events: this.events,
      log: this.log,
      now: this.now,
      stopping: () => this.state === "draining" || this.state === "stopped",
      lifecycleStamp: (a) => this.roster.lifecycleStamp(a),
      queue: this.book,
      drained: (a) => this.roster.finishDrain(a),
      drainSpec: (type) => this.drainSpec(type),
      publishCommitted: (episode, rows, agent) => this.effects.publishCommitted(episode, rows, agent),
      wakesScheduled: (dueAt) => this.wakeups?.scheduled(dueAt),
      running: () => this.scheduler.active,
      infra: this.infra,
      bundleFile: (hash) => this.bundles.file(hash),
      codeVersion: (module, type, bundle) => this.codeVersion(module, type, bundle),
      inSourceTerms: async (text, bundle, sv, type) => {
        if (!text.includes(bundle.file)) return text;
        const found = await this.bundles.sourceMap(bundle.hash);
        return inSourceTerms(text, bundle.file, found?.map ?? null, {
          fleetDir: dirname(sv.path),
          module: sv.spec.agents[type]?.module ?? type,
          ...(found && !found.built ? { storedBundle: bundle.hash } : {}),
        });
      },
      bundleFor: (agent, type, sv) =>
        this.rollouts ? this.rollouts.bundleFor(agent, type, sv) : (sv.bundles[type] ?? null),
    });
    this.executor = executor;
    this.scheduler = new Scheduler({
      maxConcurrent: spec.fleet.max_concurrent_episodes,
      runTurn: (a) => executor.turn(a),
      queued: (a) => this.book.queued(a),
      flooded: (a) => floods.flooded(a),
      pace: new QuietPace(),
      now: this.now,
    });
    // Bursts can come and go several times a second: the log says so at most once a minute.
    let noted = -Infinity;
    let bursts = 0;
    this.pressure = new IntakePressure((burst) => {
      this.scheduler.setCap(burst ? burstSlots : null);
      if (!burst) return;
      bursts++;
      if (this.now() - noted < 60_000) return;
      noted = this.now();
      this.log.info(
        { slots: this.scheduler.capacity, bursts },
        "devices first: intake bursts, fewer episodes at once while they last",
      );
      bursts = 0;
    }, this.now);
    this.roster = new Roster(this.store, this.events, this.scheduler, this.book);
    this.intake = new Intake(
      this.store,
      {
        route: (t) => this.route(t),
        admit: (a, max, cap) => this.book.admit(a, max, cap),
        recorded: (a, seq, receivedAt, kind) => {
          this.book.recorded(a, seq, receivedAt);
          if (pressesIntake(kind)) this.pressure.recorded(1);
        },
        released: (a, n) => this.book.released(a, n),
        diskLow: () => this.disk?.refusal() ?? null,
      },
      this.events,
      this.log,
      this.now,
    );
  }

  /**
   * Intake for the broker: refused (transient: the device or the broker retries) unless the gateway
   * runs. An external broker may deliver its queue before start finishes: that waits for running.
   */
  private brokerIntake(msg: PublishedMessage, client: ClientInfo): Promise<IntakeVerdict> {
    // The path of every device message adds no promise of its own while the gateway runs.
    return this.state === "running" ? this.intake.mqtt(msg, client) : this.brokerIntakeNotRunning(msg, client);
  }

  private async brokerIntakeNotRunning(msg: PublishedMessage, client: ClientInfo): Promise<IntakeVerdict> {
    if (this.state === "starting") await this.started;
    if (this.state !== "running") return { ok: false, reason: `gateway is ${this.state}` };
    return this.intake.mqtt(msg, client);
  }

  /**
   * The external broker is reachable again: outputs held back by the outage go now, before newer ones
   * (not at the next retry, up to 30 s on), and if a status could not be published meanwhile, every
   * agent's status is published again (retained there, it would stay stale until the agent's next change).
   */
  private outputsReconnected(): void {
    void this.effects.kick();
    if (!this.facts.statusMissed || this.state !== "running") return;
    this.facts.statusMissed = false;
    this.log.info("re-publishing agent statuses: some could not be published while the broker was out of reach");
    const again = () => republishStatuses(this.store, this.events, () => this.state !== "running");
    this.republished = this.republished.then(again).catch((err: unknown) => {
      this.log.error({ err }, "re-publishing agent statuses failed");
      return 0;
    });
  }

  /**
   * The [http] keys a reload applies live (the guard reads the running spec per request): what
   * changed, said in the redeploy line. Host, port and TLS are restart keys.
   */
  private applyHttp(current: FleetSpec, next: FleetSpec): string | null {
    const [a, b] = [current.http, next.http];
    const changed = LIVE_HTTP_KEYS.filter((k) => canonicalJson(a[k]) !== canonicalJson(b[k]));
    if (changed.length === 0) return null;
    if (b.allow_unauthenticated && !a.allow_unauthenticated)
      this.log.warn({ host: b.host }, "HTTP API and dashboard need no token ([http] allow_unauthenticated)");
    return `http ${changed.join(", ")} applied live`;
  }

  /** Hot redeploy over the running parts; `adopt` is how it switches spec versions. */
  private createRedeploy(): Redeploy {
    return new Redeploy({
      store: this.store,
      scheduler: this.scheduler,
      timers: this.timers,
      roster: this.roster,
      log: this.log,
      now: this.now,
      running: () => this.state === "running",
      current: () => this.current,
      adopt: async (next) => {
        await this.rollouts?.deployed(this.current, next);
        this.adopt(next);
      },
      needsRestart: (current, next) =>
        restartNeeded(current, next, [
          ...(this.opts.mqttPort === undefined ? [] : ["broker.mqtt_port"]),
          ...(this.opts.httpPort === undefined ? [] : ["http.port"]),
        ]),
      check: async (current, next) => {
        const types = typesToCheck(next.spec, current);
        const problems = await checkConfigs(types, this.spawnOptions, this.spares ?? undefined);
        return problems.length > 0 ? configProblemsError(next, problems).message : null;
      },
      gate: async (current, next) =>
        canaryConfigRefusal(current, next) ??
        this.rollouts?.configRefusal(current, next) ??
        reloadGate(this.store, current, next, this.spawnOptions, (h) => this.bundles.file(h)).catch(
          (err: unknown) => `the deploy check could not run: ${err instanceof Error ? err.message : String(err)}`,
        ),
      applyLive: async (current, next) =>
        [(await this.link?.applyLive(current, next)) ?? null, this.applyHttp(current, next)]
          .filter((x) => x !== null)
          .join("; ") || null,
      pin: (next, current) => this.pin(next, current),
    });
  }

  /**
   * Bundle and store a version's code (gateway/code). On a redeploy, new code whose state version
   * is lower than the version that wrote its agents' state is refused (docs/upgrading.md).
   */
  private async pin(next: SpecVersion, current: SpecVersion | null): Promise<Pinned> {
    const pinned = await this.pinOnly(next, current);
    if (!pinned.ok || current === null) return pinned;
    const problems: string[] = [];
    for (const c of codeChanges(current, pinned.sv)) {
      const type = pinned.sv.spec.agents[c.type];
      if (!type || c.to === null) continue;
      const lowered = await loweredVersion(this.store, type, await this.bundles.file(c.to), this.spawnOptions);
      if (lowered !== null) problems.push(lowered);
    }
    return problems.length > 0 ? { ok: false, problems } : pinned;
  }

  /**
   * The state version the code of an episode declares, read once per bundle in a check subprocess (a
   * module file, each time its files change): what the checkpoint records, whatever the episode's
   * subprocess says (gateway/episode/state-version.ts). Null when the check failed (asked again next time).
   */
  private codeVersion(module: string, type: AgentTypeSpec, bundle: string | null): Promise<number | null> {
    const key = bundle ?? `${module}\n${stampOf(module)}`;
    let known = this.codeVersions.get(key);
    if (!known) {
      known = moduleVersion(type, module, this.spawnOptions).then((r) =>
        r !== null && "version" in r ? r.version : null,
      );
      this.codeVersions.set(key, known);
      void known.then((v) => {
        if (v === null) this.codeVersions.delete(key);
      });
    }
    return known;
  }

  private pinOnly(next: SpecVersion, current: SpecVersion | null): Promise<Pinned> {
    return pinCode(next, current, {
      sink: this.store,
      files: this.bundles,
      hostModules: HOST_MODULES,
      now: this.now,
      log: this.log.child({ mod: "code" }),
      dataDir: this.dataDir,
    });
  }

  /**
   * The files whose change is a code change: the import closures of the running types' modules and
   * of those fleet.toml names now (a type refused because its module was missing is applied once it
   * is written), with where a missing module or import would appear.
   */
  private codeFiles(): string[] {
    const modules = new Set<string>();
    for (const spec of [this.current.spec, this.redeploy?.read?.spec])
      for (const t of Object.values(spec?.agents ?? {})) modules.add(t.module_path);
    return [...modules].flatMap((m) => agentFiles(m, HOST_PATHS).watched);
  }

  /** The newest time seen (the clock, the data dir's newest record): `clockBehindMs` measures from it. */
  private clockHighWater = 0;
  private clockBehind = false;

  /** Why fleet.toml was not applied at start (the spec error until a reload applies a file). */
  private startRefusal: string | null = null;
  /** Why fleet.toml could not be read or compiled at all at start, when the version that ran before runs instead. */
  private unreadableFile: string | null = null;
  /** That file's text then ("" when it could not be read): the watcher applies the file once it differs. */
  private unreadableText: string | null = null;

  /**
   * fleet.toml cannot be read or compiled at start (`err`): the version that ran before the gateway stopped,
   * from its data dir, runs instead, and the error is the spec error, as after a refused reload: an edit
   * with a typo never takes down a fleet that a power cut restarts. Only with a data dir given (`--data-dir`,
   * `FLEET_DATA_DIR`, as the systemd unit does): the file that cannot be read cannot say where its data
   * dir is. Otherwise, or on a data dir that never ran, `err` is thrown (the start fails).
   */
  private async lastRunSpec(err: unknown): Promise<SpecVersion> {
    if (!(err instanceof SpecError) || this.opts.dataDir === undefined) throw err;
    const db = join(resolve(this.opts.dataDir), "fleet.db");
    if (!existsSync(db)) throw err;
    let previous: SpecVersion | null = null;
    try {
      const store = await Store.open(db, { synchronous: "normal", readonly: true });
      try {
        previous = await storedSpec(store);
      } finally {
        await store.close();
      }
    } catch (readErr) {
      this.log.warn({ err: readErr }, "the data dir's last spec version could not be read");
    }
    if (previous === null) throw err;
    try {
      this.unreadableText = readFileSync(this.opts.configPath, "utf8");
    } catch {
      this.unreadableText = "";
    }
    this.unreadableFile =
      `not applied at start: ${err.message}; running spec ${previous.hash.slice(0, 12)}, the one that ran before ` +
      "(fix the file: it is applied when it changes)";
    // Watched and reloaded from where it is now, whatever path the version was stored with.
    return Object.freeze({ ...previous, path: resolve(this.opts.configPath) });
  }

  /**
   * The version to start on: fleet.toml's, unless a hot reload from the version that ran before
   * the gateway stopped would have refused it (a state version lowered, an edit of bundled code
   * that does not bundle, a failed `require_check` deploy check). Then that version runs again and
   * the refusal is the spec error, as after a refused reload: a restart never slips it through.
   */
  private async startingVersion(
    file: SpecVersion,
  ): Promise<{ sv: SpecVersion; refused: string | null; previous: SpecVersion | null }> {
    // A stored version this code can no longer compile is as good as none (the file is checked as at a first start).
    const previous = await storedSpec(this.store).catch(() => null);
    const pinned = await this.pin(file, previous);
    if (previous === null) {
      if (!pinned.ok) throw new Error(pinned.problems.join("\n"));
      return { sv: pinned.sv, refused: null, previous };
    }
    let refused = pinned.ok ? null : pinned.problems.join("; ");
    if (pinned.ok && pinned.sv.hash !== previous.hash)
      refused =
        canaryConfigRefusal(previous, pinned.sv) ??
        (await reloadGate(this.store, previous, pinned.sv, this.spawnOptions, (h) => this.bundles.file(h)).catch(
          (err: unknown) => `the deploy check could not run: ${err instanceof Error ? err.message : String(err)}`,
        ));
    if (pinned.ok && refused === null) return { sv: pinned.sv, refused: null, previous };
    return {
      previous,
      sv: previous,
      refused: `not applied at start: ${refused}; running spec ${previous.hash.slice(0, 12)}, the one that ran before`,
    };
  }

  /** Switch routing and new episodes to `sv`. */
  private adopt(sv: SpecVersion): void {
    const before = this.current as SpecVersion | undefined;
    for (const [name, hook] of Object.entries(sv.spec.hooks)) {
      const env = hook.secret_env;
      if (!env || this.secrets[env] || before?.spec.hooks[name]?.secret_env === env) continue;
      // Fails closed (503 to every call) until the variable is set and the gateway restarted.
      this.log.warn({ hook: name, secret_env: env }, `hook ${name}: ${env} is not set; its calls are refused`);
    }
    this.current = sv;
    this.drainSpecs.clear(); // a type removed again may have changed meanwhile
    this.route = createRouter(sv.spec);
    this.broker
      ?.setIntakeFilters(intakeFilters(sv.spec))
      .catch((err: unknown) => this.log.warn({ err }, "updating the broker subscriptions failed"));
  }
}
