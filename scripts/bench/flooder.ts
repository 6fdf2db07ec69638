/**
 * The flooding device of `scripts/bench-policy.ts`: its own process, as a real device is, so the
 * flood's thousands of PUBACKs are not handled on the thread that times the quiet agent's outputs.
 *
 *   bun scripts/bench/flooder.ts PORT TOPIC COUNT
 *
 * Publishes COUNT QoS 1 messages `{"id": "f<i>"}` to TOPIC at once, prints `acked <ms>` once every
 * PUBACK is back, and exits 0 (1 when something failed).
 */
import { connectAsync } from "mqtt";

const [port, topic, count] = [Number(process.argv[2]), process.argv[3] ?? "", Number(process.argv[4])];
if (!Number.isSafeInteger(port) || topic === "" || !Number.isSafeInteger(count) || count < 1) {
  console.error("usage: bun scripts/bench/flooder.ts PORT TOPIC COUNT");
  process.exit(1);
}
const client = await connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 10_000 });
const began = performance.now();
await Promise.all(
  Array.from({ length: count }, (_, i) => client.publishAsync(topic, JSON.stringify({ id: `f${i}` }), { qos: 1 })),
);
console.log(`acked ${Math.round(performance.now() - began)}`);
await client.endAsync();
process.exit(0);
