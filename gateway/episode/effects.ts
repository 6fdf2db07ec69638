/**
 * Effects after commit: drains the outbox to the broker (agent outputs, publish tool
 * calls), at least once. Rows are deleted only after publishing, so a crash in between
 * re-sends them on the next start; consumers dedup by `episode` + `seq`. A failed publish
 * is retried with backoff while the gateway runs; what is still unsent at stop stays in the
 * outbox for the next start. Nothing already published is published again by this process.
 * "Published" is aedes' publish callback, which runs after the message's retained row and
 * offline-queue rows are committed to the broker's persistence (broker.db with
 * `persistence = "libsql"`).
 *
 * Order: while older rows wait in the outbox (a publish failed, or the drain at start runs), a
 * new commit's rows are not published from memory but left to the drain, which sends in outbox
 * order: an agent's later output never overtakes an earlier one, and a retained topic keeps
 * the last value published to it. An agent's next episode also waits for its previous one's
 * publishes to settle, so one whose PUBACK fails late (an external broker's timeout) is not overtaken.
 */
import type { Logger } from "pino";
import { type Broker, type PublishMeta, PublishRefused } from "../../broker/index.ts";
import type { OutboxRow, Store } from "../store/index.ts";
import { topics } from "../protocol.ts";

/** An outbox row as the drain reads it: with its episode's agent when the store knows it. */
export type PendingEffect = OutboxRow & { readonly agent?: string | null };

/** The outbox as effects use it (a `Store` satisfies it). */
export interface OutboxStore extends Pick<Store, "deleteOutbox" | "deleteOutboxOf"> {
  pendingOutbox(limit?: number, afterId?: number): Promise<PendingEffect[]>;
}

/** An outbox row as a just-committed episode hands it over. */
export interface CommittedEffect {
  /** Position in the episode's outbox: with `episode`, what identifies the output for consumers. */
  readonly seq: number;
  readonly topic: string;
  readonly payload: string;
  readonly qos: number;
  readonly retain: boolean;
}

/** Timers and backoff; tests inject them. */
export interface EffectsOptions {
  /**
   * Delay before the grouped delete of published rows, ms (default 250: at tens of episodes a
   * second one fsync forgets many episodes' rows; a crash re-sends at most that much, at least once).
   */
  readonly deleteDelayMs?: number;
  /** First retry delay after a failed publish, ms; doubles up to `retryMaxMs`. */
  readonly retryMs?: number;
  readonly retryMaxMs?: number;
  readonly setTimeout?: (fn: () => void, ms: number) => unknown;
  /**
   * What a send of `episode` forwarded to another shard carries: the sends that led to it (store
   * `forwardHops`; docs/shards.md). Without it, or null, a forward carries no count.
   */
  readonly forwardHops?: (episode: string) => Promise<number | null>;
}

/** The outbox dispatcher. */
export class Effects {
  /** Messages handed to the broker by this process. */
  published = 0;
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  /** Episodes published from memory whose rows are not deleted yet: a drain must skip them. */
  private readonly sentEpisodes = new Set<string>();
  /** Episodes being published from memory now. */
  private readonly inFlight = new Map<string, Promise<void>>();
  /**
   * The last publish from memory of each agent: the agent's next episode waits for it to settle (a
   * PUBACK can take seconds from an external broker, and fail late), so it never goes out first.
   */
  private readonly lastOfAgent = new Map<string, Promise<void>>();
  private doneEpisodes: string[] = [];
  private deleteScheduled = false;
  private retryArmed = false;
  /** The last drain could not publish (an outage is logged once). */
  private failing = false;
  /** A publish failed and its rows wait in the outbox: newer ones queue behind them (the drain). */
  private behind = false;
  private retryDelay: number;
  private readonly opts: Required<EffectsOptions>;

  constructor(
    private readonly store: OutboxStore,
    private readonly broker: Pick<Broker, "publish">,
    private readonly log: Logger,
    opts: EffectsOptions = {},
  ) {
    this.opts = {
      deleteDelayMs: opts.deleteDelayMs ?? 250,
      retryMs: opts.retryMs ?? 1000,
      retryMaxMs: opts.retryMaxMs ?? 30_000,
      forwardHops: opts.forwardHops ?? (async () => null),
      setTimeout:
        opts.setTimeout ??
        ((fn, ms) => {
          const t = setTimeout(fn, ms);
          t.unref?.();
          return t;
        }),
    };
    this.retryDelay = this.opts.retryMs;
  }

  /**
   * Publish a just-committed episode's effects from memory (no read-back), then forget its
   * outbox rows in a later grouped delete. A crash in between re-sends them at start.
   */
  publishCommitted(episode: string, rows: readonly CommittedEffect[], agent: string | null = null): void {
    // Older rows go first: a running drain sends these after them (it runs again if it read its
    // pages before this commit); while a failure is pending, the retry (or `kick`) drains them in order.
    if (this.running) {
      void this.kick();
      return;
    }
    if (this.behind) return;
    const key = agent ?? "";
    const before = this.lastOfAgent.get(key);
    const run = (async () => {
      if (before) {
        await before;
        // It failed meanwhile: these rows wait in the outbox behind its, for the retry's drain (or
        // the drain running now, which runs again if it read its pages before they were committed).
        if (this.running) return void this.kick();
        if (this.behind) return;
      }
      try {
        for (const r of rows) await this.send(episode, r, agent);
        this.published += rows.length;
      } catch (err) {
        // Some rows may have gone out: the drain re-sends the episode whole (at least once).
        this.log.error({ err, episode }, "publishing effects failed; the outbox drain retries them");
        this.behind = true;
        this.scheduleRetry();
        return;
      }
      this.sentEpisodes.add(episode);
      this.doneEpisodes.push(episode);
      if (!this.deleteScheduled) {
        this.deleteScheduled = true;
        // Joins whatever transaction commits next instead of paying its own fsync now.
        this.opts.setTimeout(() => void this.flushDeletes(), this.opts.deleteDelayMs);
      }
    })().finally(() => {
      this.inFlight.delete(episode);
      if (this.lastOfAgent.get(key) === run) this.lastOfAgent.delete(key);
    });
    this.inFlight.set(episode, run);
    this.lastOfAgent.set(key, run);
  }

  private async flushDeletes(): Promise<void> {
    this.deleteScheduled = false;
    const episodes = this.doneEpisodes;
    this.doneEpisodes = [];
    if (episodes.length === 0) return;
    try {
      await this.store.deleteOutboxOf(episodes);
      for (const e of episodes) this.sentEpisodes.delete(e);
    } catch (err) {
      // Still marked sent: this process will not publish them again; the next start does.
      this.log.warn({ err }, "outbox cleanup failed; rows are re-sent at next start");
    }
  }

  /**
   * Shutdown: no more retries; wait for publishes in flight, forget what they sent, then
   * drain what is left once. Rows already published are not published again.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.inFlight.values());
    await this.flushDeletes();
    await this.kick().catch((err) => this.log.warn({ err }, "final outbox drain failed; rows stay for next start"));
  }

  /** Drain the outbox now (at start, or when the broker is back); coalesces concurrent kicks. */
  kick(): Promise<void> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = this.drain().finally(() => {
      this.running = null;
      if (this.again) {
        this.again = false;
        void this.kick();
      }
    });
    return this.running;
  }

  /**
   * Publish one row. One the broker will never take (PublishRefused) is settled, not retried: kept, it
   * would hold back every output behind it, for good. Logged, it is dropped.
   */
  private async send(episode: string, r: CommittedEffect, agent: string | null): Promise<void> {
    try {
      // A count that cannot be read leaves the forward without one (its owner counts from 1), not unsent.
      const hops = r.topic.startsWith(topics.sendsPrefix)
        ? await this.opts.forwardHops(episode).catch(() => null)
        : null;
      await this.broker.publish(r.topic, r.payload, {
        qos: r.qos === 0 ? 0 : 1,
        retain: r.retain,
        ...metaOf(episode, r.seq, agent, hops),
      });
    } catch (err) {
      if (!(err instanceof PublishRefused)) throw err;
      this.log.error({ episode, seq: r.seq, agent, reason: err.reason }, "output refused by the broker; dropped");
    }
  }

  private scheduleRetry(): void {
    if (this.stopped || this.retryArmed) return;
    this.retryArmed = true;
    const delay = this.retryDelay;
    this.retryDelay = Math.min(this.retryDelay * 2, this.opts.retryMaxMs);
    this.opts.setTimeout(() => {
      this.retryArmed = false;
      void this.kick();
    }, delay);
  }

  /** Rows a drain may publish: not being published or already published from memory. */
  private unsent(rows: readonly PendingEffect[]): PendingEffect[] {
    return rows.filter((r) => !this.sentEpisodes.has(r.episode) && !this.inFlight.has(r.episode));
  }

  private async drain(): Promise<void> {
    let after = 0;
    for (;;) {
      const page = await this.store.pendingOutbox(500, after);
      if (page.length === 0) {
        this.behind = false;
        this.retryDelay = this.opts.retryMs;
        if (this.failing) this.log.info("publishing outbox resumed");
        this.failing = false;
        return;
      }
      after = page[page.length - 1]!.id;
      const rows = this.unsent(page);
      const sent: number[] = [];
      let failed: unknown = null;
      for (const r of rows) {
        try {
          await this.send(r.episode, r, r.agent ?? null);
        } catch (err) {
          failed = err;
          break;
        }
        sent.push(r.id);
      }
      await this.store.deleteOutbox(sent);
      this.published += sent.length;
      if (failed) {
        // A broker out of reach fails every retry: one warning per outage, not a stack each time.
        const err = failed instanceof Error ? failed.message : String(failed);
        if (this.stopped) this.log.warn({ err }, "publishing outbox failed; rows stay for the next start");
        else if (!this.failing)
          this.log.warn({ err, retry_ms: this.retryDelay }, "publishing outbox failed; retrying until it goes out");
        else this.log.debug({ err, retry_ms: this.retryDelay }, "publishing outbox failed again");
        this.failing = true;
        this.behind = true;
        this.scheduleRetry();
        return;
      }
    }
  }
}

/**
 * Who produced an output (MQTT 5 user properties in external mode), and for a forwarded send the sends
 * that led to it; nothing when the agent is unknown.
 */
function metaOf(episode: string, seq: number, agent: string | null, hops: number | null): { meta?: PublishMeta } {
  if (agent === null) return {};
  return { meta: { episode, seq, agent, ...(hops === null ? {} : { hops }) } };
}
