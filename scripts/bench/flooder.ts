/**
 * The flooding device of `scripts/bench-policy.ts`: its own process, as a real device is, so the
 * flood's thousands of PUBACKs are not handled on the thread that times the quiet agent's outputs.
 *
 *   bun scripts/bench/flooder.ts PORT TOPIC COUNT
 *
 * Writes COUNT QoS 1 PUBLISH packets `{"id": "f<i>"}` to TOPIC at once over one MQTT 3.1.1
 * connection, prints how long until every PUBACK was back and the CPU it used meanwhile, and exits
 * 0 (1 when something failed).
 *
 * The packets are built before the clock starts and written as one buffer: a device's CPU is its
 * own, so the flood should cost the box only what the gateway spends on it. Building them with
 * mqtt.js, one `publishAsync` each, took a whole core of the two the gateway and the quiet agent's
 * episodes share (619 ms of CPU for 5,000 messages acked in 658 ms): the flood's onset measured
 * that client, not the gateway.
 */
import { connect } from "node:net";
import { connectPacket, publishPacket } from "../../test/helpers/gateway.ts";

const [port, topic, count] = [Number(process.argv[2]), process.argv[3] ?? "", Number(process.argv[4])];
if (!Number.isSafeInteger(port) || topic === "" || !Number.isSafeInteger(count) || count < 1 || count > 65_535) {
  console.error("usage: bun scripts/bench/flooder.ts PORT TOPIC COUNT (COUNT: 1..65535, one packet id each)");
  process.exit(1);
}

const CONNACK_OK = [0x20, 0x02, 0x00, 0x00];
const PUBACK = 0x40;
const flood = Buffer.concat(
  Array.from({ length: count }, (_, i) => publishPacket(topic, JSON.stringify({ id: `f${i}` }), 1, i + 1)),
);

const socket = connect(port, "127.0.0.1");
const fail = (why: string): never => {
  console.error(`flooder: ${why}`);
  process.exit(1);
};
socket.on("error", (err) => fail(err.message));
socket.on("close", () => fail(`the broker closed the connection before ${count} PUBACKs`));
setTimeout(() => fail(`no ${count} PUBACKs within 60 s`), 60_000).unref();

// Every reply is 4 bytes: the CONNACK, then one PUBACK per packet id.
let pending: Buffer = Buffer.alloc(0);
let acked = -1; // the CONNACK first
let began = 0;
let cpuBefore = process.cpuUsage();
socket.on("data", (chunk: Buffer) => {
  pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
  let at = 0;
  for (; at + 4 <= pending.length; at += 4) {
    if (acked < 0) {
      if (!CONNACK_OK.every((b, i) => pending[at + i] === b)) fail(`CONNACK refused: ${pending.toString("hex")}`);
      began = performance.now();
      cpuBefore = process.cpuUsage();
      socket.write(flood);
    } else if (pending[at] !== PUBACK || pending[at + 1] !== 0x02) {
      fail(`not a PUBACK: ${pending.subarray(at, at + 4).toString("hex")}`);
    }
    acked++;
  }
  pending = pending.subarray(at);
  if (acked === count) {
    const ms = Math.round(performance.now() - began);
    const cpu = process.cpuUsage(cpuBefore);
    console.log(`acked in ${ms} ms, ${Math.round((cpu.user + cpu.system) / 1000)} ms of the flooder's CPU meanwhile`);
    socket.removeAllListeners("close");
    socket.end(() => process.exit(0));
  }
});
socket.write(connectPacket(`flooder-${process.pid}`));
