/**
 * The core loop end to end (docs/cli.md–§7), driven from the outside exactly as a user does:
 * the real gateway process (`bun gateway/cli/main.ts start`), real MQTT clients (mqtt.js,
 * mosquitto_pub, mosquitto_sub, raw sockets), real episode subprocesses, the real libSQL
 * file and the `fleet` CLI. No timing assertions; every wait is bounded.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { connectAsync, type MqttClient } from "mqtt";
import { bootId, startTicks } from "../gateway/pids.ts";
import { hexOfSql, STATUS_COMMITTED } from "../gateway/store/index.ts";
import {
  RawMqtt,
  Signal,
  type GatewayInfo,
  TestFleet,
  alive,
  cleanupAll,
  cpuTicks,
  fixture,
  openDbFile,
  publishPacket,
  publishQos1,
  reap,
  runCli,
  seeded,
  spawnLines,
  subscribe,
  waitFor,
  within,
  type Received,
} from "./helpers/gateway.ts";
import { isSandboxUid } from "./helpers/policy.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const COUNTER = fixture("counter");
const IS_ROOT = process.getuid?.() === 0;
/** Per-test bound: generous for a busy 2-core machine (Bun ignores a bunfig [test] timeout). */
const E2E_TIMEOUT = 120_000;

/** `[fleet]`, `[broker]` and `[http]` on loopback with ports picked by the flags; `extra` adds `[fleet]` lines. */
const header = (name: string, extra?: string, broker?: string): string =>
  fleetHeader(name, { drainTimeoutMs: 10_000, maxPacketBytes: 65536, fleet: extra, broker });

/** An out message's envelope for `agent`, or undefined. */
function outOf(
  msgs: readonly Received[],
  agent: string,
  pred: (data: any) => boolean = () => true,
): Received | undefined {
  return msgs.find((m) => m.json?.agent === agent && pred(m.json.data));
}

afterAll(() => cleanupAll(), 60_000);

// ---------------------------------------------------------------------------------------
describe("the core loop (one shared gateway)", () => {
  let fleet: TestFleet;
  let client: MqttClient;

  beforeAll(async () => {
    fleet = new TestFleet(
      header("e2e-core", undefined, "ws_port = 0") +
        agentType("counter", COUNTER, ["c/+/in"], { dedup: "id" }) +
        agentType("hashed", COUNTER, ["h/+/in"]) +
        agentType("twin-a", COUNTER, ["both/+/x"]) +
        agentType("twin-b", COUNTER, ["both/+/x"]) +
        agentType("wild", COUNTER, ["a/#"], { key: "all" }) +
        agentType("env", fixture("env"), ["env/+/in"]),
      { env: { FLEET_TEST_SECRET: "hunter2" } },
    );
    await fleet.start();
    client = await fleet.mqtt({ clientId: "e2e-core-main" });
  }, 60_000);

  afterAll(async () => {
    if (fleet?.running) expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("gateway.json names the gateway's pid with its start time, by which the CLI finds it running", async () => {
    const info = JSON.parse(readFileSync(join(fleet.dataDir, "gateway.json"), "utf8")) as GatewayInfo;
    // A reused pid (a kill -9 or a power cut left the file behind) has another start time: pids.ts processRuns.
    expect(info.pid_start).toBe(startTicks(info.pid)!);
    expect(info.boot_id).toBe(bootId()!);
    expect((await fleet.cli("status")).json.fleet).toBe("e2e-core");
  });

  test("ws_port = 0 picks a free port, named in gateway.json and in the running log line", async () => {
    const info = JSON.parse(readFileSync(join(fleet.dataDir, "gateway.json"), "utf8")) as GatewayInfo;
    expect(info.ws_port).toBeGreaterThan(0);
    const running = readFileSync(fleet.logPath, "utf8")
      .split("\n")
      .filter((l) => l.includes('"fleet \\"e2e-core\\" running"'))
      .map((l) => JSON.parse(l) as { ws_port?: number });
    expect(running.at(-1)?.ws_port).toBe(info.ws_port!);
    const ws = await within(
      connectAsync(`ws://127.0.0.1:${info.ws_port}/mqtt`, { clientId: "e2e-core-ws", reconnectPeriod: 0 }),
      10_000,
      "ws connect",
    );
    await ws.endAsync();
  });

  test(
    "outputs arrive on fleet/agents/<type>/<key>/out from mqtt.js and mosquitto_pub publishes, seen by mosquitto_sub",
    async () => {
      const outs = await subscribe(client, "fleet/agents/counter/+/out");
      const summaries = await subscribe(client, "fleet/episodes");
      // mosquitto_sub with -d prints "received SUBACK" once subscribed; -v prefixes the topic.
      const sub = spawnLines([
        "stdbuf",
        "-oL",
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        String(fleet.mqttPort),
        "-q",
        "1",
        "-v",
        "-d",
        "-t",
        "fleet/agents/counter/mq/out",
      ]);
      try {
        await sub.until((lines) => lines.some((l) => l.includes("SUBACK")), 15_000, "mosquitto_sub SUBACK");

        await publishQos1(client, "c/js/in", { id: "js-1", v: 1 });
        const pub = Bun.spawn(
          [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            String(fleet.mqttPort),
            "-q",
            "1",
            "-t",
            "c/mq/in",
            "-m",
            JSON.stringify({ id: "mq-1", v: 2 }),
          ],
          { stdout: "pipe", stderr: "pipe" },
        );
        expect(await within(pub.exited, 15_000, "mosquitto_pub")).toBe(0); // -q 1 waits for the PUBACK

        const js = await outs.next((m) => m.json?.agent === "counter/js", 30_000, "out of counter/js");
        const mq = await outs.next((m) => m.json?.agent === "counter/mq", 30_000, "out of counter/mq");
        for (const [m, agent, payload] of [
          [js, "counter/js", { id: "js-1", v: 1 }],
          [mq, "counter/mq", { id: "mq-1", v: 2 }],
        ] as const) {
          expect(m.topic).toBe(`fleet/agents/${agent}/out`);
          expect(typeof m.json.episode).toBe("string");
          expect(m.json.seq).toBe(0);
          expect(m.json.agent).toBe(agent);
          expect(m.json.data).toMatchObject({ count: 1, payload, kind: "mqtt" });
        }

        // A third-party subscriber gets the same output.
        await sub.until(
          (lines) => lines.some((l) => l.startsWith("fleet/agents/counter/mq/out ")),
          30_000,
          "mosquitto_sub to print the out message",
        );
        const line = sub.lines.find((l) => l.startsWith("fleet/agents/counter/mq/out "))!;
        expect(JSON.parse(line.slice(line.indexOf(" ") + 1))).toEqual(mq.json);

        // fleet/episodes carries one summary per committed episode.
        const summary = await summaries.next(
          (m) => m.json?.episode === js.json.episode,
          30_000,
          "episode summary of counter/js",
        );
        expect(summary.json).toMatchObject({
          episode: js.json.episode,
          agent: "counter/js",
          stimulus: "id:js-1",
          status: "committed",
        });
        expect(summary.json.checkpoint).toMatch(/^[0-9a-f]{64}$/);
        expect(typeof summary.json.ms).toBe("number");

        // The retained status topic shows idle and the checkpoint that episode sealed.
        const watcher = await fleet.mqtt({ clientId: "e2e-core-status" });
        const status = await subscribe(watcher, "fleet/agents/counter/js/status");
        const st = await status.next(
          (m) => m.json?.status === "idle" && m.json?.checkpoint === summary.json.checkpoint,
          15_000,
          "retained idle status",
        );
        expect(st.retain).toBe(true);

        // The CLI agrees.
        const eps = await fleet.episodes("counter/js");
        expect(eps.map((e) => [e.id, e.status, e.stimulus, e.checkpoint])).toEqual([
          [js.json.episode, "committed", "id:js-1", summary.json.checkpoint],
        ]);
      } finally {
        await sub.stop();
        await outs.close();
        await summaries.close();
      }
    },
    E2E_TIMEOUT,
  );

  test(
    "without a dedup key a repeated value runs again, and only a QoS 1 retransmission is a duplicate",
    async () => {
      const outs = await subscribe(client, "fleet/agents/hashed/k1/out");
      await publishQos1(client, "h/k1/in", '{"open":true}');
      await publishQos1(client, "h/k1/in", '{"open":true}'); // the door opened again: a new reading
      // A retransmission: the same packet id again with DUP set (MQTT-3.3.1-1), as a device
      // sends it when it never saw the PUBACK. It is acknowledged, and runs nothing.
      const raw = await RawMqtt.connect(fleet.mqttPort, "door-raw");
      const packet = (dup: boolean) => {
        const body = Buffer.concat([
          Buffer.from([0, 7]),
          Buffer.from("h/k1/in"),
          Buffer.from([0x12, 0x34]),
          Buffer.from('{"open":"raw"}'),
        ]);
        return Buffer.concat([Buffer.from([dup ? 0x3a : 0x32, body.length]), body]);
      };
      raw.write(packet(false));
      raw.write(packet(true));
      await raw.until(() => raw.pubacks(0x1234) === 2, 30_000, "both PUBACKs");
      raw.close();
      // The sentinel: a distinct message after the rest. Per-agent FIFO means a duplicate
      // episode would have run before it.
      await publishQos1(client, "h/k1/in", '{"open":false}');
      await outs.next((m) => m.json?.data?.payload?.open === false, 30_000, "the sentinel");
      expect(outs.messages.map((m) => [m.json.data.payload.open, m.json.data.count])).toEqual([
        [true, 1],
        [true, 2],
        ["raw", 3],
        [false, 4],
      ]);
      const ids = outs.messages.map((m) => m.json.data.id as string);
      expect(ids[2]).toMatch(/^r:door-raw:4660:[0-9a-f]{32}$/);
      expect(new Set(ids).size).toBe(4);
      await outs.close();

      // The same for a type with dedup = "id" when a payload lacks the id field.
      const noid = await subscribe(client, "fleet/agents/counter/noid/out");
      await publishQos1(client, "c/noid/in", '{"v":1}');
      await publishQos1(client, "c/noid/in", '{"v":1}');
      await publishQos1(client, "c/noid/in", '{"v":2}');
      await noid.next((m) => m.json?.data?.payload?.v === 2, 30_000, "the second distinct payload");
      expect(noid.messages.map((m) => [m.json.data.payload.v, m.json.data.count])).toEqual([
        [1, 1],
        [1, 2],
        [2, 3],
      ]);
      await noid.close();
    },
    E2E_TIMEOUT,
  );

  test(
    "one MQTT message matching two agent types makes one stimulus per agent",
    async () => {
      const outs = await subscribe(client, "fleet/agents/+/k2/out");
      await publishQos1(client, "both/k2/x", { reading: 7 });
      const got = await outs.until(
        (m) => (outOf(m, "twin-a/k2") && outOf(m, "twin-b/k2") ? m : undefined),
        30_000,
        "outputs of both types",
      );
      expect(outOf(got, "twin-a/k2")!.json.data).toMatchObject({ count: 1, payload: { reading: 7 } });
      expect(outOf(got, "twin-b/k2")!.json.data).toMatchObject({ count: 1, payload: { reading: 7 } });
      expect((await fleet.episodes("twin-a/k2")).length).toBe(1);
      expect((await fleet.episodes("twin-b/k2")).length).toBe(1);
      await outs.close();
    },
    E2E_TIMEOUT,
  );

  test(
    "a non-JSON payload reaches the agent as a string",
    async () => {
      const outs = await subscribe(client, "fleet/agents/counter/text/out");
      await publishQos1(client, "c/text/in", "not json {");
      const m = await outs.next(() => true, 30_000, "out of counter/text");
      expect(m.json.data.payload).toBe("not json {");
      expect(m.json.data.id).toMatch(/^r:/); // no JSON, no id field: only a redelivery would repeat it
      await outs.close();
    },
    E2E_TIMEOUT,
  );

  test(
    "a device publish to fleet/agents/<type>/<key>/inbox runs an episode of kind inbox",
    async () => {
      const outs = await subscribe(client, "fleet/agents/counter/ibx/out");
      await publishQos1(client, "fleet/agents/counter/ibx/inbox", { id: "in-1", hello: "agent" });
      const m = await outs.next(() => true, 30_000, "out of counter/ibx");
      expect(m.json.data).toMatchObject({ kind: "inbox", count: 1, payload: { id: "in-1", hello: "agent" } });
      const eps = await fleet.episodes("counter/ibx");
      expect(eps.length).toBe(1);
      const shown = await fleet.cli("show", eps[0]!.id);
      expect(shown.code).toBe(0);
      expect(shown.json.events[0]).toMatchObject({
        kind: "stimulus",
        data: { kind: "inbox", topic: "fleet/agents/counter/ibx/inbox" },
      });
    },
    E2E_TIMEOUT,
  );

  test(
    "a publish to a wildcard topic closes the connection; $SYS and fleet/…/out are acked and dropped; no episode",
    async () => {
      // A wildcard in a PUBLISH topic is a protocol error (MQTT 3.1.1 §4.7.1): no PUBACK, closed.
      const wildcard = await RawMqtt.connect(fleet.mqttPort, "refused-wildcard");
      wildcard.write(publishPacket("a/+/b", '{"id":"refused"}', 1));
      await wildcard.waitClosed(15_000);
      expect(wildcard.pubacked).toBe(false);
      // Topics the broker keeps for itself: a permanent refusal, acknowledged and dropped (docs/mqtt.md).
      for (const topic of ["$SYS/x", "fleet/agents/counter/ref/out"]) {
        const raw = await RawMqtt.connect(fleet.mqttPort, `refused-${topic.length}`);
        raw.write(publishPacket(topic, '{"id":"refused"}', 1));
        await raw.until(() => raw.pubacked, 15_000, `the PUBACK of a dropped publish to ${topic}`);
        expect(raw.closed).toBe(false);
        raw.close();
      }
      // The gateway keeps serving the client that was connected all along. Per-agent FIFO:
      // had a refused publish become a stimulus, these sentinels would not see count 1.
      const outs = await subscribe(client, "fleet/agents/+/+/out");
      await publishQos1(client, "a/ok/b", { id: "sentinel" });
      await publishQos1(client, "fleet/agents/counter/ref/inbox", { id: "sentinel" });
      const wild = await outs.next((m) => m.json?.agent === "wild/all", 30_000, "out of wild/all");
      const ref = await outs.next((m) => m.json?.agent === "counter/ref", 30_000, "out of counter/ref");
      expect(wild.json.data).toMatchObject({ count: 1, topic: "a/ok/b" });
      expect(ref.json.data).toMatchObject({ count: 1, kind: "inbox" });
      expect((await fleet.episodes("wild/all")).length).toBe(1);
      expect((await fleet.episodes("counter/ref")).length).toBe(1);
      await outs.close();
    },
    E2E_TIMEOUT,
  );

  test(
    "an oversized packet closes that connection and the gateway keeps serving other clients",
    async () => {
      const raw = await RawMqtt.connect(fleet.mqttPort, "oversized");
      // A PUBLISH announcing ~1 MB (max_packet_bytes is 64 KiB), followed by some of its body.
      const announced = 1_000_000;
      const lenBytes: number[] = [];
      for (let n = announced; ; ) {
        let b = n % 128;
        n = Math.floor(n / 128);
        if (n > 0) b |= 0x80;
        lenBytes.push(b);
        if (n === 0) break;
      }
      raw.write(
        Buffer.concat([
          Buffer.from([0x32, ...lenBytes]),
          Buffer.from([0, 6]),
          Buffer.from("c/x/in"),
          Buffer.from([0, 1]),
          Buffer.alloc(8192, 0x41),
        ]),
      );
      await raw.waitClosed(15_000);
      expect(raw.pubacked).toBe(false);

      const outs = await subscribe(client, "fleet/agents/counter/big/out");
      // A packet under the limit still goes through, on the connection that stayed open.
      const filler = "x".repeat(60_000);
      await publishQos1(client, "c/big/in", { id: "big-1", filler });
      const m = await outs.next(() => true, 30_000, "out of counter/big");
      expect(m.json.data.payload.filler.length).toBe(60_000);
      expect((await fleet.episodes("counter/x")).length).toBe(0);
      await outs.close();
    },
    E2E_TIMEOUT,
  );

  test(
    "the agent subprocess sees a scrubbed environment and cannot read the gateway's",
    async () => {
      const outs = await subscribe(client, "fleet/agents/env/e1/out");
      await publishQos1(client, "env/e1/in", { needle: "hunter2", pids: [fleet.pid] });
      const m = await outs.next(() => true, 30_000, "out of env/e1");
      const data = m.json.data as {
        env_keys: string[];
        secret_in_env: boolean;
        ppid: number;
        parent_environ_readable: boolean;
        probes: { pid: number; readable: boolean }[];
        secret_visible_in: number[];
        uid: number | null;
      };
      expect(data.env_keys).not.toContain("FLEET_TEST_SECRET");
      expect(data.secret_in_env).toBe(false);
      // Nothing of the gateway's own environment leaks either (it runs with these set).
      expect(data.env_keys).not.toContain("FLEET_LOG_LEVEL");
      expect(data.env_keys).not.toContain("FLEET_LOG_FORMAT");
      expect(data.env_keys.length).toBeLessThan(10);
      // The secret is in no environ file the agent can read, whatever its sandbox looks like.
      expect(data.secret_visible_in).toEqual([]);
      if (IS_ROOT) {
        expect(data.uid).not.toBe(0);
        // Its parent's environ: the gateway's when it has no pid namespace (then it must be
        // unreadable); inside a namespace the gateway is not even visible at its pid.
        if (data.ppid === fleet.pid) expect(data.parent_environ_readable).toBe(false);
        expect(data.probes).toEqual([{ pid: fleet.pid, readable: false }]);
      }
      await outs.close();
    },
    E2E_TIMEOUT,
  );
});

// ---------------------------------------------------------------------------------------
describe("sandbox without namespaces", () => {
  // As root, `sandbox = "uid"` runs episodes as nobody with no pid namespace: the agent can
  // see its parent, the gateway, but must not be able to read its /proc/<pid>/environ.
  test.if(IS_ROOT)(
    'with sandbox = "uid" the agent is the gateway\'s child and cannot read its /proc/<ppid>/environ',
    async () => {
      const fleet = new TestFleet(
        header("e2e-uid", 'sandbox = "uid"\nallow_weak_sandbox = true') +
          agentType("env", fixture("env"), ["env/+/in"]),
        { env: { FLEET_TEST_SECRET: "hunter2" } },
      );
      await fleet.start();
      const c = await fleet.mqtt();
      const outs = await subscribe(c, "fleet/agents/env/u1/out");
      await publishQos1(c, "env/u1/in", { needle: "hunter2", pids: [fleet.pid] });
      const data = (await outs.next(() => true, 30_000, "out of env/u1")).json.data;
      expect(data.env_keys).not.toContain("FLEET_TEST_SECRET");
      expect(isSandboxUid(data.uid)).toBe(true);
      expect(data.ppid).toBe(fleet.pid);
      expect(data.parent_environ_readable).toBe(false);
      expect(data.secret_visible_in).toEqual([]);
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );
});

// ---------------------------------------------------------------------------------------
describe("across restarts", () => {
  const toml = () => header("e2e-restart") + agentType("counter", COUNTER, ["c/+/in"], { dedup: "id" });

  test(
    "a duplicate stimulus id starts no second episode, also after a gateway restart",
    async () => {
      const fleet = new TestFleet(toml());
      await fleet.start();
      let c = await fleet.mqtt();
      await publishQos1(c, "c/d/in", { id: "d-1", v: 1 });
      await publishQos1(c, "c/d/in", { id: "d-1", v: 1 });
      await publishQos1(c, "c/d/in", { id: "d-1", v: "other content, same id" });
      await publishQos1(c, "c/d/in", { id: "d-2", v: 2 });
      // FIFO per agent: once d-2 committed, any queued duplicate of d-1 would have run before it.
      let eps = await fleet.waitCommitted("counter/d", 2);
      expect(eps.map((e) => e.stimulus).sort()).toEqual(["id:d-1", "id:d-2"]);

      expect(await fleet.stop()).toBe(0);
      await fleet.start();
      c = await fleet.mqtt();
      await publishQos1(c, "c/d/in", { id: "d-1", v: 1 });
      await publishQos1(c, "c/d/in", { id: "d-2", v: 2 });
      await publishQos1(c, "c/d/in", { id: "d-3", v: 3 });
      eps = await fleet.waitCommitted("counter/d", 3);
      expect(eps.length).toBe(3);
      expect(eps.map((e) => e.stimulus).sort()).toEqual(["id:d-1", "id:d-2", "id:d-3"]);
      expect(eps.every((e) => e.status === "committed")).toBe(true);
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );

  test(
    "state carries across episodes and across a gateway restart",
    async () => {
      const fleet = new TestFleet(toml());
      await fleet.start();
      let c = await fleet.mqtt();
      let outs = await subscribe(c, "fleet/agents/counter/s/out");
      for (let i = 1; i <= 3; i++) await publishQos1(c, "c/s/in", { id: `s-${i}` });
      await outs.next((m) => m.json.data.count === 3, 30_000, "count 3");
      expect(outs.messages.map((m) => m.json.data.count)).toEqual([1, 2, 3]);
      const before = await fleet.agent("counter/s");
      expect(before).toMatchObject({ seq: 3, episodes: 3, status: "idle" });

      expect(await fleet.stop()).toBe(0);
      await fleet.start();
      c = await fleet.mqtt();
      outs = await subscribe(c, "fleet/agents/counter/s/out");
      await publishQos1(c, "c/s/in", { id: "s-4" });
      const m = await outs.next(() => true, 30_000, "out after restart");
      expect(m.json.data.count).toBe(4);
      const eps = await fleet.waitCommitted("counter/s", 4);
      // The new episode starts from the checkpoint the last one before the restart sealed.
      expect(eps[0]!.parent).toBe(before!.checkpoint);
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );

  test(
    "SIGTERM makes the gateway exit 0 and a restart resumes the queued work",
    async () => {
      const fleet = new TestFleet(toml());
      await fleet.start();
      const c = await fleet.mqtt();
      const n = 30;
      await Promise.all(Array.from({ length: n }, (_, i) => publishQos1(c, `c/t${i % 3}/in`, { id: `t-${i}` })));
      // Every stimulus is acknowledged (durable); stop right away, with work still queued.
      expect(await fleet.stop()).toBe(0);

      await fleet.start();
      for (let k = 0; k < 3; k++) {
        // A wait, not a deadline: CI saw 15-18 s episodes here under load (30 s was too short).
        const eps = await fleet.waitCommitted(`counter/t${k}`, n / 3, 60_000);
        expect(eps.length).toBe(n / 3);
        expect(new Set(eps.map((e) => e.stimulus)).size).toBe(n / 3);
        expect((await fleet.agent(`counter/t${k}`))?.seq).toBe(n / 3);
      }
      expect((await fleet.cli("verify")).code).toBe(0);
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );
});

// ---------------------------------------------------------------------------------------
describe("sealed checkpoints", () => {
  test(
    "fleet verify exits 1 naming a tampered checkpoint, and loading it fails only that agent",
    async () => {
      const fleet = new TestFleet(header("e2e-verify") + agentType("counter", COUNTER, ["c/+/in"], { dedup: "id" }));
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "c/a/in", { id: "a-1" });
      await publishQos1(c, "c/a/in", { id: "a-2" });
      await publishQos1(c, "c/b/in", { id: "b-1" });
      await fleet.waitCommitted("counter/a", 2);
      await fleet.waitCommitted("counter/b", 1);

      // Healthy store: verify passes, while the gateway runs and after it stopped.
      const live = await fleet.cli("verify");
      expect(live.code).toBe(0);
      expect(live.json.problems).toEqual([]);
      expect(await fleet.stop()).toBe(0);
      expect((await fleet.cli("verify")).code).toBe(0);

      // Change one character of counter/a's newest checkpoint state.
      const db = openDbFile(join(fleet.dataDir, "fleet.db"));
      const head = (
        await db.execute({
          // The hash is stored as its bytes (store/hashes.ts): kept raw to find the row, read as hex to compare.
          sql: `SELECT c.hash, ${hexOfSql("c.hash")} AS hex, c.seq, c.state FROM checkpoints c
            JOIN agents a ON a.head_hash = c.hash WHERE a.id = ?`,
          args: ["counter/a"],
        })
      ).rows[0]!;
      const state = String(head.state);
      expect(state).toContain('"count":2');
      const tampered = state.replace('"count":2', '"count":7');
      expect(tampered.length).toBe(state.length);
      await db.execute({ sql: "UPDATE checkpoints SET state = ? WHERE hash = ?", args: [tampered, head.hash!] });
      db.close();

      const broken = await fleet.cli("verify");
      expect(broken.code).toBe(1);
      const record = `counter/a#${Number(head.seq)}`;
      expect(broken.json.problems.length).toBe(1);
      expect(broken.json.problems[0].record).toContain(record);
      expect(broken.json.problems[0].record).toContain(String(head.hex).slice(0, 16));
      expect(broken.json.problems[0].problem).toContain("hash mismatch");
      const human = await runCli(["verify", "--data-dir", fleet.dataDir]);
      expect(human.code).toBe(1);
      expect(human.stdout).toContain(`BROKEN checkpoint ${record}`);

      // The next stimulus for counter/a refuses the checkpoint and fails the agent; counter/b goes on.
      await fleet.start();
      const c2 = await fleet.mqtt();
      const status = await subscribe(c2, "fleet/agents/counter/a/status");
      const outs = await subscribe(c2, "fleet/agents/counter/b/out");
      await publishQos1(c2, "c/a/in", { id: "a-3" });
      await publishQos1(c2, "c/b/in", { id: "b-2" });
      const failed = await status.next((m) => m.json?.status === "failed", 30_000, "failed status of counter/a");
      expect(failed.json.reason).toContain("hash mismatch");
      const b = await outs.next(() => true, 30_000, "out of counter/b");
      expect(b.json.data.count).toBe(2);
      const a = await fleet.agent("counter/a");
      expect(a?.status).toBe("failed");
      expect(a?.reason).toContain("hash mismatch");
      expect(a?.reason).toContain(`counter/a#${Number(head.seq)}`);
      expect((await fleet.agent("counter/b"))?.status).toBe("idle");
      expect((await fleet.episodes("counter/a")).length).toBe(2); // nothing ran on the broken state
      // Pausing it would hide the failure (and its reason) behind "paused by operator": refused.
      const pause = await fleet.fetch("/api/agents/counter/a/pause", { method: "POST" });
      expect(pause.status).toBe(409);
      const refusal = ((await pause.json()) as { error: { code: string; message: string } }).error;
      expect(refusal.code).toBe("failed");
      expect(refusal.message).toContain("hash mismatch");
      expect(await fleet.agent("counter/a")).toMatchObject({ status: "failed", reason: a?.reason });
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );
});

// ---------------------------------------------------------------------------------------
describe("bad input", () => {
  test(
    "an invalid fleet.toml makes `fleet start` and `fleet validate` fail naming file:line:column",
    async () => {
      const fleet = new TestFleet(`[fleet]\nname = "broken"\nmax_concurrent_episodes = = 4\n`);
      const where = new RegExp(`${fleet.configPath.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:3:\\d+`);
      const start = await runCli([
        "start",
        "--config",
        fleet.configPath,
        "--data-dir",
        fleet.dataDir,
        "--mqtt-port",
        "0",
        "--http-port",
        "0",
      ]);
      expect(start.code).not.toBe(0);
      expect(start.stderr + start.stdout).toMatch(where);

      const validate = await runCli(["validate", fleet.configPath]);
      expect(validate.code).toBe(1);
      expect(validate.stdout + validate.stderr).toMatch(where);
      const asJson = await runCli(["validate", fleet.configPath, "--json"]);
      expect(asJson.code).toBe(1);
      expect(asJson.json).toMatchObject({ ok: false, file: fleet.configPath, line: 3 });

      // A schema error names the key path.
      const schema = new TestFleet(
        header("schema") +
          agentType("counter", COUNTER, ["c/+/in"], { extra: "[agents.counter.budget]\nepisodes_per_hour = -1\n" }),
      );
      const bad = await runCli(["validate", schema.configPath]);
      expect(bad.code).toBe(1);
      expect(bad.stdout + bad.stderr).toContain("agents.counter.budget.episodes_per_hour must be a positive integer");
    },
    E2E_TIMEOUT,
  );

  test(
    "agents that throw, hang, blow their memory or exit fail only their own episodes, are retried, then quarantined",
    async () => {
      const retry = "[agents.%s.retry]\nmax_attempts = 2\nbackoff_ms = 50\n";
      const bad = (name: string, budget = "") =>
        agentType(name, fixture(name), [`bad/${name}/+`], {
          key: "{1}",
          extra: retry.replace("%s", name) + (budget ? `[agents.${name}.budget]\n${budget}\n` : ""),
        });
      const fleet = new TestFleet(
        header("e2e-bad") +
          bad("throws") +
          bad("loops", "episode_timeout_ms = 500") +
          bad("hog", "memory_mb = 64") +
          bad("exits") +
          agentType("counter", COUNTER, ["ok/+/in"], { dedup: "id" }),
      );
      await fleet.start();
      const c = await fleet.mqtt();
      const outs = await subscribe(c, "fleet/agents/counter/good/out");
      const expected: Record<string, string> = { throws: "threw", loops: "timeout", hog: "oom", exits: "crashed" };
      // Interleave healthy work with the poison so they compete for the same episode slots.
      let n = 0;
      for (const name of Object.keys(expected)) {
        await publishQos1(c, `bad/${name}/k`, { poison: name });
        await publishQos1(c, "ok/good/in", { id: `g-${++n}` });
        await publishQos1(c, "ok/good/in", { id: `g-${++n}` });
      }

      for (const [name, kind] of Object.entries(expected)) {
        const agent = `${name}/k`;
        const eps = await fleet.waitEpisodes(
          agent,
          (list) => (list.length >= 2 ? list : undefined),
          60_000,
          `two failed attempts of ${agent}`,
        );
        expect(eps.length).toBe(2);
        for (const e of eps) {
          expect(e.status).toBe("failed");
          expect(e.error_kind).toBe(kind);
        }
        expect(eps.map((e) => e.attempt).sort()).toEqual([1, 2]);
        // The episode log records how it ended.
        const shown = await fleet.cli("show", eps[0]!.id);
        expect(shown.json).toMatchObject({ status: "failed", error_kind: kind });
        expect(shown.json.events.at(-1)).toMatchObject({ kind: "failure", data: { kind } });
        // After max_attempts the stimulus is quarantined; the agent itself goes on.
        const stim = await waitFor(
          async () =>
            (
              await fleet.query<{ state: string; attempts: number }>(
                "SELECT state, attempts FROM stimuli WHERE agent = ?",
                [agent],
              )
            ).find((s) => s.state === "quarantined"),
          30_000,
          `quarantine of ${agent}'s stimulus`,
        );
        expect(stim.attempts).toBe(2);
        const a = await fleet.agent(agent);
        expect(a).toMatchObject({ status: "idle", failures: 2, seq: 0 });
      }

      // Meanwhile the healthy agent in the same fleet committed every one of its stimuli.
      await outs.until((m) => m.length >= n, 30_000, `${n} outputs of counter/good`);
      expect(outs.messages.map((m) => m.json.data.count)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
      const good = await fleet.agent("counter/good");
      expect(good).toMatchObject({ status: "idle", failures: 0, episodes: n, seq: n });
      // Health and metrics say how many wait in quarantine now (one per failing agent).
      const [row] = await fleet.query<{ n: number }>("SELECT count(*) AS n FROM stimuli WHERE state = 'quarantined'");
      const inQuarantine = Number(row!.n);
      expect(inQuarantine).toBeGreaterThan(0);
      const health = (await (await fleet.fetch("/api/fleet")).json()) as { quarantined_stimuli: number };
      expect(health.quarantined_stimuli).toBe(inQuarantine);
      expect(await (await fleet.fetch("/metrics")).text()).toContain(`\nfleet_stimuli_quarantined ${inQuarantine}\n`);
      expect(await fleet.stop()).toBe(0);
      await fleet.dispose();
    },
    E2E_TIMEOUT,
  );
});

// ---------------------------------------------------------------------------------------
describe("failure domains after a gateway crash", () => {
  for (const sandbox of ["auto", "uid"] as const) {
    test(
      `a spinning episode subprocess does not outlive a kill -9 of its gateway (sandbox = "${sandbox}")`,
      async () => {
        const fleet = new TestFleet(
          header(`e2e-orphan-${sandbox}`, `sandbox = "${sandbox}"\nallow_weak_sandbox = true`) +
            agentType("loops", fixture("loops"), ["l/+/in"], {
              extra: "[agents.loops.budget]\nepisode_timeout_ms = 1000\n",
            }),
        );
        await fleet.start();
        const c = await fleet.mqtt();
        await publishQos1(c, "l/k/in", "spin");
        // An episode subprocess is inside the agent's loop once it has burnt some CPU.
        await waitFor(
          () => fleet.descendants().some((p) => cpuTicks(p) >= 10),
          30_000,
          "a spinning episode subprocess",
        );
        const left = await fleet.kill({ reap: false });
        expect(left.length).toBeGreaterThan(0);
        try {
          // Without a pid namespace only the RLIMIT_CPU backstop ends it: a few CPU seconds,
          // which take much longer in wall time on a loaded machine.
          await waitFor(
            () => left.every((p) => !alive(p)),
            90_000,
            `orphaned episode processes ${left.join(", ")} to exit`,
            100,
          );
        } finally {
          reap(left);
        }
        await fleet.dispose();
      },
      E2E_TIMEOUT,
    );

    test(
      `an episode stuck on a tool call does not outlive a kill -9 of its gateway (sandbox = "${sandbox}")`,
      async () => {
        // A server that takes the agent's http tool call and never answers it.
        let hit: () => void = () => {};
        const hitP = new Promise<void>((r) => (hit = r));
        const server = Bun.serve({
          hostname: "127.0.0.1",
          port: 0,
          fetch: () => {
            hit();
            return new Promise<Response>(() => {});
          },
        });
        const fleet = new TestFleet(
          header(`e2e-stuck-${sandbox}`, `sandbox = "${sandbox}"\nallow_weak_sandbox = true`) +
            agentType("sleeps", fixture("sleeps"), ["s/+/in"], {
              extra:
                'tools = ["http"]\nhttp_hosts = ["127.0.0.1"]\n[agents.sleeps.budget]\nepisode_timeout_ms = 60000\n',
            }),
        );
        try {
          await fleet.start();
          const c = await fleet.mqtt();
          await publishQos1(c, "s/k/in", { url: `http://127.0.0.1:${server.port}/never` });
          await within(hitP, 30_000, "the agent's tool call to reach the test server");
          const left = await fleet.kill({ reap: false });
          expect(left.length).toBeGreaterThan(0);
          try {
            await waitFor(
              () => left.every((p) => !alive(p)),
              15_000,
              `orphaned episode processes ${left.join(", ")} to exit`,
              100,
            );
          } finally {
            reap(left);
          }
        } finally {
          server.stop(true);
          await fleet.dispose();
        }
      },
      E2E_TIMEOUT,
    );
  }
});

// ---------------------------------------------------------------------------------------
describe("crash safety", () => {
  const SEEDS = [11, 23, 37];
  const N = 200;
  const KEYS = 4;

  for (const seed of SEEDS) {
    test(
      `kill -9 during a burst loses no acknowledged stimulus and commits none twice (seed ${seed})`,
      async () => {
        const rand = seeded(seed);
        // keep = 0: no checkpoint is collected, so the chain length is the committed history.
        const fleet = new TestFleet(
          header(`e2e-crash-${seed}`) +
            agentType("counter", COUNTER, ["crash/+/in"], {
              dedup: "id",
              extra: "[agents.counter.checkpoint]\nkeep = 0\n",
            }),
        );
        await fleet.start();
        const clients = [
          await fleet.mqtt({ clientId: `crash-${seed}-a` }),
          await fleet.mqtt({ clientId: `crash-${seed}-b` }),
        ];
        const watcher = await fleet.mqtt({ clientId: `crash-${seed}-watch` });
        // The publisher stays at most `backlog` stimuli ahead of committed episodes, so intake,
        // episodes and commits are all in full swing when the kill lands after `killAfter` acks.
        const backlog = 8 + Math.floor(rand() * 40);
        const killAfter = backlog + 10 + Math.floor(rand() * (N - backlog - 30));
        const signal = new Signal();
        let committedSeen = 0;
        watcher.on("message", (topic, payload) => {
          if (
            topic === "fleet/episodes" &&
            (JSON.parse(payload.toString()) as { status?: string }).status === "committed"
          )
            committedSeen++;
          signal.notify();
        });
        await subscribe(watcher, "fleet/episodes");

        const acked = new Set<number>();
        let killed: Promise<void> | null = null as Promise<void> | null;
        let inflight = 0;
        let committedAtKill = -1;
        const kill = () => {
          if (killed) return;
          committedAtKill = committedSeen;
          killed = fleet.kill().then(() => undefined);
          signal.notify();
        };
        for (let i = 0; i < N; i++) {
          await signal.wait(
            () => killed !== null || (inflight < 16 && i - committedSeen < backlog),
            60_000,
            `room to publish stimulus ${i}`,
          );
          if (killed) break;
          inflight++;
          const client = clients[i % clients.length]!;
          client
            .publishAsync(`crash/k${i % KEYS}/in`, JSON.stringify({ id: `c-${i}`, i }), { qos: 1 })
            .then(
              () => {
                acked.add(i);
                if (acked.size >= killAfter) kill();
              },
              () => undefined,
            )
            .finally(() => {
              inflight--;
              signal.notify();
            });
        }
        kill(); // killAfter < N, so normally already done
        await killed;
        expect(acked.size).toBeGreaterThanOrEqual(killAfter);
        // By construction the kill lands with episodes committed and more still queued.
        expect(committedAtKill).toBeGreaterThan(0);

        await fleet.start();
        await waitFor(
          async () =>
            (await fleet.query<{ n: number }>("SELECT count(*) AS n FROM stimuli WHERE state = 'queued'"))[0]?.n === 0,
          60_000,
          "every queued stimulus to be processed",
          200,
        );

        const committed = await fleet.query<{ agent: string; stimulus_id: string }>(
          `SELECT agent, stimulus_id FROM episodes WHERE status = ${STATUS_COMMITTED}`,
        );
        const perStimulus = new Map<string, number>();
        for (const e of committed)
          perStimulus.set(`${e.agent} ${e.stimulus_id}`, (perStimulus.get(`${e.agent} ${e.stimulus_id}`) ?? 0) + 1);
        // No stimulus committed twice.
        expect([...perStimulus.entries()].filter(([, n]) => n > 1)).toEqual([]);
        // Every acknowledged stimulus committed exactly once.
        const missing = [...acked].filter((i) => perStimulus.get(`counter/k${i % KEYS} id:c-${i}`) !== 1);
        expect(missing).toEqual([]);
        // Nothing was left failed or quarantined.
        expect(await fleet.query("SELECT agent, sid, state FROM stimuli WHERE state <> 'done'")).toEqual([]);

        // Each agent's checkpoint chain is exactly as long as its committed history, and the
        // counter in its newest state says the same.
        for (let k = 0; k < KEYS; k++) {
          const agent = `counter/k${k}`;
          const n = committed.filter((e) => e.agent === agent).length;
          const [row] = await fleet.query<{ head_seq: number; state: string; chain: number }>(
            "SELECT a.head_seq, c.state, (SELECT count(*) FROM checkpoints WHERE agent = a.id) AS " +
              "chain FROM agents a LEFT JOIN checkpoints c ON c.hash = a.head_hash WHERE a.id = ?",
            [agent],
          );
          if (n === 0) continue;
          expect(row).toBeDefined();
          expect(Number(row!.head_seq)).toBe(n);
          expect(Number(row!.chain)).toBe(n);
          expect(JSON.parse(row!.state).count).toBe(n);
        }

        const verify = await fleet.cli("verify");
        expect(verify.code).toBe(0);
        expect(await fleet.stop()).toBe(0);
        await fleet.dispose();
      },
      E2E_TIMEOUT,
    );
  }
});
