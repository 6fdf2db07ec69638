/**
 * The access guard in-process (gateway/http/access.ts): what each route needs, probes from a
 * peer that is not this machine, and the Host names the API answers to. The real gateway
 * process is driven in e2e.auth.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { connect } from "node:net";
import { join } from "node:path";
import { addToken, Sessions, TokenAuth } from "../gateway/auth/index.ts";
import {
  type AuditEntry,
  BodyBudget,
  createGuard,
  needOf,
  readRequestBody,
  signInPage,
} from "../gateway/http/index.ts";
import type { FleetSpec } from "../gateway/spec/index.ts";

let dir: string;
let auth: TokenAuth;
let readToken: string;
let operateToken: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "fleet-access-"));
  const file = join(dir, "tokens.json");
  readToken = addToken(file, "reader", "read");
  operateToken = addToken(file, "operator", "operate");
  auth = new TokenAuth(file);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const HTTP: FleetSpec["http"] = {
  host: "0.0.0.0",
  port: 0,
  tls: null,
  allowed_hosts: ["fleet.plant-7.lan"],
  open_metrics: false,
  allow_unauthenticated: false,
  max_concurrent_requests: 10,
  max_body_bytes_in_flight: 1_000_000,
};

type Call = (...a: unknown[]) => Promise<Response>;

/** One guarded route answering 200 "ok" (to GET, or to `methods`), called as if from `peer`. */
function guarded(
  pattern: string,
  http: Partial<FleetSpec["http"]> = {},
  methods: readonly string[] = [],
  handler: () => Response | Promise<Response> = () => new Response("ok"),
) {
  const audits: AuditEntry[] = [];
  const table = { ...HTTP, ...http };
  const guard = createGuard({
    http: () => table,
    auth,
    sessions: new Sessions(auth),
    audit: async (e) => void audits.push(e),
    signInPage,
    streams: () => 0,
    bodies: new BodyBudget(() => 1_000_000),
  });
  const route = methods.length === 0 ? handler : Object.fromEntries(methods.map((m) => [m, handler]));
  const routes = guard.protect({ [pattern]: route }) as unknown as Record<string, Record<string, Call>>;
  const call = (peer: string, headers: Record<string, string> = {}, method = "GET") => {
    const req = Object.assign(
      new Request(`http://x${pattern}`, { method, headers: { host: "192.0.2.2:8080", ...headers } }),
      {
        params: {},
      },
    );
    return routes[pattern]![method]!(req, { requestIP: () => ({ address: peer }), timeout: () => undefined });
  };
  return { call, audits };
}

describe("what a route needs", () => {
  test.each([
    ["/healthz", "GET", "probe"],
    ["/metrics", "GET", "probe"],
    ["/hooks/:name", "POST", "hook"],
    ["/api/session", "POST", "signin"],
    ["/api/session", "GET", "read"],
    ["/api/agents", "GET", "read"],
    ["/api/agents/:type/:key/:action", "POST", "operate"],
    ["/api/quarantine/:seq/:action", "POST", "operate"],
    ["/api/gc", "POST", "admin"],
    ["/api/audit", "GET", "admin"],
    ["/", "GET", "dashboard"],
    ["/ui/app.js", "GET", "dashboard"],
  ] as const)("%s %s needs %s", (pattern, method, need) => {
    expect(needOf(pattern, method)).toBe(need);
  });
});

describe("probes", () => {
  test("answer a loopback peer without a token", async () => {
    expect((await guarded("/metrics").call("127.0.0.1", { host: "127.0.0.1:8080" })).status).toBe(200);
    expect((await guarded("/healthz").call("::1", { host: "[::1]:8080" })).status).toBe(200);
    expect((await guarded("/metrics").call("::ffff:127.0.0.1")).status).toBe(200);
  });

  test("need a read token from any other peer", async () => {
    const g = guarded("/metrics");
    expect((await g.call("192.0.2.9")).status).toBe(401);
    expect((await g.call("192.0.2.9", { authorization: "Bearer fleet_nope" })).status).toBe(401);
    expect((await g.call("192.0.2.9", { authorization: `Bearer ${readToken}` })).status).toBe(200);
  });

  test("answer any peer with open_metrics = true", async () => {
    expect((await guarded("/metrics", { open_metrics: true }).call("192.0.2.9")).status).toBe(200);
  });
});

describe("Host names", () => {
  test.each([
    ["192.0.2.2:8080", 200],
    ["[fd00::2]:8080", 200],
    ["localhost:8080", 200],
    ["fleet.plant-7.lan", 200],
    ["FLEET.plant-7.lan:8080", 200],
    ["evil.example:8080", 403],
    ["127.0.0.1.evil.example", 403],
    ["evil.com:80:80", 403],
    ["fd00::2", 403],
  ] as const)("Host %s -> %d", async (host, status) => {
    const res = await guarded("/api/agents").call("127.0.0.1", { host, authorization: `Bearer ${readToken}` });
    expect(res.status).toBe(status);
  });
});

describe("a web page cannot fire a webhook", () => {
  const post = { "content-type": "text/plain" };
  test("a foreign Origin is refused (403 bad_origin) whatever the listen address; none or our own passes", async () => {
    for (const host of ["127.0.0.1", "0.0.0.0"]) {
      const g = guarded("/hooks/:name", { host }, ["POST"]);
      const foreign = await g.call("127.0.0.1", { ...post, origin: "http://evil.example" }, "POST");
      expect(foreign.status).toBe(403);
      expect(((await foreign.json()) as any).error.code).toBe("bad_origin");
      expect((await g.call("127.0.0.1", { ...post, origin: "null" }, "POST")).status).toBe(403);
      expect((await g.call("127.0.0.1", post, "POST")).status).toBe(200);
      expect((await g.call("127.0.0.1", { ...post, origin: "http://192.0.2.2:8080" }, "POST")).status).toBe(200);
    }
  });

  test("on a loopback gateway a foreign Host (DNS rebinding) is refused; on another address it is not", async () => {
    const loopback = guarded("/hooks/:name", { host: "127.0.0.1" }, ["POST"]);
    const rebound = await loopback.call("127.0.0.1", { ...post, host: "evil.example:21802" }, "POST");
    expect(rebound.status).toBe(403);
    expect(((await rebound.json()) as any).error.code).toBe("bad_host");
    expect((await loopback.call("127.0.0.1", { ...post, host: "127.0.0.1:21802" }, "POST")).status).toBe(200);
    // A public gateway's senders (GitHub, Slack) name it by whatever DNS name points at it.
    const open = guarded("/hooks/:name", { host: "0.0.0.0" }, ["POST"]);
    expect((await open.call("127.0.0.1", { ...post, host: "hooks.example.com" }, "POST")).status).toBe(200);
  });
});

describe("allow_unauthenticated", () => {
  test("lets a call without a token through as `anonymous`, and audits it under that name", async () => {
    const g = guarded("/api/agents/:type/:key/:action", { allow_unauthenticated: true }, ["POST"]);
    const res = await g.call("127.0.0.1", { "content-type": "application/json" }, "POST");
    expect(res.status).toBe(200);
    expect(g.audits.map((a) => a.actor)).toEqual(["anonymous"]);
    // A bad token is still refused: only its absence is allowed.
    expect((await g.call("127.0.0.1", { authorization: "Bearer fleet_bad" })).status).toBe(401);
  });
});

describe("a change whose handler throws", () => {
  test("is audited with the status the server answers it with, and the error goes on to that answer", async () => {
    const g = guarded("/api/agents/:type/:key/:action", { allow_unauthenticated: true }, ["POST"], () => {
      throw new Error("half-way through");
    });
    const answer = g.call("127.0.0.1", { "content-type": "application/json" }, "POST");
    expect(answer).rejects.toThrow("half-way through");
    await answer.catch(() => undefined);
    expect(g.audits.map((a) => [a.actor, a.status])).toEqual([["anonymous", 500]]);
  });
});

describe("a method the route does not have", () => {
  const json = { "content-type": "application/json" };

  test.each([
    ["/api/agents/:type/:key", [], "DELETE", "GET, HEAD"],
    ["/api/fleet", [], "POST", "GET, HEAD"],
    ["/api/fleet", [], "OPTIONS", "GET, HEAD"],
    ["/api/send", ["POST"], "GET", "POST"],
    ["/api/session", ["GET", "POST", "DELETE"], "PUT", "GET, POST, DELETE, HEAD"],
  ] as const)(
    "%s %j: %s is 405 naming the allowed ones, and is not audited",
    async (pattern, methods, method, allow) => {
      const g = guarded(pattern, {}, methods);
      const res = await g.call("127.0.0.1", { authorization: `Bearer ${operateToken}`, ...json }, method);
      expect(res.status).toBe(405);
      expect(res.headers.get("allow")).toBe(allow);
      expect(await res.json()).toEqual({
        error: { code: "method_not_allowed", message: `${method} is not allowed here; allowed: ${allow}` },
      });
      expect(g.audits).toEqual([]);
    },
  );

  test("is a 401 without a token, and a 405 (not a 403 nor an audit) with a token of too small a scope", async () => {
    const g = guarded("/api/agents/:type/:key");
    expect((await g.call("127.0.0.1", json, "DELETE")).status).toBe(401);
    expect((await g.call("127.0.0.1", { authorization: `Bearer ${readToken}`, ...json }, "DELETE")).status).toBe(405);
    expect(g.audits).toEqual([]);
  });

  test("comes after the Host and Origin checks and before the content type", async () => {
    const g = guarded("/api/fleet");
    const auth = { authorization: `Bearer ${operateToken}` };
    expect((await g.call("127.0.0.1", { ...auth, host: "evil.example" }, "DELETE")).status).toBe(403);
    expect((await g.call("127.0.0.1", { ...auth, origin: "http://evil.example" }, "DELETE")).status).toBe(403);
    expect((await g.call("127.0.0.1", { ...auth, "content-type": "text/plain" }, "DELETE")).status).toBe(405);
  });

  test("is a 405 for a webhook's GET, which needs no token", async () => {
    const res = await guarded("/hooks/:name", {}, ["POST"]).call("127.0.0.1", {}, "GET");
    expect(res.status).toBe(405);
    expect(res.headers.get("allow")).toBe("POST");
  });

  test("a route's own methods still run", async () => {
    const g = guarded("/api/fleet");
    expect((await g.call("127.0.0.1", { authorization: `Bearer ${readToken}` }, "GET")).status).toBe(200);
  });
});

describe("request bodies", () => {
  /** A guarded webhook route that reads its body (at most 1000 bytes) under `bodies`, answering "ok". */
  const bodyRoutes = (bodies: BodyBudget) =>
    createGuard({
      http: () => HTTP,
      auth,
      sessions: new Sessions(auth),
      audit: async () => undefined,
      signInPage,
      streams: () => 0,
      bodies,
    }).protect({
      "/hooks/:name": {
        POST: async (req: Request) => {
          const r = await readRequestBody(req, 1000);
          return r.ok ? new Response("ok") : r.res;
        },
      },
    });

  test("a body trickled slowly is cut off at the read deadline (408), its bytes given back", async () => {
    const bodies = new BodyBudget(() => 1_000_000, { readDeadlineMs: 300 });
    const routes = bodyRoutes(bodies) as unknown as Record<string, Record<string, Call>>;
    let timer: ReturnType<typeof setInterval> | undefined;
    const trickle = new ReadableStream<Uint8Array>({
      start(ctrl) {
        // One byte every 100 ms: never idle for long, never done.
        timer = setInterval(() => ctrl.enqueue(new Uint8Array([32])), 100);
      },
      cancel: () => clearInterval(timer),
    });
    const req = Object.assign(
      new Request("http://x/hooks/h", { method: "POST", body: trickle, headers: { host: "192.0.2.2" } }),
      { params: { name: "h" } },
    );
    const started = Date.now();
    const res = await routes["/hooks/:name"]!.POST!(req, { requestIP: () => null, timeout: () => undefined });
    clearInterval(timer);
    expect(res.status).toBe(408);
    expect(((await res.json()) as any).error.code).toBe("request_timeout");
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(bodies.held).toBe(0);
  });
  test("a body trickled past Bun's own 10 s request timeout still gets its 408, not a dropped connection", async () => {
    // Bun.serve ends a request after 10 s unless told otherwise (at 12 s: its timer ticks every 4 s); the read
    // deadline here is past that.
    const bodies = new BodyBudget(() => 1_000_000, { readDeadlineMs: 14_500 });
    const server = Bun.serve({ hostname: "127.0.0.1", port: 0, routes: bodyRoutes(bodies) });
    try {
      const socket = connect(server.port!, "127.0.0.1");
      let answer = "";
      // Done at the answer's end or the connection's, whichever comes first.
      const done = new Promise<void>((resolve) => {
        socket.on("data", (d) => {
          answer += d;
          if (answer.endsWith("}}")) resolve();
        });
        socket.on("close", () => resolve());
      });
      socket.on("error", () => undefined);
      socket.write("POST /hooks/h HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n");
      const timer = setInterval(() => socket.destroyed || socket.write(" "), 250);
      await Promise.race([done, Bun.sleep(20_000)]);
      clearInterval(timer);
      socket.destroy();
      expect(answer.split("\r\n")[0]).toBe("HTTP/1.1 408 Request Timeout");
      expect(answer).toContain('"request_timeout"');
      expect(bodies.held).toBe(0);
    } finally {
      server.stop(true);
    }
  }, 30_000);
});

describe("dashboard sessions", () => {
  test("one token signing in again and again ends only its own oldest sessions (20 per token)", () => {
    const sessions = new Sessions(auth);
    const other = sessions.open(operateToken)!;
    const mine = Array.from({ length: 25 }, () => sessions.open(readToken)!);
    expect(sessions.principal(other.id)?.name).toBe("operator");
    expect(mine.slice(0, 5).map((s) => sessions.principal(s.id))).toEqual([null, null, null, null, null]);
    expect(mine.slice(5).every((s) => sessions.principal(s.id)?.name === "reader")).toBe(true);
    expect(sessions.size).toBe(21);
  });

  test("past the global cap the token with the most sessions loses its oldest, not the oldest overall", () => {
    const sessions = new Sessions(auth, { max: 10, maxPerToken: 100 });
    const first = sessions.open(operateToken)!;
    const reads = Array.from({ length: 9 }, () => sessions.open(readToken)!);
    sessions.open(operateToken);
    expect(sessions.size).toBe(10);
    expect(sessions.principal(first.id)?.name).toBe("operator");
    expect(sessions.principal(reads[0]!.id)).toBeNull();
    expect(sessions.principal(reads[1]!.id)?.name).toBe("reader");
  });
});
