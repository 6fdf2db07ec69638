/**
 * aedes-persistence's own conformance suite (`abstract.js`, unmodified) run against both broker
 * persistences, through a small adapter from its node:test-style `t` to bun:test (with one deliberate
 * difference: DUP on a redelivery, see REDELIVERED); then what aedes' own in-memory persistence got wrong,
 * against both.
 */
import { afterAll, describe, expect, test } from "bun:test";
import assert from "node:assert";
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { LibsqlPersistence, memoryPersistence, persistenceFor, RetainedOrder } from "../broker/index.ts";

type Assert = Record<string, (...args: unknown[]) => void>;
interface TestContext {
  plan(n: number): void;
  diagnostic(msg: string): void;
  assert: Assert;
}

const require = createRequire(import.meta.url);
const abstract = require("aedes-persistence/abstract.js") as (opts: {
  test: (name: string, fn: (t: TestContext) => Promise<void>) => void;
  persistence: () => unknown;
  testAsync: boolean;
}) => void;

const dir = mkdtempSync(join(tmpdir(), "broker-persistence-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

/**
 * The suite's tests whose deepEqual the broker answers differently on purpose: a packet read back from a
 * session's queue that was sent before (numbered) goes out again with DUP = 1 (MQTT-3.3.1-1), where the
 * suite compares it to the packet as first sent. There the flag is asserted to be 1, and the rest equal.
 */
const REDELIVERED = new Set(["add outgoing packet as a string and pump"]);

function redeliveredEqual(actual: unknown, expected: unknown, message?: string): void {
  const a = actual as Record<string, unknown>;
  const e = expected as Record<string, unknown>;
  assert.equal(a.dup, true, "a packet sent before goes out again with DUP = 1");
  if (message === undefined) assert.deepEqual({ ...a, dup: e.dup }, expected);
  else assert.deepEqual({ ...a, dup: e.dup }, expected, message);
}

/** node:test's `t` as abstract.js uses it: counted assertions (legacy node:assert) and `plan`. */
function adapt(name: string, fn: (t: TestContext) => Promise<void>): void {
  test(`aedes-persistence abstract: ${name}`, async () => {
    let planned: number | null = null;
    let count = 0;
    const counted: Assert = {};
    for (const k of ["equal", "notEqual", "deepEqual", "ok", "strictEqual", "deepStrictEqual"] as const) {
      const check = k === "deepEqual" && REDELIVERED.has(name) ? redeliveredEqual : assert[k];
      counted[k] = (...args: unknown[]) => {
        count++;
        (check as (...a: unknown[]) => void)(...args);
      };
    }
    await fn({ plan: (p) => void (planned = p), diagnostic: () => undefined, assert: counted });
    if (planned !== null) expect(count).toBe(planned);
  });
}

describe('[broker] persistence = "libsql"', () => {
  abstract({
    test: adapt,
    persistence: () => new LibsqlPersistence({ path: join(dir, `p${n++}.db`), synchronous: "normal" }),
    testAsync: true,
  });
});

describe('[broker] persistence = "memory" (its own outgoing queues)', () => {
  abstract({
    test: adapt,
    persistence: () => memoryPersistence({ maxOfflineMessages: 1000 }).aedes,
    testAsync: true,
  });
});

/**
 * A session comes back: aedes restores its subscriptions, then reads its queue back (outgoingStream)
 * and numbers each packet it sends (outgoingUpdate). A message queued just before the read-back also
 * goes out live; found by a crash trial (test/helpers/trial.ts): the read-back handed it to aedes, its
 * live copy was acknowledged, and numbering the read-back's copy failed with "no such packet", which
 * aedes answers by dropping the client, at every reconnection while messages kept coming.
 */
/** The outgoing half of aedes' persistence interface, as aedes calls it, and the counts. */
interface Outgoing {
  setup(broker: { id: string }): Promise<void>;
  outgoingEnqueueCombi(subs: { clientId: string; topic: string; qos: number }[], packet: object): Promise<void>;
  outgoingUpdate(client: { id: string; _nextId?: number }, packet: object): Promise<void>;
  outgoingClearMessageId(client: { id: string }, packet: { messageId?: number }): Promise<unknown>;
  outgoingStream(client: { id: string }): AsyncIterable<unknown>;
  claimLive(client: { id: string }, brokerId: string, brokerCounter: number): boolean;
  stats(): { offlineDropped: number; queued: number; queuedBytes: number };
  destroy(): Promise<void>;
}

/** `[broker] persistence` of broker "broker-1" (libsql on a fresh file), set up as aedes does. */
async function opened(
  kind: "libsql" | "memory",
  maxOfflineMessages = 1000,
  maxOfflineBytesTotal = 0,
): Promise<Outgoing> {
  const bounds = { maxOfflineMessages, maxOfflineBytesTotal };
  const chosen = persistenceFor(
    kind === "libsql" ? { kind, path: join(dir, `p${n++}.db`), synchronous: "normal", ...bounds } : { kind, ...bounds },
    pino({ level: "silent" }),
  )!;
  const base = chosen.aedes as Omit<Outgoing, "stats" | "destroy">;
  const p: Outgoing = {
    setup: (broker) => base.setup(broker),
    outgoingEnqueueCombi: (subs, packet) => base.outgoingEnqueueCombi(subs, packet),
    outgoingUpdate: (client, packet) => base.outgoingUpdate(client, packet),
    outgoingClearMessageId: (client, packet) => base.outgoingClearMessageId(client, packet),
    outgoingStream: (client) => base.outgoingStream(client),
    claimLive: (client, brokerId, brokerCounter) => base.claimLive(client, brokerId, brokerCounter),
    stats: () => chosen.stats(),
    destroy: () => chosen.destroy(),
  };
  await p.setup({ id: "broker-1" });
  return p;
}

/** The i-th message broker "broker-1" publishes on out/a, as aedes queues it. */
const published = (i: number, qos: 1 | 2) => ({
  cmd: "publish",
  topic: "out/a",
  payload: Buffer.from(`m${i}`),
  qos,
  retain: false,
  dup: false,
  brokerId: "broker-1",
  brokerCounter: i,
});

for (const kind of ["libsql", "memory"] as const) {
  describe(`[broker] persistence = "${kind}"`, () => {
    test("a queued message sent live and acknowledged while the queue is read back: sent again, no error", async () => {
      const p = await opened(kind);
      const client = { id: "back-1" };
      const sub = { clientId: client.id, topic: "out/#", qos: 1 };
      const packet = (i: number) => published(i, 1);
      type Queued = ReturnType<typeof packet>;
      // More than a page (500 rows): the second page is read after the live sends below.
      for (let i = 1; i <= 600; i++) await p.outgoingEnqueueCombi([sub], packet(i));
      const stream = p.outgoingStream(client)[Symbol.asyncIterator]();
      const first = (await stream.next()).value as Queued;
      expect(first.payload.toString()).toBe("m1");
      // Live copies go out and are acknowledged before aedes numbers what the read-back handed it: m2
      // (read ahead already) and m550 (on the next page).
      for (const i of [2, 550]) {
        await p.outgoingUpdate(client, { ...packet(i), messageId: 1000 + i });
        expect(await p.outgoingClearMessageId(client, { messageId: 1000 + i })).toBeTruthy();
      }
      // aedes wraps what it read (aedes-packet keeps the payload) and numbers it: every one resolves, m2's
      // copy included (sent once more), where "no such packet" would have dropped the client.
      await p.outgoingUpdate(client, { ...first, messageId: 1 });
      const rest: string[] = [];
      for (let r = await stream.next(), id = 2; !r.done; r = await stream.next(), id++) {
        const q = r.value as Queued;
        await p.outgoingUpdate(client, { ...q, messageId: id });
        rest.push(q.payload.toString());
      }
      // What was on the next page and already went out live is not handed over again.
      expect(rest).not.toContain("m550");
      expect(rest.filter((m) => m !== "m2")).toEqual(
        Array.from({ length: 598 }, (_, i) => `m${i + 3}`).filter((m) => m !== "m550"),
      );
      // A packet from no broker that nobody read back or queued is still an error, as in aedes' own persistence.
      const { brokerId: _none, ...unknown } = packet(9999);
      expect(p.outgoingUpdate(client, { ...unknown, messageId: 65_000 })).rejects.toThrow("no such packet");
      await p.destroy();
    });

    test("a message queued as its session comes back goes out once: live, or from the queue's read-back", async () => {
      const p = await opened(kind);
      const connection = { id: "back-3" };
      const sub = { clientId: connection.id, topic: "out/#", qos: 2 };
      for (const i of [1, 2]) await p.outgoingEnqueueCombi([sub], published(i, 2));
      // m1's live copy reaches the returning connection before its read-back starts: it goes out live.
      expect(p.claimLive(connection, "broker-1", 1)).toBe(true);
      await p.outgoingUpdate(connection, { ...published(1, 2), messageId: 1 });
      const stream = p.outgoingStream(connection)[Symbol.asyncIterator]();
      // m2's live copy comes once the read-back holds it: turned away, the read-back sends it.
      expect(p.claimLive(connection, "broker-1", 2)).toBe(false);
      // m3 is queued after the read-back began: it goes out live.
      await p.outgoingEnqueueCombi([sub], published(3, 2));
      expect(p.claimLive(connection, "broker-1", 3)).toBe(true);
      const handed: string[] = [];
      for (let r = await stream.next(); !r.done; r = await stream.next()) {
        handed.push((r.value as { payload: Buffer }).payload.toString());
      }
      expect(handed).toEqual(["m2"]);
      // The connection drops with nothing acknowledged: the next one gets all three from the read-back.
      const next = { id: "back-3" };
      const again: string[] = [];
      for await (const packet of p.outgoingStream(next)) again.push((packet as { payload: Buffer }).payload.toString());
      expect(again).toEqual(["m1", "m2", "m3"]);
      expect(p.claimLive(next, "broker-1", 1)).toBe(false);
      await p.destroy();
    });

    test("two QoS 2 messages past PUBREC each keep their own PUBREL: both are sent again on reconnect", async () => {
      const p = await opened(kind);
      const client = { id: "qos2-1" };
      const sub = { clientId: client.id, topic: "out/#", qos: 2 };
      const publish = (i: number) => published(i, 2);
      for (const i of [1, 2]) await p.outgoingEnqueueCombi([sub], publish(i));
      // Sent as 5 and 7; the client's PUBRECs turn each into its PUBREL (aedes' pubrec handler).
      await p.outgoingUpdate(client, { ...publish(1), messageId: 5 });
      await p.outgoingUpdate(client, { ...publish(2), messageId: 7 });
      for (const messageId of [5, 7]) await p.outgoingUpdate(client, { cmd: "pubrel", messageId });
      const resent: unknown[] = [];
      for await (const packet of p.outgoingStream(client)) resent.push(packet);
      expect(resent).toEqual([
        { cmd: "pubrel", messageId: 5 },
        { cmd: "pubrel", messageId: 7 },
      ]);
      // Their PUBCOMPs clear each one.
      for (const messageId of [5, 7]) expect(await p.outgoingClearMessageId(client, { messageId })).toBeTruthy();
      expect(p.stats().queued).toBe(0);
      await p.destroy();
    });

    test("a packet numbered with an identifier in flight for its session gets a free one; none is lost", async () => {
      const p = await opened(kind);
      // A connection of a returning session; aedes drew 7 as its first identifier.
      const client: { id: string; _nextId?: number } = { id: "back-2", _nextId: 7 };
      const sub = { clientId: client.id, topic: "out/#", qos: 1 };
      // Sent as 7 by an earlier broker run and not acknowledged: it is handed over again with its 7.
      const earlier = { ...published(1, 1), brokerId: "broker-0" };
      await p.outgoingEnqueueCombi([sub], earlier);
      await p.outgoingUpdate(client, { ...earlier, messageId: 7 });
      // A message of this run numbered from 7 too, and one with 8 (both taken by aedes' counter).
      const live = { ...published(2, 1), messageId: 7 };
      await p.outgoingEnqueueCombi([sub], published(2, 1));
      await p.outgoingUpdate(client, live);
      expect(live.messageId).not.toBe(7);
      expect(client._nextId).toBe(live.messageId + 1);
      // Each PUBACK clears its own message: the earlier one is still the 7.
      expect(
        ((await p.outgoingClearMessageId(client, { messageId: 7 })) as { payload: Buffer }).payload.toString(),
      ).toBe("m1");
      expect(p.stats().queued).toBe(1);
      const back: string[] = [];
      for await (const packet of p.outgoingStream({ id: client.id }))
        back.push(String((packet as { payload: Buffer }).payload));
      expect(back).toEqual(["m2"]);
      expect(((await p.outgoingClearMessageId(client, live)) as { payload: Buffer }).payload.toString()).toBe("m2");
      expect(p.stats().queued).toBe(0);
      await p.destroy();
    });

    test("a live message its publish did not queue for the session joins the queue as it is sent", async () => {
      // aedes stores a SUBSCRIBE's subscriptions before it routes to them: a publish in between was queued for
      // the sessions stored before, and reaches the new one live. "no such packet" closed that connection.
      const p = await opened(kind, 2);
      const client = { id: "late-1" };
      await p.outgoingUpdate(client, { ...published(1, 1), messageId: 1 });
      expect(p.stats()).toEqual({ offlineDropped: 0, queued: 1, queuedBytes: 2 });
      // Kept as any queued message: read back (DUP 1) when the session comes back before its PUBACK.
      const back: { payload: string; dup: unknown; messageId: unknown }[] = [];
      for await (const packet of p.outgoingStream({ id: client.id })) {
        const q = packet as { payload: Buffer; dup: unknown; messageId: unknown };
        back.push({ payload: q.payload.toString(), dup: q.dup, messageId: q.messageId });
      }
      expect(back).toEqual([{ payload: "m1", dup: false, messageId: 1 }]);
      expect(
        ((await p.outgoingClearMessageId(client, { messageId: 1 })) as { payload: Buffer }).payload.toString(),
      ).toBe("m1");
      expect(p.stats()).toEqual({ offlineDropped: 0, queued: 0, queuedBytes: 0 });
      // Past the session's bound it goes out unkept (resolves: the connection stays).
      const sub = { clientId: client.id, topic: "out/#", qos: 1 };
      for (const i of [2, 3]) await p.outgoingEnqueueCombi([sub], published(i, 1));
      await p.outgoingUpdate(client, { ...published(4, 1), messageId: 4 });
      expect(p.stats()).toMatchObject({ queued: 2, queuedBytes: 4 });
      await p.destroy();
      // Past max_offline_bytes_total the same, counted as dropped.
      const bounded = await opened(kind, 100, 2);
      await bounded.outgoingUpdate(client, { ...published(5, 1), messageId: 5 });
      await bounded.outgoingUpdate(client, { ...published(6, 1), messageId: 6 });
      expect(bounded.stats()).toEqual({ offlineDropped: 1, queued: 1, queuedBytes: 2 });
      await bounded.destroy();
    });

    test("a message a full queue dropped still goes to the connected client live, without an error", async () => {
      const p = await opened(kind, 2);
      const client = { id: "behind-1" };
      const sub = { clientId: client.id, topic: "out/#", qos: 1 };
      for (const i of [1, 2, 3]) await p.outgoingEnqueueCombi([sub], published(i, 1));
      expect(p.stats()).toEqual({ offlineDropped: 1, queued: 2, queuedBytes: 4 });
      // aedes numbers each live send; the third was not queued. "no such packet" made aedes close the client.
      for (const i of [1, 2, 3]) await p.outgoingUpdate(client, { ...published(i, 1), messageId: i });
      expect(
        ((await p.outgoingClearMessageId(client, { messageId: 1 })) as { payload: Buffer }).payload.toString(),
      ).toBe("m1");
      // Its PUBACK finds nothing to clear.
      expect(await p.outgoingClearMessageId(client, { messageId: 3 })).toBeUndefined();
      expect(p.stats()).toEqual({ offlineDropped: 1, queued: 1, queuedBytes: 2 });
      await p.destroy();
    });

    test("identifiers run on past 65535 to 1 and skip every one the session holds", async () => {
      const p = await opened(kind);
      const client: { id: string; _nextId?: number } = { id: "wrap-1", _nextId: 65_535 };
      const sub = { clientId: client.id, topic: "out/#", qos: 1 };
      for (const [i, id] of [
        [1, 65_535],
        [2, 1],
        [3, 2],
      ] as const) {
        await p.outgoingEnqueueCombi([sub], published(i, 1));
        await p.outgoingUpdate(client, { ...published(i, 1), messageId: id });
      }
      const next = { ...published(4, 1), messageId: 65_535 };
      await p.outgoingEnqueueCombi([sub], published(4, 1));
      await p.outgoingUpdate(client, next);
      expect(next.messageId).toBe(3);
      expect(client._nextId).toBe(4);
      await p.destroy();
    });
  });
}

describe("RetainedOrder: retained copies older than a message of their topic sent live", () => {
  const copies = async (order: RetainedOrder, packets: { topic: string; payload: string }[]) => {
    const out: { topic: string; payload: Buffer; retain: boolean }[] = [];
    const source = (async function* () {
      for (const p of packets) yield { ...p, payload: Buffer.from(p.payload), cmd: "publish", qos: 0, retain: true };
    })();
    for await (const c of order.stream(source)) out.push(c);
    return out;
  };

  test("a copy whose topic was stored after its read began is dropped; the others and live packets go", async () => {
    const order = new RetainedOrder();
    order.stored("a");
    const read = copies(order, [
      { topic: "a", payload: "old a" },
      { topic: "b", payload: "old b" },
    ]);
    order.stored("b");
    const [a, b] = await read;
    expect(order.mayForward(a!)).toBe(true);
    expect(order.mayForward(b!)).toBe(false);
    // Not a copy a read yielded: a live message, whatever its payload.
    expect(order.mayForward({ payload: Buffer.from("old b") })).toBe(true);
    expect(order.mayForward({})).toBe(true);
  });

  test("each copy is its own payload object, the same bytes; looked at once, then it is any packet", async () => {
    const order = new RetainedOrder();
    const [a] = await copies(order, [{ topic: "a", payload: "v" }]);
    order.stored("a");
    expect(a!.payload.toString()).toBe("v");
    expect(order.mayForward(a!)).toBe(false);
    expect(order.mayForward(a!)).toBe(true);
  });

  test("stores are remembered only while a read or a copy is pending", async () => {
    const order = new RetainedOrder();
    order.stored("before");
    expect(order.remembered).toBe(0);
    const [a, b] = await copies(order, [
      { topic: "a", payload: "1" },
      { topic: "b", payload: "2" },
    ]);
    order.stored("a");
    expect(order.remembered).toBe(1);
    order.mayForward(a!);
    expect(order.remembered).toBe(1);
    order.mayForward(b!);
    expect(order.remembered).toBe(0);
  });

  test("copies never looked at (a stream torn down) stop holding the stores after the abandon delay", async () => {
    const order = new RetainedOrder(20);
    await copies(order, [{ topic: "a", payload: "1" }]);
    order.stored("a");
    expect(order.remembered).toBe(1);
    await Bun.sleep(60);
    expect(order.remembered).toBe(0);
  });
});
