/**
 * Hot reload of `[broker]` and `[http]` keys against the real gateway process: auth and
 * ACL keys are applied live (sessions that no longer pass are closed), keys that only a
 * restart applies make the reload fail with "needs restart: …" instead of claiming success.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { TestFleet, cleanupAll, publishQos1, waitFor, within } from "./helpers/gateway.ts";
import { closed, connackCode, deviceCli } from "./helpers/devices.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

afterAll(() => cleanupAll(), 60_000);

const fleetInfo = async (f: TestFleet) =>
  (await (await f.fetch("/api/fleet")).json()) as { spec_version: string; spec_error: string | null };

describe("reloading [broker] and [http]", () => {
  test("allow_anonymous = false applies at once: anonymous sessions are closed and refused, devices stay", async () => {
    const toml = (anonymous: boolean) =>
      fleetHeader("e2e-reload-auth", { broker: `allow_anonymous = ${anonymous}\ndevices = "devices.toml"` }) +
      counterType("counter", "sensors/+/c");
    const fleet = new TestFleet(toml(true));
    const added = await deviceCli(fleet, "add", "boiler-1", "--publish", "sensors/%u/#", "--json");
    expect(added.code).toBe(0);
    const secret = (added.json as { secret: string }).secret;
    await fleet.start();
    const port = fleet.mqttPort;
    const device = await fleet.mqtt({ clientId: "boiler-1", username: "boiler-1", password: secret });
    const anonymous = await fleet.mqtt({ clientId: "anon-1" });
    const anonymousClosed = closed(anonymous);
    let deviceOpen = true;
    device.once("close", () => (deviceOpen = false));

    writeFileSync(fleet.configPath, toml(false));
    await within(anonymousClosed, 15_000, "the anonymous session to be closed by the reload");
    expect(await connackCode(port, { clientId: "anon-2" })).toBe(5);
    await publishQos1(device, "sensors/boiler-1/c", { id: "after-reload" });
    expect(deviceOpen).toBe(true);
    const info = await fleetInfo(fleet);
    expect(info.spec_error).toBeNull();
    expect(readFileSync(fleet.logPath, "utf8")).toContain("broker auth applied live, 1 session(s) closed");

    // Back to anonymous: allowed again without a restart.
    writeFileSync(fleet.configPath, toml(true));
    await waitFor(
      async () => (await connackCode(port, { clientId: "anon-3" })) === 0,
      15_000,
      "anonymous allowed again",
    );
    expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("a listener key is not applied live: the reload fails with needs restart and the spec stays", async () => {
    const base = fleetHeader("e2e-reload-restart") + counterType("counter", "sensors/+/c");
    const fleet = new TestFleet(base);
    await fleet.start();
    const before = await fleetInfo(fleet);
    writeFileSync(
      fleet.configPath,
      base.replace('[broker]\nhost = "127.0.0.1"', '[broker]\nhost = "127.0.0.1"\nmax_packet_bytes = 1000'),
    );
    const after = await waitFor(
      async () => {
        const i = await fleetInfo(fleet);
        return i.spec_error ? i : undefined;
      },
      15_000,
      "the reload error",
    );
    expect(after.spec_error).toContain("needs restart: broker.max_packet_bytes (262144 -> 1000)");
    expect(after.spec_version).toBe(before.spec_version);
    const status = await fleet.cli("status");
    expect(status.json.spec_error).toBe(after.spec_error);
    expect(readFileSync(fleet.logPath, "utf8")).not.toContain("redeployed");
    expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("max_keepalive and connection_messages apply live to new connections; connected clients stay", async () => {
    const base = fleetHeader("e2e-reload-keepalive") + counterType("counter", "sensors/+/c");
    const fleet = new TestFleet(base);
    await fleet.start();
    const port = fleet.mqttPort;
    const seldom = await fleet.mqtt({ clientId: "seldom", keepalive: 600 });
    writeFileSync(
      fleet.configPath,
      base.replace(
        '[broker]\nhost = "127.0.0.1"',
        '[broker]\nhost = "127.0.0.1"\nmax_keepalive = 120\nconnection_messages = true',
      ),
    );
    await waitFor(
      async () => (await connackCode(port, { clientId: "seldom-2", keepalive: 600 })) === 2,
      15_000,
      "a keep alive of 600 s refused (CONNACK 2)",
    );
    expect(await connackCode(port, { clientId: "never", keepalive: 0 })).toBe(2);
    expect(await connackCode(port, { clientId: "often", keepalive: 60 })).toBe(0);
    expect((await fleetInfo(fleet)).spec_error).toBeNull();
    const log = readFileSync(fleet.logPath, "utf8");
    expect(log).toContain("max_keepalive 120 (new connections)");
    expect(log).toContain("connection_messages true");
    // The accepted connect after the reload is logged (with its keep alive); "seldom", made before, is not.
    expect(log).toMatch(/"client":"often".*"keepalive":60.*"msg":"client connected"/);
    expect(log).not.toMatch(/"client":"seldom".*"msg":"client connected"/);
    await publishQos1(seldom, "sensors/a/c", { id: "still-connected" });
    expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("removing a device from the devices file closes its live session, even an idle one", async () => {
    const fleet = new TestFleet(
      fleetHeader("e2e-device-removed", { broker: 'allow_anonymous = false\ndevices = "devices.toml"' }),
    );
    const login = async (id: string) => {
      const added = await deviceCli(fleet, "add", id, "--subscribe", "alerts/%u/#", "--json");
      expect(added.code).toBe(0);
      return { clientId: id, username: id, password: (added.json as { secret: string }).secret };
    };
    const [one, two] = [await login("dev-1"), await login("dev-2")];
    await fleet.start();
    const gone = await fleet.mqtt(one);
    const stays = await fleet.mqtt(two);
    await gone.subscribeAsync("alerts/dev-1/#");
    const goneClosed = closed(gone);
    let staysOpen = true;
    stays.once("close", () => (staysOpen = false));

    expect((await deviceCli(fleet, "remove", "dev-1")).code).toBe(0);
    await within(goneClosed, 15_000, "the removed device's session to be closed");
    expect(await connackCode(fleet.mqttPort, one)).toBe(4);
    expect(staysOpen).toBe(true);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});
