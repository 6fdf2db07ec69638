/**
 * HTTP limits against a real gateway process: a ceiling on requests handled at once (slow or
 * stuck clients cannot take every slot; `/healthz` still answers) and a ceiling on request
 * body bytes held at once across requests (many large bodies cannot exhaust memory).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { connect, type Socket } from "node:net";
import { TestFleet, cleanupAll, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

const MAX_REQUESTS = 8;
const MAX_BODY_BYTES = 100_000;
const TOML =
  fleetHeader("e2e-limits", {
    extra: `max_concurrent_requests = ${MAX_REQUESTS}\nmax_body_bytes_in_flight = ${MAX_BODY_BYTES}\n`,
  }) +
  counterType("counter", "lim/+/in") +
  '\n[hooks.open]\nagent = "counter/hooked"\n' +
  '\n[hooks.unset]\nagent = "counter/x"\nsecret_env = "E2E_LIMITS_UNSET"\n' +
  '\n[hooks.signed]\nagent = "counter/signed"\nsecret_env = "E2E_LIMITS_SECRET"\n';

let fleet: TestFleet;

beforeAll(async () => {
  fleet = new TestFleet(TOML, { env: { E2E_LIMITS_SECRET: "s3cret" } });
  await fleet.start();
}, 60_000);

afterAll(async () => {
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

/** A JSON `/api/send` body of exactly `size` bytes. */
function sendBody(id: string, size: number): string {
  const shell = JSON.stringify({ topic: `lim/${id}/in`, payload: { pad: "" }, id });
  return JSON.stringify({ topic: `lim/${id}/in`, payload: { pad: "x".repeat(size - shell.length) }, id });
}

/**
 * A POST whose body arrives only when `finish` is called: the gateway holds it in flight.
 * `token`: the operator's unless false (a caller without one, as a webhook sender or a sign-in).
 */
function slowPost(path: string, body: string, sendFirst: number, token = true) {
  const socket: Socket = connect(fleet.info!.http_port, "127.0.0.1");
  let received = "";
  /** Resolves with the raw response once it is complete (or the connection closes). */
  const answered = new Promise<string>((resolve) => {
    socket.on("data", (d) => {
      received += d.toString();
      const head = received.indexOf("\r\n\r\n");
      const length = /content-length: *(\d+)/i.exec(received)?.[1];
      if (head >= 0 && length !== undefined && received.length - head - 4 >= Number(length)) resolve(received);
    });
    socket.on("close", () => resolve(received));
    socket.on("error", () => undefined);
  });
  socket.write(
    `POST ${path} HTTP/1.1\r\nHost: 127.0.0.1:${fleet.info!.http_port}\r\n` +
      (token ? `Authorization: Bearer ${fleet.token}\r\n` : "") +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n` +
      body.slice(0, sendFirst),
  );
  return {
    /** Send the rest of the body; resolves with the raw response. */
    finish: async () => {
      socket.write(body.slice(sendFirst));
      const res = await answered;
      socket.destroy();
      return res;
    },
    abort: () => socket.destroy(),
  };
}

describe("requests in flight", () => {
  test("past max_concurrent_requests the API answers 503, /healthz still answers, slots come back", async () => {
    const stuck = Array.from({ length: MAX_REQUESTS }, (_, i) => slowPost("/api/send", sendBody(`s${i}`, 200), 10));
    const busy = await waitFor(
      async () => {
        const res = await fleet.fetch("/api/fleet");
        return res.status === 503 ? res : null;
      },
      10_000,
      "the API to answer 503 with every slot taken",
    );
    expect(busy.headers.get("retry-after")).toBe("1");
    expect(((await busy.json()) as any).error.code).toBe("busy");
    expect((await fetch(`${fleet.httpUrl}/healthz`)).status).toBe(200);
    expect((await fetch(`${fleet.httpUrl}/readyz`)).status).toBe(200);

    for (const s of stuck) s.abort();
    await waitFor(async () => (await fleet.fetch("/api/fleet")).status === 200, 10_000, "a free slot");
  }, 60_000);
});

describe("request body bytes in flight", () => {
  test("a body past max_body_bytes_in_flight is refused with 503; it fits once the first is done", async () => {
    const big = slowPost("/api/send", sendBody("big", 80_000), 79_000);
    await waitFor(
      async () => sampleValue(await scrape(fleet.httpUrl), "fleet_http_body_bytes_in_flight") === 79_000,
      10_000,
      "the first body to hold the 79000 bytes sent",
    );
    const second = sendBody("second", 30_000);
    const refused = await fleet.fetch("/api/send", { method: "POST", body: second });
    expect(refused.status).toBe(503);
    expect(refused.headers.get("retry-after")).toBe("1");
    expect(((await refused.json()) as any).error.message).toContain("max_body_bytes_in_flight");
    expect((await fetch(`${fleet.httpUrl}/healthz`)).status).toBe(200);

    const first = await big.finish();
    expect(first).toStartWith("HTTP/1.1 202");
    const again = await fleet.fetch("/api/send", { method: "POST", body: second });
    expect(again.status).toBe(202);
    expect(sampleValue(await scrape(fleet.httpUrl), "fleet_http_body_bytes_in_flight")).toBe(0);
    await fleet.waitCommitted("counter/second", 1);
  }, 60_000);

  test("a chunked body without Content-Length is counted as it arrives", async () => {
    const body = new TextEncoder().encode(sendBody("chunky", 120_000));
    const stream = new ReadableStream<Uint8Array>({
      start(ctrl) {
        for (let i = 0; i < body.length; i += 16_384) ctrl.enqueue(body.slice(i, i + 16_384));
        ctrl.close();
      },
    });
    const res = await fleet.fetch("/api/send", { method: "POST", body: stream });
    expect(res.status).toBe(503);
    expect(sampleValue(await scrape(fleet.httpUrl), "fleet_http_body_bytes_in_flight")).toBe(0);
  }, 60_000);
});

describe("clients without a token cannot starve the API", () => {
  /** The status line of a raw response. */
  const statusOf = (raw: string) => raw.split("\r\n")[0];

  test("webhook bodies hold the bytes they sent, not those declared, and half the budget at most", async () => {
    // Declared 45000 and 60000 (the budget is 100000): before, they held it all and every API body was a 503.
    const small = slowPost("/hooks/open", `{"pad":"${"x".repeat(44_990)}"}`, 10, false);
    const large = slowPost("/hooks/open", `{"pad":"${"x".repeat(59_990)}"}`, 10, false);
    try {
      await waitFor(
        async () => sampleValue(await scrape(fleet.httpUrl), "fleet_http_body_bytes_in_flight") === 20,
        10_000,
        "the two hook bodies to hold the 10 bytes each sent",
      );
      const res = await fleet.fetch("/api/send", { method: "POST", body: sendBody("past-hooks", 60_000) });
      expect(res.status).toBe(202);
      expect(statusOf(await small.finish())).toBe("HTTP/1.1 202 Accepted");
      // Whole, the larger body passes the half of the budget that callers without a token may hold.
      const refused = await large.finish();
      expect(statusOf(refused)).toBe("HTTP/1.1 503 Service Unavailable");
      expect(refused).toContain("half of max_body_bytes_in_flight");
      expect(sampleValue(await scrape(fleet.httpUrl), "fleet_http_body_bytes_in_flight")).toBe(0);
    } finally {
      small.abort();
      large.abort();
    }
  }, 60_000);

  test("a hook whose secret is unset, or a call without its bearer secret, is refused before its body", async () => {
    const body = `{"pad":"${"x".repeat(50_000)}"}`;
    const answered = async (path: string, headers = "") => {
      const socket = connect(fleet.info!.http_port, "127.0.0.1");
      let got = "";
      socket.on("data", (d) => {
        got += d.toString();
      });
      socket.on("error", () => undefined);
      socket.write(
        `POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n${headers}` +
          `Content-Length: ${body.length}\r\n\r\n${body.slice(0, 1)}`,
      );
      // Answered with one byte of the body sent: nothing waits for the rest.
      await waitFor(async () => got.includes("\r\n\r\n"), 5_000, `an answer from ${path} before the body`);
      socket.destroy();
      return statusOf(got);
    };
    expect(await answered("/hooks/unset")).toBe("HTTP/1.1 503 Service Unavailable");
    expect(await answered("/hooks/signed")).toBe("HTTP/1.1 401 Unauthorized");
    expect(await answered("/hooks/signed", "Authorization: Bearer wrong\r\n")).toBe("HTTP/1.1 401 Unauthorized");
    const ok = await fetch(`${fleet.httpUrl}/hooks/signed`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "bearer s3cret" },
      body: "{}",
    });
    expect(ok.status).toBe(202);
  }, 60_000);

  test("slow sign-in bodies take a quarter of max_concurrent_requests at most; the API still answers", async () => {
    // Before, these held every slot and GET /api/fleet was a 503.
    const signIns = Array.from({ length: MAX_REQUESTS }, () =>
      slowPost("/api/session", `{"token":"${"x".repeat(80)}"}`, 1, false),
    );
    await Bun.sleep(500);
    for (let i = 0; i < 3; i++) expect((await fleet.fetch("/api/fleet")).status).toBe(200);
    const answers = await Promise.all(signIns.map((s) => s.finish()));
    const share = MAX_REQUESTS / 4;
    expect(answers.filter((a) => statusOf(a) === "HTTP/1.1 503 Service Unavailable").length).toBe(MAX_REQUESTS - share);
    expect(answers.filter((a) => statusOf(a) === "HTTP/1.1 401 Unauthorized").length).toBe(share);
  }, 60_000);
});

describe("a web page cannot fire a webhook", () => {
  test("a foreign Origin or, on this loopback gateway, a foreign Host is refused and records nothing", async () => {
    const hook = (headers: Record<string, string>, id: string) =>
      fetch(`${fleet.httpUrl}/hooks/open`, {
        method: "POST",
        headers: { "content-type": "text/plain", ...headers },
        body: JSON.stringify({ id }),
      });
    expect((await hook({ origin: "http://evil.example" }, "csrf-1")).status).toBe(403);
    expect((await hook({ origin: "null" }, "csrf-2")).status).toBe(403);
    expect((await hook({ host: `evil.example:${fleet.info!.http_port}` }, "csrf-3")).status).toBe(403);
    // Only the plain call (no Origin, our Host) makes an episode.
    const before = await fleet.episodes("counter/hooked").catch(() => []);
    expect((await hook({}, "plain")).status).toBe(202);
    await fleet.waitCommitted("counter/hooked", before.length + 1);
    await Bun.sleep(500);
    expect((await fleet.episodes("counter/hooked")).length).toBe(before.length + 1);
  }, 60_000);
});
