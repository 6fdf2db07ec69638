/**
 * (logins) A device's first login (argon2id, nothing cached yet) while guessing clients hammer the
 * broker with logins for user names that are no device, vs the same login on a quiet broker. Logins
 * are verified one at a time; each device id waits in a queue of its own and the queues take turns
 * (gateway/devices/login-queue.ts), so the storm should cost a device about one more verification,
 * not one per guess made before it. Interleaved rounds, medians; a fresh device each time (a
 * device's later logins are answered from the verified-secret cache and would measure nothing).
 */
import { join } from "node:path";
import mqtt from "mqtt";
import type { BenchOptions, Row } from "./harness.ts";
import { quantile, ROOT, tempDir } from "./harness.ts";
import { benchFleet, startGateway } from "./procs.ts";

const ROUNDS = 3;
/** Clients guessing at once, each reconnecting as soon as it is refused. */
const GUESSERS = 16;
/** How long the storm runs before a device logs in: the guesses queue up first. */
const STORM_LEAD_MS = 2_000;

/** `fleet device add <id>` on the bench's fleet.toml: the secret. */
function addDevice(config: string, id: string): string {
  const add = Bun.spawnSync(
    [process.execPath, join(ROOT, "gateway/cli/main.ts"), "device", "add", id, "--json", "--config", config],
    { cwd: ROOT, stderr: "inherit" },
  );
  if (add.exitCode !== 0) throw new Error(`fleet device add ${id} failed`);
  return (JSON.parse(add.stdout.toString()) as { secret: string }).secret;
}

/** Milliseconds from CONNECT to CONNACK for this device's login (it must be accepted). */
async function loginMs(port: number, id: string, secret: string): Promise<number> {
  const began = performance.now();
  const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: id,
    username: id,
    password: secret,
    reconnectPeriod: 0,
    connectTimeout: 120_000,
  });
  const took = performance.now() - began;
  await c.endAsync(true);
  return took;
}

/** Clients logging in as no device with a new password each time, until stopped; counts refusals. */
function storm(port: number): { stop(): Promise<number> } {
  let running = true;
  let refused = 0;
  const guesser = async (g: number) => {
    for (let i = 0; running; i++) {
      await mqtt
        .connectAsync(`mqtt://127.0.0.1:${port}`, {
          clientId: `guess-${g}-${i}`,
          username: `nobody-${g}`,
          password: `guess-${i}`,
          reconnectPeriod: 0,
          connectTimeout: 120_000,
        })
        .then(
          (c) => c.endAsync(true),
          () => refused++,
        );
    }
  };
  const all = Promise.all(Array.from({ length: GUESSERS }, (_, g) => guesser(g)));
  return {
    stop: async () => {
      running = false;
      await all;
      return refused;
    },
  };
}

/** Run the section. */
export async function benchLogins(o: BenchOptions): Promise<Row[]> {
  const rounds = o.quick ? 1 : ROUNDS;
  o.log(`logins: ${rounds} rounds, a device's first login quiet vs during ${GUESSERS} clients guessing`);
  const dir = tempDir("logins");
  const toml = benchFleet({ maxConcurrent: 1 }).replace(
    '[broker]\nhost = "127.0.0.1"',
    '[broker]\nhost = "127.0.0.1"\nallow_anonymous = false\ndevices = "devices.toml"',
  );
  await Bun.write(join(dir, "fleet.toml"), toml);
  const secrets = new Map<string, string>();
  for (let r = 0; r < rounds; r++)
    for (const kind of ["quiet", "storm"])
      secrets.set(`${kind}-${r}`, addDevice(join(dir, "fleet.toml"), `${kind}-${r}`));
  const gw = await startGateway("logins", toml, { dir });
  try {
    const quiet: number[] = [];
    const stormy: number[] = [];
    let refused = 0;
    for (let r = 0; r < rounds; r++) {
      quiet.push(await loginMs(gw.mqttPort, `quiet-${r}`, secrets.get(`quiet-${r}`)!));
      const s = storm(gw.mqttPort);
      await Bun.sleep(STORM_LEAD_MS);
      stormy.push(await loginMs(gw.mqttPort, `storm-${r}`, secrets.get(`storm-${r}`)!));
      refused += await s.stop();
      o.log(`  round ${r + 1}: quiet ${quiet.at(-1)!.toFixed(0)} ms, during the storm ${stormy.at(-1)!.toFixed(0)} ms`);
    }
    const [during, alone] = [quantile(stormy, 0.5), quantile(quiet, 0.5)];
    return [
      {
        section: "logins",
        metric: "a device's first login during a guess storm vs quiet",
        unit: "ms",
        gateway: during,
        baseline: alone,
        ratio: during / alone,
        ratioKind: "x",
        target: "<= 3x",
        ok: during / alone <= 3,
        note: `${GUESSERS} clients guessing user names that are no device; ${refused} guesses refused meanwhile`,
      },
    ];
  } finally {
    await gw.stop();
  }
}
