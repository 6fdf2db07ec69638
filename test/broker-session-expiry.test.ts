/**
 * `[broker] session_expiry_days` (Mosquitto's persistent_client_expiration): a clean = false session whose
 * client stays away longer ends as a clean = true CONNECT would end it, with either persistence; a connected
 * client's session never does, and time the broker was stopped is not absence.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { IClientOptions, MqttClient } from "mqtt";
import { type EmbeddedBroker, LibsqlPersistence } from "../broker/index.ts";
import { BrokerKit } from "./helpers/broker.ts";

const dir = mkdtempSync(join(tmpdir(), "session-expiry-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const kit = new BrokerKit();

const HOUR = 3_600_000;
const DAY = 24 * HOUR;
const EXPIRY = 7 * DAY;
let n = 0;

type Kind = "libsql" | "memory";

/** An embedded broker with a week's expiry (its own timer never fires in a test), closed after the test. */
function startBroker(kind: Kind, path = join(dir, `b${n++}.db`)): Promise<EmbeddedBroker> {
  const bounds = { maxOfflineMessages: 100 };
  return kit.start({
    persistence: kind === "libsql" ? { kind, path, synchronous: "full", ...bounds } : { kind, ...bounds },
    sessionExpiryMs: EXPIRY,
  });
}

const client = (broker: EmbeddedBroker, opts: IClientOptions) => kit.client(broker, opts);

/**
 * End `c` and wait for the broker to see it go: a sweep with a clock set ahead would otherwise find it still
 * connected, and take that time for its last use.
 */
async function leave(broker: EmbeddedBroker, c: MqttClient): Promise<void> {
  const before = broker.stats().clients;
  await c.endAsync();
  const deadline = Date.now() + 10_000;
  while (broker.stats().clients >= before) {
    if (Date.now() > deadline) throw new Error("the broker did not see the client go");
    await Bun.sleep(10);
  }
}

/** A persistent subscriber to `t/#` that went away, with one QoS 1 message queued for it. */
async function awaySubscriber(broker: EmbeddedBroker, clientId: string): Promise<void> {
  const c = await client(broker, { clientId, clean: false });
  await c.subscribeAsync("t/#", { qos: 1 });
  await leave(broker, c);
  await broker.publish("t/1", "queued", { qos: 1 });
}

const comeBack = (broker: EmbeddedBroker, clientId: string) => kit.comeBack(broker, clientId);

async function countRows(path: string, table: string): Promise<number> {
  const db = createClient({ url: `file:${path}` });
  try {
    return Number((await db.execute(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
  } finally {
    db.close();
  }
}

for (const kind of ["libsql", "memory"] as const) {
  describe(`session expiry, persistence = "${kind}"`, () => {
    test("a session whose client stayed away longer ends: no session present, no queued message", async () => {
      const broker = await startBroker(kind);
      await awaySubscriber(broker, "gone");
      expect(await broker.expireSessions(Date.now() + EXPIRY - HOUR)).toBe(0);
      expect(broker.stats().sessions).toBe(1);
      expect(await broker.expireSessions(Date.now() + EXPIRY + HOUR)).toBe(1);
      expect(broker.stats()).toMatchObject({ sessions: 0, sessionsExpired: 1 });
      expect(await comeBack(broker, "gone")).toEqual({ present: false, got: [] });
      // A fresh session, subscribed to nothing: a new message for t/# is not queued for it.
      await broker.publish("t/2", "after", { qos: 1 });
      expect((await comeBack(broker, "gone")).got).toEqual([]);
    });

    test("a session not yet due keeps its subscriptions and queue", async () => {
      const broker = await startBroker(kind);
      await awaySubscriber(broker, "back-soon");
      expect(await broker.expireSessions(Date.now() + EXPIRY - HOUR)).toBe(0);
      expect(await comeBack(broker, "back-soon")).toEqual({ present: true, got: ["queued"] });
    });

    test("a connected client's session never expires; its absence counts from when it left", async () => {
      const broker = await startBroker(kind);
      const c = await client(broker, { clientId: "here", clean: false });
      await c.subscribeAsync("t/#", { qos: 1 });
      expect(await broker.expireSessions(Date.now() + 10 * EXPIRY)).toBe(0);
      const left = Date.now();
      await leave(broker, c);
      expect(await broker.expireSessions(left + EXPIRY - HOUR)).toBe(0);
      expect(await broker.expireSessions(left + EXPIRY + HOUR)).toBe(1);
    });

    test("clean = true clients hold no session to expire", async () => {
      const broker = await startBroker(kind);
      const c = await client(broker, { clientId: "passing", clean: true });
      await c.subscribeAsync("t/#", { qos: 1 });
      await leave(broker, c);
      expect(broker.stats().sessions).toBe(0);
      expect(await broker.expireSessions(Date.now() + 10 * EXPIRY)).toBe(0);
    });
  });
}

describe("session expiry on broker.db", () => {
  test("an expired session's rows leave the file: subscriptions, queue and session", async () => {
    const path = join(dir, `b${n++}.db`);
    const broker = await startBroker("libsql", path);
    await awaySubscriber(broker, "gone");
    expect([await countRows(path, "subscriptions"), await countRows(path, "outgoing")]).toEqual([1, 1]);
    expect(await broker.expireSessions(Date.now() + EXPIRY + HOUR)).toBe(1);
    const left = await Promise.all(["subscriptions", "outgoing", "sessions"].map((t) => countRows(path, t)));
    expect(left).toEqual([0, 0, 0]);
  });

  test("a session kept across a restart keeps its age: it expires on time after the restart", async () => {
    const path = join(dir, `b${n++}.db`);
    const first = await startBroker("libsql", path);
    await awaySubscriber(first, "away");
    const left = Date.now();
    await first.close();
    const second = await startBroker("libsql", path);
    expect(second.stats().sessions).toBe(1);
    expect(await second.expireSessions(left + EXPIRY + HOUR)).toBe(1);
  });

  /** A persistence on `path` whose clock reads `clock.now`. */
  async function opened(path: string, clock: { now: number }): Promise<LibsqlPersistence> {
    const p = new LibsqlPersistence({ path, now: () => clock.now });
    await p.setup({ id: "broker" });
    return p;
  }

  test("time the broker was stopped is not absence: the clock resumes where the stop left it", async () => {
    const path = join(dir, `b${n++}.db`);
    const clock = { now: 1_000_000 };
    const before = await opened(path, clock);
    await before.subscriptionsByClient({ id: "dev" });
    before.left("dev", clock.now + HOUR);
    clock.now += 2 * HOUR;
    await before.destroy();
    // Stopped for 30 days: the session has been away one hour of running time.
    clock.now += 30 * DAY;
    const after = await opened(path, clock);
    kit.defer(() => after.destroy());
    const never = () => false;
    expect(await after.expire(clock.now, EXPIRY, never)).toEqual([]);
    expect(await after.expire(clock.now + EXPIRY - 2 * HOUR, EXPIRY, never)).toEqual([]);
    expect(await after.expire(clock.now + EXPIRY, EXPIRY, never)).toEqual(["dev"]);
  });

  test("after a crash, running time since the last sweep counts as downtime: expiry is late, not early", async () => {
    const path = join(dir, `b${n++}.db`);
    const clock = { now: 1_000_000 };
    const crashed = await opened(path, clock);
    await crashed.subscriptionsByClient({ id: "dev" });
    crashed.left("dev", clock.now);
    clock.now += HOUR;
    expect(await crashed.expire(clock.now, EXPIRY, () => false)).toEqual([]); // a sweep marks the broker running
    // 50 minutes later the process dies (no destroy); it starts again 30 days after that.
    clock.now += 50 * 60_000 + 30 * DAY;
    const after = await opened(path, clock);
    kit.defer(() => after.destroy());
    const never = () => false;
    // Away one hour of running time as far as the file knows (the last 50 minutes are lost with the crash).
    expect(await after.expire(clock.now + EXPIRY - HOUR, EXPIRY, never)).toEqual([]);
    expect(await after.expire(clock.now + EXPIRY - HOUR + 1, EXPIRY, never)).toEqual(["dev"]);
  });

  test("sessions kept by older code (no row, or no time) count their absence from the first start", async () => {
    const path = join(dir, `b${n++}.db`);
    const clock = { now: 5_000_000 };
    const first = await opened(path, clock);
    await first.destroy();
    // As session 57's code left them: a subscription without a session row, and a row without a time.
    const db = createClient({ url: `file:${path}` });
    await db.execute("INSERT INTO subscriptions (client_id, topic, qos, options) VALUES ('old-sub', 't/#', 1, '{}')");
    await db.execute("INSERT INTO sessions (client_id, seen_at) VALUES ('old-row', NULL)");
    await db.execute("DELETE FROM meta");
    db.close();
    clock.now += 100 * DAY;
    const after = await opened(path, clock);
    kit.defer(() => after.destroy());
    expect(after.count()).toBe(2);
    expect(await after.expire(clock.now + EXPIRY - HOUR, EXPIRY, () => false)).toEqual([]);
    expect((await after.expire(clock.now + EXPIRY + HOUR, EXPIRY, () => false)).sort()).toEqual(["old-row", "old-sub"]);
  });

  test("a broker.db from before session_expiry_days gets a seen_at column; older code's rows load", async () => {
    const path = join(dir, `b${n++}.db`);
    const db = createClient({ url: `file:${path}` });
    await db.execute("CREATE TABLE sessions (client_id TEXT PRIMARY KEY) WITHOUT ROWID");
    await db.execute("INSERT INTO sessions (client_id) VALUES ('dev')");
    await db.execute("PRAGMA user_version = 1");
    db.close();
    const p = await opened(path, { now: 1_000 });
    kit.defer(() => p.destroy());
    expect(p.count()).toBe(1);
    const check = createClient({ url: `file:${path}` });
    try {
      const rows = (await check.execute("SELECT client_id, seen_at FROM sessions")).rows;
      expect(rows.map((r) => [r.client_id, r.seen_at])).toEqual([["dev", 1000]]);
    } finally {
      check.close();
    }
  });
});
