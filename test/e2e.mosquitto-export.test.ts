/**
 * `fleet device export --mosquitto DIR` (issue 12): the devices file becomes a Mosquitto password
 * file (`$7$` PBKDF2-SHA512, as mosquitto_passwd writes it) and ACL file; a real Mosquitto started
 * with them lets each device publish and subscribe where its patterns allow, and nowhere else.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectAsync, type MqttClient } from "mqtt";
import { connackCode, grantedQos } from "./helpers/devices.ts";
import { runCli, waitFor } from "./helpers/gateway.ts";
import { Mosquitto } from "./helpers/mosquitto.ts";

const dirs: string[] = [];
const brokers: Mosquitto[] = [];
const clients: MqttClient[] = [];
afterAll(async () => {
  for (const c of clients) c.end(true);
  for (const b of brokers) await b.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const GW_PW = "gateway-password-for-tests";

/** A fleet.toml in external mode naming a devices file, in a temp dir. */
function fleetDir(): { dir: string; config: string; out: string; devices: string } {
  const dir = mkdtempSync(join(tmpdir(), "fleet-export-"));
  dirs.push(dir);
  const config = join(dir, "fleet.toml");
  writeFileSync(
    config,
    [
      "[fleet]",
      'name = "export"',
      "[broker]",
      'url = "mqtt://127.0.0.1:1883"',
      'username = "fleet-gw"',
      'password_env = "FLEET_TEST_GW_PW"',
      'devices = "devices.toml"',
      "",
    ].join("\n"),
  );
  return { dir, config, out: join(dir, "mosquitto"), devices: join(dir, "devices.toml") };
}

const device = (config: string, ...args: string[]) =>
  runCli(["device", ...args, "--config", config], { env: { FLEET_TEST_GW_PW: GW_PW } });

async function add(config: string, id: string, ...flags: string[]): Promise<string> {
  const r = await device(config, "add", id, ...flags, "--json");
  expect(r.code).toBe(0);
  return (r.json as { secret: string }).secret;
}

async function login(m: Mosquitto, username: string, password: string): Promise<MqttClient> {
  const c = await connectAsync(m.url, { username, password, clientId: username, reconnectPeriod: 0 });
  clients.push(c);
  return c;
}

describe("fleet device export --mosquitto", () => {
  test("Mosquitto started with the exported files lets a device publish and subscribe where allowed only", async () => {
    const f = fleetDir();
    const s1 = await add(
      f.config,
      "dev1",
      "--publish",
      "sensors/%c/#",
      "--publish",
      "fleet/agents/+/%u/inbox",
      "--subscribe",
      "alerts/%u/#",
    );
    await add(f.config, "dev2", "--publish", "sensors/%c/#");
    const r = await device(f.config, "export", "--mosquitto", f.out);
    expect(r.code).toBe(0);
    const passwd = readFileSync(join(f.out, "passwd"), "utf8");
    // mosquitto_passwd's format: user:$7$<iterations>$<12-byte salt>$<64-byte PBKDF2-SHA512>, base64.
    expect(
      passwd
        .trim()
        .split("\n")
        .map((l) => l.split(":")[0]),
    ).toEqual(["fleet-gw", "dev1", "dev2"]);
    for (const line of passwd.trim().split("\n"))
      expect(line).toMatch(/^[^:]+:\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==$/);
    expect(readFileSync(join(f.out, "acl"), "utf8")).toContain("user dev1\ntopic write sensors/dev1/#\n");

    const m = await Mosquitto.start({ passwordFile: join(f.out, "passwd"), aclFile: join(f.out, "acl") });
    brokers.push(m);
    expect(await connackCode(m.port, { username: "dev1", password: "wrong", clientId: "dev1" })).toBe(5);
    expect(await connackCode(m.port, { clientId: "anon" })).toBe(5);

    const gw = await login(m, "fleet-gw", GW_PW);
    const seen: string[] = [];
    gw.on("message", (topic) => seen.push(topic));
    await gw.subscribeAsync("#", { qos: 1 });
    const dev1 = await login(m, "dev1", s1);
    for (const topic of ["sensors/dev2/t", "fleet/agents/t/dev1/out", "sensors/dev1/t", "fleet/agents/t/dev1/inbox"])
      await dev1.publishAsync(topic, "1", { qos: 1 });
    // One connection, in order: once the last allowed one arrived, the refused ones were dropped.
    await waitFor(() => seen.includes("fleet/agents/t/dev1/inbox"), 10_000, "the allowed publishes", 20);
    expect(seen).toEqual(["sensors/dev1/t", "fleet/agents/t/dev1/inbox"]);

    // Mosquitto 2.0 grants the SUBSCRIBE and checks read access on each delivery instead.
    expect(await grantedQos(dev1, ["alerts/dev1/#", "alerts/dev2/#"])).toEqual([1, 1]);
    const got = new Promise<string>((resolve) => dev1.once("message", (topic) => resolve(topic)));
    await gw.publishAsync("alerts/dev2/x", "no", { qos: 1 });
    await gw.publishAsync("alerts/dev1/x", "yes", { qos: 1 });
    expect(await got).toBe("alerts/dev1/x");
  });

  test("a pattern reaching the fleet's own topics, or a device without a Mosquitto hash: nothing written", async () => {
    const f = fleetDir();
    await add(f.config, "wide", "--publish", "#");
    const r = await device(f.config, "export", "--mosquitto", f.out);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('device "wide": publish pattern "#" reaches the fleet\'s own topics under fleet/');
    expect(existsSync(f.out)).toBe(false);
    expect((await device(f.config, "remove", "wide")).code).toBe(0);

    // A device added before export existed has only its argon2id hash.
    await add(f.config, "old", "--publish", "sensors/%c/#");
    const text = readFileSync(f.devices, "utf8");
    writeFileSync(f.devices, text.replace(/^mosquitto_secret = .*\n/m, ""));
    const refused = await device(f.config, "export", "--mosquitto", f.out);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("`fleet device rekey old`");
    const rekeyed = await device(f.config, "rekey", "old", "--json");
    expect(rekeyed.code).toBe(0);
    const secret = (rekeyed.json as { secret: string }).secret;
    expect((await device(f.config, "export", "--mosquitto", f.out)).code).toBe(0);
    const m = await Mosquitto.start({ passwordFile: join(f.out, "passwd"), aclFile: join(f.out, "acl") });
    brokers.push(m);
    expect(await connackCode(m.port, { username: "old", password: secret, clientId: "old" })).toBe(0);
    expect(readFileSync(f.devices, "utf8")).toContain('publish = ["sensors/%c/#"]');
  });

  test("export without --mosquitto, or without a devices file, is a usage error", async () => {
    const f = fleetDir();
    expect((await device(f.config, "export")).code).toBe(2);
    writeFileSync(f.config, '[broker]\nurl = "mqtt://127.0.0.1:1883"\n');
    const r = await device(f.config, "export", "--mosquitto", f.out);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("names no devices file");
  });
});
