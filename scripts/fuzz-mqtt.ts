/**
 * Throws mutated MQTT at a real gateway and checks it keeps serving: `bun scripts/fuzz-mqtt.ts
 * [--seconds 120] [--seed 1] [--auth] [--verbose]`. Each round opens a few raw TCP connections that send valid
 * packets (mqtt-packet, MQTT 3.1.1 and 5) with bytes flipped, cut, repeated or inserted; every 200
 * connections a well-behaved client publishes at QoS 1 and must be acknowledged. `--auth`: the broker
 * wants logins (a devices file with one device); most fuzzed CONNECTs log in as it, the rest guess.
 * Ends non-zero if the gateway exits, stops acknowledging, or logs an error it did not handle.
 * `--verbose` also counts the gateway's log lines by message (which refusals the fuzz reached).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { connect as tcp, type Socket } from "node:net";
import { join } from "node:path";
import { parseArgs } from "node:util";
import mqtt from "mqtt";
import mqttPacket from "mqtt-packet";
import { ROOT, cleanupAll, tempDir } from "./bench/harness.ts";
import { startGateway } from "./bench/procs.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "120" },
    seed: { type: "string", default: "1" },
    auth: { type: "boolean", default: false },
    verbose: { type: "boolean", default: false },
  },
});
let seed = Number(values.seed) >>> 0 || 1;
/** xorshift32: a run is repeatable from its seed. */
const rand = (): number => {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed / 0x1_0000_0000;
};
const int = (n: number): number => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;

const FLEET = `
[fleet]
name = "fuzz"
[broker]
host = "127.0.0.1"
allow_anonymous = ${!values.auth}
${values.auth ? 'devices = "devices.toml"' : ""}
max_packet_bytes = 65536
[http]
host = "127.0.0.1"
[agents.sink]
module = "${new URL("../agents/examples/temp-monitor.ts", import.meta.url).pathname}"
subscribe = ["sensors/+/temperature"]
key = "{1}"
dedup = "id"
tools = ["publish"]
publish = ["alerts/#"]
config = { threshold = 80.0, hysteresis = 2.0 }
`;

/** The device `--auth` logs in as (its secret from `fleet device add`). */
let device: { id: string; secret: string } | null = null;

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
      payload: Buffer.from(JSON.stringify({ id: int(1e9), t: rand() * 100 })),
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

function generate(pkt: object, v5: boolean): Buffer {
  try {
    return mqttPacket.generate(pkt as mqttPacket.Packet, { protocolVersion: v5 ? 5 : 4 });
  } catch {
    return Buffer.from([0xe0, 0x00]);
  }
}

async function fuzzConnection(port: number): Promise<void> {
  const v5 = rand() < 0.15;
  const list = packets(v5);
  const chunks: Buffer[] = [];
  if (rand() < 0.8) chunks.push(generate(list[0]!, v5)); // a valid CONNECT first, mostly
  for (let k = 0; k < 1 + int(12); k++) {
    const p = generate(pick(list), v5);
    chunks.push(rand() < 0.15 ? mutate(p) : p);
  }
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

async function healthy(port: number, n: number): Promise<void> {
  const creds = device
    ? { clientId: device.id, username: device.id, password: device.secret }
    : { clientId: `fuzz-check-${n}` };
  const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { ...creds, reconnectPeriod: 0, connectTimeout: 5000 });
  try {
    const acked = c.publishAsync(
      `sensors/${device?.id ?? "check"}/temperature`,
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
if (values.auth) {
  writeFileSync(join(dir, "fleet.toml"), FLEET);
  const add = Bun.spawnSync(
    [
      process.execPath,
      join(ROOT, "gateway/cli/main.ts"),
      "device",
      "add",
      "fz",
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
  device = JSON.parse(add.stdout.toString()) as { id: string; secret: string };
}
const gw = await startGateway("fuzz", FLEET, { dir });
const until = performance.now() + Number(values.seconds) * 1000;
let connections = 0;
let checks = 0;
let failure: string | null = null;
try {
  while (performance.now() < until) {
    await Promise.all(Array.from({ length: 8 }, () => fuzzConnection(gw.mqttPort)));
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
const err = readFileSync(join(dir, "gateway.err"), "utf8");
const log = readFileSync(gw.logFile, "utf8").split("\n");
const errors = log.filter((l) => /"level":(50|60)|uncaught|unhandled/i.test(l));
console.log(
  `${connections} fuzzed connections, ${checks} acknowledged checks, ${stimuli} stimuli recorded, seed ${values.seed}`,
);
console.log(`agents recorded: ${keys.join(",")}`);
console.log(`gateway stderr: ${err.length} bytes; error lines in its log: ${errors.length}`);
if (values.verbose) {
  // What the gateway said, by message: which refusals the fuzz reached.
  const said = new Map<string, number>();
  for (const l of log) {
    const m = /"msg":"([^"]{0,60})/.exec(l);
    if (m) said.set(m[1]!, (said.get(m[1]!) ?? 0) + 1);
  }
  for (const [msg, n] of [...said].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`  ${n}\t${msg}`);
}
for (const l of errors.slice(0, 10)) console.log(`  ${l.slice(0, 400)}`);
if (err.trim()) console.log(err.slice(0, 2000));
const failed = failure !== null || errors.length > 0 || err.trim() !== "";
if (failure) console.log(`FAILED: ${failure}`);
// A failed run keeps its data dir and logs to look at; a clean one leaves nothing behind.
if (failed) console.log(`kept: ${dir}`);
else await cleanupAll();
process.exit(failed ? 1 : 0);
