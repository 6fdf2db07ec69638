/**
 * Effects after commit: drains the outbox to the broker (agent outputs, publish tool
 * calls), at least once. Rows are deleted only after publishing, so a crash in between
 * re-sends them on the next start; consumers dedup by `episode` + `seq`.
 */
import type { Logger } from "pino";
import type { Broker } from "../../broker/index.ts";
import type { Store } from "../store/index.ts";

/** The outbox dispatcher. */
export class Effects {
  private running: Promise<void> | null = null;
  private again = false;
  published = 0;

  constructor(
    private readonly store: Store,
    private readonly broker: Broker,
    private readonly log: Logger,
  ) {}

  private doneEpisodes: string[] = [];
  private deleteScheduled = false;

  /**
   * Publish a just-committed episode's effects from memory (no read-back), then forget its
   * outbox rows in a later grouped delete. A crash in between re-sends them at start.
   */
  publishCommitted(
    episode: string,
    rows: readonly { topic: string; payload: string; qos: number; retain: boolean }[],
  ): void {
    void (async () => {
      try {
        for (const r of rows)
          await this.broker.publish(r.topic, r.payload, { qos: r.qos === 0 ? 0 : 1, retain: r.retain });
        this.published += rows.length;
      } catch (err) {
        this.log.error({ err, episode }, "publishing effects failed; they stay in the outbox for the next start");
        return;
      }
      this.doneEpisodes.push(episode);
      if (!this.deleteScheduled) {
        this.deleteScheduled = true;
        // Joins whatever transaction commits next instead of paying its own fsync now.
        setTimeout(() => void this.flushDeletes(), 20);
      }
    })();
  }

  private async flushDeletes(): Promise<void> {
    this.deleteScheduled = false;
    const episodes = this.doneEpisodes;
    this.doneEpisodes = [];
    if (episodes.length > 0)
      await this.store
        .deleteOutboxOf(episodes)
        .catch((err) => this.log.warn({ err }, "outbox cleanup failed; rows are re-sent at next start"));
  }

  /** Publish and delete pending cleanups (shutdown). */
  async flush(): Promise<void> {
    await this.flushDeletes();
  }

  /** Drain the outbox soon; coalesces concurrent kicks. */
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

  private async drain(): Promise<void> {
    for (;;) {
      const rows = await this.store.pendingOutbox(500);
      if (rows.length === 0) return;
      const sent: number[] = [];
      try {
        for (const r of rows) {
          await this.broker.publish(r.topic, r.payload, { qos: r.qos === 0 ? 0 : 1, retain: r.retain });
          sent.push(r.id);
        }
      } catch (err) {
        this.log.error(
          { err },
          "publishing outbox failed; the rest stays in the outbox for the next drain (next commit or start)",
        );
        await this.store.deleteOutbox(sent);
        this.published += sent.length;
        return;
      }
      await this.store.deleteOutbox(sent);
      this.published += sent.length;
    }
  }
}
