/**
 * Throws mutated MQTT at a real gateway and checks it keeps serving:
 * `bun scripts/fuzz-mqtt.ts [--seconds 120] [--seed 1] [--auth] [--ws] [--libsql] [--verbose]`.
 * Each round opens a few raw TCP connections that send valid packets (mqtt-packet, MQTT 3.1.1 and 5),
 * some with bytes flipped, cut or inserted, a bad remaining length or another first byte, their
 * publishes carrying readings with odd dedup ids, or payloads that are not JSON objects; every 200
 * connections a well-behaved client publishes at QoS 1 and must be acknowledged. `--auth`: the broker
 * wants logins (a devices file with one device); most fuzzed CONNECTs log in as it, the rest guess.
 * `--ws`: half the connections come over the WebSocket listener instead, their bytes cut into frames.
 * `--libsql`: the broker keeps sessions on its libSQL persistence (half the CONNECTs ask for one).
 * Then the gateway starts again on the fuzzed data dir and must serve a device once more.
 * Ends non-zero if the gateway exits, stops acknowledging, or logs an error it did not handle.
 * `--verbose` also counts the gateway's log lines by message (which refusals the fuzz reached).
 */
import { renameSync, writeFileSync } from "node:fs";
import { connect as tcp, type Socket } from "node:net";
import { join } from "node:path";
import mqtt from "mqtt";
import mqttPacket from "mqtt-packet";
import { freePort } from "../test/helpers/sqld.ts";
import { chooser } from "../test/helpers/seeded.ts";
import { finish, fuzzArgs, sinkAgent } from "./bench/fuzzkit.ts";
import { ROOT, tempDir } from "./bench/harness.ts";
import { startGateway } from "./bench/procs.ts";

const values = fuzzArgs(120, ["auth", "ws", "libsql"]);
/** `--ws`: half the connections come over the WebSocket listener, on a port free a moment ago. */
const wsPort = values.ws ? await freePort() : null;
const { rand, int, pick } = chooser(values.seed);

const FLEET = `
[fleet]
name = "fuzz"
[broker]
host = "127.0.0.1"
allow_anonymous = ${!values.auth}
${values.auth ? 'devices = "devices.toml"' : ""}
${wsPort !== null ? `ws_port = ${wsPort}` : ""}
${values.libsql ? 'persistence = "libsql"' : ""}
max_packet_bytes = 65536
[http]
host = "127.0.0.1"
${sinkAgent()}`;

/** The device `--auth` logs in as (its secret from `fleet device add`). */
let device: { id: string; secret: string } | null = null;
/**
 * The device the acknowledged checks log in as: one the fuzz never uses. A device has one client id, and a
 * fuzzed CONNECT with it arriving late took the session over (MQTT-3.1.4-2), closing a check's connection
 * before its PUBACK (seen with the libSQL persistence, whose slower CONNECT widened the window).
 */
let checker: { id: string; secret: string } | null = null;

const VALID_TOPICS = [
  "sensors/fz/temperature",
  "sensors/b/temperature",
  "fleet/agents/sink/fz/inbox",
  "alerts/fz",
  "a/b/c",
];
const BAD_TOPICS = ["sensors/+/temperature", "fleet/x", "$SYS/x", "a/#", "", "\u0000", "a\uD800"];

function login(): object {
  if (!device) return {};
  const r = rand();
  if (r < 0.7) return { username: device.id, password: Buffer.from(device.secret), clientId: device.id };
  if (r < 0.8) return { username: device.id, password: Buffer.from("wrong"), clientId: device.id };
  if (r < 0.9) return { username: `nobody${int(100)}`, password: Buffer.from("x"), clientId: `fz${int(1e6)}` };
  return {}; // anonymous
}

/**
 * A reading, mostly: JSON with an `id` (the sink's dedup field) of any type or size, or JSON that is
 * not an object, broken JSON, deep nesting, binary, empty, or big.
 */
function payload(): Buffer {
  const id = pick<unknown>([int(1e9), int(1e9), `r-${int(1e6)}`, "", "x".repeat(300), null, {}, [1], -0, 1.5, true]);
  switch (int(10)) {
    case 0:
      return Buffer.from(pick(["", "null", "[]", "42", '"s"', "{", '{"id":', "\u0000", "\ufeff{}", "1e999"]));
    case 1:
      return Buffer.from(`${"[".repeat(1 + int(300))}${"]".repeat(1 + int(300))}`);
    case 2:
      return Buffer.from(Array.from({ length: int(64) }, () => int(256)));
    case 3:
      return Buffer.from(JSON.stringify({ id, value: "v".repeat(int(60_000)) }));
    default:
      return Buffer.from(JSON.stringify({ id, value: rand() * 100 }));
  }
}

function packets(v5: boolean): object[] {
  const protocolVersion = v5 ? 5 : 4;
  const props = v5 ? { properties: { userProperties: { a: "b" }, contentType: "x" } } : {};
  const topic = rand() < 0.8 ? pick(VALID_TOPICS) : pick(BAD_TOPICS);
  return [
    {
      cmd: "connect",
      protocolId: "MQTT",
      protocolVersion,
      clientId: `fz${int(1e6)}`,
      ...login(),
      clean: rand() < 0.5,
      keepalive: int(120),
      ...(v5 ? { properties: { sessionExpiryInterval: int(100), receiveMaximum: 1 + int(100) } } : {}),
      ...(rand() < 0.3
        ? {
            will: {
              topic: "sensors/w/temperature",
              payload: Buffer.from("{}"),
              qos: int(3),
              retain: rand() < 0.5,
              ...(v5 ? { properties: { willDelayInterval: int(5) } } : {}),
            },
          }
        : {}),
    },
    {
      cmd: "publish",
      topic,
      payload: payload(),
      qos: int(3),
      retain: rand() < 0.2,
      messageId: 1 + int(65535),
      dup: rand() < 0.1,
      ...props,
    },
    {
      cmd: "subscribe",
      messageId: 1 + int(65535),
      subscriptions: [{ topic, qos: int(3), ...(v5 ? { nl: rand() < 0.5, rap: rand() < 0.5, rh: int(3) } : {}) }],
      ...props,
    },
    { cmd: "unsubscribe", messageId: 1 + int(65535), unsubscriptions: [topic], ...props },
    { cmd: "puback", messageId: 1 + int(65535) },
    { cmd: "pubrec", messageId: 1 + int(65535) },
    { cmd: "pubrel", messageId: 1 + int(65535) },
    { cmd: "pubcomp", messageId: 1 + int(65535) },
    { cmd: "pingreq" },
    { cmd: "disconnect", ...(v5 ? { reasonCode: 0 } : {}) },
    ...(v5 ? [{ cmd: "auth", reasonCode: 0x18, properties: { authenticationMethod: "x" } }] : []),
  ];
}

function mutate(b: Buffer): Buffer {
  const out = Buffer.from(b);
  switch (int(6)) {
    case 0: // flip bytes
      for (let k = 0; k < 1 + int(4); k++) if (out.length > 0) out[int(out.length)] = int(256);
      return out;
    case 1: // cut
      return out.subarray(0, int(out.length + 1));
    case 2: // insert random bytes
      return Buffer.concat([
        out.subarray(0, int(out.length + 1)),
        Buffer.from(Array.from({ length: 1 + int(16) }, () => int(256))),
        out.subarray(int(out.length + 1)),
      ]);
    case 3: // a huge or malformed remaining length
      return Buffer.concat([
        out.subarray(0, 1),
        Buffer.from(pick([[0xff, 0xff, 0xff, 0x7f], [0xff, 0xff, 0xff, 0xff, 0x01], [0x80], [0x00]])),
        out.subarray(2),
      ]);
    case 4: // another packet type's first byte
      out[0] = int(256);
      return out;
    default:
      return out; // unchanged
  }
}

/** The packet's bytes; one mqtt-packet will not build (a field out of its range) is sent as a DISCONNECT. */
function generate(pkt: object, v5: boolean): Buffer {
  try {
    return mqttPacket.generate(pkt as mqttPacket.Packet, { protocolVersion: v5 ? 5 : 4 });
  } catch {
    return Buffer.from([0xe0, 0x00]);
  }
}

/** A connection's bytes: a valid CONNECT (mostly), then packets, some mutated. */
function connectionBytes(): Buffer[] {
  const v5 = rand() < 0.15;
  const list = packets(v5);
  const chunks: Buffer[] = [];
  if (rand() < 0.8) chunks.push(generate(list[0]!, v5));
  for (let k = 0; k < 1 + int(12); k++) {
    const p = generate(pick(list), v5);
    chunks.push(rand() < 0.15 ? mutate(p) : p);
  }
  return chunks;
}

async function fuzzConnection(port: number): Promise<void> {
  const chunks = connectionBytes();
  await new Promise<void>((resolve) => {
    const s: Socket = tcp(port, "127.0.0.1");
    const done = () => {
      s.destroy();
      resolve();
    };
    s.on("error", done);
    s.on("close", done);
    s.on("data", () => undefined);
    s.on("connect", () => {
      for (const c of chunks) s.write(c);
      setTimeout(done, 20 + int(80));
    });
  });
}

/**
 * The same over MQTT's WebSocket listener: the bytes cut into binary frames at random places, and now
 * and then a text frame (which MQTT over WebSocket does not allow) or a frame of random bytes.
 */
let wsOpened = 0;
async function fuzzWebSocket(port: number): Promise<void> {
  const bytes = Buffer.concat(connectionBytes());
  await new Promise<void>((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/`, rand() < 0.9 ? ["mqtt"] : []);
    ws.binaryType = "arraybuffer";
    const done = () => {
      ws.close();
      resolve();
    };
    ws.onerror = done;
    ws.onclose = done;
    ws.onopen = () => {
      wsOpened++;
      for (let at = 0; at < bytes.length; ) {
        const n = 1 + int(64);
        ws.send(bytes.subarray(at, at + n));
        at += n;
        if (rand() < 0.02) ws.send(pick(["text", "\u0000", ""]));
        if (rand() < 0.02) ws.send(new Uint8Array(Array.from({ length: int(32) }, () => int(256))));
      }
      setTimeout(done, 20 + int(80));
    };
  });
}

async function healthy(port: number, n: number): Promise<void> {
  const creds = checker
    ? { clientId: checker.id, username: checker.id, password: checker.secret }
    : { clientId: `fuzz-check-${n}` };
  // A generous CONNACK wait: with --auth every guessed login the fuzz made pays an argon2id hash, one at a
  // time on the hashing thread (about 1 s each on a loaded 2-core box), and the check's login waits its turn.
  const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    ...creds,
    reconnectPeriod: 0,
    connectTimeout: 30_000,
  });
  try {
    const acked = c.publishAsync(
      `sensors/${checker?.id ?? "check"}/temperature`,
      JSON.stringify({ id: `check-${n}`, t: 20 }),
      { qos: 1 },
    );
    const timeout = Bun.sleep(10_000).then(() => {
      throw new Error(`check ${n}: no PUBACK within 10 s`);
    });
    await Promise.race([acked, timeout]);
  } finally {
    await c.endAsync(true);
  }
}

const dir = tempDir("fuzz");
/** `fleet device add <id>` with the fuzz's patterns: its id and secret. */
function addDevice(id: string): { id: string; secret: string } {
  const add = Bun.spawnSync(
    [
      process.execPath,
      join(ROOT, "gateway/cli/main.ts"),
      "device",
      "add",
      id,
      "--publish",
      "sensors/%c/#",
      "--publish",
      "fleet/agents/+/%u/inbox",
      "--subscribe",
      "alerts/#",
      "--json",
      "--config",
      join(dir, "fleet.toml"),
    ],
    { cwd: ROOT, stderr: "inherit" },
  );
  if (add.exitCode !== 0) throw new Error("fleet device add failed");
  return JSON.parse(add.stdout.toString()) as { id: string; secret: string };
}

if (values.auth) {
  writeFileSync(join(dir, "fleet.toml"), FLEET);
  device = addDevice("fz");
  checker = addDevice("fzcheck");
}
const gw = await startGateway("fuzz", FLEET, { dir });
const until = performance.now() + Number(values.seconds) * 1000;
let connections = 0;
let checks = 0;
let failure: string | null = null;
try {
  while (performance.now() < until) {
    await Promise.all(
      Array.from({ length: 8 }, () =>
        wsPort !== null && rand() < 0.5 ? fuzzWebSocket(wsPort) : fuzzConnection(gw.mqttPort),
      ),
    );
    connections += 8;
    if (connections % 200 === 0) {
      try {
        process.kill(gw.pid, 0);
      } catch {
        failure = "the gateway exited";
        break;
      }
      await healthy(gw.mqttPort, checks++);
    }
  }
  await healthy(gw.mqttPort, checks++);
} catch (err) {
  failure = String(err);
}
// How far the valid packets got: stimuli recorded (fleet_stimuli_total, every label set summed), and
// whose readings they were: with --auth, only the device's own key may appear (its ACL: sensors/%c/#).
let stimuli = 0;
let keys: string[] = [];
try {
  const metrics = await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`, { headers: gw.headers }).then((r) => r.text());
  for (const l of metrics.split("\n")) if (l.startsWith("fleet_stimuli_total")) stimuli += Number(l.split(" ").pop());
  const { agents } = await gw.api<{ agents: { key: string }[] }>("/api/agents?type=sink&limit=1000");
  keys = agents.map((a) => a.key).sort();
} catch (err) {
  failure ??= `the gateway's API did not answer: ${String(err)}`;
}
await gw.stop();
// What the fuzz left in the store (persistent sessions, their queues, retained messages, wills) must load:
// the same data dir starts again and a device is served. The fuzzed run's logs are kept beside.
let restarted = false;
if (failure === null)
  try {
    for (const f of ["gateway.log", "gateway.err"]) renameSync(join(dir, f), join(dir, f.replace(".", "-fuzzed.")));
    const again = await startGateway("fuzz", FLEET, { dir });
    await healthy(again.mqttPort, checks++);
    await again.stop();
    restarted = true;
  } catch (err) {
    failure = `restarting on the fuzzed data dir: ${String(err)}`;
  }
console.log(
  `${connections} fuzzed connections, ${checks} acknowledged checks, ${stimuli} stimuli recorded, seed ${values.seed}`,
);
console.log(`restarted on the fuzzed data dir and served: ${restarted ? "yes" : "no"}`);
console.log(`agents recorded: ${keys.join(",")}`);
if (wsPort !== null) console.log(`WebSocket connections opened: ${wsOpened}`);
await finish(dir, failure, values.verbose);
