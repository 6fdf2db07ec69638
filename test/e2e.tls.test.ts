/**
 * TLS at the edges, against the real gateway process: `mqtts` and secure WebSocket
 * listeners with certificate files from fleet.toml, HTTPS for the API, and client
 * certificates when `tls_ca` is set. Certificates are made with `openssl` at test time.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { copyFileSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { connectAsync } from "mqtt";
import type { IClientOptions } from "mqtt";
import { closed, connackCode, deviceCli, publishOutcome } from "./helpers/devices.ts";
import { TestFleet, authed, cleanupAll, publishQos1, waitFor, within } from "./helpers/gateway.ts";
import { clientCertFor, crlFor, makeCerts } from "./helpers/tls.ts";
import { counterType, fleetHeader, q } from "./helpers/toml.ts";

const certs = makeCerts();
afterAll(async () => {
  await cleanupAll();
  rmSync(certs.dir, { recursive: true, force: true });
}, 60_000);

const tlsLines = (extra = "") =>
  `tls_port = 0\nwss_port = 0\ntls_cert = ${q(certs.cert)}\ntls_key = ${q(certs.key)}\n${extra}`;

describe("TLS listeners", () => {
  test("devices publish over mqtts and wss with a verified certificate, and the API answers over HTTPS", async () => {
    const fleet = new TestFleet(
      fleetHeader("e2e-tls", {
        broker: tlsLines(),
        extra: `tls_cert = ${q(certs.cert)}\ntls_key = ${q(certs.key)}`,
      }) + counterType("counter", "tls/+/c"),
    );
    const info = await fleet.start();
    expect(info.https).toBe(true);
    const verified = { ca: certs.caPem, rejectUnauthorized: true, reconnectPeriod: 0, connectTimeout: 5000 };

    const mqtts = await within(
      connectAsync(`mqtts://127.0.0.1:${info.mqtts_port}`, { ...verified, clientId: "over-tls" }),
      10_000,
      "mqtts connect",
    );
    // A busy CI machine can take long over the first TLS session.
    await publishQos1(mqtts, "tls/a/c", { id: "m1" }, 60_000);
    const wss = await within(
      connectAsync(`wss://127.0.0.1:${info.wss_port}`, { ...verified, clientId: "over-wss" }),
      10_000,
      "wss connect",
    );
    await publishQos1(wss, "tls/a/c", { id: "w1" }, 60_000);
    await fleet.waitCommitted("counter/a", 2);

    // Without the CA the server's certificate is refused: it is verified, not just encrypted.
    const unverified = await connectAsync(`mqtts://127.0.0.1:${info.mqtts_port}`, {
      rejectUnauthorized: true,
      reconnectPeriod: 0,
      connectTimeout: 5000,
    }).then(
      (c) => {
        c.end(true);
        return null;
      },
      (e: Error) => e,
    );
    expect(unverified).toBeInstanceOf(Error);

    const res = await fetch(`https://127.0.0.1:${info.http_port}/api/fleet`, {
      ...authed(fleet.token),
      tls: { ca: certs.caPem },
    });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { fleet: string }).fleet).toBe("e2e-tls");
    // The dashboard's session cookie is never sent over plain HTTP.
    const signIn = await fetch(`https://127.0.0.1:${info.http_port}/api/session`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: fleet.token }),
      tls: { ca: certs.caPem },
    });
    expect(signIn.status).toBe(200);
    expect(signIn.headers.get("set-cookie")).toMatch(/; Secure$/);
    const plain = await fetch(`http://127.0.0.1:${info.http_port}/healthz`).then(
      (r) => r.status,
      () => "refused",
    );
    expect(plain).not.toBe(200);
    // The CLI finds the HTTPS API through gateway.json.
    expect((await fleet.cli("status")).json.fleet).toBe("e2e-tls");
    mqtts.end(true);
    wss.end(true);
    expect(await fleet.stop()).toBe(0);
  }, 60_000);

  test("with tls_ca, a device needs a client certificate signed by that CA", async () => {
    const fleet = new TestFleet(fleetHeader("e2e-mtls", { broker: tlsLines(`tls_ca = ${q(certs.ca)}`) }));
    const info = await fleet.start();
    const base = { ca: certs.caPem, rejectUnauthorized: true, reconnectPeriod: 0, connectTimeout: 5000 };
    const without = await connectAsync(`mqtts://127.0.0.1:${info.mqtts_port}`, { ...base, clientId: "no-cert" }).then(
      (c) => {
        c.end(true);
        return null;
      },
      (e: Error) => e,
    );
    expect(without).toBeInstanceOf(Error);
    const withCert = await within(
      connectAsync(`mqtts://127.0.0.1:${info.mqtts_port}`, {
        ...base,
        clientId: "boiler-1",
        cert: readFileSync(certs.clientCert),
        key: readFileSync(certs.clientKey),
      }),
      10_000,
      "mqtts connect with a client certificate",
    );
    await publishQos1(withCert, "anything/x", "1");
    withCert.end(true);
    expect(await fleet.stop()).toBe(0);
  }, 60_000);
});

/** MQTT CONNECT (3.1.1, client id "x") and a WebSocket upgrade: what a device sends first on each listener. */
const CONNECT = Buffer.from([0x10, 13, 0, 4, ...Buffer.from("MQTT"), 4, 2, 0, 60, 0, 1, 0x78]);
const UPGRADE =
  "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
  "Sec-WebSocket-Protocol: mqtt\r\n\r\n";

/**
 * A TLS listener's first answer to a device presenting `client`'s certificate (a CONNACK on mqtts, a 101 on wss),
 * or "" when the connection ends without one: the certificate was refused in the handshake.
 */
const firstAnswer = (
  port: number | undefined,
  listener: "mqtts" | "wss",
  client: { cert: Buffer | string; key: Buffer | string },
) =>
  within(
    new Promise<string>((resolve) => {
      let got = "";
      const s = tlsConnect({ host: "127.0.0.1", port, ca: certs.caPem, servername: "localhost", ...client });
      s.on("secureConnect", () => s.write(listener === "mqtts" ? CONNECT : UPGRADE));
      s.on("data", (d: Buffer) => {
        got += d.toString("latin1");
        s.destroy();
      });
      s.on("error", () => undefined);
      s.on("close", () => resolve(got));
    }),
    15_000,
    `the first answer of ${listener} port ${port}`,
  );

/** The CONNACK code over mqtts or wss (0: accepted), or the TLS error's code when the handshake failed. */
const tlsConnack = (url: string, opts: IClientOptions) =>
  within(
    connectAsync(url, {
      ca: certs.caPem,
      rejectUnauthorized: true,
      reconnectPeriod: 0,
      connectTimeout: 5000,
      ...opts,
    }),
    15_000,
    `connect ${url}`,
  ).then(
    (c) => {
      c.end(true);
      return 0 as number | string;
    },
    (e: { code?: number | string }) => e.code ?? "failed",
  );

describe("use_identity_as_username: a device's client certificate is its login on mqtts", () => {
  test("the CN names the device, no secret is asked; its ACL, client id, will and removal apply", async () => {
    const fleet = new TestFleet(
      fleetHeader("e2e-cert-login", {
        broker: tlsLines(
          `tls_ca = ${q(certs.ca)}\nuse_identity_as_username = true\nallow_anonymous = false\ndevices = "devices.toml"`,
        ),
      }) + counterType("counter", "tls/+/c"),
    );
    // makeCerts' client certificate says CN=boiler-1.
    const added = await deviceCli(fleet, "add", "boiler-1", "--publish", "tls/%u/c", "--json");
    expect(added.code).toBe(0);
    const secret = added.json.secret as string;
    const info = await fleet.start();
    const mqtts = `mqtts://127.0.0.1:${info.mqtts_port}`;
    const wss = `wss://127.0.0.1:${info.wss_port}`;
    const boiler = { cert: readFileSync(certs.clientCert), key: readFileSync(certs.clientKey) };

    // No user name, no password: the certificate is the login.
    const device = await within(
      connectAsync(mqtts, {
        ca: certs.caPem,
        ...boiler,
        clientId: "boiler-1",
        reconnectPeriod: 0,
        connectTimeout: 10_000,
      }),
      15_000,
      "mqtts connect with the device's certificate",
    );
    await publishQos1(device, "tls/boiler-1/c", { id: "c1" }, 60_000);
    await fleet.waitCommitted("counter/boiler-1", 1);
    // The ACL is the CN's: another device's topic is acknowledged and dropped, never recorded.
    expect(await publishOutcome(device, "tls/boiler-2/c", JSON.stringify({ id: "x" }))).toBe("acked");
    // A user name in the CONNECT changes nothing (the certificate names the device), nor does a wrong password.
    expect(await tlsConnack(mqtts, { ...boiler, clientId: "boiler-1", username: "boiler-2", password: "no" })).toBe(0);

    // Refused with CONNACK 5: another client id, a CN that is no device, a certificate without a CN.
    expect(await tlsConnack(mqtts, { ...boiler, clientId: "not-boiler" })).toBe(5);
    expect(await tlsConnack(mqtts, { ...clientCertFor(certs, "ghost", "/CN=ghost"), clientId: "ghost" })).toBe(5);
    expect(await tlsConnack(mqtts, { ...clientCertFor(certs, "nameless", "/O=fleet test"), clientId: "x" })).toBe(5);
    // The plain listener and the wss one (which cannot read certificates) still ask for the secret.
    expect(await connackCode(fleet.mqttPort, { clientId: "boiler-1", username: "boiler-1" })).toBe(4);
    expect(await connackCode(fleet.mqttPort, { clientId: "boiler-1", username: "boiler-1", password: secret })).toBe(0);
    expect(await tlsConnack(wss, { ...boiler, clientId: "boiler-1", username: "boiler-1" })).toBe(4);
    expect(await tlsConnack(wss, { ...boiler, clientId: "boiler-1", username: "boiler-1", password: secret })).toBe(0);
    expect(await fleet.query("SELECT sid FROM stimuli WHERE agent = 'counter/boiler-2'")).toEqual([]);

    // Its will is judged as the device too: published when the connection drops, within the device's ACL.
    const willing = await within(
      connectAsync(mqtts, {
        ca: certs.caPem,
        ...boiler,
        clientId: "boiler-1",
        reconnectPeriod: 0,
        will: { topic: "tls/boiler-1/c", payload: Buffer.from(JSON.stringify({ id: "will" })), qos: 1, retain: false },
      }),
      15_000,
      "mqtts connect with a will",
    );
    willing.stream.destroy();
    await fleet.waitCommitted("counter/boiler-1", 2);

    // Removed from the devices file, the device's certificate session ends (the file is re-read live).
    const again = await within(
      connectAsync(mqtts, { ca: certs.caPem, ...boiler, clientId: "boiler-1", reconnectPeriod: 0 }),
      15_000,
      "mqtts connect before the removal",
    );
    const gone = closed(again);
    expect((await deviceCli(fleet, "remove", "boiler-1")).code).toBe(0);
    await within(gone, 20_000, "the certificate session to close once its device is removed");
    expect(await tlsConnack(mqtts, { ...boiler, clientId: "boiler-1" })).toBe(5);
    device.end(true);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);

  test("a certificate another CA signed is refused on both TLS listeners, every time", async () => {
    const rogue = makeCerts();
    try {
      const fleet = new TestFleet(fleetHeader("e2e-rogue-cert", { broker: tlsLines(`tls_ca = ${q(certs.ca)}`) }));
      const info = await fleet.start();
      const cert = { cert: readFileSync(rogue.clientCert), key: readFileSync(rogue.clientKey) };
      for (let i = 0; i < 10; i++) {
        expect(await firstAnswer(info.mqtts_port, "mqtts", cert)).toBe("");
        expect(await firstAnswer(info.wss_port, "wss", cert)).toBe("");
      }
      // The same first bytes with the CA's own client certificate are answered: a CONNACK, a 101.
      const own = { cert: readFileSync(certs.clientCert), key: readFileSync(certs.clientKey) };
      expect(await firstAnswer(info.mqtts_port, "mqtts", own)).toStartWith("\x20\x02");
      expect(await firstAnswer(info.wss_port, "wss", own)).toStartWith("HTTP/1.1 101");
      expect(await fleet.stop()).toBe(0);
    } finally {
      rmSync(rogue.dir, { recursive: true, force: true });
    }
  }, 120_000);
});

describe("tls_crl: revoked client certificates", () => {
  test("a certificate the CRL revokes is refused on mqtts and wss; a new CRL applies without a restart", async () => {
    const crlFile = join(certs.dir, "fleet-crl.pem");
    copyFileSync(crlFor(certs, "none-revoked", []), crlFile);
    const fleet = new TestFleet(
      fleetHeader("e2e-crl", { broker: tlsLines(`tls_ca = ${q(certs.ca)}\ntls_crl = ${q(crlFile)}`) }),
    );
    const info = await fleet.start();
    const mqtts = `mqtts://127.0.0.1:${info.mqtts_port}`;
    const wss = `wss://127.0.0.1:${info.wss_port}`;
    const boiler = { cert: readFileSync(certs.clientCert), key: readFileSync(certs.clientKey) };
    const other = clientCertFor(certs, "crl-other", "/CN=other");
    expect(await tlsConnack(mqtts, { ...boiler, clientId: "b1" })).toBe(0);
    expect(await tlsConnack(wss, { ...boiler, clientId: "b2" })).toBe(0);
    const open = await within(
      connectAsync(mqtts, { ca: certs.caPem, ...boiler, clientId: "open", reconnectPeriod: 0 }),
      15_000,
      "mqtts connect before the revocation",
    );
    // Over wss too: a new list moves the port to a new listener, and this connection stays with the old one.
    const openWss = await within(
      connectAsync(wss, { ca: certs.caPem, ...boiler, clientId: "open-wss", reconnectPeriod: 0 }),
      15_000,
      "wss connect before the revocation",
    );

    // The CA revokes boiler-1's certificate: the new list is picked up from the file, no restart.
    copyFileSync(crlFor(certs, "boiler-revoked", [certs.clientCert]), crlFile);
    const refused = async (listener: "mqtts" | "wss") =>
      (await firstAnswer(listener === "mqtts" ? info.mqtts_port : info.wss_port, listener, boiler)) === "";
    for (const listener of ["mqtts", "wss"] as const)
      await waitFor(async () => (await refused(listener)) || undefined, 15_000, `boiler-1 refused on ${listener}`);
    expect(await tlsConnack(mqtts, { ...other, clientId: "o1" })).toBe(0);
    expect(await tlsConnack(wss, { ...other, clientId: "o2" })).toBe(0);
    // A connection made before stays: revocation is checked at the handshake.
    expect(open.connected).toBe(true);
    await publishQos1(open, "anything/x", "1");
    expect(openWss.connected).toBe(true);
    await publishQos1(openWss, "anything/y", "1");
    expect(fleet.logTail(200)).toContain("tls_crl reloaded");

    // A file that is no CRL changes nothing: logged, and the lists in force stay.
    writeFileSync(crlFile, "not a revocation list\n");
    await waitFor(() => fleet.logTail(200).includes("tls_crl not applied") || undefined, 15_000, "the refusal logged");
    expect(await refused("mqtts")).toBe(true);
    expect(await refused("wss")).toBe(true);
    expect(await tlsConnack(mqtts, { ...other, clientId: "o3" })).toBe(0);
    expect(await tlsConnack(wss, { ...other, clientId: "o4" })).toBe(0);
    open.end(true);
    openWss.end(true);
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});
