/**
 * `fleet reshard --to N --create-sessions` on a real Mosquitto: before the gateways stop for a
 * reshard, the broker gets the persistent sessions the new layout needs and the running one lacks,
 * subscribed to every filter of the fleet, so what devices publish during the switch is queued for
 * the new shards' gateways instead of for nobody. Sessions the running layout uses are not touched.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { type AddressInfo, createServer } from "node:net";
import { tmpdir } from "node:os";
import { Aedes } from "aedes";
import { join } from "node:path";
import { connect, connectAsync, type IConnackPacket, type MqttClient } from "mqtt";
import { fixture, runCli } from "./helpers/gateway.ts";
import { LIVE_HEALTH_MS, liveLayouts } from "../gateway/ops/index.ts";
import { Mosquitto } from "./helpers/mosquitto.ts";
import { freePort } from "./helpers/sqld.ts";
import { agentType, fleetHeader, q } from "./helpers/toml.ts";

const brokers: Mosquitto[] = [];
const clients: MqttClient[] = [];
const dirs: string[] = [];

afterAll(async () => {
  for (const c of clients) c.end(true);
  for (const b of brokers) await b.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}, 60_000);

const COUNTER = fixture("counter");

/** A fleet.toml on the broker at `url` (`[fleet] shard` when `shard` is given) in a temp dir; its path. */
function fleetToml(url: string, o: { shard?: string; broker?: string; mqtt?: 4 | 5 } = {}): string {
  const dir = mkdtempSync(join(tmpdir(), "fleet-sessions-"));
  dirs.push(dir);
  const file = join(dir, "fleet.toml");
  const broker = [
    `url = ${q(url)}`,
    `client_id = ${q("gw-plant")}`,
    ...(o.mqtt === 5 ? ['mqtt_version = "5"'] : []),
    ...(o.broker ? [o.broker] : []),
  ].join("\n");
  writeFileSync(
    file,
    fleetHeader("plant", { fleet: o.shard ? `shard = ${q(o.shard)}` : undefined, broker }) +
      agentType("counter", COUNTER, ["c/+/in"]),
  );
  return file;
}

const createSessions = (config: string, to: number, env: Record<string, string> = {}) =>
  runCli(["reshard", "--to", String(to), "--create-sessions", "--config", config, "--json"], { env });

interface Report {
  from: number;
  seen: string[];
  to: number;
  sessions: { clientId: string; created: boolean; index: number }[];
  filters: string[];
}

/** Connect as `clientId` resuming its session (clean = false); the CONNACK and what the session delivers. */
async function resume(
  url: string,
  clientId: string,
  mqtt: 4 | 5 = 4,
): Promise<{ connack: IConnackPacket; got: string[] }> {
  const got: string[] = [];
  const c = connect(url, {
    clientId,
    clean: false,
    protocolVersion: mqtt,
    reconnectPeriod: 0,
    ...(mqtt === 5 ? { properties: { sessionExpiryInterval: 0xffff_ffff } } : {}),
  });
  clients.push(c);
  // Listening before the CONNACK: a resumed session delivers its queue right after it.
  c.on("message", (topic) => got.push(topic));
  const connack = await new Promise<IConnackPacket>((resolve, reject) => {
    c.once("connect", resolve);
    c.once("error", reject);
  });
  return { connack, got };
}

async function device(url: string): Promise<MqttClient> {
  const c = await connectAsync(url, { clientId: `device-${clients.length}`, clean: true, reconnectPeriod: 0 });
  clients.push(c);
  return c;
}

describe("fleet reshard --to N --create-sessions", () => {
  const GROW =
    "growing 2 -> 3: shard 3's session is made with every filter of the fleet; what a device publishes next " +
    "waits in it, while the running shards' sessions stay untouched";
  test(GROW, async () => {
    const mq = await Mosquitto.start();
    brokers.push(mq);
    // The running layout's two gateways, as clients holding their sessions.
    const running: MqttClient[] = [];
    const closed: string[] = [];
    for (const i of [1, 2]) {
      const c = await connectAsync(mq.url, { clientId: `gw-plant-shard-${i}`, clean: false, reconnectPeriod: 0 });
      c.on("close", () => closed.push(`gw-plant-shard-${i}`));
      clients.push(c);
      running.push(c);
    }
    const config = fleetToml(mq.url, { shard: "1/2" });

    const r = await createSessions(config, 3);
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: "" });
    const report = r.json as Report;
    expect(report.from).toBe(2);
    expect(report.sessions).toEqual([{ clientId: "gw-plant-shard-3", created: true, index: 3 }]);
    expect([...report.filters].sort()).toEqual(["c/+/in", "fleet/agents/+/+/inbox", "fleet/sends/#"].sort());

    const d = await device(mq.url);
    await d.publishAsync("c/d1/in", JSON.stringify({ n: 1 }), { qos: 1 });
    await d.publishAsync("fleet/agents/counter/d2/inbox", JSON.stringify({ n: 2 }), { qos: 1 });
    await d.publishAsync("elsewhere/x", "not the fleet's", { qos: 1 });
    const shard3 = await resume(mq.url, "gw-plant-shard-3");
    expect(shard3.connack.sessionPresent).toBe(true);
    await waitUntil(() => shard3.got.length >= 2, "the queued messages");
    await Bun.sleep(200);
    expect(shard3.got.sort()).toEqual(["c/d1/in", "fleet/agents/counter/d2/inbox"]);
    // Neither running shard's connection was taken over.
    expect(closed).toEqual([]);
    expect(running.every((c) => c.connected)).toBe(true);

    // Again: the session is there already (its queue kept), nothing else is made.
    const again = await createSessions(config, 3);
    expect(again.code).toBe(0);
    expect((again.json as Report).sessions).toEqual([{ clientId: "gw-plant-shard-3", created: false, index: 3 }]);
    expect(closed).toEqual([]);
  }, 60_000);

  const STALE =
    "a fleet.toml naming another layout than the running gateways' is refused before any session is made; " +
    "health retained by gateways long gone does not count";
  test(STALE, async () => {
    const mq = await Mosquitto.start();
    brokers.push(mq);
    // Three shards run (their health says so, retained); the fleet.toml at hand still says two.
    const gw = await device(mq.url);
    const health = (shard: string | null, at: number) => JSON.stringify({ fleet: "plant", shard, at });
    await gw.publishAsync("fleet/health/3-of-3", health("3/3", Date.now()), { qos: 1, retain: true });
    const r = await createSessions(fleetToml(mq.url, { shard: "1/2" }), 4);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("fleet.toml says the running layout is 2 shards, but gateways of 3 shards");
    expect(r.stderr).toContain("fleet/health/3-of-3");
    // Nothing was made: shard 3's session (the running one's, in truth) and shard 4's are not on the broker.
    for (const id of ["gw-plant-shard-3", "gw-plant-shard-4"])
      expect((await resume(mq.url, id)).connack.sessionPresent).toBe(false);

    // The three shards stopped long ago (their health is old); an unsharded gateway runs now.
    const old = Date.now() - 2 * LIVE_HEALTH_MS;
    await gw.publishAsync("fleet/health/3-of-3", health("3/3", old), { qos: 1, retain: true });
    await gw.publishAsync("fleet/health", health(null, Date.now()), { qos: 1, retain: true });
    const ok = await createSessions(fleetToml(mq.url), 2);
    expect({ code: ok.code, stderr: ok.stderr }).toEqual({ code: 0, stderr: "" });
    expect((ok.json as Report).sessions.map((s) => s.clientId)).toEqual(["gw-plant-shard-1", "gw-plant-shard-2"]);
  }, 60_000);

  const SPLIT =
    "an unsharded fleet split in two gets both shard sessions; a sharded one going back to one gateway gets " +
    "<client_id>, under MQTT 5 too";
  test(SPLIT, async () => {
    const mq = await Mosquitto.start();
    brokers.push(mq);
    const split = await createSessions(fleetToml(mq.url), 2);
    expect(split.code).toBe(0);
    expect((split.json as Report).sessions.map((s) => [s.clientId, s.created])).toEqual([
      ["gw-plant-shard-1", true],
      ["gw-plant-shard-2", true],
    ]);
    const back = await createSessions(fleetToml(mq.url, { shard: "2/3", mqtt: 5 }), 1);
    expect(back.code).toBe(0);
    const report = back.json as Report;
    expect(report.sessions).toEqual([{ clientId: "gw-plant", created: true, index: 0 }]);
    // One gateway again: no sends forwarded between shards.
    expect(report.filters).not.toContain("fleet/sends/#");
    const d = await device(mq.url);
    await d.publishAsync("c/d9/in", "{}", { qos: 1 });
    const one = await resume(mq.url, "gw-plant", 5);
    expect(one.connack.sessionPresent).toBe(true);
    await waitUntil(() => one.got.length >= 1, "the queued message");
    expect(one.got).toEqual(["c/d9/in"]);
  }, 60_000);

  const EDITED =
    "a fleet.toml already edited to the new count is refused even where its own count needs no new session " +
    "(an unsharded gateway runs, it says 1/2; two shards run, it says 1/3); the running one's makes them";
  test(EDITED, async () => {
    const mq = await Mosquitto.start();
    brokers.push(mq);
    const gw = await device(mq.url);
    const health = (shard: string | null) => JSON.stringify({ fleet: "plant", shard, at: Date.now() });
    // One unsharded gateway runs; fleet.toml says "1/2" already, which by itself needs no new session for 2.
    await gw.publishAsync("fleet/health", health(null), { qos: 1, retain: true });
    const split = await createSessions(fleetToml(mq.url, { shard: "1/2" }), 2);
    expect(split.code).toBe(1);
    expect(split.stderr).toContain(
      "fleet.toml says the running layout is 2 shards, but gateways of 1 gateway (unsharded) published",
    );
    expect(split.stderr).toContain("(fleet/health)");
    const splitOk = await createSessions(fleetToml(mq.url), 2);
    expect({ code: splitOk.code, stderr: splitOk.stderr }).toEqual({ code: 0, stderr: "" });
    expect((splitOk.json as Report).sessions.map((s) => s.clientId)).toEqual(["gw-plant-shard-1", "gw-plant-shard-2"]);

    // Now two shards run; fleet.toml says "1/3", by which shard 3 would be a running session.
    for (const [topic, shard] of [
      ["fleet/health", "2/2"],
      ["fleet/health/1-of-2", "1/2"],
      ["fleet/health/2-of-2", "2/2"],
    ] as const)
      await gw.publishAsync(topic, health(shard), { qos: 1, retain: true });
    const grow = await createSessions(fleetToml(mq.url, { shard: "1/3" }), 3);
    expect(grow.code).toBe(1);
    expect(grow.stderr).toContain("fleet.toml says the running layout is 3 shards, but gateways of 2 shards published");
    expect((await resume(mq.url, "gw-plant-shard-3")).connack.sessionPresent).toBe(false);
    const growOk = await createSessions(fleetToml(mq.url, { shard: "1/2" }), 3);
    expect({ code: growOk.code, stderr: growOk.stderr }).toEqual({ code: 0, stderr: "" });
    expect((growOk.json as Report).from).toBe(2);
    expect([...(growOk.json as Report).seen].sort()).toEqual(
      ["fleet/health", "fleet/health/1-of-2", "fleet/health/2-of-2"].sort(),
    );
  }, 60_000);

  const NONE =
    "a layout that needs no new session (shrinking, the same count) makes none; the report says whether the " +
    "running layout is the gateways' health's or fleet.toml's alone";
  test(NONE, async () => {
    const mq = await Mosquitto.start();
    brokers.push(mq);
    // No gateway's health: fleet.toml is all there is to go by.
    const quiet = await runCli(["reshard", "--to", "1", "--create-sessions", "--config", fleetToml(mq.url)]);
    expect({ code: quiet.code, stderr: quiet.stderr }).toEqual({ code: 0, stderr: "" });
    expect(quiet.stdout).toContain(
      "uses no broker session that the running one (one unsharded gateway by fleet.toml: no gateway published " +
        "its health in the last 60 s) lacks: nothing to create.",
    );
    const gw = await device(mq.url);
    for (const i of [1, 2, 3])
      await gw.publishAsync(
        `fleet/health/${i}-of-3`,
        JSON.stringify({ fleet: "plant", shard: `${i}/3`, at: Date.now() }),
        { qos: 1, retain: true },
      );
    for (const [shard, to] of [
      ["2/3", 2],
      ["1/3", 3],
    ] as const) {
      const r = await createSessions(fleetToml(mq.url, { shard }), to);
      expect({ shard, code: r.code, sessions: (r.json as Report | undefined)?.sessions }).toEqual({
        shard,
        code: 0,
        sessions: [],
      });
    }
    const human = await runCli([
      "reshard",
      "--to",
      "2",
      "--create-sessions",
      "--config",
      fleetToml(mq.url, { shard: "1/3" }),
    ]);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/the running one \(3 shards, as their health on fleet\/health\/\d-of-3, .* says\)/);
    expect(human.stdout).toContain("nothing to create");
    // No session was made.
    for (const id of ["gw-plant", "gw-plant-shard-1", "gw-plant-shard-2", "gw-plant-shard-3"])
      expect({ id, present: (await resume(mq.url, id)).connack.sessionPresent }).toEqual({ id, present: false });
  }, 60_000);

  const REFUSED =
    "refused with a clear error (exit 1): no external broker, an unset password variable, a wrong password, " +
    "a subscription the broker refuses, a broker that is not there";
  test(REFUSED, async () => {
    const embedded = mkdtempSync(join(tmpdir(), "fleet-sessions-"));
    dirs.push(embedded);
    const plain = join(embedded, "fleet.toml");
    writeFileSync(plain, fleetHeader("plant") + agentType("counter", COUNTER, ["c/+/in"]));
    const r1 = await createSessions(plain, 2);
    expect(r1.code).toBe(1);
    expect(r1.stderr).toContain("names no external broker ([broker] url)");

    const unset = await createSessions(
      fleetToml("mqtt://127.0.0.1:1", { broker: 'username = "gw"\npassword_env = "FLEET_TEST_UNSET_PW"' }),
      2,
    );
    expect(unset.code).toBe(1);
    expect(unset.stderr).toContain("FLEET_TEST_UNSET_PW, which is not set");

    // A broker with a login: the gateway's user.
    const auth = mkdtempSync(join(tmpdir(), "fleet-sessions-auth-"));
    dirs.push(auth);
    const passwd = join(auth, "passwd");
    writeFileSync(passwd, "");
    const made = Bun.spawnSync(["mosquitto_passwd", "-b", passwd, "gw", "right-pw"]);
    expect(made.exitCode).toBe(0);
    chmodSync(passwd, 0o644);
    const mq = await Mosquitto.start({ passwordFile: passwd });
    brokers.push(mq);
    const login = 'username = "gw"\npassword_env = "FLEET_TEST_GW_PW"';
    const wrong = await createSessions(fleetToml(mq.url, { broker: login }), 2, { FLEET_TEST_GW_PW: "wrong-pw" });
    expect(wrong.code).toBe(1);
    // The first connection reads the running gateways' health; it is refused before any session is made.
    expect(wrong.stderr).toContain("reading retained fleet/health, fleet/health/+: the broker refused the CONNECT");
    expect(wrong.stderr).not.toContain("wrong-pw");
    // Mosquitto 2.0 grants a subscription its ACL denies (and delivers nothing). Brokers that refuse one: an
    // aedes that denies the inboxes in its SUBACK (0x80), as EMQX and HiveMQ do, or closes the connection.
    for (const [how, deny, said] of [
      ["SUBACK 0x80", "suback", "the broker refused the subscription to fleet/agents/+/+/inbox (check its ACL)"],
      ["connection closed", "close", "subscribing to the fleet's filters: "],
    ] as const) {
      const refusing = await Aedes.createBroker({
        authorizeSubscribe: (_client, sub, done) =>
          !sub.topic.startsWith("fleet/agents/")
            ? done(null, sub)
            : deny === "suback"
              ? done(null, null)
              : done(new Error("not for you")),
      });
      const server = createServer((socket) => refusing.handle(socket));
      await new Promise<void>((resolve) => server.listen({ host: "127.0.0.1", port: 0 }, resolve));
      try {
        const url = `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`;
        const denied = await createSessions(fleetToml(url), 2);
        expect({ how, code: denied.code }).toEqual({ how, code: 1 });
        expect(denied.stderr).toContain(`session gw-plant-shard-1: ${said}`);
      } finally {
        await new Promise<void>((resolve) => refusing.close(() => server.close(() => resolve())));
      }
    }

    const gone = await createSessions(fleetToml(`mqtt://127.0.0.1:${await freePort()}`), 2);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("reading retained fleet/health, fleet/health/+:");
  }, 60_000);

  test("health the broker will not show (its ACL closes the connection) does not stop it", async () => {
    const hiding = await Aedes.createBroker({
      authorizeSubscribe: (_client, sub, done) =>
        sub.topic.startsWith("fleet/health") ? done(new Error("not for you")) : done(null, sub),
    });
    const server = createServer((socket) => hiding.handle(socket));
    await new Promise<void>((resolve) => server.listen({ host: "127.0.0.1", port: 0 }, resolve));
    try {
      const r = await createSessions(fleetToml(`mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`), 2);
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: "" });
      expect((r.json as Report).sessions.map((s) => [s.clientId, s.created])).toEqual([
        ["gw-plant-shard-1", true],
        ["gw-plant-shard-2", true],
      ]);
    } finally {
      await new Promise<void>((resolve) => hiding.close(() => server.close(() => resolve())));
    }
  }, 60_000);

  const USAGE = "bad command lines are usage errors (exit 2): with --from or --out, without --to, a --to out of range";
  test(USAGE, async () => {
    const config = fleetToml("mqtt://127.0.0.1:1", { shard: "1/2" });
    for (const args of [
      ["--to", "3", "--create-sessions", "--from", "a,b"],
      ["--to", "3", "--create-sessions", "--out", "x-"],
      ["--create-sessions"],
      ["--to", "0", "--create-sessions"],
      ["--to", "65", "--create-sessions"],
      ["--to", "three", "--create-sessions"],
    ]) {
      const r = await runCli(["reshard", ...args, "--config", config]);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
    }
  }, 60_000);
});

async function waitUntil(ok: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

describe("which layouts run, from the gateways' retained health", () => {
  const now = 1_700_000_000_000;
  const msg = (topic: string, body: unknown) => ({
    topic,
    payload: Buffer.from(typeof body === "string" ? body : JSON.stringify(body)),
  });
  test("recent health counts its layout (null shard: one gateway); old, timeless or unreadable health does not", () => {
    const live = liveLayouts(
      [
        msg("fleet/health/1-of-3", { shard: "1/3", at: now - 5_000 }),
        msg("fleet/health/2-of-3", { shard: "2/3", at: now + 2_000 }),
        msg("fleet/health", { shard: null, at: now - 1_000 }),
        msg("fleet/health/1-of-2", { shard: "1/2", at: now - LIVE_HEALTH_MS - 1 }),
        msg("fleet/health/1-of-4", { shard: "1/4" }),
        msg("fleet/health/2-of-4", "not json"),
        msg("fleet/health/3-of-4", { shard: "three", at: now }),
      ],
      now,
    );
    expect([...live].sort()).toEqual([
      [1, ["fleet/health"]],
      [3, ["fleet/health/1-of-3", "fleet/health/2-of-3"]],
    ]);
  });
});
