/**
 * Baseline broker for the intake bench, run as its own process like the gateway:
 *
 *   bun scripts/bench/bare-broker.ts aedes      plain aedes + node:net, no hooks
 *   bun scripts/bench/bare-broker.ts embedded   createEmbeddedBroker (guard, hooks, ordered
 *                                               acks) with an intake that resolves at once
 *
 * Prints `{"port": N}` on its first stdout line once listening; exits on SIGTERM.
 */
import { createServer, type AddressInfo } from "node:net";
import { Aedes } from "aedes";
import pino from "pino";
import { createEmbeddedBroker } from "../../broker/index.ts";

const mode = process.argv[2];

async function main(): Promise<() => Promise<void>> {
  if (mode === "aedes") {
    const aedes = await Aedes.createBroker();
    const server = createServer((socket) => {
      socket.setNoDelay(true);
      aedes.handle(socket);
    });
    await new Promise<void>((resolve) => server.listen({ host: "127.0.0.1", port: 0 }, resolve));
    console.log(JSON.stringify({ port: (server.address() as AddressInfo).port }));
    return () => new Promise<void>((resolve) => aedes.close(() => server.close(() => resolve())));
  }
  if (mode === "embedded") {
    const broker = createEmbeddedBroker({
      host: "127.0.0.1",
      port: 0,
      maxPacketBytes: 262_144,
      allowAnonymous: true,
      intake: () => Promise.resolve({ ok: true }),
      logger: pino({ level: "silent" }),
    });
    await broker.start();
    console.log(JSON.stringify({ port: broker.port }));
    return () => broker.close();
  }
  console.error("usage: bare-broker.ts aedes|embedded");
  process.exit(2);
}

const close = await main();
for (const sig of ["SIGTERM", "SIGINT"] as const) {
  process.on(sig, () => void close().finally(() => process.exit(0)));
}
