/**
 * Effects after commit, in-process: a fake outbox and a fake broker, timers run by hand.
 * Published after commit, retried on failure, at least once, and never re-sent by the
 * process that already sent it.
 */
import { describe, expect, test } from "bun:test";
import pino from "pino";
import { Effects, type EffectsOptions, type OutboxStore } from "../gateway/episode/index.ts";
import type { OutboxRow } from "../gateway/store/index.ts";
import { type PublishMeta, PublishRefused } from "../broker/index.ts";

const log = pino({ level: "silent" });

/** An in-memory outbox with the Store's semantics. */
class FakeOutbox implements OutboxStore {
  rows: OutboxRow[] = [];
  /** The agent of each episode, as the store's join with episodes gives it. */
  readonly agents = new Map<string, string>();
  private nextId = 1;

  add(
    episode: string,
    n: number,
    topic = "fleet/agents/t/k/out",
  ): { seq: number; topic: string; payload: string; qos: number; retain: boolean }[] {
    const out = [];
    for (let seq = 0; seq < n; seq++) {
      const row = {
        id: this.nextId++,
        episode,
        seq,
        topic,
        payload: `${episode}:${seq}`,
        qos: 1,
        retain: false,
        createdAt: 0,
      };
      this.rows.push(row);
      out.push(row);
    }
    return out;
  }

  async pendingOutbox(limit = 500, afterId = 0) {
    return this.rows
      .filter((r) => r.id > afterId)
      .slice(0, limit)
      .map((r) => ({ ...r, agent: this.agents.get(r.episode) ?? null }));
  }

  async deleteOutbox(ids: readonly number[]) {
    this.rows = this.rows.filter((r) => !ids.includes(r.id));
  }

  async deleteOutboxOf(episodes: readonly string[]) {
    this.rows = this.rows.filter((r) => !episodes.includes(r.episode));
  }
}

/** A broker that records payloads and fails while `failing` > 0. */
class FakeBroker {
  readonly sent: string[] = [];
  /** The `meta` of each publish, in order (undefined when none was given). */
  readonly metas: (PublishMeta | undefined)[] = [];
  failing = 0;
  /** While set, each publish waits for it (a PUBACK that is slow to come) and fails if it rejects. */
  hold: Promise<void> | null = null;
  async publish(_topic: string, payload: string | Uint8Array, opts: { meta?: PublishMeta } = {}): Promise<void> {
    if (this.hold) await this.hold;
    if (this.failing > 0) {
      this.failing--;
      throw new Error("broker down");
    }
    this.sent.push(String(payload));
    this.metas.push(opts.meta);
  }
}

/** Timers that run only when the test says so. */
class ManualTimers {
  private due: { fn: () => void; ms: number }[] = [];
  readonly setTimeout = (fn: () => void, ms: number) => {
    this.due.push({ fn, ms });
  };
  get delays(): number[] {
    return this.due.map((d) => d.ms);
  }
  /** Run everything armed so far (and let the async work it starts settle). */
  async runAll(): Promise<void> {
    const now = this.due.splice(0);
    for (const d of now) d.fn();
    for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
  }
}

function setup(opts: EffectsOptions = {}) {
  const outbox = new FakeOutbox();
  const broker = new FakeBroker();
  const timers = new ManualTimers();
  const effects = new Effects(outbox, broker, log, {
    setTimeout: timers.setTimeout,
    retryMs: 100,
    retryMaxMs: 400,
    ...opts,
  });
  return { outbox, broker, timers, effects };
}

const settle = async () => {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
};

describe("effects", () => {
  test("a committed episode's effects are published once and then deleted from the outbox", async () => {
    const { outbox, broker, timers, effects } = setup();
    effects.publishCommitted("e1", outbox.add("e1", 3));
    await settle();
    expect(broker.sent).toEqual(["e1:0", "e1:1", "e1:2"]);
    expect(outbox.rows.length).toBe(3); // the delete joins a later commit
    await timers.runAll();
    expect(outbox.rows.length).toBe(0);
    expect(effects.published).toBe(3);
  });

  test("each output names its episode, seq and agent to the broker (from memory and from the drain)", async () => {
    const { outbox, broker, effects } = setup();
    outbox.agents.set("old", "t/k1");
    outbox.add("old", 1);
    outbox.add("gone", 1); // its episode row was collected: no agent known, no meta
    await effects.kick();
    effects.publishCommitted("e1", outbox.add("e1", 2), "t/k2");
    await settle();
    expect(broker.metas).toEqual([
      { episode: "old", seq: 0, agent: "t/k1" },
      undefined,
      { episode: "e1", seq: 0, agent: "t/k2" },
      { episode: "e1", seq: 1, agent: "t/k2" },
    ]);
  });

  test("a send forwarded to another shard carries its episode's hop count; other outputs none", async () => {
    const { outbox, broker, effects } = setup({
      forwardHops: async (episode) => {
        if (episode === "unread") throw new Error("store closed");
        return episode === "e2" ? 3 : null;
      },
    });
    effects.publishCommitted("e1", outbox.add("e1", 1), "a/k");
    effects.publishCommitted("e2", outbox.add("e2", 1, "fleet/sends/b/k/e2/0"), "a/k");
    // A count that cannot be read: the forward still goes, without one (its owner counts from 1).
    effects.publishCommitted("unread", outbox.add("unread", 1, "fleet/sends/b/k/unread/0"), "a/j");
    await settle();
    // Another agent's output does not wait for a/k's: by episode.
    expect(broker.metas.toSorted((x, y) => x!.episode.localeCompare(y!.episode))).toEqual([
      { episode: "e1", seq: 0, agent: "a/k" },
      { episode: "e2", seq: 0, agent: "a/k", hops: 3 },
      { episode: "unread", seq: 0, agent: "a/j" },
    ]);
  });

  test("stop() right after a publish does not re-send what was already published", async () => {
    const { outbox, broker, effects } = setup();
    effects.publishCommitted("e1", outbox.add("e1", 2));
    // The grouped delete has not run yet: the rows are still in the outbox at stop.
    await effects.stop();
    expect(broker.sent).toEqual(["e1:0", "e1:1"]);
    expect(outbox.rows.length).toBe(0);
  });

  test("a drain while an episode is being published from memory does not send it twice", async () => {
    const { outbox, broker, timers, effects } = setup();
    const left = outbox.add("old", 1); // left by a previous run
    effects.publishCommitted("e1", outbox.add("e1", 2));
    await effects.kick();
    await settle();
    await timers.runAll();
    expect(broker.sent.sort()).toEqual(["e1:0", "e1:1", left[0]!.payload].sort());
    expect(outbox.rows.length).toBe(0);
  });

  test("a drain at start publishes what a previous run left, oldest first, past one page", async () => {
    const { outbox, broker, effects } = setup();
    for (let e = 0; e < 300; e++) outbox.add(`e${e}`, 2);
    await effects.kick();
    expect(broker.sent.length).toBe(600);
    expect(broker.sent[0]).toBe("e0:0");
    expect(broker.sent[599]).toBe("e299:1");
    expect(outbox.rows.length).toBe(0);
  });

  test("a failed publish is retried with backoff until it goes out (at least once)", async () => {
    const { outbox, broker, timers, effects } = setup();
    broker.failing = 3;
    effects.publishCommitted("e1", outbox.add("e1", 2));
    await settle();
    expect(broker.sent).toEqual([]);
    expect(timers.delays).toEqual([100]);
    await timers.runAll(); // drain: fails again
    expect(timers.delays).toEqual([200]);
    await timers.runAll(); // fails a third time
    expect(timers.delays).toEqual([400]);
    await timers.runAll(); // goes out
    expect(broker.sent).toEqual(["e1:0", "e1:1"]);
    expect(outbox.rows.length).toBe(0);
    expect(timers.delays).toEqual([]);
  });

  test("an outage is logged once at warn, without a stack, its end at info; the retries only at debug", async () => {
    const lines: { level: number; msg: string; err?: unknown }[] = [];
    const logged = pino({ level: "debug" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    const outbox = new FakeOutbox();
    const broker = new FakeBroker();
    const timers = new ManualTimers();
    const effects = new Effects(outbox, broker, logged, { setTimeout: timers.setTimeout, retryMs: 100 });
    broker.failing = 4;
    effects.publishCommitted("e1", outbox.add("e1", 1));
    await settle();
    for (let i = 0; i < 4; i++) await timers.runAll();
    expect(broker.sent).toEqual(["e1:0"]);
    const drain = lines.filter((l) => l.msg.startsWith("publishing outbox"));
    expect(drain.map((l) => [l.level, l.msg])).toEqual([
      [40, "publishing outbox failed; retrying until it goes out"],
      [20, "publishing outbox failed again"],
      [20, "publishing outbox failed again"],
      [30, "publishing outbox resumed"],
    ]);
    expect(drain[0]!.err).toBe("broker down");
  });

  test("rows published before a failure are deleted; the rest are retried, none is lost", async () => {
    const { outbox, broker, timers, effects } = setup();
    outbox.add("a", 2);
    outbox.add("b", 2);
    let calls = 0;
    const publish = broker.publish.bind(broker);
    broker.publish = async (topic, payload) => {
      if (++calls === 3) throw new Error("broker down once");
      return publish(topic, payload);
    };
    await effects.kick();
    expect(broker.sent).toEqual(["a:0", "a:1"]);
    expect(outbox.rows.map((r) => r.payload)).toEqual(["b:0", "b:1"]);
    await timers.runAll();
    expect(broker.sent).toEqual(["a:0", "a:1", "b:0", "b:1"]);
    expect(outbox.rows.length).toBe(0);
  });

  test("after a failed publish, later episodes' outputs wait behind it: order and retained values hold", async () => {
    const { outbox, broker, timers, effects } = setup();
    broker.failing = 1;
    effects.publishCommitted("e1", outbox.add("e1", 2));
    await settle();
    // The broker is back: the next episode's outputs must not overtake e1's (a retained topic would
    // keep e1's older value), they go out behind them.
    effects.publishCommitted("e2", outbox.add("e2", 1));
    await settle();
    expect(broker.sent).toEqual([]);
    await timers.runAll();
    expect(broker.sent).toEqual(["e1:0", "e1:1", "e2:0"]);
    expect(outbox.rows.length).toBe(0);
    // Caught up: the next one is published from memory again.
    effects.publishCommitted("e3", outbox.add("e3", 1));
    await settle();
    expect(broker.sent.at(-1)).toBe("e3:0");
  });

  /** e1 of agent `first` is published and its PUBACK does not come (`late` settles it); then e2 of `second` commits. */
  async function slowThenNext(first: string, second: string) {
    const ctx = setup();
    const late = Promise.withResolvers<void>();
    ctx.broker.hold = late.promise;
    ctx.effects.publishCommitted("e1", ctx.outbox.add("e1", 1), first);
    await settle();
    ctx.broker.hold = null;
    ctx.effects.publishCommitted("e2", ctx.outbox.add("e2", 1), second);
    await settle();
    return { ...ctx, late };
  }

  test("a publish that fails late (no PUBACK in time) is not overtaken by the agent's next episode", async () => {
    // e1's PUBACK has not come when the agent's next episode commits: e2 waits for it, not beside it.
    const { outbox, broker, timers, late } = await slowThenNext("t/k", "t/k");
    expect(broker.sent).toEqual([]);
    late.reject(new Error("no PUBACK within 10000 ms"));
    await settle();
    expect(broker.sent).toEqual([]);
    await timers.runAll();
    expect(broker.sent).toEqual(["e1:0", "e2:0"]);
    expect(outbox.rows.length).toBe(0);
  });

  test("another agent's episode does not wait for a slow PUBACK", async () => {
    const { broker, late } = await slowThenNext("t/a", "t/b");
    expect(broker.sent).toEqual(["e2:0"]);
    late.resolve();
    await settle();
    expect(broker.sent).toEqual(["e2:0", "e1:0"]);
  });

  test("an episode committed while the drain at start runs is published after what it drains", async () => {
    const { outbox, broker, effects } = setup();
    outbox.add("old", 2); // left by a previous run
    const drained = effects.kick();
    effects.publishCommitted("e1", outbox.add("e1", 1));
    await drained;
    await settle();
    expect(broker.sent).toEqual(["old:0", "old:1", "e1:0"]);
    expect(outbox.rows.length).toBe(0);
  });

  test("an output the broker refuses for good is dropped and logged, not retried; later ones go", async () => {
    const { outbox, broker, timers, effects } = setup();
    const publish = broker.publish.bind(broker);
    broker.publish = async (topic, payload) => {
      if (payload === "e1:0") throw new PublishRefused(topic, "topic of more than 100 levels");
      return publish(topic, payload);
    };
    effects.publishCommitted("e1", outbox.add("e1", 2));
    await settle();
    effects.publishCommitted("e2", outbox.add("e2", 1));
    await settle();
    await timers.runAll();
    expect(broker.sent).toEqual(["e1:1", "e2:0"]);
    expect(outbox.rows.length).toBe(0);
    expect(timers.delays).toEqual([]);
  });

  test("after stop() a failure is not retried: the rows stay for the next start", async () => {
    const { outbox, broker, timers, effects } = setup();
    outbox.add("e1", 1);
    broker.failing = 10;
    await effects.stop();
    expect(timers.delays).toEqual([]);
    expect(outbox.rows.length).toBe(1);
  });
});
