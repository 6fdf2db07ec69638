/**
 * Eclipse Paho's interoperability suites, unmodified (test/vendor/paho.mqtt.testing, a copy of
 * ../shared/vendor/paho.mqtt.testing, see its ORIGIN.md; the shared one is run where it is beside the
 * checkout), run through test/fixtures/paho/run_suite.py: MQTT 3.1.1 against the embedded broker
 * of a real gateway, MQTT 5 against Mosquitto with a gateway attached in external mode. Which
 * tests pass is pinned here; every expected failure is listed, with why, in PAHO_EXPECTED_FAILURES
 * (the same list is in docs/mqtt.md#interoperability).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { mosquittoHash } from "../gateway/devices/index.ts";
import { ROOT, TestFleet, cleanupAll, fixture } from "./helpers/gateway.ts";
import { Mosquitto } from "./helpers/mosquitto.ts";
import { agentType, fleetHeader, q } from "./helpers/toml.ts";

/**
 * The suites: PAHO_INTEROP_DIR, else ../shared/vendor's beside the checkout, else the copy in the repo,
 * so a clone anywhere (CI's) runs them too instead of skipping them.
 */
const SUITES =
  process.env.PAHO_INTEROP_DIR ??
  [resolve(ROOT, "../shared/vendor/paho.mqtt.testing/interoperability")].find((d) => existsSync(d)) ??
  join(ROOT, "test/vendor/paho.mqtt.testing/interoperability");
const RUNNER = join(ROOT, "test/fixtures/paho/run_suite.py");
const COUNTER = fixture("counter");
const brokers: Mosquitto[] = [];
const dirs: string[] = [];
const GW_PW = "paho-gateway-password";

afterAll(async () => {
  await cleanupAll();
  for (const b of brokers) await b.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}, 60_000);

/**
 * Tests that may fail, each with why; every other test of the suite must pass. (Under MQTT 5 the
 * broker is Debian's Mosquitto 2.0.11 with its defaults: these are its behaviours, not the gateway's.)
 */
const PAHO_EXPECTED_FAILURES: Record<"v311" | "v5", Record<string, string>> = {
  v311: {
    test_subscribe_failure:
      "expects SUBACK 0x80 for test/nosubscribe, a filter the broker must be configured to refuse; " +
      "the embedded broker refuses only $ filters and filters outside a device's ACL",
    test_retained_messages:
      "subscribes to +/+ and expects its own 3 retained messages; the gateway's retained fleet/health " +
      "(published every 10 s, not deletable by a device) is a 4th once it is there",
    test_unsubscribe: "runs after test_retained_messages and sees the retained messages that test could not clear",
  },
  v5: {
    test_subscribe_failure: "same: Mosquitto without an ACL grants test/nosubscribe",
    test_server_keep_alive: "Mosquitto sends Server Keep Alive only with max_keepalive configured",
    test_server_topic_alias: "Mosquitto 2.0 does not assign topic aliases to what it sends",
    test_subscribe_identifiers: "Mosquitto delivers one copy per overlapping subscription (allowed, MQTT-3.3.4-3)",
    test_will_delay: "Mosquitto publishes a delayed will up to seconds late (expects 1 s +- 1 s)",
  },
};

/**
 * Not run at all: sends Receive Maximum + 1 QoS 2 messages and reads until the broker
 * disconnects (0x93); Mosquitto 2.0.11 never does, so the suite would hang.
 */
const PAHO_NOT_RUN: Record<string, string> = { test_flow_control2: "hangs on Mosquitto 2.0.11 (no 0x93 DISCONNECT)" };

type Outcome = "pass" | "fail" | "error";

/** One run of a suite: each test's outcome, and what unittest printed (its tracebacks). */
interface SuiteRun {
  readonly outcomes: Record<string, Outcome>;
  readonly output: string;
}

/** Run one suite (or some of its tests) against host:port. */
async function runSuite(file: string, port: number, tests: readonly string[] = []): Promise<SuiteRun> {
  const proc = Bun.spawn(["python3", RUNNER, SUITES, file, "127.0.0.1", String(port), ...tests], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", PYTHONUNBUFFERED: "1" },
  });
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  await proc.exited;
  if (process.env.PAHO_LOG) await Bun.write(`${process.env.PAHO_LOG}.${file}.log`, `${out}\n${err}`);
  const line = out.split("\n").find((l) => l.startsWith("PAHO_RESULT "));
  if (!line) throw new Error(`${file} printed no result (exit ${proc.exitCode}):\n${err.slice(-3000)}`);
  return { outcomes: JSON.parse(line.slice("PAHO_RESULT ".length)) as Record<string, Outcome>, output: err };
}

/** Every test of a suite file, by name. */
async function testNames(file: string): Promise<string[]> {
  const text = await Bun.file(join(SUITES, file)).text();
  return [...text.matchAll(/^\s+def (test\w*)\(self\)/gm)].map((m) => m[1]!).sort();
}

/** Every test ran, and every one not listed passed: the unexpected outcomes (empty when all is as pinned). */
function unexpected(
  names: readonly string[],
  result: Record<string, Outcome>,
  failures: Record<string, string>,
): Record<string, Outcome | "not run"> {
  const out: Record<string, Outcome | "not run"> = {};
  for (const n of names) {
    const o = result[n];
    if (o === undefined) out[n] = "not run";
    else if (o !== "pass" && !(n in failures)) out[n] = o;
  }
  return out;
}

/**
 * Run a suite and hold it to its pinned outcomes: the unexpected ones (empty when all is as pinned).
 * The suites time the broker with fixed sleeps and short waits (a CONNACK within 0.5 s, a message
 * within 1–3 s, a session gone after 6 s), which a loaded build machine sometimes overruns. So a
 * test that comes out unexpected is run once more, on its own, and only an outcome it repeats
 * counts; the tracebacks of both runs go to stderr, so a real failure shows what the suite saw.
 */
async function pinnedSuite(
  file: string,
  port: number,
  names: readonly string[],
  failures: Record<string, string>,
): Promise<{ unexpected: Record<string, Outcome | "not run">; outcomes: Record<string, Outcome> }> {
  const first = await runSuite(file, port, names);
  const odd = Object.keys(unexpected(names, first.outcomes, failures));
  if (odd.length === 0) return { unexpected: {}, outcomes: first.outcomes };
  const again = await runSuite(file, port, odd);
  const outcomes = { ...first.outcomes, ...again.outcomes };
  const still = unexpected(names, outcomes, failures);
  if (Object.keys(still).length > 0) {
    console.error(`${file}: unexpected twice: ${JSON.stringify(still)}\n--- first run ---\n${first.output}`);
    console.error(`--- run again on their own ---\n${again.output}`);
  }
  return { unexpected: still, outcomes };
}

describe("Paho interoperability suites", () => {
  // Both broker persistences: the suite's sessions, redelivery and QoS 2 flows go through each one's queues.
  for (const persistence of ["memory", "libsql"] as const) {
    const name =
      "MQTT 3.1.1 (client_test.py) against the embedded broker of a running gateway, " +
      `persistence = "${persistence}": the unlisted pass`;
    test(name, async () => {
      const header = fleetHeader(`paho-311-${persistence}`, { broker: `persistence = ${q(persistence)}` });
      const fleet = new TestFleet(header + agentType("counter", COUNTER, ["c/+/in"]));
      await fleet.start();
      const names = await testNames("client_test.py");
      const run = await pinnedSuite("client_test.py", fleet.mqttPort, names, PAHO_EXPECTED_FAILURES.v311);
      expect(run.unexpected).toEqual({});
      // The gateway's topic rules make this one fail deterministically.
      expect(run.outcomes.test_subscribe_failure).toBe("fail");
      expect((await fleet.fetch("/readyz")).status).toBe(200);
      await fleet.stop();
    }, 240_000);
  }

  test("MQTT 5 (client_test5.py) against Mosquitto with an external-mode gateway: the unlisted pass", async () => {
    // The suite's anonymous clients may use every topic but the fleet's (its `+/+` would see the
    // gateway's retained fleet/health); the gateway logs in with a user of its own.
    const dir = mkdtempSync(join(tmpdir(), "fleet-paho-"));
    dirs.push(dir);
    writeFileSync(join(dir, "passwd"), `fleet-gw:${mosquittoHash(GW_PW)}\n`, { mode: 0o600 });
    writeFileSync(join(dir, "acl"), "topic readwrite #\ntopic deny fleet/#\n\nuser fleet-gw\ntopic readwrite #\n");
    const mq = await Mosquitto.start({
      passwordFile: join(dir, "passwd"),
      aclFile: join(dir, "acl"),
      extra: ["allow_anonymous true"],
    });
    brokers.push(mq);
    const broker = `url = ${q(mq.url)}\nmqtt_version = "5"\nusername = "fleet-gw"\npassword_env = "FLEET_TEST_GW_PW"`;
    const fleet = new TestFleet(fleetHeader("paho-v5", { broker }) + agentType("counter", COUNTER, ["c/+/in"]), {
      env: { FLEET_TEST_GW_PW: GW_PW },
    });
    await fleet.start();
    const names = (await testNames("client_test5.py")).filter((n) => !(n in PAHO_NOT_RUN));
    const run = await pinnedSuite("client_test5.py", mq.port, names, PAHO_EXPECTED_FAILURES.v5);
    expect(run.unexpected).toEqual({});
    // The gateway kept its session through the suite (whose cleanup wipes retained messages).
    const health = (await (await fleet.fetch("/api/fleet")).json()) as { broker: { external: { connected: boolean } } };
    expect(health.broker.external.connected).toBe(true);
    await fleet.stop();
  }, 600_000);
});
