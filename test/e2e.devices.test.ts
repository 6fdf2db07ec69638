/**
 * Devices and quarantine end to end: the real gateway process with
 * `allow_anonymous = false` and a devices file, real MQTT clients (mqtt.js, mosquitto_pub),
 * real episode subprocesses and the `fleet device` / `fleet quarantine` CLI, while the
 * gateway runs and while it is stopped.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT, TestFleet, cleanupAll, publishQos1, runCli, subscribe, waitFor } from "./helpers/gateway.ts";
import {
  closed,
  connackCode,
  deviceCli,
  grantedQos,
  mosquittoPub,
  publishOutcome,
  quarantineAction,
  quarantined,
  type QuarantineJson,
} from "./helpers/devices.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const PICKY = join(ROOT, "test/fixtures/devices/picky.ts");
const PUBLISH = ["sensors/%u/#", "fleet/agents/+/%u/inbox"];
const SUBSCRIBE = ["alerts/%u/#", "fleet/agents/+/%u/out"];

function fleetToml(acceptAll: boolean): string {
  const broker = 'allow_anonymous = false\ndevices = "devices.toml"';
  const picky = `config = { accept_all = ${acceptAll} }\n\n[agents.picky.retry]\nmax_attempts = 1\nbackoff_ms = 0\n`;
  return (
    fleetHeader("e2e-devices", { maxConcurrent: 2, drainTimeoutMs: 5000, maxPacketBytes: 65536, broker }) +
    agentType("picky", PICKY, ["sensors/+/temp"], { dedup: "id", extra: picky })
  );
}

afterAll(() => cleanupAll(), 60_000);

describe("devices and quarantine (one gateway, allow_anonymous = false)", () => {
  let fleet: TestFleet;
  const secrets: Record<string, string> = {};
  const login = (id: string, clientId = id) => ({ clientId, username: id, password: secrets[id]! });

  /** Stimuli recorded for an agent (0 = the broker refused before intake). */
  const stimuliOf = async (agent: string) =>
    (await fleet.query<{ n: number }>("SELECT count(*) AS n FROM stimuli WHERE agent = ?", [agent]))[0]!.n;

  beforeAll(async () => {
    fleet = new TestFleet(fleetToml(false));
    // Registered while the gateway is stopped: the CLI creates the file.
    for (const id of ["dev-a", "dev-b"]) {
      const r = await deviceCli(
        fleet,
        "add",
        id,
        ...PUBLISH.flatMap((p) => ["--publish", p]),
        ...SUBSCRIBE.flatMap((p) => ["--subscribe", p]),
        "--json",
      );
      expect(r.code).toBe(0);
      expect(r.json.id).toBe(id);
      secrets[id] = r.json.secret;
    }
    await fleet.start();
  }, 60_000);

  afterAll(async () => {
    if (fleet?.running) expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("wrong password, unknown device or no credentials: CONNACK refused (mqtt.js and mosquitto_pub)", async () => {
    const port = fleet.mqttPort;
    expect(await connackCode(port, { ...login("dev-a"), password: "wrong" })).toBe(4);
    expect(await connackCode(port, { clientId: "dev-z", username: "dev-z", password: secrets["dev-a"]! })).toBe(4);
    expect(await connackCode(port, { clientId: "dev-a", username: "dev-a" })).toBe(4); // no password
    expect(await connackCode(port, { clientId: "anon" })).toBe(5); // anonymous not allowed

    const bad = await mosquittoPub(port, {
      id: "dev-a",
      user: "dev-a",
      password: "wrong",
      topic: "sensors/dev-a/temp",
      message: '{"id":"never","ok":true}',
    });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.toLowerCase()).toMatch(/not authori[sz]ed|refused|bad user/);
    const anon = await mosquittoPub(port, {
      id: "anon-mq",
      topic: "sensors/dev-a/temp",
      message: '{"id":"never","ok":true}',
    });
    expect(anon.code).not.toBe(0);
    expect(await stimuliOf("picky/dev-a")).toBe(0);
  }, 60_000);

  test("the right secret connects; a publish is acknowledged and an episode runs", async () => {
    const a = await fleet.mqtt(login("dev-a"));
    const outs = await subscribe(a, "fleet/agents/picky/dev-a/out");
    await publishQos1(a, "sensors/dev-a/temp", { id: "a-1", ok: true });
    const out = await outs.next((m) => m.json?.data?.id === "id:a-1", 30_000, "out of picky/dev-a");
    expect(out.json).toMatchObject({ agent: "picky/dev-a", data: { accepted: 1, kind: "mqtt" } });

    const mq = await mosquittoPub(fleet.mqttPort, {
      id: "dev-a-mq",
      user: "dev-a",
      password: secrets["dev-a"],
      topic: "sensors/dev-a/temp",
      message: '{"id":"a-mq","ok":true}',
    });
    // mosquitto_pub logs in as dev-a but with another client id: refused, a device keeps its own client id.
    expect(mq.code).not.toBe(0);
    a.end(true);
    await closed(a);
    const mq2 = await mosquittoPub(fleet.mqttPort, {
      id: "dev-a",
      user: "dev-a",
      password: secrets["dev-a"],
      topic: "sensors/dev-a/temp",
      message: '{"id":"a-mq","ok":true}',
    });
    expect(mq2).toMatchObject({ code: 0 }); // -q 1 exits 0 only after the PUBACK
    const eps = await fleet.waitCommitted("picky/dev-a", 2);
    expect(eps.map((e) => e.stimulus).sort()).toEqual(["id:a-1", "id:a-mq"]);
  }, 60_000);

  test("ACL matrix: a device publishes and subscribes under its own topics only", async () => {
    const a = await fleet.mqtt(login("dev-a"));
    // Subscribe: own topics granted, B's and broad filters refused with 0x80, the connection stays.
    expect(await grantedQos(a, ["alerts/dev-a/#", "fleet/agents/+/dev-a/out", "fleet/agents/picky/dev-a/out"])).toEqual(
      [1, 1, 1],
    );
    expect(
      await grantedQos(a, ["alerts/dev-b/#", "fleet/agents/+/dev-b/out", "alerts/#", "fleet/#", "#", "$SYS/#"]),
    ).toEqual([128, 128, 128, 128, 128, 128]);
    expect(a.connected).toBe(true);

    // Publish to its own inbox (allowed by its ACL) starts an inbox episode.
    expect(await publishOutcome(a, "fleet/agents/picky/dev-a/inbox", '{"id":"a-inbox","ok":true}')).toBe("acked");
    await fleet.waitEpisodes(
      "picky/dev-a",
      (eps) => eps.some((e) => e.stimulus === "id:a-inbox" && e.status === "committed"),
      30_000,
      "inbox episode",
    );

    // Publish under B's topics, or the fleet's own: refused for good, so acked and dropped; nothing recorded.
    for (const topic of [
      "sensors/dev-b/temp",
      "fleet/agents/picky/dev-b/inbox",
      "$SYS/broker/x",
      "fleet/agents/picky/dev-a/out",
    ]) {
      const c = await fleet.mqtt(login("dev-a"));
      expect([topic, await publishOutcome(c, topic, '{"id":"stolen","ok":true}')]).toEqual([topic, "acked"]);
    }
    expect(await stimuliOf("picky/dev-b")).toBe(0);

    // B can do its own.
    const b = await fleet.mqtt(login("dev-b"));
    expect(await grantedQos(b, ["fleet/agents/picky/dev-b/out"])).toEqual([1]);
    expect(await publishOutcome(b, "sensors/dev-b/temp", '{"id":"b-1","ok":true}')).toBe("acked");
    const eps = await fleet.waitCommitted("picky/dev-b", 1);
    expect(eps[0]?.stimulus).toBe("id:b-1");
  }, 60_000);

  test("a client id cannot take over another device's session", async () => {
    const a = await fleet.mqtt(login("dev-a"));
    let aClosed = false;
    a.on("close", () => (aClosed = true));
    // B's valid credentials on A's client id: refused before aedes would drop A's session.
    expect(await connackCode(fleet.mqttPort, login("dev-b", "dev-a"))).toBe(4);
    const mq = await mosquittoPub(fleet.mqttPort, {
      id: "dev-a",
      user: "dev-b",
      password: secrets["dev-b"],
      topic: "sensors/dev-b/temp",
      message: '{"id":"b-x","ok":true}',
    });
    expect(mq.code).not.toBe(0);
    // A is still connected and still acknowledged.
    expect(await publishOutcome(a, "sensors/dev-a/temp", '{"id":"a-after","ok":true}')).toBe("acked");
    expect(aClosed).toBe(false);
    expect(a.connected).toBe(true);
  }, 60_000);

  test("device add: the secret is printed once, only its hash is stored, the running gateway accepts it", async () => {
    const human = await deviceCli(fleet, "add", "dev-c", "--publish", "sensors/%u/#");
    expect(human.code).toBe(0);
    const secret = /^secret: (\S+)$/m.exec(human.stdout)?.[1] ?? "";
    expect(secret).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(human.stdout.split(secret).length - 1).toBe(1); // printed exactly once
    const file = readFileSync(join(fleet.dir, "devices.toml"), "utf8");
    expect(file).toContain('[devices.dev-c]\nsecret = "$argon2id$v=19$');
    for (const s of [secret, secrets["dev-a"]!, secrets["dev-b"]!]) expect(file).not.toContain(s);
    const list = await deviceCli(fleet, "list", "--json");
    expect(list.json.devices.map((d: { id: string }) => d.id)).toEqual(["dev-a", "dev-b", "dev-c"]);
    expect(list.stdout).not.toContain("argon2");
    expect(list.stdout).not.toContain(secret);

    // No restart: the gateway re-reads the file at the next CONNECT.
    const c = await fleet.mqtt({ clientId: "dev-c", username: "dev-c", password: secret });
    expect(await publishOutcome(c, "sensors/dev-c/temp", '{"id":"c-1","ok":true}')).toBe("acked");
    await fleet.waitCommitted("picky/dev-c", 1);
    // Not allowed by its ACL (no subscribe patterns, no [defaults]).
    expect(await grantedQos(c, ["fleet/agents/picky/dev-c/out"])).toEqual([128]);

    const removed = await deviceCli(fleet, "remove", "dev-c");
    expect(removed.code).toBe(0);
    // What it says is what happens below: the live session is closed.
    expect(removed.stdout).toContain("closes its live session within about a second");
    expect((await deviceCli(fleet, "remove", "dev-c")).code).toBe(1);
    expect(await connackCode(fleet.mqttPort, { clientId: "dev-c", username: "dev-c", password: secret })).toBe(4);
    // The live session lost its rights too.
    await waitFor(
      async () => (await publishOutcome(c, "sensors/dev-c/temp", '{"id":"c-2","ok":true}')) === "closed",
      10_000,
      "removed device refused",
    );
  }, 60_000);

  test("quarantine while running: list with failures, retry runs it again, drop removes it", async () => {
    const a = await fleet.mqtt(login("dev-a"));
    await publishQos1(a, "sensors/dev-a/temp", { id: "poison-1", v: 1 });
    await publishQos1(a, "sensors/dev-a/temp", { id: "poison-2", v: 2 });
    const both = await waitFor(
      async () => {
        const list = await quarantined(fleet);
        return list.length >= 2 ? list : undefined;
      },
      30_000,
      "two quarantined stimuli",
      200,
    );
    const p1 = both.find((x) => x.sid === "id:poison-1")!;
    const p2 = both.find((x) => x.sid === "id:poison-2")!;
    expect(p1).toMatchObject({ agent: "picky/dev-a", attempts: 1 });
    expect(p1.last_error).toContain('picky refuses {"id":"poison-1","v":1}');
    const failed = (await fleet.episodes("picky/dev-a")).filter((e) => e.status === "failed");
    expect(p1.episodes).toEqual(failed.filter((e) => e.stimulus === "id:poison-1").map((e) => e.id));
    expect(p1.episodes).toHaveLength(1);

    const human = await quarantineCommandHuman();
    expect(human).toContain("picky/dev-a");
    expect(human).toContain(p1.episodes[0]!);

    // Retry: back in the queue with attempts reset; it runs now (and fails again: still poison).
    const retry = await quarantineAction(fleet, "retry", p1.seq);
    expect(retry.code).toBe(0);
    expect(retry.json).toMatchObject({ ok: true, seq: p1.seq, agent: "picky/dev-a" });
    const again = await waitFor(
      async () => (await quarantined(fleet)).find((x) => x.seq === p1.seq && x.episodes.length === 2),
      30_000,
      "the retried stimulus to fail again",
      200,
    );
    expect(again.attempts).toBe(1);

    // Drop: gone from the list, recorded as dropped; a second drop or a retry is refused.
    expect((await quarantineAction(fleet, "drop", p2.seq)).code).toBe(0);
    expect((await quarantined(fleet)).map((x) => x.seq)).toEqual([p1.seq]);
    expect(await fleet.query("SELECT state FROM stimuli WHERE seq = ?", [p2.seq])).toEqual([{ state: "dropped" }]);
    expect((await quarantineAction(fleet, "drop", p2.seq)).code).toBe(1);
    expect((await quarantineAction(fleet, "retry", p2.seq)).code).toBe(1);
    expect((await quarantineAction(fleet, "retry", 999_999)).code).toBe(1);
  }, 60_000);

  test("quarantine while stopped: list and retry write the data dir, and the next start runs it", async () => {
    const a = await fleet.mqtt(login("dev-a"));
    await publishQos1(a, "sensors/dev-a/temp", { id: "poison-3", v: 3 });
    await waitFor(
      async () => (await quarantined(fleet)).some((x) => x.sid === "id:poison-3"),
      30_000,
      "poison-3 quarantined",
      200,
    );
    expect(await fleet.stop()).toBe(0);

    const list = await quarantined(fleet);
    const p1 = list.find((x) => x.sid === "id:poison-1") as QuarantineJson;
    const p3 = list.find((x) => x.sid === "id:poison-3") as QuarantineJson;
    expect(p1.episodes).toHaveLength(2);
    expect(p3.episodes).toHaveLength(1);

    expect((await quarantineAction(fleet, "retry", p1.seq)).code).toBe(0);
    expect((await quarantineAction(fleet, "drop", p3.seq)).code).toBe(0);
    expect(
      await fleet.query("SELECT seq, state, attempts FROM stimuli WHERE seq IN (?, ?) ORDER BY seq", [p1.seq, p3.seq]),
    ).toEqual([
      { seq: p1.seq, state: "queued", attempts: 0 },
      { seq: p3.seq, state: "dropped", attempts: 0 },
    ]);

    // The operator fixes the cause (here: the type's config), then starts the gateway.
    writeFileSync(fleet.configPath, fleetToml(true));
    await fleet.start();
    await fleet.waitEpisodes(
      "picky/dev-a",
      (eps) => eps.some((e) => e.stimulus === "id:poison-1" && e.status === "committed"),
      30_000,
      "the retried stimulus to commit",
      200,
    );
    expect(await quarantined(fleet)).toEqual([]);
  }, 60_000);

  /** `fleet quarantine` human output. */
  async function quarantineCommandHuman(): Promise<string> {
    const r = await runCli(["quarantine", "--config", fleet.configPath, "--data-dir", fleet.dataDir]);
    expect(r.code).toBe(0);
    return r.stdout;
  }
});
