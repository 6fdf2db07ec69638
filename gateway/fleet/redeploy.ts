/**
 * Hot redeploy: load fleet.toml again; an invalid file changes nothing (its error is kept
 * for status and /api/fleet). A valid change becomes a new spec version: new types and
 * instances start, removed types' agents are retired, changed types take effect from their
 * next episode (an in-flight episode finishes on the version it started on), timers re-plan.
 * What changed is described by reload.ts; this file applies it.
 */
import type { Logger } from "pino";
import { diffSpecs } from "./reload.ts";
import type { Roster } from "./roster.ts";
import type { Scheduler } from "./scheduler.ts";
import { canonicalJson } from "../hash.ts";
import { loadSpec } from "../spec/index.ts";
import { SpecError, type FleetSpec, type SpecVersion } from "../spec/index.ts";
import type { Store } from "../store/index.ts";
import type { Timers } from "../intake/index.ts";
import { codeChanges, type Pinned } from "../code/index.ts";
import { ownsAgent } from "../shard.ts";
import { agentId, type AgentId } from "../types.ts";

/**
 * Make sure every instance a spec lists exists as an agent row (of this shard's agents, when
 * sharded). Agent rows are never deleted (retired at most), so a spec version whose instances
 * were all written once needs nothing more: a restart on the same fleet.toml skips re-checking
 * 100,000 instances. Returns the instances it made sure of (none when skipped).
 */
export async function deployInstances(store: Store, sv: SpecVersion, at: number): Promise<AgentId[]> {
  if ((await store.getMeta("instances_deployed")) === sv.hash) return [];
  const list: { id: AgentId; type: string; key: string }[] = [];
  for (const type of Object.values(sv.spec.agents)) {
    for (const key of type.instances) {
      const id = agentId(type.name, key);
      if (id && ownsAgent(sv.spec.fleet.shard, id)) list.push({ id, type: type.name, key });
    }
  }
  await store.ensureAgents(list, at);
  await store.setMeta("instances_deployed", sv.hash);
  return list.map((a) => a.id);
}

/** What a redeploy changes on the running gateway. */
export interface RedeployDeps {
  readonly store: Store;
  readonly scheduler: Scheduler;
  readonly timers: Timers;
  readonly roster: Roster;
  readonly log: Logger;
  readonly now: () => number;
  /** Only a running gateway redeploys (not while starting, draining or stopped). */
  running(): boolean;
  /** The version new episodes start on. */
  current(): SpecVersion;
  /** Route and start new episodes on `next` from now on (after what must be durable first, e.g. a rollout). */
  adopt(next: SpecVersion): void | Promise<void>;
  /** Changed keys that only a restart applies; any -> the reload is refused ("needs restart: …"). */
  needsRestart?(current: FleetSpec, next: FleetSpec): string[];
  /** Checks a new version must pass before anything is applied (agents' config schemas); why not, or null. */
  check?(current: FleetSpec, next: SpecVersion): Promise<string | null>;
  /** The replay gate (`require_check`): why `next` must not be applied, or null. Runs before anything changes. */
  gate?(current: SpecVersion, next: SpecVersion): Promise<string | null>;
  /** Bundle and store the new version's code (gateway/code); problems refuse the reload. */
  pin?(next: SpecVersion, current: SpecVersion): Promise<Pinned>;
  /** Apply what changes live outside the fleet (broker auth); what it did, for the log. Throws to refuse the reload. */
  applyLive?(current: FleetSpec, next: FleetSpec): Promise<string | null>;
}

/** A reload under way: the version it checks, which check runs, since when (epoch ms). */
export interface SpecPending {
  readonly spec_version: string;
  readonly step: "config check" | "deploy check";
  readonly since: number;
}

/** Applies fleet.toml changes one at a time. */
export class Redeploy {
  /** Last spec reload error, shown by status and /api/fleet; null once a load succeeds. */
  error: string | null = null;
  /**
   * The version a reload is checking before it applies it (the config check in sandboxes, the replay
   * gate), or null: while it runs `error` is null and the running version the old one, which alone would
   * not say the edit was seen (shown by status and /api/fleet as `spec_pending`).
   */
  pending: SpecPending | null = null;
  /**
   * fleet.toml as last read (applied or not; null until a read parses): the modules it names are
   * watched too, so a module written after its type was added is picked up like an edit.
   */
  read: SpecVersion | null = null;
  /** The last version refused after it was pinned, and why (null once a version is applied). */
  private refused: { readonly hash: string; readonly error: string } | null = null;
  /** The last reload failed on an error of its own (a write the full disk refused): `retryFailed` runs it again. */
  private failed = false;
  /**
   * The version whose agents, timers and budgets were last brought in line with it, while a newer
   * version adopted since has not been (a write failed after the adoption: a full disk); the next
   * reload finishes what that one began, even when fleet.toml is unchanged. Null when settled.
   */
  private unsettledFrom: SpecVersion | null = null;
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly d: RedeployDeps) {}

  /**
   * Queue a reload behind any in progress; resolves when it is applied (or rejected). `recheck`
   * false (the file watch): the version refused last, found again (a file touched, one more file
   * watched), keeps its refusal without running its checks again; SIGHUP runs them.
   */
  reload(reason: string, recheck = true): Promise<void> {
    this.chain = this.chain
      .then(() => {
        this.failed = false;
        return this.reloadNow(reason, recheck);
      })
      .catch((err: unknown) => {
        // Shown by status like a refusal: the running version stays, the edit is not applied yet.
        // Or it was adopted, and what follows the adoption waits for the retry.
        const why = err instanceof Error ? err.message : String(err);
        const running = this.d.current().hash.slice(0, 12);
        this.error =
          this.unsettledFrom && this.unsettledFrom.hash !== this.d.current().hash
            ? `applied in part: spec ${running} runs, but its instances, retired types, budgets or timers ` +
              `are not all in place: ${why}`
            : `not applied: ${why}; still running spec ${running}`;
        this.failed = true;
        this.d.log.error({ err, reason }, `reload failed: ${this.error}`);
      });
    return this.chain;
  }

  /** Run again a reload that failed on an error of its own (storage is back); nothing when none did. */
  retryFailed(): Promise<void> {
    return this.failed ? this.reload("storage recovered") : this.chain;
  }

  private refuse(hash: string, error: string): void {
    this.error = error;
    this.refused = { hash, error };
  }

  private async reloadNow(reason: string, recheck: boolean): Promise<void> {
    if (!this.d.running()) return;
    const current = this.d.current();
    let next: SpecVersion;
    try {
      next = await loadSpec(current.path);
      this.read = next;
    } catch (err) {
      this.error = err instanceof SpecError ? err.message : String(err);
      this.d.log.error({ reason }, `fleet.toml rejected, keeping spec ${current.hash.slice(0, 12)}: ${this.error}`);
      return;
    }
    if (this.d.pin) {
      const pinned = await this.d.pin(next, current);
      if (!pinned.ok) {
        this.error = `not applied: ${pinned.problems.join("; ")}; still running spec ${current.hash.slice(0, 12)}`;
        // A module edit as often as a fleet.toml one: the problems name each module by its key.
        this.d.log.error({ reason }, `new code ${this.error}`);
        return;
      }
      next = pinned.sv;
    }
    if (!recheck && this.refused?.hash === next.hash) {
      this.error = this.refused.error;
      return;
    }
    this.error = null;
    if (next.hash === current.hash) {
      if (this.unsettledFrom)
        await this.settle(reason, this.unsettledFrom, current, "finished what the last reload began");
      return;
    }
    const restart = this.d.needsRestart?.(current.spec, next.spec) ?? [];
    if (restart.length > 0) {
      this.refuse(next.hash, `needs restart: ${restart.join(", ")}; still running spec ${current.hash.slice(0, 12)}`);
      this.d.log.error({ reason }, `fleet.toml not applied: ${this.error}`);
      return;
    }
    try {
      await this.checkAndApply(reason, current, next);
    } finally {
      this.pending = null;
    }
  }

  /** `next` (a new version that needs no restart) checked, then applied unless a check refuses it. */
  private async checkAndApply(reason: string, current: SpecVersion, next: SpecVersion): Promise<void> {
    this.pending = { spec_version: next.hash, step: "config check", since: this.d.now() };
    const refused = (await this.d.check?.(current.spec, next)) ?? null;
    if (refused !== null) {
      this.refuse(next.hash, `not applied: ${refused}`);
      this.d.log.error({ reason }, `fleet.toml ${this.error}; keeping spec ${current.hash.slice(0, 12)}`);
      return;
    }
    this.pending = { spec_version: next.hash, step: "deploy check", since: this.pending?.since ?? this.d.now() };
    const gated = (await this.d.gate?.(current, next)) ?? null;
    if (gated !== null) {
      this.refuse(next.hash, `not applied: ${gated}; still running spec ${current.hash.slice(0, 12)}`);
      this.d.log.error({ reason }, `fleet.toml ${this.error}`);
      return;
    }
    let live: string | null;
    try {
      live = (await this.d.applyLive?.(current.spec, next.spec)) ?? null;
    } catch (err) {
      this.refuse(next.hash, `not applied: ${err instanceof Error ? err.message : String(err)}`);
      this.d.log.error({ reason }, `fleet.toml ${this.error}; keeping spec ${current.hash.slice(0, 12)}`);
      return;
    }
    const diff = diffSpecs(current.spec, next.spec);
    const code = codeChanges(current, next).map((c) => `${c.type} ${short(c.from)} -> ${short(c.to)}`);
    const summary =
      code.length === 0
        ? diff.summary
        : `${diff.summary === "no effective change" ? "" : `${diff.summary}; `}new code ${code.join(", ")}`;
    await this.d.store.saveSpecVersion({
      hash: next.hash,
      path: next.path,
      text: next.text,
      summary,
      at: this.d.now(),
      bundles: next.bundles,
    });
    // From a version adopted but not settled (its steps below cut short), the steps cover both changes.
    const from = this.unsettledFrom ?? current;
    this.unsettledFrom = from;
    await this.d.adopt(next);
    this.refused = null;
    await this.settle(reason, from, next, `${summary}${live ? ` (${live})` : ""}`);
  }

  /**
   * What follows the adoption of `next`, idempotent: its instances exist, the types it removed
   * (since `from`) retire and those it brings back return, agents paused by a budget it changed are
   * released, and timers follow it. A failure leaves `unsettledFrom` for the next reload.
   */
  private async settle(reason: string, from: SpecVersion, next: SpecVersion, summary: string): Promise<void> {
    const diff = diffSpecs(from.spec, next.spec);
    this.d.scheduler.setMaxConcurrent(next.spec.fleet.max_concurrent_episodes);
    this.d.roster.deployed(await deployInstances(this.d.store, next, this.d.now()));
    for (const type of diff.removed) await this.d.roster.retireType(type, next.hash);
    for (const type of diff.added) await this.d.roster.unretireType(type);
    await this.d.roster.budgetsChanged(
      diff.changed.filter(
        (t) => canonicalJson(from.spec.agents[t]?.budget) !== canonicalJson(next.spec.agents[t]?.budget),
      ),
    );
    await this.d.timers.update(next.spec);
    this.unsettledFrom = null;
    this.d.log.info({ reason, from: from.hash.slice(0, 12), to: next.hash.slice(0, 12) }, `redeployed: ${summary}`);
  }
}

function short(hash: string | null): string {
  return hash === null ? "(module file)" : hash.slice(0, 12);
}
