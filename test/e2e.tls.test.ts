/**
 * TLS at the edges, against the real gateway process: `mqtts` and secure WebSocket
 * listeners with certificate files from fleet.toml, HTTPS for the API, and client
 * certificates when `tls_ca` is set. Certificates are made with `openssl` at test time.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync } from "node:fs";
import { connectAsync } from "mqtt";
import { TestFleet, authed, cleanupAll, publishQos1, within } from "./helpers/gateway.ts";
import { makeCerts } from "./helpers/tls.ts";
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
