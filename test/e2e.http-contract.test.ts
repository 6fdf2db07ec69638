/**
 * The HTTP API keeps its own rules on every route (docs/http-api.md, docs/access.md), against a
 * real gateway process: boolean query flags are strict and the audit names what ran, a route
 * answers only its own methods, a full queue is a 429 whichever way a stimulus comes in, statuses
 * are shown one way, unknown names are 404 `not_found`, and an Idempotency-Key reused with another
 * body is refused wherever it dedups.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { TestFleet, cleanupAll } from "./helpers/gateway.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

const TOML =
  fleetHeader("e2e-http-contract") +
  counterType("counter", "hc/+/in", { instances: ["c1", "c2", "r1"] }) +
  counterType("tight", "tight/+/in", { instances: ["q1"], extra: "max_queue = 1\n" });

let fleet: TestFleet;
/** An episode of counter/c1, for the episode routes. */
let episode: string;

type Answer = { status: number; headers: Headers; body: any };

/** Call the API as the local operator (admin, `cli@local`); the body is parsed when it is JSON. */
async function call(method: string, path: string, body?: unknown, headers: Record<string, string> = {}) {
  const init: RequestInit = { method, headers };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const res = await fleet.fetch(path, init);
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {}
  return { status: res.status, headers: res.headers, body: parsed } as Answer;
}

/** The newest audit records, newest first. */
async function audit(limit = 1): Promise<any[]> {
  return (await call("GET", `/api/audit?limit=${limit}`)).body.records;
}

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  expect((await call("POST", "/api/send", { topic: "hc/c1/in", payload: { id: "e1" }, id: "e1" })).status).toBe(202);
  await fleet.waitCommitted("counter/c1", 1);
  episode = (await call("GET", "/api/agents/counter/c1/episodes")).body.episodes[0].id;
}, 60_000);

afterAll(async () => {
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

describe("boolean query flags", () => {
  test.each([
    ["1", "gc.dry_run"],
    ["true", "gc.dry_run"],
    ["0", "gc"],
    ["false", "gc"],
  ])("POST /api/gc?dry_run=%s runs and is audited as %s", async (flag, action) => {
    const r = await call("POST", `/api/gc?dry_run=${flag}`);
    expect(r.status).toBe(200);
    expect((await audit())[0]).toMatchObject({ action, status: 200, result: "ok" });
  });

  test.each(["yes", "", "TRUE", "2", "constructor", "toString", "__proto__"])(
    "POST /api/gc?dry_run=%j is a 400 bad_query naming dry_run, and runs no gc",
    async (flag) => {
      const r = await call("POST", `/api/gc?dry_run=${flag}`);
      expect(r.status).toBe(400);
      expect(r.body.error.code).toBe("bad_query");
      expect(r.body.error.message).toBe(`dry_run must be 1, true, 0 or false, not ${JSON.stringify(flag)}`);
      // Nothing ran: the record is the refusal, not a collection.
      expect((await audit())[0]).toMatchObject({ action: "gc", status: 400, result: "refused" });
    },
  );

  test("drain on retire reads the same spellings, and refuses the rest naming drain", async () => {
    const yes = await call("POST", "/api/agents/counter/c2/retire?drain=yes");
    expect(yes.status).toBe(400);
    expect(yes.body.error).toEqual({ code: "bad_query", message: 'drain must be 1, true, 0 or false, not "yes"' });
    const pause = await call("POST", "/api/agents/counter/c2/pause?drain=false");
    expect(pause.body).toMatchObject({ ok: true, action: "pause", status: "paused" });
    expect((await call("POST", "/api/agents/counter/c2/resume?drain=true")).status).toBe(400);
    expect((await call("POST", "/api/agents/counter/c2/resume")).status).toBe(200);
  });
});

/** A concrete path of every read route, with the methods it answers besides HEAD. */
const READ_ROUTES = [
  "/healthz",
  "/readyz",
  "/metrics",
  "/",
  "/ui/app.js",
  "/ui/style.css",
  "/api/fleet",
  "/api/agents",
  "/api/agents/counter/c1",
  "/api/agents/counter/c1/episodes",
  "/api/agents/counter/c1/wakeups",
  "/api/agents/counter/c1/checkpoints",
  "/api/agents/counter/c1/state",
  "/api/agents/counter/c1/state/diff?from=1&to=1",
  "/api/episodes/:episode",
  "/api/episodes/:episode/events",
  "/api/episodes/:episode/trace",
  "/api/trace?topic=fleet/agents/counter/c1/out",
  "/api/rejected",
  "/api/quarantine",
  "/api/outputs",
  "/api/activity",
  "/api/audit",
  "/api/events",
];

describe("a route answers only its own methods", () => {
  const paths = () => READ_ROUTES.map((p) => p.replace(":episode", episode));

  test.each(["DELETE", "POST", "PUT", "PATCH"])(
    "%s on every read route is a 405 with Allow, and changes nothing",
    async (method) => {
      const before = (await call("GET", "/api/agents/counter/c1")).body;
      const since = (await audit())[0]?.seq ?? 0;
      for (const path of paths()) {
        const r = await call(method, path, {});
        expect([path, r.status, r.headers.get("allow")]).toEqual([path, 405, "GET, HEAD"]);
        expect(r.body.error).toEqual({
          code: "method_not_allowed",
          message: `${method} is not allowed here; allowed: GET, HEAD`,
        });
      }
      // Not an operator action: nothing is audited, and the agent is as it was.
      expect((await audit(50)).filter((a) => a.seq > since)).toEqual([]);
      expect((await call("GET", "/api/agents/counter/c1")).body).toEqual(before);
    },
  );

  test("every read route still answers GET", async () => {
    for (const path of paths()) {
      if (path === "/api/events") continue; // a stream that does not end
      const r = await call("GET", path);
      expect([path, r.status]).toEqual([path, 200]);
    }
  });

  test("a change route names its own method; a caller without a token learns nothing but 401", async () => {
    const get = await call("GET", "/api/send");
    expect([get.status, get.headers.get("allow"), get.body.error.code]).toEqual([405, "POST", "method_not_allowed"]);
    expect((await call("GET", "/api/agents/counter/c1/pause")).headers.get("allow")).toBe("POST");
    const anonymous = await fetch(`${fleet.httpUrl}/api/agents/counter/c1`, {
      method: "DELETE",
      headers: { "content-type": "application/json" },
    });
    expect(anonymous.status).toBe(401);
    expect(anonymous.headers.get("allow")).toBeNull();
  });
});

describe("a method no route table names", () => {
  test("PROPFIND or TRACE on a route is its 405 with Allow (401 without a token); on no route a 404", async () => {
    for (const method of ["PROPFIND", "TRACE"]) {
      const r = await call(method, "/api/fleet");
      expect([method, r.status, r.headers.get("allow")]).toEqual([method, 405, "GET, HEAD"]);
    }
    expect((await call("PROPFIND", "/api/fleet")).body.error.code).toBe("method_not_allowed");
    expect((await call("PROPFIND", "/api/agents/counter/c1/pause")).headers.get("allow")).toBe("POST");
    expect((await fetch(`${fleet.httpUrl}/api/fleet`, { method: "PROPFIND" })).status).toBe(401);
    expect((await call("PROPFIND", "/api/nothing-here")).status).toBe(404);
  });
});

describe("a full queue is backpressure, whichever way the stimulus comes", () => {
  test("POST /api/send to a full queue is 429 queue_full with Retry-After; to a retired agent 409", async () => {
    expect((await call("POST", "/api/agents/tight/q1/pause")).status).toBe(200);
    const first = await call("POST", "/api/send", { topic: "tight/q1/in", payload: { id: "f1" }, id: "f1" });
    expect(first.status).toBe(202);
    const full = await call("POST", "/api/send", { topic: "tight/q1/in", payload: { id: "f2" }, id: "f2" });
    expect(full.status).toBe(429);
    expect(full.headers.get("retry-after")).toBe("5");
    expect(full.body.error.code).toBe("queue_full");
    expect(full.body.refused).toMatchObject([{ agent: "tight/q1", code: "queue_full" }]);
    // A retry of what the full queue holds is a duplicate, not a 429; its id with another payload a 422.
    const retry = await call("POST", "/api/send", { topic: "tight/q1/in", payload: { id: "f1" }, id: "f1" });
    expect([retry.status, retry.body.duplicates]).toEqual([200, [{ agent: "tight/q1", sid: "id:f1" }]]);
    const reused = await call("POST", "/api/send", { topic: "tight/q1/in", payload: { id: "f9" }, id: "f1" });
    expect([reused.status, reused.body.error.code]).toEqual([422, "idempotency_key_reused"]);
    // The manual stimulus to the same agent answers the same.
    const manual = await call("POST", "/api/agents/tight/q1/stimuli", { n: 1 });
    expect([manual.status, manual.headers.get("retry-after"), manual.body.error.code]).toEqual([
      429,
      "5",
      "queue_full",
    ]);

    expect((await call("POST", "/api/send", { topic: "hc/r1/in", payload: { id: "e1" }, id: "e1" })).status).toBe(202);
    expect((await call("POST", "/api/agents/counter/r1/retire")).body.status).toBe("retired");
    const retired = await call("POST", "/api/send", { topic: "hc/r1/in", payload: { id: "r" }, id: "r" });
    expect(retired.status).toBe(409);
    expect(retired.headers.get("retry-after")).toBeNull();
    expect(retired.body.error.code).toBe("refused");
    expect(retired.body.refused).toMatchObject([{ agent: "counter/r1", code: "retired" }]);
    // ...but a retry of a stimulus it took before it was retired is a duplicate.
    const before = await call("POST", "/api/send", { topic: "hc/r1/in", payload: { id: "e1" }, id: "e1" });
    expect([before.status, before.body.duplicates]).toEqual([200, [{ agent: "counter/r1", sid: "id:e1" }]]);
    expect((await call("POST", "/api/agents/tight/q1/resume")).status).toBe(200);
  });
});

describe("statuses are shown one way", () => {
  test("pause, resume and retire answer the status /api/agents shows (idle, never the stored active)", async () => {
    expect((await call("POST", "/api/agents/counter/c2/pause")).body.status).toBe("paused");
    const resumed = await call("POST", "/api/agents/counter/c2/resume");
    expect(resumed.body).toEqual({ ok: true, agent: "counter/c2", action: "resume", status: "idle" });
    expect((await call("GET", "/api/agents/counter/c2")).body.status).toBe("idle");
  });
});

describe("filters name what they take", () => {
  test("a bad status filter lists every status the filter takes", async () => {
    const r = await call("GET", "/api/agents?status=bogus");
    expect(r.status).toBe(400);
    expect(r.body.error).toEqual({
      code: "bad_query",
      message: 'status must be one of idle, paused, draining, failed, retired; got "bogus"',
    });
    for (const s of ["idle", "paused", "draining", "failed", "retired", "active"])
      expect((await call("GET", `/api/agents?status=${s}`)).status).toBe(200);
  });

  test("?kind= takes the kinds an event log has, and refuses any other naming kind and the kinds", async () => {
    const stimulus = await call("GET", `/api/episodes/${episode}/events?kind=stimulus`);
    expect(stimulus.body.events.map((e: any) => e.kind)).toEqual(["stimulus"]);
    expect((await call("GET", `/api/episodes/${episode}/events?kind=end`)).body.events.length).toBe(1);
    expect((await call("GET", `/api/episodes/${episode}/events?kind=wake`)).body.events).toEqual([]);
    const bogus = await call("GET", `/api/episodes/${episode}/events?kind=bogus`);
    expect(bogus.status).toBe(400);
    expect(bogus.body.error.code).toBe("bad_query");
    expect(bogus.body.error.message).toBe(
      "kind must be one of stimulus, decide, emit, send, now, random, log, wake, cancel_wake, migrate, " +
        'pending_wakes, tool, end, failure; got "bogus"',
    );
  });
});

describe("unknown names", () => {
  test.each([
    ["/api/agents/counter/nope", 404, "not_found"],
    ["/api/agents/counter/nope/state", 404, "not_found"],
    ["/api/agents/counter/nope/state?at=1", 404, "not_found"],
    ["/api/agents/counter/nope/state/diff?from=1&to=2", 404, "not_found"],
    ["/api/agents/nosuch/nope/state", 404, "not_found"],
  ])("GET %s is %d %s", async (path, status, code) => {
    const r = await call("GET", path);
    expect([r.status, r.body.error.code]).toEqual([status, code]);
  });

  test.each(["toString", "constructor", "__proto__", "hasOwnProperty"])(
    "%s, a name every JavaScript object answers to, is no agent type, hook or rollout",
    async (name) => {
      const stimulus = await call("POST", `/api/agents/${name}/k1/stimuli`, { n: 1 });
      expect([stimulus.status, stimulus.body.error.code]).toEqual([404, "not_found"]);
      const hook = await call("POST", `/hooks/${name}`, { n: 1 });
      expect([hook.status, hook.body.error.code]).toEqual([404, "unknown_hook"]);
      const rollout = await call("POST", `/api/rollouts/${name}/promote`);
      expect([rollout.status, rollout.body.error.code]).toEqual([404, "not_found"]);
      const check = await call("POST", "/api/deploy/check", { types: [name] });
      expect([check.status, check.body.error.code]).toEqual([400, "bad_request"]);
      // Nothing was recorded for it, and no agent of such a type exists.
      const agents = await call("GET", `/api/agents?type=${name}`);
      expect(agents.body.agents ?? []).toEqual([]);
    },
  );

  test("a known agent without that checkpoint keeps its own code", async () => {
    const r = await call("GET", "/api/agents/counter/c1/state?at=99");
    expect([r.status, r.body.error.code]).toEqual([404, "no_checkpoint"]);
  });

  test("a rollout of an unknown type is 404 not_found; of a known type without one 409 no_rollout", async () => {
    const unknown = await call("POST", "/api/rollouts/nosuch/promote");
    expect(unknown.status).toBe(404);
    expect(unknown.body.error).toEqual({ code: "not_found", message: "no agent type nosuch" });
    const none = await call("POST", "/api/rollouts/counter/abort");
    expect([none.status, none.body.error.code]).toEqual([409, "no_rollout"]);
  });

  test("an action a route does not have is a 404, audited by its route and not by the name in the path", async () => {
    const agent = await call("POST", "/api/agents/counter/c1/frobnicate");
    expect([agent.status, agent.body.error.code]).toEqual([404, "not_found"]);
    expect((await audit())[0]).toMatchObject({
      action: "POST /api/agents/:type/:key/:action",
      target: "counter/c1",
      status: 404,
    });
    const rollout = await call("POST", "/api/rollouts/counter/frob");
    expect(rollout.status).toBe(404);
    expect((await audit())[0]).toMatchObject({ action: "POST /api/rollouts/:type/:action", status: 404 });
    await call("POST", "/api/agents/counter/c2/pause");
    expect((await audit())[0]).toMatchObject({ action: "agent.pause", target: "counter/c2" });
    await call("POST", "/api/agents/counter/c2/resume");
  });

  test("a deploy check forcing a type the candidate lacks is 400 bad_request naming it", async () => {
    const r = await call("POST", "/api/deploy/check", { types: ["counter", "nosuch"] });
    expect(r.status).toBe(400);
    expect(r.body.error.code).toBe("bad_request");
    expect(r.body.error.message).toBe(`body types[1] "nosuch" is not an agent type of ${fleet.configPath}`);
    const ok = await call("POST", "/api/deploy/check", { types: ["counter"] });
    expect(ok.status).toBe(200);
    expect(ok.body.types.map((t: any) => [t.type, t.changed])).toEqual([["counter", ["forced"]]]);
  }, 60_000);
});

describe("an Idempotency-Key on a manual stimulus", () => {
  const stimulus = (body: unknown, key: string) =>
    call("POST", "/api/agents/counter/c1/stimuli", body, { "idempotency-key": key });

  test("a retry with the same body is a duplicate; the key with another body is 422 and records nothing", async () => {
    const first = await stimulus({ n: 1 }, "manual-k1");
    expect(first.status).toBe(202);
    const again = await stimulus({ n: 1 }, "manual-k1");
    expect(again.status).toBe(200);
    expect(again.body).toMatchObject({ stimulus: first.body.stimulus, duplicate: true });
    const other = await stimulus({ n: 2 }, "manual-k1");
    expect(other.status).toBe(422);
    expect(other.body.error).toEqual({
      code: "idempotency_key_reused",
      message: "Idempotency-Key was already used with a different body",
    });
    const rows = await fleet.query<{ payload: Uint8Array }>(
      "SELECT payload FROM stimuli WHERE agent = 'counter/c1' AND sid = 'idem:manual-k1'",
    );
    expect(rows.map((r) => Buffer.from(r.payload).toString())).toEqual(['{"n":1}']);
  });

  test("a key of more than 256 characters is a 400, as on a webhook", async () => {
    const r = await stimulus({ n: 1 }, "k".repeat(257));
    expect([r.status, r.body.error.code]).toEqual([400, "bad_idempotency_key"]);
  });
});

describe("POST /api/send", () => {
  const send = (body: unknown, key?: string) =>
    call("POST", "/api/send", body, key === undefined ? {} : { "idempotency-key": key });

  test("a payload nested too deep to encode again is a 400, recorded nowhere and audited", async () => {
    const deep = 60_000; // ~120 KB: JSON.parse takes it, JSON.stringify overflows its stack
    const body = `{"topic":"hc/c1/in","payload":${"[".repeat(deep)}${"]".repeat(deep)}}`;
    const stimuli = async () =>
      (await fleet.query<{ n: number }>("SELECT count(*) AS n FROM stimuli WHERE agent = 'counter/c1'"))[0]!.n;
    const before = await stimuli();
    const r = await call("POST", "/api/send", body, { "content-type": "application/json" });
    expect(await stimuli()).toBe(before);
    expect([r.status, r.body.error.code]).toEqual([400, "bad_request"]);
    expect(r.body.error.message).toBe("payload nests too deep to be encoded again");
    expect((await audit())[0]).toMatchObject({ action: "send", status: 400, result: "refused" });
  });

  test("honours Idempotency-Key: a retry is a duplicate, the key with another payload a 422", async () => {
    const first = await send({ topic: "hc/c2/in", payload: { n: 1 } }, "send-k1");
    expect(first.status).toBe(202);
    const again = await send({ topic: "hc/c2/in", payload: { n: 1 } }, "send-k1");
    expect(again.status).toBe(200);
    expect(again.body.duplicates).toEqual([{ agent: "counter/c2", sid: "idem:send-k1" }]);
    const other = await send({ topic: "hc/c2/in", payload: { n: 2 } }, "send-k1");
    expect([other.status, other.body.error.code]).toEqual([422, "idempotency_key_reused"]);
    const both = await send({ topic: "hc/c2/in", payload: 1, id: "x" }, "send-k2");
    expect([both.status, both.body.error.code]).toEqual([400, "bad_request"]);
  });

  test("honours the body's id as the header: the id with another payload is a 422 that records nothing", async () => {
    expect((await send({ topic: "hc/c2/in", payload: { n: 1 }, id: "send-b1" })).status).toBe(202);
    const again = await send({ topic: "hc/c2/in", payload: { n: 1 }, id: "send-b1" });
    expect(again.status).toBe(200);
    expect(again.body.duplicates).toEqual([{ agent: "counter/c2", sid: "id:send-b1" }]);
    const other = await send({ topic: "hc/c2/in", payload: { a: 5 }, id: "send-b1" });
    expect([other.status, other.body.error.code]).toEqual([422, "idempotency_key_reused"]);
    const rows = await fleet.query<{ payload: Uint8Array }>(
      "SELECT payload FROM stimuli WHERE agent = 'counter/c2' AND sid = 'id:send-b1'",
    );
    expect(rows.map((r) => Buffer.from(r.payload).toString())).toEqual(['{"n":1}']);
  });

  test("an id with a lone surrogate is a 400: stored as UTF-8 it would be the same id as another", async () => {
    // JSON.stringify keeps "\ud800" escaped, so the body is valid JSON holding a lone surrogate.
    const r = await send({ topic: "hc/c2/in", payload: 1, id: "\ud800" });
    expect([r.status, r.body.error.code]).toEqual([400, "bad_request"]);
    expect(r.body.error.message).toBe("body id must be well-formed Unicode (no lone surrogate)");
    expect((await send({ topic: "hc/c2/in", payload: 1, id: "\ud83d\ude00" })).status).toBe(202);
  });

  test("a string payload is sent as its text, as a device publishing it: '42' arrives as the number 42", async () => {
    const first = await send({ topic: "hc/c1/in", payload: "42" });
    const second = await send({ topic: "hc/c1/in", payload: 42 });
    const raw = await send({ topic: "hc/c1/in", payload: JSON.stringify("42") });
    expect([first.status, second.status, raw.status]).toEqual([202, 202, 202]);
    const rows = await fleet.query<{ payload: Uint8Array }>(
      "SELECT payload FROM stimuli WHERE agent = 'counter/c1' ORDER BY seq",
    );
    expect(rows.map((r) => Buffer.from(r.payload).toString()).slice(-3)).toEqual(["42", "42", '"42"']);
  });

  test("without payload is a 400 saying it is required", async () => {
    const r = await send({ topic: "hc/c2/in" });
    expect([r.status, r.body.error.message]).toEqual([400, "body payload is required"]);
    expect((await send({ topic: "hc/c2/in", payload: null })).status).toBe(202);
  });
});

describe("bodies and queries a typo or a bad client gets wrong", () => {
  test("a manual stimulus body that is not UTF-8 is a 400 bad_json, as a webhook's is", async () => {
    const res = await fleet.fetch("/api/agents/counter/c2/stimuli", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: new Uint8Array([0x22, 0xff, 0xfe, 0x22]),
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as any).error.code).toBe("bad_json");
  });

  test("/api/activity?type= of a type not in the fleet is a 400 naming the fleet's types", async () => {
    const r = await call("GET", "/api/activity?type=nope");
    expect([r.status, r.body.error.code]).toEqual([400, "bad_query"]);
    expect(r.body.error.message).toContain("counter, tight");
    expect((await call("GET", "/api/activity?type=counter")).status).toBe(200);
  });
});

describe("with the gateway stopped", () => {
  test("`fleet pause|resume|retire` print the status as the API shows it", async () => {
    expect(await fleet.stop()).toBe(0);
    const paused = await fleet.cli("pause", "counter/c2");
    expect([paused.code, paused.json.status]).toEqual([0, "paused"]);
    const resumed = await fleet.cli("resume", "counter/c2");
    expect(resumed.code).toBe(0);
    expect(resumed.json).toEqual({ ok: true, agent: "counter/c2", action: "resume", status: "idle" });
  }, 60_000);
});
