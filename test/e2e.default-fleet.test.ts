/**
 * The newcomer's path (README "Try it"): the repository's own fleet.toml, fed by scripts/simulate.ts,
 * runs both example agents once on every reading, and leaves hash chains `fleet verify` passes.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { cleanupAll, type EpisodeJson, ROOT, runCommand, TestFleet } from "./helpers/gateway.ts";

const DEVICES = 3;
const RATE_HZ = 2;
const SECONDS = 2;
/** Temperature readings the simulator sends: it stops at devices x rate x seconds. */
const READINGS = DEVICES * RATE_HZ * SECONDS;
const BOILERS = Array.from({ length: DEVICES }, (_, i) => `boiler-${i + 1}`);

let fleet: TestFleet;

beforeAll(async () => {
  // As it is, but for its example modules' paths (they resolve against the fleet.toml's folder).
  const toml = readFileSync(join(ROOT, "fleet.toml"), "utf8").replaceAll(
    'module = "agents/',
    `module = "${ROOT}/agents/`,
  );
  fleet = new TestFleet(toml);
  await fleet.start();
});

afterAll(cleanupAll);

/** The committed episodes among `episodes` that readings started (the dedup key `id`, not the heartbeat timer). */
const readingsRun = (episodes: EpisodeJson[]) =>
  episodes.filter((e) => e.stimulus.startsWith("id:") && e.status === "committed");

describe("the default fleet.toml with the device simulator", () => {
  test("every reading runs temp-monitor and anomaly once, for each boiler, and the chains verify", async () => {
    const url = `mqtt://127.0.0.1:${fleet.mqttPort}`;
    const sim = await runCommand(
      [
        process.execPath,
        join(ROOT, "scripts/simulate.ts"),
        ...["--url", url, "--devices", String(DEVICES), "--rate", String(RATE_HZ)],
        ...["--duration", String(SECONDS), "--seed", "7"],
      ],
      { cwd: ROOT, timeoutMs: 60_000 },
    );
    expect(sim.code).toBe(0);
    const totals = JSON.parse(sim.stdout.trim().split("\n").at(-1)!) as { errors: number; unacked: number };
    expect(totals).toMatchObject({ errors: 0, unacked: 0 });

    for (const type of ["temp-monitor", "anomaly"]) {
      const perBoiler = await Promise.all(
        BOILERS.map((b) =>
          fleet.waitEpisodes(
            `${type}/${b}`,
            (eps) => readingsRun(eps).length === READINGS / DEVICES && eps,
            60_000,
            `${type}/${b}'s readings`,
          ),
        ),
      );
      const ids = perBoiler.flatMap((eps) => readingsRun(eps).map((e) => e.stimulus));
      expect(new Set(ids).size).toBe(READINGS);
    }
    const verify = await fleet.cli("verify");
    expect(verify.code).toBe(0);
  }, 120_000);
});
