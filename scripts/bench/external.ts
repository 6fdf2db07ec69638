/**
 * (external) Intake through an existing broker (issue 12): the same publisher sends QoS 1
 * messages to Debian's Mosquitto, once with a plain QoS 1 subscriber draining them (Mosquitto
 * alone: the rate that subscriber receives them), once with a gateway in external-broker mode
 * as the subscriber (the rate at which the gateway records them durably; its agents are paused
 * so episodes do not compete). Interleaved rounds, medians.
 */
import type { MqttClient } from "mqtt";
import { Mosquitto } from "../../test/helpers/mosquitto.ts";
import type { BenchOptions, Row } from "./harness.ts";
import { quantile, rateRow, until } from "./harness.ts";
import { collect, connect, publishWindowed } from "./mqttkit.ts";
import { benchFleet, type GatewayProc, startGateway } from "./procs.ts";

const TOPICS = 200;
const ROUNDS = 3;

const message = (run: string) => (i: number) => ({
  topic: `bench/k${i % TOPICS}/t`,
  payload: JSON.stringify({ id: `${run}-${i}`, n: i }),
});

/** Messages/s the plain subscriber receives: first publish to the last arrival. */
async function bare(pub: MqttClient, sub: MqttClient, n: number, window: number, run: string): Promise<number> {
  const got = await collect(sub, "bench/+/t", (_t, p) => (p.toString().includes(`"${run}-`) ? 1 : null));
  const began = performance.now();
  await publishWindowed(pub, n, window, message(run));
  const last = await got.waitFor(n, 120_000);
  got.close();
  return n / ((last - began) / 1000);
}

/** Stimuli/s the gateway records: first publish to the moment it counts them all queued. */
async function viaGateway(pub: MqttClient, gw: GatewayProc, n: number, window: number, run: string) {
  const base = (await gw.api<{ queued_stimuli: number }>("/api/fleet")).queued_stimuli;
  const began = performance.now();
  await publishWindowed(pub, n, window, message(run));
  await until(
    `the gateway to record ${n} stimuli`,
    async () =>
      (await gw.api<{ queued_stimuli: number }>("/api/fleet")).queued_stimuli >= base + n ? true : undefined,
    120_000,
    10,
  );
  return n / ((performance.now() - began) / 1000);
}

/** Run the section. */
export async function benchExternal(o: BenchOptions): Promise<Row[]> {
  const n = o.quick ? 1_000 : 3_000;
  o.log(`external: ${ROUNDS} rounds of ${n} QoS 1 messages through Mosquitto, alone vs into a gateway`);
  const bareMq = await Mosquitto.start();
  const gwMq = await Mosquitto.start();
  const keys = Array.from({ length: TOPICS }, (_, i) => `k${i}`);
  const toml = benchFleet({ maxConcurrent: 1, instances: keys }).replace(
    '[broker]\nhost = "127.0.0.1"',
    `[broker]\nurl = ${JSON.stringify(gwMq.url)}\nclient_id = "bench-gateway"`,
  );
  const gw = await startGateway("external", toml);
  try {
    for (let i = 0; i < keys.length; i += 50)
      await Promise.all(keys.slice(i, i + 50).map((k) => gw.api(`/api/agents/bench/${k}/pause`, "POST")));
    const sub = await connect(bareMq.port, "bench-sub");
    const pubBare = await connect(bareMq.port, "bench-pub-bare");
    const pubGw = await connect(gwMq.port, "bench-pub-gw");
    await bare(pubBare, sub, 200, o.window, "warm");
    await viaGateway(pubGw, gw, 200, o.window, "warm");
    const rates = { bare: [] as number[], gateway: [] as number[] };
    for (let round = 0; round < ROUNDS; round++) {
      rates.bare.push(await bare(pubBare, sub, n, o.window, `bare-${round}`));
      rates.gateway.push(await viaGateway(pubGw, gw, n, o.window, `gw-${round}`));
      const [alone, via] = [rates.bare.at(-1)!, rates.gateway.at(-1)!].map((r) => r.toFixed(0));
      o.log(`  round ${round + 1}: mosquitto alone ${alone}, via gateway ${via} msg/s`);
    }
    return [
      rateRow(
        "external",
        "QoS1 intake through Mosquitto vs Mosquitto alone",
        "msg/s",
        quantile(rates.gateway, 0.5),
        quantile(rates.bare, 0.5),
        null,
        "same publisher; gateway: recorded durably (agents paused); alone: a QoS 1 subscriber receives them",
      ),
    ];
  } finally {
    await gw.stop();
    await bareMq.stop();
    await gwMq.stop();
  }
}
