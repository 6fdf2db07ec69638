/**
 * A cached, per-type picture of the fleet read from the store: agents by status, queue
 * depth and age, budget use in the current windows. `/metrics`, `fleet/health` and the
 * dashboard all read it; a burst of scrapes costs one set of queries per `ttlMs`.
 */
import type { AgentTypeSpec, FleetSpec } from "../spec/index.ts";
import type { Store } from "../store/index.ts";
import { budgetWindows } from "../episode/index.ts";
import { shownStatus } from "../types.ts";
import { agentStatusByType, queueByType, usageByType } from "./queries.ts";

/** Statuses as operators see them (the stored `active` is shown as `idle`). */
export const AGENT_STATUSES = ["idle", "paused", "draining", "failed", "retired"] as const;
export type ShownStatus = (typeof AGENT_STATUSES)[number];

/** Budgets whose use is tracked per window. */
export const BUDGETS = ["episodes_per_hour", "tokens_per_day", "cost_per_day", "bytes_per_day"] as const;
export type BudgetName = (typeof BUDGETS)[number];

/** One agent type's slice of the snapshot. */
export interface TypeSnapshot {
  agents: Record<ShownStatus, number>;
  /** Paused by a budget (resume by themselves when the window ends). */
  budgetPaused: number;
  queued: number;
  /** Receive time of the oldest queued stimulus, or null. */
  oldestQueuedAt: number | null;
  used: { episodesHour: number; toolCallsHour: number; tokensDay: number; costDay: number; bytesDay: number };
  /** Per-agent limit of each budget (Infinity / 0 when unlimited, as in the spec). */
  limits: Record<BudgetName, number>;
  /** Highest use/limit ratio of any single agent of the type, per budget (0 when unlimited). */
  maxRatio: Record<BudgetName, number>;
}

/** The whole snapshot. */
export interface FleetSnapshot {
  readonly at: number;
  readonly types: ReadonlyMap<string, Readonly<TypeSnapshot>>;
}

function emptyType(spec: AgentTypeSpec | undefined): TypeSnapshot {
  return {
    agents: { idle: 0, paused: 0, draining: 0, failed: 0, retired: 0 },
    budgetPaused: 0,
    queued: 0,
    oldestQueuedAt: null,
    used: { episodesHour: 0, toolCallsHour: 0, tokensDay: 0, costDay: 0, bytesDay: 0 },
    limits: {
      episodes_per_hour: spec?.budget.episodes_per_hour ?? 0,
      tokens_per_day: spec?.budget.tokens_per_day ?? 0,
      cost_per_day: spec?.budget.cost_per_day ?? 0,
      bytes_per_day: spec?.budget.bytes_per_day ?? 0,
    },
    maxRatio: { episodes_per_hour: 0, tokens_per_day: 0, cost_per_day: 0, bytes_per_day: 0 },
  };
}

const ratio = (used: number | null, limit: number) => (used && limit > 0 && Number.isFinite(limit) ? used / limit : 0);

/** Stimuli queued for one type's agents and the oldest receive time among them. */
export interface TypeQueueCount {
  readonly type: string;
  readonly n: number;
  readonly oldest: number | null;
}

/**
 * Read the snapshot now (3 aggregate queries). `queues`, when given, counts what waits without
 * the store: a running gateway's queue book, where the query would read every queued row.
 */
export async function readSnapshot(
  store: Store,
  spec: FleetSpec,
  now: number,
  queues?: () => readonly TypeQueueCount[],
): Promise<FleetSnapshot> {
  const win = budgetWindows(now);
  const [statuses, queued, usage] = await Promise.all([
    agentStatusByType(store),
    queues ? queues() : queueByType(store),
    usageByType(store, [win.hourWindow, win.dayWindow]),
  ]);
  const types = new Map<string, TypeSnapshot>();
  // Every declared type shows up, even before it has agents, so dashboards see zeros.
  for (const name of Object.keys(spec.agents)) types.set(name, emptyType(spec.agents[name]));
  const slice = (type: string): TypeSnapshot => {
    let s = types.get(type);
    if (!s) types.set(type, (s = emptyType(spec.agents[type])));
    return s;
  };
  for (const r of statuses) {
    const s = slice(r.type);
    const shown: ShownStatus = shownStatus(r.status);
    s.agents[shown] += r.n;
    if (r.status === "paused") s.budgetPaused += r.budget;
  }
  for (const q of queued) {
    const s = slice(q.type);
    s.queued = q.n;
    s.oldestQueuedAt = q.oldest ?? null;
  }
  for (const u of usage) {
    const s = slice(u.type);
    if (u.window === win.hourWindow) {
      s.used.episodesHour = u.episodes ?? 0;
      s.used.toolCallsHour = u.toolCalls ?? 0;
      s.maxRatio.episodes_per_hour = ratio(u.maxEpisodes, s.limits.episodes_per_hour);
    } else {
      s.used.tokensDay = u.tokens ?? 0;
      s.used.costDay = u.cost ?? 0;
      s.used.bytesDay = u.bytes ?? 0;
      s.maxRatio.tokens_per_day = ratio(u.maxTokens, s.limits.tokens_per_day);
      s.maxRatio.cost_per_day = ratio(u.maxCost, s.limits.cost_per_day);
      s.maxRatio.bytes_per_day = ratio(u.maxBytes, s.limits.bytes_per_day);
    }
  }
  return { at: now, types };
}

/** Caches `readSnapshot` for `ttlMs`; concurrent callers share one read. */
export class SnapshotCache {
  private last: FleetSnapshot | null = null;
  private inflight: Promise<FleetSnapshot> | null = null;

  constructor(
    private readonly read: () => Promise<FleetSnapshot>,
    private readonly now: () => number,
    private readonly ttlMs = 1000,
  ) {}

  /** A snapshot no older than `ttlMs`. */
  get(): Promise<FleetSnapshot> {
    if (this.last && this.now() - this.last.at < this.ttlMs) return Promise.resolve(this.last);
    this.inflight ??= this.read()
      .then((s) => (this.last = s))
      .finally(() => (this.inflight = null));
    return this.inflight;
  }
}
