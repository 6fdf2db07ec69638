/**
 * Canary rollouts (docs/upgrading.md `[agents.<t>.rollout]`): new code for a type with
 * `canary > 0` first runs on that share of its agents (a stable choice by the hash of the agent
 * id) while the others stay on the previous bundle. It is promoted once the canaries ran
 * `min_episodes` on it within `max_failure_rate` for at least `bake`, and rolled back by itself
 * as soon as it fails more (the canaries return to the previous bundle; their stimuli that the
 * new code quarantined are retried there). An operator may promote or abort by hand.
 *
 * Rollouts are rows of the store, written before anything runs on them, so a kill -9 keeps them;
 * every step is a row of `rollout_steps`. Episode counts are read from the episodes themselves
 * (those of the type on the new bundle since the rollout began), so they need no counter of their own.
 */
import type { Logger } from "pino";
import { canonicalJson } from "../hash.ts";
import type { SpecVersion } from "../spec/index.ts";
import { bundleToDriver, STATUS_FAILED, type RolloutRow, type RolloutState, type Store } from "../store/index.ts";

/** What a rollout looks like in status, `/api/fleet` and `fleet/health`. */
export interface RolloutView {
  readonly id: number;
  readonly type: string;
  readonly state: RolloutState;
  readonly from_bundle: string | null;
  readonly to_bundle: string;
  readonly canary: number;
  /** The type's agents on the new bundle now (all of them once promoted, none once rolled back). */
  readonly canary_agents: readonly string[];
  readonly episodes: number;
  readonly failures: number;
  readonly min_episodes: number;
  readonly max_failure_rate: number;
  readonly bake_ms: number;
  readonly started_at: number;
  readonly decided_at: number | null;
  readonly reason: string | null;
}

/** What rollouts need from the gateway. */
export interface RolloutDeps {
  readonly store: Store;
  readonly log: Logger;
  readonly now: () => number;
  /** The type's agent ids (to name the canaries). */
  agentsOf(type: string): Promise<readonly string[]>;
  /** Put a quarantined stimulus back in its queue (a rolled-back canary's failures are retried). */
  retry(seq: number): Promise<void>;
  /** The agents' queues may run again (their bundle changed). */
  wake(agents: readonly string[]): void;
}

/** Whether `agent` is in the canary share (stable: the same agents for every rollout of the same share). */
export function isCanary(agent: string, share: number): boolean {
  if (share <= 0) return false;
  if (share >= 1) return true;
  return slot(agent) / 10_000 < share;
}

/**
 * The share a rollout uses: `share`, raised just enough to take the lowest-hashing agent when it
 * selects none of `agents` (a small share of a few agents), so new code always reaches a canary.
 */
export function canaryShare(agents: readonly string[], share: number): number {
  if (share <= 0 || share >= 1 || agents.length === 0 || agents.some((a) => isCanary(a, share))) return share;
  return (Math.min(...agents.map(slot)) + 1) / 10_000;
}

/**
 * Why `next` must not be applied: it changes both the code and the config of a type with a
 * canary share, and the agents left on the previous bundle (the non-canaries, and every agent
 * after a rollback or abort) would run that code with a config written for the new one.
 */
export function canaryConfigRefusal(current: SpecVersion, next: SpecVersion): string | null {
  const types = Object.values(next.spec.agents).filter((t) => {
    const before = current.spec.agents[t.name];
    return (
      before !== undefined &&
      t.rollout.canary > 0 &&
      (next.bundles[t.name] ?? null) !== (current.bundles[t.name] ?? null) &&
      canonicalJson(before.config) !== canonicalJson(t.config)
    );
  });
  if (types.length === 0) return null;
  const names = types.map((t) => t.name).join(", ");
  return (
    `agents.${types[0]!.name}: new code and a new config together on a canary type (${names}): the agents ` +
    "that stay on the previous bundle would run it with the new config; deploy a config both versions accept " +
    "first and the code after it, or set rollout.canary = 0 for this deploy"
  );
}

function slot(agent: string): number {
  return Number(Bun.hash.wyhash(agent, 0n) % 10_000n);
}

/** The rollouts of one gateway: the newest per type, in memory, backed by the store. */
export class Rollouts {
  private readonly latest = new Map<string, RolloutRow>();
  /** Canary counts by rollout id, and the last episode row they have read (see `counts`). */
  private readonly tallies = new Map<number, { upTo: number; episodes: number; failures: number }>();
  private timer: ReturnType<typeof setInterval> | null = null;
  private deciding = false;

  constructor(private readonly d: RolloutDeps) {}

  /**
   * Load the newest rollout of each type and square it with the code the gateway starts on: a
   * rollout of that code goes on where it was; new code since then starts a rollout of its own.
   * Only a rollout in progress is superseded by it: a decided one (rolled back, promoted, aborted)
   * keeps its state, since it no longer applies to code other than its own (`bundleFor`).
   */
  async start(sv: SpecVersion): Promise<void> {
    const rows = (
      await this.d.store.client.execute(
        "SELECT * FROM rollouts WHERE id IN (SELECT max(id) FROM rollouts GROUP BY type) ORDER BY id",
      )
    ).rows;
    for (const r of rows) this.latest.set(String(r.type), rowOf(r as unknown as Record<string, unknown>));
    for (const [type, r] of this.latest) {
      const now = sv.bundles[type] ?? null;
      if (r.toBundle === now || (r.state !== "canary" && r.state !== "rolled_back")) continue;
      if (r.state === "canary") await this.settle(r, "superseded", "the code changed while the gateway was down");
      // Its previous bundle is what the type's agents ran (all of them after a rollback): new code rolls out from it.
      const t = sv.spec.agents[type];
      if (t && now !== null && t.rollout.canary > 0 && r.fromBundle !== now)
        await this.begin(type, r.fromBundle, now, sv);
    }
  }

  /**
   * Judge the rollouts in progress from now on, twice a second. Apart from `start`: a judgement
   * retries quarantined stimuli and wakes agents, which must wait until the queues are loaded.
   */
  watch(): void {
    if (this.timer) return;
    this.timer = setInterval(() => void this.evaluate(), 500);
    this.timer.unref?.();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /**
   * A new version is about to be adopted: each type whose bundle changes and that has a canary
   * share gets a rollout (durable before any episode can run on it); others take the code at once.
   */
  async deployed(current: SpecVersion, next: SpecVersion): Promise<void> {
    for (const [type, to] of Object.entries(next.bundles)) {
      const t = next.spec.agents[type];
      const stable = this.stableBundle(type, current);
      if (!t || (stable === to && !this.active(type))) continue;
      // Code a rollout already rolled back (or that was aborted) stays off until there is new code.
      if (this.refused(type, to)) continue;
      const r = this.active(type);
      if (r && r.toBundle === to) continue;
      if (r) await this.settle(r, "superseded", `new code ${to.slice(0, 12)} deployed`);
      if (t.rollout.canary > 0 && stable !== to && current.spec.agents[type]) await this.begin(type, stable, to, next);
    }
  }

  /**
   * Why `next` must not change a type's config while its code stays: some of its agents run the previous
   * bundle (a canary rollout in progress, or one rolled back or aborted), and the config would reach that
   * code, not only the code it was written for (`canaryConfigRefusal` covers code and config together).
   */
  configRefusal(current: SpecVersion, next: SpecVersion): string | null {
    for (const [type, r] of this.latest) {
      const before = current.spec.agents[type];
      const after = next.spec.agents[type];
      const code = current.bundles[type] ?? null;
      if (!before || !after || r.toBundle !== code || (next.bundles[type] ?? null) !== code) continue;
      if (canonicalJson(before.config) === canonicalJson(after.config)) continue;
      const at = `agents.${type}.config`;
      if (r.state === "canary")
        return (
          `${at}: a canary rollout of new code (${code.slice(0, 12)}) is in progress and its other agents run the ` +
          "previous bundle, which the new config would reach; promote or abort it first " +
          `(\`fleet rollout promote ${type}\` or \`fleet rollout abort ${type}\`)`
        );
      if (r.state === "rolled_back" || r.state === "aborted")
        return (
          `${at}: the rollout of ${code.slice(0, 12)} was ${r.state.replace("_", " ")} and every agent runs the ` +
          "previous bundle, which the new config would reach; deploy it with new code (rollout.canary = 0 for " +
          "that deploy takes both to every agent at once)"
        );
    }
    return null;
  }

  /** The bundle `agent` runs now: the canary's new code, the previous bundle for the others, else the spec's. */
  bundleFor(agent: string, type: string, sv: SpecVersion): string | null {
    const r = this.latest.get(type);
    const spec = sv.bundles[type] ?? null;
    if (!r || r.toBundle !== spec) return spec;
    if (r.state === "canary") return isCanary(agent, r.canary) ? r.toBundle : r.fromBundle;
    if (r.state === "rolled_back" || r.state === "aborted") return r.fromBundle;
    return spec;
  }

  /** Bundles episodes may run now (retention keeps them). */
  inUse(): string[] {
    const out: string[] = [];
    for (const r of this.latest.values()) {
      if (r.fromBundle) out.push(r.fromBundle);
      out.push(r.toBundle);
    }
    return out;
  }

  /** Every type's newest rollout, for status and `fleet/health`. */
  async view(): Promise<RolloutView[]> {
    const out: RolloutView[] = [];
    for (const r of this.latest.values()) {
      const { episodes, failures } = await this.counts(r);
      const agents = await this.d.agentsOf(r.type);
      const on =
        r.state === "canary" ? agents.filter((a) => isCanary(a, r.canary)) : r.state === "promoted" ? [...agents] : [];
      out.push({
        id: r.id,
        type: r.type,
        state: r.state,
        from_bundle: r.fromBundle,
        to_bundle: r.toBundle,
        canary: r.canary,
        canary_agents: on,
        episodes,
        failures,
        min_episodes: r.minEpisodes,
        max_failure_rate: r.maxFailureRate,
        bake_ms: r.bakeMs,
        started_at: r.startedAt,
        decided_at: r.decidedAt,
        reason: r.reason,
      });
    }
    return out;
  }

  /** `fleet rollout promote|abort <type>`: decide an active rollout by hand. */
  async decide(type: string, action: "promote" | "abort", by: string): Promise<{ ok: boolean; message: string }> {
    const r = this.active(type);
    if (!r) return { ok: false, message: `agent type ${type} has no rollout in progress` };
    if (action === "promote") await this.settle(r, "promoted", `promoted by ${by}`);
    else await this.rollBack(r, "aborted", `aborted by ${by}`);
    return {
      ok: true,
      message: `rollout of ${type} to ${r.toBundle.slice(0, 12)} ${action === "promote" ? "promoted" : "aborted"}`,
    };
  }

  /** Decide what the counts say, for every rollout still on its canaries. */
  async evaluate(): Promise<void> {
    if (this.deciding) return;
    this.deciding = true;
    try {
      for (const r of [...this.latest.values()]) {
        // An episode on the new code still in flight when it was rolled back fails afterwards: retry that too.
        if ((r.state === "rolled_back" || r.state === "aborted") && this.d.now() - (r.decidedAt ?? 0) < 300_000)
          await this.retryQuarantined(r);
        if (r.state !== "canary") continue;
        const { episodes, failures } = await this.counts(r);
        const bound = r.maxFailureRate;
        // Past this many failures the rate stays above the bound even if every episode up to min_episodes succeeds.
        if (failures > bound * Math.max(episodes, r.minEpisodes)) {
          const why = `${failures} of ${episodes} canary episode(s) failed (max_failure_rate ${bound})`;
          await this.rollBack(r, "rolled_back", why);
        } else if (episodes >= r.minEpisodes && this.d.now() - r.startedAt >= r.bakeMs) {
          const why = `${episodes} canary episode(s), ${failures} failed, baked ${Math.round(r.bakeMs / 1000)} s`;
          await this.settle(r, "promoted", why);
        }
      }
    } catch (err) {
      this.d.log.error({ err }, "rollout evaluation failed");
    } finally {
      this.deciding = false;
    }
  }

  private active(type: string): RolloutRow | null {
    const r = this.latest.get(type);
    return r && r.state === "canary" ? r : null;
  }

  /** Whether the type's newest rollout, of bundle `to`, was rolled back or aborted. */
  private refused(type: string, to: string): boolean {
    const r = this.latest.get(type);
    return r !== undefined && r.toBundle === to && (r.state === "rolled_back" || r.state === "aborted");
  }

  /** What the type's agents that do not run a rollout's new code run: its previous bundle. */
  private stableBundle(type: string, current: SpecVersion): string | null {
    const r = this.latest.get(type);
    const spec = current.bundles[type] ?? null;
    if (r && r.toBundle === spec && (r.state === "canary" || r.state === "rolled_back" || r.state === "aborted"))
      return r.fromBundle;
    return spec;
  }

  private async begin(type: string, from: string | null, to: string, sv: SpecVersion): Promise<void> {
    const t = sv.spec.agents[type]!;
    const at = this.d.now();
    const agents = await this.d.agentsOf(type);
    const share = canaryShare(agents, t.rollout.canary);
    if (share !== t.rollout.canary)
      this.d.log.warn(
        { type, canary: t.rollout.canary, share },
        `rollout of ${type}: canary = ${t.rollout.canary} selects none of its ${agents.length} agent(s); ` +
          `the share is raised to ${share} to take one`,
      );
    const [rs] = await this.d.store.writer.write([
      {
        sql: `INSERT INTO rollouts (gateway, type, from_bundle, to_bundle, canary, min_episodes, max_failure_rate,
        bake_ms, state, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'canary', ?) RETURNING *`,
        args: [
          this.d.store.gatewayId,
          type,
          from,
          to,
          share,
          t.rollout.min_episodes,
          t.rollout.max_failure_rate,
          t.rollout.bake_ms,
          at,
        ],
      },
    ]);
    const row = rowOf(rs!.rows[0] as unknown as Record<string, unknown>);
    const before = this.latest.get(type);
    if (before) this.tallies.delete(before.id);
    this.latest.set(type, row);
    const canaries = agents.filter((a) => isCanary(a, row.canary));
    await this.step(row, "started", { from, to, canary: row.canary, canary_agents: canaries });
    this.d.log.info(
      { type, from: from?.slice(0, 12) ?? null, to: to.slice(0, 12), canaries: canaries.length },
      `rollout started: new code on ${canaries.length} canary agent(s) of ${type}`,
    );
  }

  /** Roll back (or abort): canaries return to the previous bundle; what the new code quarantined is retried there. */
  private async rollBack(r: RolloutRow, state: "rolled_back" | "aborted", reason: string): Promise<void> {
    await this.settle(r, state, reason);
    await this.retryQuarantined(r);
    this.d.wake((await this.d.agentsOf(r.type)).filter((a) => isCanary(a, r.canary)));
  }

  /** Put back what the new code quarantined (its last attempt ran the new code), to run on the previous bundle. */
  private async retryQuarantined(r: RolloutRow): Promise<void> {
    // A quarantined stimulus names the attempt that quarantined it, its last (store/episodes.ts).
    const rows = (
      await this.d.store.client.execute({
        sql: `SELECT s.seq, s.agent FROM stimuli s JOIN episodes e ON e.id = s.episode
          WHERE s.state = 'quarantined' AND s.done_at >= ? AND s.agent LIKE ? || '/%'
            AND e.bundle = ? AND e.started_at >= ?`,
        args: [r.startedAt, r.type, bundleToDriver(r.toBundle), r.startedAt],
      })
    ).rows;
    for (const s of rows) await this.d.retry(Number(s.seq));
    if (rows.length > 0) await this.step(r, "retried", { stimuli: rows.map((s) => Number(s.seq)) });
  }

  private async settle(r: RolloutRow, state: RolloutState, reason: string): Promise<void> {
    const at = this.d.now();
    await this.d.store.writer.write([
      {
        sql: "UPDATE rollouts SET state = ?, reason = ?, decided_at = ? WHERE id = ?",
        args: [state, reason, at, r.id],
      },
    ]);
    const next = { ...r, state, reason, decidedAt: at };
    if (this.latest.get(r.type)?.id === r.id) this.latest.set(r.type, next);
    await this.step(next, state, { reason, ...(await this.counts(r)) });
    const msg = `rollout of ${r.type} to ${r.toBundle.slice(0, 12)} ${state.replace("_", " ")}: ${reason}`;
    if (state === "rolled_back") this.d.log.warn({ type: r.type }, msg);
    else this.d.log.info({ type: r.type }, msg);
    if (state === "promoted") this.d.wake(await this.d.agentsOf(r.type));
  }

  private async step(r: RolloutRow, step: string, detail: unknown): Promise<void> {
    await this.d.store.writer.write([
      {
        sql: "INSERT INTO rollout_steps (rollout, at, step, detail) VALUES (?, ?, ?, ?)",
        args: [r.id, this.d.now(), step, JSON.stringify(detail)],
      },
    ]);
  }

  /**
   * The episodes of the rollout's new code since it started, and how many failed (infra failures are
   * the machine's, not the code's). Episodes are not indexed by bundle (store/migrate.ts, migration 32):
   * the first count reads the episodes started since the rollout did, by time; each later one reads on
   * by rowid from the newest row the last one saw, so an evaluation every 500 ms costs the new rows.
   */
  private async counts(r: RolloutRow): Promise<{ episodes: number; failures: number }> {
    const seen = this.tallies.get(r.id);
    // `+started_at` keeps a later count on the rowid range rather than the time index.
    const rs = await this.d.store.client.execute({
      sql: `SELECT (SELECT max(rowid) FROM episodes) AS top, count(*) AS n,
          coalesce(sum(status = ${STATUS_FAILED}), 0) AS f FROM episodes
        WHERE ${seen ? "rowid > ? AND +started_at >= ?" : "started_at >= ?"} AND bundle = ? AND agent LIKE ? || '/%'
          AND (error_kind IS NULL OR error_kind != 'infra')`,
      args: [...(seen ? [seen.upTo] : []), r.startedAt, bundleToDriver(r.toBundle), r.type],
    });
    const row = rs.rows[0];
    const tally = {
      upTo: Number(row?.top ?? seen?.upTo ?? 0),
      episodes: (seen?.episodes ?? 0) + Number(row?.n ?? 0),
      failures: (seen?.failures ?? 0) + Number(row?.f ?? 0),
    };
    this.tallies.set(r.id, tally);
    return { episodes: tally.episodes, failures: tally.failures };
  }
}

function rowOf(r: Record<string, unknown>): RolloutRow {
  return {
    id: Number(r.id),
    gateway: String(r.gateway),
    type: String(r.type),
    fromBundle: r.from_bundle === null ? null : String(r.from_bundle),
    toBundle: String(r.to_bundle),
    canary: Number(r.canary),
    minEpisodes: Number(r.min_episodes),
    maxFailureRate: Number(r.max_failure_rate),
    bakeMs: Number(r.bake_ms),
    state: String(r.state) as RolloutState,
    reason: r.reason === null ? null : String(r.reason),
    startedAt: Number(r.started_at),
    decidedAt: r.decided_at === null ? null : Number(r.decided_at),
  };
}
