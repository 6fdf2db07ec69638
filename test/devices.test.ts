/**
 * Device credentials and ACLs, in process: %c/%u substitution, filter coverage, argon2id
 * hashing, devices-file validation, the registry (auth, reload) and the file editor.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, connectAsync } from "mqtt";
import pino from "pino";
import { BrokerBusy, createEmbeddedBroker } from "../broker/index.ts";
import {
  aclAllowsPublish,
  aclAllowsSubscribe,
  aclPatternProblem,
  patternCoversFilter,
  substitute,
} from "../gateway/devices/index.ts";
import { addDevice, listDevices, removeDevice } from "../gateway/devices/index.ts";
import { hashSecret, newSecret, parseArgon2, verifySecret } from "../gateway/devices/index.ts";
import { compileDevices, DeviceRegistry, DevicesError, deviceBrokerHooks } from "../gateway/devices/index.ts";
import { CrlWatch, loadDevices, mosquittoExport } from "../gateway/devices/index.ts";

const dir = mkdtempSync(join(tmpdir(), "fleet-devices-unit-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const enc = (s: string) => new TextEncoder().encode(s);
const who = (clientId: string, username: string) => ({ clientId, username });

describe("ACL patterns", () => {
  test("%c and %u are replaced by the client id and the username", () => {
    expect(substitute("sensors/%c/#", who("c1", "u1"))).toBe("sensors/c1/#");
    expect(substitute("fleet/agents/+/%u/inbox", who("c1", "u1"))).toBe("fleet/agents/+/u1/inbox");
    expect(substitute("a/%u-%c", who("c1", "u1"))).toBe("a/u1-c1");
  });

  test("a client id or username with /, + or # grants nothing instead of widening the pattern", () => {
    for (const bad of ["+", "#", "a/b", "x+", ""]) {
      expect(substitute("sensors/%u/#", who("ok", bad))).toBeNull();
      expect(substitute("sensors/%c/t", who(bad, "ok"))).toBeNull();
    }
    expect(aclAllowsPublish(["sensors/%u/t"], who("c", "+"), "sensors/other/t")).toBe(false);
    expect(aclAllowsPublish(["sensors/%u/t"], who("c", "a/b"), "sensors/a/b/t")).toBe(false);
    expect(aclAllowsSubscribe(["alerts/%u/#"], who("c", "#"), "alerts/#")).toBe(false);
    // A pattern without substitutions is unaffected by the names.
    expect(aclAllowsPublish(["public/t"], who("#", "#"), "public/t")).toBe(true);
  });

  test("publish: the topic must match an expanded pattern", () => {
    const pats = ["sensors/%c/#", "fleet/agents/+/%u/inbox"];
    expect(aclAllowsPublish(pats, who("boiler-1", "boiler-1"), "sensors/boiler-1/temp")).toBe(true);
    expect(aclAllowsPublish(pats, who("boiler-1", "boiler-1"), "sensors/boiler-1")).toBe(true);
    expect(aclAllowsPublish(pats, who("boiler-1", "boiler-1"), "sensors/boiler-2/temp")).toBe(false);
    expect(aclAllowsPublish(pats, who("boiler-1", "boiler-1"), "fleet/agents/t/boiler-1/inbox")).toBe(true);
    expect(aclAllowsPublish(pats, who("boiler-1", "boiler-1"), "fleet/agents/t/boiler-2/inbox")).toBe(false);
    expect(aclAllowsPublish([], who("a", "a"), "anything")).toBe(false);
  });

  test("subscribe: the filter must be covered, wildcard for wildcard", () => {
    expect(patternCoversFilter("alerts/u1/#", "alerts/u1/#")).toBe(true);
    expect(patternCoversFilter("alerts/u1/#", "alerts/u1/+/x")).toBe(true);
    expect(patternCoversFilter("alerts/u1/#", "alerts/u1")).toBe(true);
    expect(patternCoversFilter("alerts/u1/#", "alerts/+/x")).toBe(false);
    expect(patternCoversFilter("alerts/u1/#", "alerts/#")).toBe(false);
    expect(patternCoversFilter("alerts/u1/#", "#")).toBe(false);
    expect(patternCoversFilter("a/+/out", "a/x/out")).toBe(true);
    expect(patternCoversFilter("a/+/out", "a/+/out")).toBe(true);
    expect(patternCoversFilter("a/+/out", "a/#")).toBe(false);
    expect(patternCoversFilter("a/+/out", "a/x/out/more")).toBe(false);
    expect(patternCoversFilter("a/x/out", "a/+/out")).toBe(false);
    expect(patternCoversFilter("#", "$SYS/x")).toBe(false);
  });

  test("invalid patterns are named", () => {
    expect(aclPatternProblem("a/#/b")).toContain("# must be");
    expect(aclPatternProblem("a/b+")).toContain("+ must be");
    expect(aclPatternProblem("$SYS/#")).toContain("$");
    expect(aclPatternProblem("a/%x")).toContain("%x");
    expect(aclPatternProblem("")).toContain("empty");
    expect(aclPatternProblem("fleet/agents/+/%u/inbox")).toBeNull();
  });

  test("a subscribe pattern may name the $SYS/broker/ tree; no other $ topic, and never to publish", () => {
    expect(aclPatternProblem("$SYS/broker/#", "subscribe")).toBeNull();
    expect(aclPatternProblem("$SYS/broker/clients/+", "subscribe")).toBeNull();
    expect(aclPatternProblem("$SYS/#", "subscribe")).toContain("other than $SYS/broker/");
    expect(aclPatternProblem("$fleet/dropped", "subscribe")).toContain("other than $SYS/broker/");
    expect(aclPatternProblem("$SYS/broker/#", "publish")).toContain("must not start with $");
    // A grant of the tree does not reach aedes' own events beside it.
    expect(patternCoversFilter("$SYS/broker/#", "$SYS/#")).toBe(false);
    expect(patternCoversFilter("$SYS/broker/#", "$SYS/broker/uptime")).toBe(true);
  });
});

describe("secrets", () => {
  test("a secret is 32 random bytes in base64url and differs every time", () => {
    const a = newSecret();
    expect(a).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(newSecret()).not.toBe(a);
  });

  test("argon2id hash with a random salt verifies the secret and nothing else", async () => {
    const secret = newSecret();
    const h1 = await hashSecret(secret);
    const h2 = await hashSecret(secret);
    expect(h1).toStartWith("$argon2id$v=19$m=19456,t=2,p=1$");
    expect(h1).not.toContain(secret);
    expect(h1).not.toBe(h2); // salted
    const parsed = parseArgon2(h1);
    if (!parsed.ok) throw new Error(parsed.problem);
    expect(await verifySecret(secret, parsed.value)).toBe(true);
    expect(await verifySecret(enc(secret), parsed.value)).toBe(true);
    expect(await verifySecret(`${secret}x`, parsed.value)).toBe(false);
    expect(await verifySecret("", parsed.value)).toBe(false);
  }, 30_000);

  test("malformed hashes are refused with a reason", () => {
    expect(parseArgon2("plaintext").ok).toBe(false);
    expect(parseArgon2("$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA").ok).toBe(false);
    const huge = parseArgon2("$argon2id$v=19$m=99999999,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA");
    expect(huge.ok ? "" : huge.problem).toContain("memorySize");
  });
});

describe("devices file", () => {
  const hash = hashSecret("s3cret-value");

  test("defaults are added to every device's ACL and client id defaults to the device id", async () => {
    const cfg = compileDevices(
      `[defaults]\npublish = ["fleet/agents/+/%u/inbox"]\n` +
        `[devices.a]\nsecret = ${JSON.stringify(await hash)}\npublish = ["sensors/%u/#"]\n` +
        `[devices.b]\nsecret = ${JSON.stringify(await hash)}\nclient_id = "b-client"\n`,
      "devices.toml",
    );
    expect(cfg.devices.get("a")?.acl.publish).toEqual(["fleet/agents/+/%u/inbox", "sensors/%u/#"]);
    expect(cfg.devices.get("a")?.clientId).toBe("a");
    expect(cfg.byClientId.get("b-client")?.id).toBe("b");
  }, 30_000);

  test("errors name the file and the key path, or line and column", async () => {
    const h = JSON.stringify(await hash);
    const cases: [string, string][] = [
      [`[devices.a]\nsecret = ${h}\npublish = ["a/#/b"]\n`, "devices.a.publish[0] is not a valid ACL pattern"],
      [`[devices.a]\npublish = []\n`, "devices.a.secret is required"],
      [`[devices.a]\nsecret = "hunter2"\n`, "devices.a.secret must be an argon2id hash"],
      [`[devices.a]\nsecret = ${h}\npassword = "x"\n`, "devices.a.password is not a known key"],
      [`[devices."a/b"]\nsecret = ${h}\n`, "must be a device id"],
      [
        `[devices.a]\nsecret = ${h}\n[devices.b]\nsecret = ${h}\nclient_id = "a"\n`,
        'devices.b.client_id "a" is already the client id of device "a"',
      ],
      [`[other]\n`, "other is not a known key"],
      [`[devices.a]\nsecret = ${h}\npublish = ["$SYS/broker/x"]\n`, "devices.a.publish[0] is not a valid ACL pattern"],
      [`[devices.a]\nsecret = ${h}\nsubscribe = ["$SYS/#"]\n`, "other than $SYS/broker/"],
    ];
    for (const [text, message] of cases) {
      let err: unknown = null;
      try {
        compileDevices(text, "/etc/fleet/devices.toml");
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(DevicesError);
      expect((err as Error).message).toMatch(/^\/etc\/fleet\/devices\.toml:\d+:\d+: /);
      expect((err as Error).message).toContain(message);
    }
    try {
      compileDevices(`[devices.a]\nsecret = \n`, "d.toml");
      throw new Error("no error");
    } catch (e) {
      expect(e).toBeInstanceOf(DevicesError);
      expect((e as DevicesError).line).toBe(2);
      expect((e as Error).message).toStartWith("d.toml:2:");
    }
  }, 30_000);
});

/** An embedded broker on a free port whose logins and ACLs are `registry`'s (more options over the defaults). */
async function deviceBroker(
  registry: DeviceRegistry,
  more: Partial<Parameters<typeof createEmbeddedBroker>[0]> = {},
): Promise<ReturnType<typeof createEmbeddedBroker>> {
  return loginBroker({ ...more, ...deviceBrokerHooks(registry) });
}

/** An embedded broker on a free port that wants logins, with `more` on top, started. */
async function loginBroker(
  more: Partial<Parameters<typeof createEmbeddedBroker>[0]>,
): Promise<ReturnType<typeof createEmbeddedBroker>> {
  const broker = createEmbeddedBroker({
    host: "127.0.0.1",
    port: 0,
    maxPacketBytes: 65536,
    allowAnonymous: false,
    intake: async () => ({ ok: true }),
    logger: pino({ level: "silent" }),
    ...more,
  });
  await broker.start();
  return broker;
}

describe("device registry", () => {
  test("authenticates by device id + secret on the device's own client id, and reloads on edit", async () => {
    const file = join(dir, "reg.toml");
    const a = await addDevice(file, "dev-a", { publish: ["sensors/%u/#"], subscribe: ["alerts/%u/#"] });
    const reg = new DeviceRegistry(file);
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret))).toBe(true);
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret))).toBe(true); // cached path
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc("wrong"))).toBe(false);
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, null)).toBe(false);
    expect(await reg.authenticate({ id: "other", username: "dev-a" }, enc(a.secret))).toBe(false);
    expect(await reg.authenticate({ id: "x", username: "nobody" }, enc(a.secret))).toBe(false);
    // anonymous on a device's client id
    expect(await reg.authenticate({ id: "dev-a", username: null }, null)).toBe(false);
    expect(await reg.authenticate({ id: "someone", username: null }, null)).toBe(true);

    expect(reg.mayPublish({ id: "dev-a", username: "dev-a" }, "sensors/dev-a/t")).toBe(true);
    expect(reg.mayPublish({ id: "dev-a", username: "dev-a" }, "sensors/dev-b/t")).toBe(false);
    expect(reg.maySubscribe({ id: "dev-a", username: "dev-a" }, "alerts/dev-a/#")).toBe(true);
    expect(reg.maySubscribe({ id: "dev-a", username: "dev-a" }, "alerts/#")).toBe(false);
    expect(reg.mayPublish({ id: "anon", username: null }, "anything/at/all")).toBe(true);

    const b = await addDevice(file, "dev-b");
    expect(await reg.authenticate({ id: "dev-b", username: "dev-b" }, enc(b.secret))).toBe(true);
    // An invalid edit keeps the devices that were loaded.
    writeFileSync(file, `${readFileSync(file, "utf8")}\n[broken\n`);
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret))).toBe(true);
  }, 30_000);

  test("every refused login costs one verification: unknown id, wrong secret, wrong client id", async () => {
    const file = join(dir, "timing.toml");
    const a = await addDevice(file, "dev-a");
    let verifications = 0;
    const reg = new DeviceRegistry(file, {
      verify: (secret, hash) => {
        verifications++;
        return verifySecret(secret, hash);
      },
    });
    const cost = async (clientId: string, username: string, secret: string) => {
      verifications = 0;
      expect(await reg.authenticate({ id: clientId, username }, enc(secret))).toBe(false);
      return verifications;
    };
    expect(await cost("probe", "nobody", "wrong")).toBe(1);
    expect(await cost("dev-a", "dev-a", "wrong")).toBe(1);
    expect(await cost("probe", "dev-a", "wrong")).toBe(1);
    expect(await cost("probe", "dev-a", a.secret)).toBe(1);
  }, 30_000);

  test("logins are verified off the gateway's thread: timers keep firing while bad logins are hashed", async () => {
    const file = join(dir, "off-thread.toml");
    const a = await addDevice(file, "dev-a");
    const reg = new DeviceRegistry(file);
    expect(await reg.authenticate({ id: "x", username: "nobody" }, enc("warm-up"))).toBe(false); // makes the dummy
    let worst = 0;
    let last = performance.now();
    const timer = setInterval(() => {
      const t = performance.now();
      worst = Math.max(worst, t - last);
      last = t;
    }, 5);
    const started = performance.now();
    const guesses = [1, 2, 3, 4].map((i) => reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(`guess-${i}`)));
    expect(await Promise.all(guesses)).toEqual([false, false, false, false]);
    clearInterval(timer);
    const took = performance.now() - started;
    // On the gateway's thread the four hashes ran back to back: the longest gap was most of `took`.
    expect(worst).toBeLessThan(took / 3);
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret))).toBe(true);
  }, 30_000);

  test("$SYS/broker/ is read by the devices the file grants it to, and by anonymous clients", async () => {
    const file = join(dir, "sys.toml");
    const ops = await addDevice(file, "ops-panel", { subscribe: ["$SYS/broker/#"] });
    const plain = await addDevice(file, "dev-b", { subscribe: ["alerts/#"] });
    const broker = await deviceBroker(new DeviceRegistry(file), { allowAnonymous: true, sysIntervalMs: 50 });
    try {
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const granted = async (opts: { clientId: string; username?: string; password?: string }) => {
        const c = await connectAsync(url, { ...opts, reconnectPeriod: 0 });
        const got = new Promise<string>((resolve) => c.once("message", (_t, p) => resolve(p.toString())));
        const qos = await c.subscribeAsync("$SYS/broker/uptime", { qos: 0 }).then(
          (g) => g[0]?.qos,
          (e: { packet?: { granted?: number[] } }) => e.packet?.granted?.[0],
        );
        const uptime = qos === 0 ? await got : null;
        await c.endAsync();
        return { qos, uptime };
      };
      const seen = await granted({ clientId: "ops-panel", username: "ops-panel", password: ops.secret });
      expect(seen.qos).toBe(0);
      expect(seen.uptime).toMatch(/^\d+ seconds$/);
      expect((await granted({ clientId: "dev-b", username: "dev-b", password: plain.secret })).qos).toBe(128);
      expect((await granted({ clientId: "visitor" })).qos).toBe(0);
    } finally {
      await broker.close();
    }
  }, 30_000);

  test("with anonymous clients allowed, an anonymous client cannot take a device's client id", async () => {
    const file = join(dir, "anon.toml");
    const a = await addDevice(file, "dev-a", { publish: ["sensors/%u/#"] });
    const broker = await deviceBroker(new DeviceRegistry(file), { allowAnonymous: true });
    try {
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const refused = await connectAsync(url, { clientId: "dev-a", reconnectPeriod: 0 }).then(
        (c) => {
          c.end(true);
          return null;
        },
        (e: { code?: number }) => e.code,
      );
      expect(refused).toBe(5);
      const anon = await connectAsync(url, { clientId: "visitor", reconnectPeriod: 0 });
      await anon.publishAsync("sensors/dev-a/t", "1", { qos: 1 }); // anonymous: built-in rules only
      await anon.endAsync();
      const dev = await connectAsync(url, {
        clientId: "dev-a",
        username: "dev-a",
        password: a.secret,
        reconnectPeriod: 0,
      });
      await dev.endAsync();
      const unknown = await connectAsync(url, { clientId: "z", username: "z", password: "z", reconnectPeriod: 0 }).then(
        (c) => {
          c.end(true);
          return null;
        },
        (e: { code?: number }) => e.code,
      );
      expect(unknown).toBe(4);
    } finally {
      await broker.close();
    }
  }, 30_000);
});

/**
 * A registry whose verifications wait until the test ends them: `calls` lists the secrets in the order
 * the hashing thread would have taken them, and `finish(ok)` ends the one running.
 */
async function heldRegistry(name: string, loginsWaitingPerLane?: number) {
  const file = join(dir, `${name}.toml`);
  const a = await addDevice(file, "dev-a");
  const b = await addDevice(file, "dev-b");
  const calls: string[] = [];
  const running: Array<(ok: boolean) => void> = [];
  const reg = new DeviceRegistry(file, {
    loginsWaitingPerLane,
    verify: (secret) => {
      calls.push(new TextDecoder().decode(secret));
      return new Promise<boolean>((resolve) => running.push(resolve));
    },
  });
  const settled = async () => {
    for (let i = 0; i < 5; i++) await Bun.sleep(0);
  };
  const finish = async (ok: boolean) => {
    await settled();
    expect(running.length).toBe(1); // one verification at a time
    running.shift()?.(ok);
    await settled();
  };
  return { reg, file, a, b, calls, finish, settled };
}

describe("logins wait their device's turn", () => {
  test("a device's login is checked after at most one guess per other user name, not after all of them", async () => {
    const { reg, a, calls, finish, settled } = await heldRegistry("turns");
    const login = (id: string, username: string, secret: string) => reg.authenticate({ id, username }, enc(secret));
    const guesses = [1, 2, 3, 4, 5].map((i) => login("x", `nobody${i}`, `g${i}`));
    await settled();
    const wrong = [1, 2, 3].map((i) => login("dev-b", "dev-b", `w${i}`));
    await settled();
    const device = login("dev-a", "dev-a", a.secret);
    await finish(false); // g1, the first asked
    await finish(false); // g2: the unknown user names' lane had the next turn when g1 ended
    await finish(false); // w1
    expect(calls).toEqual(["g1", "g2", "w1", a.secret]); // dev-a next: not behind g3..g5, w2 and w3
    await finish(true);
    expect(await device).toBe(true);
    while (calls.length < 9) await finish(false);
    await finish(false);
    expect(await Promise.all([...guesses, ...wrong])).toEqual(Array(8).fill(false));
    // The lanes were served in turn to the end.
    expect(calls.slice(4)).toEqual(["g3", "w2", "g4", "w3", "g5"]);
  }, 30_000);

  test("the same secret asked again while its check waits joins it: one verification", async () => {
    const { reg, a, calls, finish } = await heldRegistry("joined");
    const logins = [1, 2, 3].map(() => reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret)));
    const guesses = [1, 2].map(() => reg.authenticate({ id: "x", username: "nobody" }, enc("same")));
    await finish(true);
    await finish(false);
    expect(await Promise.all(logins)).toEqual([true, true, true]);
    expect(await Promise.all(guesses)).toEqual([false, false]);
    expect(calls).toEqual([a.secret, "same"]);
    // Once it has settled, a new ask is a new check (here answered from the verified-secret cache).
    expect(await reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret))).toBe(true);
    expect(calls.length).toBe(2);
  }, 30_000);

  test("a full lane refuses at once as busy, unhashed; other devices' logins still go through", async () => {
    const { reg, a, calls, finish, settled } = await heldRegistry("busy", 2);
    const login = (id: string, username: string, secret: string) => reg.authenticate({ id, username }, enc(secret));
    const held = [1, 2, 3].map((i) => login("dev-b", "dev-b", `w${i}`)); // one running, two waiting
    await settled();
    const refused = await login("dev-b", "dev-b", "w4").catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(BrokerBusy);
    expect((refused as Error).message).toBe("2 logins for this user name are waiting to be checked");
    const device = login("dev-a", "dev-a", a.secret);
    await finish(false);
    await finish(false);
    expect(calls).toEqual(["w1", "w2", a.secret]); // w4 was never hashed; dev-a's turn came before w3
    await finish(true);
    expect(await device).toBe(true);
    await finish(false);
    expect(await Promise.all(held)).toEqual([false, false, false]);
  }, 30_000);

  test("a device removed while its login waited is refused, even with the right secret", async () => {
    const { reg, file, a, finish } = await heldRegistry("removed-while-waiting");
    const login = reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret));
    expect(removeDevice(file, "dev-a")).toBe(true);
    await finish(true); // the secret matched the hash the file had when the login came
    expect(await login).toBe(false);
    expect(reg.sessionValid({ id: "dev-a", username: "dev-a" })).toBe(false);
  }, 30_000);

  test("a verification that fails rejects its own login only; the next one runs", async () => {
    const file = join(dir, "throws.toml");
    const a = await addDevice(file, "dev-a");
    let first = true;
    const reg = new DeviceRegistry(file, {
      verify: (secret, hash) => {
        if (first) {
          first = false;
          throw new Error("argon2 thread failed");
        }
        return verifySecret(secret, hash);
      },
    });
    const failed = reg.authenticate({ id: "dev-a", username: "dev-a" }, enc("guess"));
    const next = reg.authenticate({ id: "dev-a", username: "dev-a" }, enc(a.secret));
    expect(await failed.catch((e: Error) => e.message)).toBe("argon2 thread failed");
    expect(await next).toBe(true);
  }, 30_000);

  test("on the broker, a busy refusal is CONNACK 3 (server unavailable), which a device retries", async () => {
    const { reg, a, finish, settled } = await heldRegistry("busy-broker", 1);
    const broker = await deviceBroker(reg);
    try {
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const code = (p: Promise<{ end(force: boolean): unknown }>) =>
        p.then(
          (c) => {
            c.end(true);
            return 0;
          },
          (e: { code?: number }) => e.code,
        );
      const connect = (password: string) =>
        connectAsync(url, { clientId: "dev-a", username: "dev-a", password, reconnectPeriod: 0 });
      const running = code(connect("w1"));
      const waiting = code(connect("w2"));
      while (reg.loginsWaiting < 1) await settled();
      expect(await code(connect("w3"))).toBe(3);
      await finish(false);
      await finish(false);
      expect(await Promise.all([running, waiting])).toEqual([4, 4]);
      const ok = code(connect(a.secret));
      await finish(true);
      expect(await ok).toBe(0);
      expect(broker.stats()).toMatchObject({ loginsBusy: 1, loginsRefused: 2 });
    } finally {
      await broker.close();
    }
  }, 30_000);

  test("a login whose every asker hung up while it waited is refused unhashed; one still there keeps it", async () => {
    const { reg, a, calls, finish, settled } = await heldRegistry("gone");
    let hungUp = false;
    const gone = () => hungUp;
    const login = (username: string, secret: string, left?: () => boolean) =>
      reg.authenticate({ id: username, username, gone: left }, enc(secret));
    const running = login("dev-b", "w1");
    await settled();
    const abandoned = [login("dev-b", "w2", gone), login("nobody", "g1", gone)];
    const joined = [login("dev-a", a.secret, gone), login("dev-a", a.secret, () => false)];
    await settled();
    hungUp = true;
    await finish(false); // w1
    expect(calls).toEqual(["w1", a.secret]); // w2 and g1 skipped; dev-a's check has an asker still there
    await finish(true);
    expect(await Promise.all([running, ...abandoned, ...joined])).toEqual([false, false, false, true, true]);
  }, 30_000);

  test("a flood from one address at a device's id keeps the device's own login neither out nor behind it", async () => {
    const { reg, b, calls, finish, settled } = await heldRegistry("sources", 2);
    const login = (host: string, secret: string) =>
      reg.authenticate({ id: "dev-b", username: "dev-b", host }, enc(secret));
    const running = login("10.0.0.9", "w0");
    await settled();
    const flood = [login("10.0.0.9", "w1"), login("10.0.0.9", "w2")]; // the lane's two places
    await settled();
    const refused = await login("10.0.0.9", "w3").catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(BrokerBusy); // full, and this address holds every place
    // From another address: the flood's newest check gives its place up.
    const device = login("10.0.0.5", b.secret);
    expect(await flood[1]!.catch((e: unknown) => e)).toBeInstanceOf(BrokerBusy);
    await finish(false); // w0
    // 10.0.0.9 had the last turn in this lane: the device's check goes before w1.
    expect(calls).toEqual(["w0", b.secret]);
    await finish(true);
    expect(await device).toBe(true);
    await finish(false);
    expect(await Promise.all([running, flood[0]])).toEqual([false, false]);
    expect(calls).toEqual(["w0", b.secret, "w1"]);
  }, 30_000);

  test("on the broker, the login hook is told the connection's peer address", async () => {
    const hosts: (string | undefined)[] = [];
    const broker = await loginBroker({
      authenticate: async (info) => {
        hosts.push(info.host);
        return true;
      },
    });
    try {
      const c = await connectAsync(`mqtt://127.0.0.1:${broker.port}`, { username: "u", password: "p" });
      await c.endAsync();
      expect(hosts).toEqual(["127.0.0.1"]);
    } finally {
      await broker.close();
    }
  }, 30_000);

  test("on the broker, a client that sends CONNECT and hangs up costs no hash", async () => {
    const { reg, calls, finish, settled } = await heldRegistry("gone-broker");
    const broker = await deviceBroker(reg);
    try {
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const held = connectAsync(url, { clientId: "dev-a", username: "dev-a", password: "w1", reconnectPeriod: 0 });
      held.catch(() => undefined);
      while (calls.length < 1) await settled();
      for (let i = 0; i < 3; i++) {
        const quitter = connect(url, {
          clientId: `q${i}`,
          username: `nobody${i}`,
          password: `g${i}`,
          reconnectPeriod: 0,
        });
        quitter.on("error", () => undefined);
        while (reg.loginsWaiting < i + 1) await settled();
        quitter.end(true);
      }
      // aedes marks each client closed once its socket's end arrives.
      await Bun.sleep(200);
      await finish(false);
      expect(await held.catch((e: { code?: number }) => e.code)).toBe(4);
      await settled();
      expect(reg.loginsWaiting).toBe(0);
      expect(calls).toEqual(["w1"]);
    } finally {
      await broker.close();
    }
  }, 30_000);
});

/** aedes inside an embedded broker: to run its will sweep's own call, `authorizePublish(null, will)`. */
type AedesWills = {
  authorizePublish(client: null, packet: Record<string, unknown>, cb: (err?: Error | null) => void): void;
  persistence: { getWill(client: { id: string }): Promise<Record<string, unknown> | undefined> };
};

describe("wills", () => {
  test("a will swept after a crash (no client) is judged as the device that set it", async () => {
    const file = join(dir, "wills.toml");
    const a = await addDevice(file, "dev-a", { publish: ["sensors/%u/#"] });
    await addDevice(file, "dev-b", { publish: ["sensors/%u/#"] });
    const registry = new DeviceRegistry(file);
    const intakes: { topic: string; username: string | null }[] = [];
    const broker = await deviceBroker(registry, {
      intake: async (msg, client) => {
        intakes.push({ topic: msg.topic, username: client.username });
        return { ok: true };
      },
      persistence: { kind: "libsql", path: join(dir, "wills.db"), synchronous: "full", maxOfflineMessages: 100 },
    });
    const aedes = (broker as unknown as { aedes: AedesWills }).aedes;
    const sweep = (will: Record<string, unknown>) =>
      new Promise<string>((resolve, reject) =>
        aedes.authorizePublish(null, { ...will }, (err) => (err ? reject(err) : resolve(String(will.topic)))),
      ).then(() => intakes.splice(0));
    try {
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const willOf = async (topic: string) => {
        const c = await connectAsync(url, {
          clientId: "dev-a",
          username: "dev-a",
          password: a.secret,
          reconnectPeriod: 0,
          will: { topic, payload: Buffer.from("gone"), qos: 1, retain: false },
        });
        const will = await aedes.persistence.getWill({ id: "dev-a" });
        c.end(true);
        return will!;
      };
      const foreign = await willOf("sensors/dev-b/temp");
      const own = await willOf("sensors/dev-a/status");
      expect(await sweep(foreign)).toEqual([]); // outside dev-a's ACL: dropped, no intake
      expect(await sweep(own)).toEqual([{ topic: "sensors/dev-a/status", username: "dev-a" }]);
      // A will stored without a user name (by older code) is anonymous: refused, anonymous clients are not allowed.
      const { fleetUsername: _, ...unstamped } = own;
      expect(await sweep(unstamped)).toEqual([]);
      removeDevice(file, "dev-a");
      registry.refresh(true);
      expect(await sweep(own)).toEqual([]); // a removed device's will
    } finally {
      await broker.close();
    }
  }, 30_000);
});

describe("revoked subscribe rights", () => {
  for (const kind of ["memory", "libsql"] as const)
    test(`${kind}: a queue is not delivered once the right is revoked, nor once it is back`, async () => {
      const file = join(dir, `revoke-${kind}.toml`);
      const a = await addDevice(file, "dev-a", { subscribe: ["alerts/%u/#"] });
      const registry = new DeviceRegistry(file);
      const broker = await deviceBroker(registry, {
        persistence:
          kind === "memory"
            ? { kind, maxOfflineMessages: 100 }
            : { kind, path: join(dir, "revoke.db"), synchronous: "full", maxOfflineMessages: 100 },
      });
      const url = `mqtt://127.0.0.1:${broker.port}`;
      const opts = { clientId: "dev-a", username: "dev-a", password: a.secret, clean: false, reconnectPeriod: 0 };
      /** Reconnect the clean = false session and collect what it gets for a while. */
      const reconnect = async (): Promise<string[]> => {
        const got: string[] = [];
        const c = await connectAsync(url, opts);
        c.on("message", (topic) => got.push(topic));
        await new Promise((r) => setTimeout(r, 500));
        await c.endAsync();
        return got;
      };
      try {
        const c = await connectAsync(url, opts);
        await c.subscribeAsync("alerts/dev-a/#", { qos: 1 });
        await c.endAsync();
        await broker.publish("alerts/dev-a/1", "queued while allowed", { qos: 1 });
        expect(await reconnect()).toEqual(["alerts/dev-a/1"]);
        writeFileSync(file, readFileSync(file, "utf8").replace('subscribe = ["alerts/%u/#"]', "subscribe = []"));
        registry.refresh(true);
        await broker.publish("alerts/dev-a/2", "queued after the revocation", { qos: 1 });
        expect(await reconnect()).toEqual([]);
        // The session came back without the revoked subscription: messages published now are not queued
        // for it, and granting the right again does not bring them (nor the subscription) back.
        await broker.publish("alerts/dev-a/3", "published while revoked", { qos: 1 });
        writeFileSync(file, readFileSync(file, "utf8").replace("subscribe = []", 'subscribe = ["alerts/%u/#"]'));
        registry.refresh(true);
        expect(await reconnect()).toEqual([]);
        await broker.publish("alerts/dev-a/4", "published with the right back, no subscription", { qos: 1 });
        expect(await reconnect()).toEqual([]);
      } finally {
        await broker.close();
      }
    }, 30_000);
});

describe("Mosquitto export", () => {
  test("a device id with ':' is refused by name: Mosquitto's password file cannot hold it", async () => {
    const file = join(dir, "colon.toml");
    await addDevice(file, "dev:1");
    await addDevice(file, "dev-2");
    const r = mosquittoExport(loadDevices(file), null, new Date());
    expect(r.ok).toBe(false);
    expect(r.ok ? [] : r.problems).toEqual([
      "device \"dev:1\": a Mosquitto user name cannot contain ':' (register it under another id)",
    ]);
  }, 30_000);

  test("a pattern with a space at either end is refused by name: Mosquitto trims it into another topic", async () => {
    // Mosquitto reads `topic write  lead/x` as lead/x, and `topic read  ` (a pattern of one space) as read
    // and write access to the topic "read": the exported ACL would grant what the devices file does not.
    const file = join(dir, "spaces.toml");
    await addDevice(file, "dev-s", { publish: [" lead/x", "trail/x "], subscribe: [" "] });
    const r = mosquittoExport(loadDevices(file), null, new Date());
    const trims = (p: string) =>
      `device "dev-s": pattern ${JSON.stringify(p)} starts or ends with a space, which Mosquitto's ACL file ` +
      "trims (the line would grant another topic); remove the space";
    expect(r.ok ? [] : r.problems).toEqual([trims(" lead/x"), trims("trail/x "), trims(" ")]);
    // Spaces inside a pattern stay as they are on both brokers.
    const inside = join(dir, "spaces-inside.toml");
    await addDevice(inside, "dev-i", { publish: ["in  side/x"], subscribe: ["a b/+"] });
    const ok = mosquittoExport(loadDevices(inside), null, new Date());
    expect(ok.ok ? ok.acl : "").toContain("user dev-i\ntopic write in  side/x\ntopic read a b/+\n");
  }, 30_000);
});

describe("device file editing", () => {
  test("add stores only a hash, keeps comments, and remove takes out exactly one device", async () => {
    const file = join(dir, "edit.toml");
    writeFileSync(file, '# my devices\n[defaults]\nsubscribe = ["public/#"]\n');
    const a = await addDevice(file, "boiler.1", { publish: ["sensors/%c/#"], clientId: "b1" });
    const b = await addDevice(file, "boiler-2");
    const text = readFileSync(file, "utf8");
    expect(text).toStartWith("# my devices\n");
    expect(text).not.toContain(a.secret);
    expect(text).not.toContain(b.secret);
    expect(text).toContain('[devices."boiler.1"]');
    expect(listDevices(file).map((d) => [d.id, d.client_id])).toEqual([
      ["boiler.1", "b1"],
      ["boiler-2", "boiler-2"],
    ]);
    await expect(addDevice(file, "boiler-2")).rejects.toThrow("already exists");
    await expect(addDevice(file, "x", { clientId: "b1" })).rejects.toThrow("already the client id");
    expect(removeDevice(file, "boiler.1")).toBe(true);
    expect(removeDevice(file, "boiler.1")).toBe(false);
    expect(listDevices(file).map((d) => d.id)).toEqual(["boiler-2"]);
    expect(readFileSync(file, "utf8")).toContain('subscribe = ["public/#"]');
  }, 30_000);

  test("a pattern holding DEL or another control still parses once written; a lone surrogate is refused", async () => {
    const file = join(dir, "odd-patterns.toml");
    const odd = ["sensors/%c/\u007f", "sensors/%c/\u0001\t\u0080"];
    await addDevice(file, "odd", { publish: odd });
    expect(loadDevices(file).devices.get("odd")?.acl.publish).toEqual(expect.arrayContaining(odd));
    await expect(addDevice(file, "lone", { publish: ["sensors/\uD800"] })).rejects.toThrow(
      'ACL pattern "sensors/\\ud800": must be valid Unicode (a lone surrogate is not: MQTT topics are UTF-8)',
    );
    expect(listDevices(file).map((d) => d.id)).toEqual(["odd"]);
  }, 30_000);

  test("concurrent add and remove commands in separate processes lose no edit", async () => {
    const file = join(dir, "race.toml");
    for (const v of ["victim-1", "victim-2"]) await addDevice(file, v);
    const lib = join(import.meta.dir, "../gateway/devices/index.ts");
    const run = (code: string) =>
      Bun.spawn(["bun", "-e", `import { addDevice, removeDevice } from ${JSON.stringify(lib)}; ${code}`], {
        stdout: "ignore",
        stderr: "inherit",
      }).exited;
    const codes = await Promise.all([
      ...[1, 2, 3, 4].map((i) => run(`await addDevice(${JSON.stringify(file)}, "race-${i}");`)),
      ...[1, 2].map((i) => run(`if (!removeDevice(${JSON.stringify(file)}, "victim-${i}")) process.exit(3);`)),
    ]);
    expect(codes).toEqual([0, 0, 0, 0, 0, 0]);
    expect(
      listDevices(file)
        .map((d) => d.id)
        .sort(),
    ).toEqual(["race-1", "race-2", "race-3", "race-4"]);
    expect(existsSync(`${file}.lock`)).toBe(false);
  }, 60_000);

  test("a lock left by a command that died is taken over once stale", async () => {
    const file = join(dir, "stale.toml");
    writeFileSync(`${file}.lock`, "999999\n");
    const old = new Date(Date.now() - 60_000);
    utimesSync(`${file}.lock`, old, old);
    await addDevice(file, "d");
    expect(listDevices(file).map((d) => d.id)).toEqual(["d"]);
  }, 30_000);

  test("a new devices file is created readable by its owner only", async () => {
    const file = join(dir, "new.toml");
    await addDevice(file, "d");
    expect(statSync(file).mode & 0o777).toBe(0o600);
  }, 30_000);
});

describe("CrlWatch ([broker] tls_crl)", () => {
  const logged: { level: number; msg: string }[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => void logged.push(JSON.parse(line)) });

  test("applies a changed file once, keeps the lists in force when one is refused or the file is missing", async () => {
    const file = join(dir, "crl.pem");
    writeFileSync(file, "list 1\n");
    const applied: string[] = [];
    const watch = new CrlWatch(
      file,
      "list 1\n",
      async (pem) => {
        if (pem.startsWith("bad")) throw new Error("no CRL in it");
        applied.push(pem);
      },
      log,
      60_000,
    );
    await watch.start();
    expect(applied).toEqual([]); // what the listeners read at start
    writeFileSync(file, "list 2\n");
    await watch.check();
    await watch.check(); // unchanged since: nothing again
    expect(applied).toEqual(["list 2\n"]);
    writeFileSync(file, "bad list\n");
    await watch.check();
    expect(logged.at(-1)?.msg).toBe("tls_crl not applied: the listeners keep the lists they had");
    rmSync(file);
    await watch.check();
    await watch.check();
    expect(logged.filter((l) => l.msg.startsWith("tls_crl unreadable"))).toHaveLength(1);
    // Back with the lists last applied: nothing to do; with new ones: applied.
    writeFileSync(file, "list 2\n");
    await watch.check();
    writeFileSync(file, "list 3, longer\n");
    await watch.check();
    expect(applied).toEqual(["list 2\n", "list 3, longer\n"]);
    watch.stop();
  });
});
