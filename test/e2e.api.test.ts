/**
 * The HTTP API (docs/http-api.md) and the `fleet` read commands against a real gateway process that
 * has run real episodes: paging and filters that hold for many agents, one error shape for
 * every failure, episode event logs with their decisions, checkpoint chains, the live
 * event stream and `/metrics`. CLI `--json` output is parsed and compared with the API.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { MqttClient } from "mqtt";
import { TestFleet, cleanupAll, publishQos1, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { counterType, fleetHeader, tempMonitorType, throwerType } from "./helpers/toml.ts";

/** 120 deployed counter instances: enough for three pages of 50. */
const DEVICES = Array.from({ length: 120 }, (_, i) => `dev-${String(i).padStart(3, "0")}`);

const TOML =
  fleetHeader("e2e-api") +
  counterType("counter", "api/+/in", { instances: DEVICES }) +
  tempMonitorType("monitor") +
  throwerType("bad/+/in");

let fleet: TestFleet;
let client: MqttClient;
let base: string;

const get = async (path: string) => {
  const res = await fleet.fetch(path);
  return { status: res.status, type: res.headers.get("content-type") ?? "", body: (await res.json()) as any };
};
const post = async (path: string) => {
  const res = await fleet.fetch(path, { method: "POST" });
  return { status: res.status, body: (await res.json()) as any };
};

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  base = fleet.httpUrl;
  client = await fleet.mqtt({ clientId: "e2e-api" });
  // Real episodes: 5 for counter/dev-000, 1 for dev-001, an alert and a clear for the
  // monitor, one failure (quarantined at once) for the thrower.
  for (let i = 0; i < 5; i++) await publishQos1(client, "api/dev-000/in", { id: `a${i}`, n: i });
  await publishQos1(client, "api/dev-001/in", { id: "b0" });
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t1", value: 91.5 });
  await publishQos1(client, "sensors/boiler-1/temperature", { id: "t2", value: 70 });
  await publishQos1(client, "bad/x/in", { id: "boom" });
  await fleet.waitCommitted("counter/dev-000", 5);
  await fleet.waitCommitted("monitor/boiler-1", 2);
  await fleet.waitEpisodes("thrower/x", (eps) => eps.length === 1, 30_000, "the thrower's failed episode");
}, 90_000);

afterAll(async () => {
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

// First: the summary's rates cover the last minute, which holds the episodes beforeAll ran.
describe("the fleet summary", () => {
  test("/healthz, /readyz and /api/fleet answer with the fleet summary", async () => {
    expect((await get("/healthz")).status).toBe(200);
    expect((await get("/readyz")).body).toMatchObject({ ready: true, state: "running" });
    const f = await get("/api/fleet");
    expect(f.body).toMatchObject({ fleet: "e2e-api", state: "running", spec_error: null, agents: { total: 122 } });
    expect(f.body.rates.episodes).toBeGreaterThanOrEqual(9);
    expect(f.body.rates.failures).toBe(1);
    expect(Object.keys(f.body.types).sort()).toEqual(["counter", "monitor", "thrower"]);
  }, 60_000);
});

describe("agents: paging and filters", () => {
  test("pages of 50 cover all 122 agents once, in a stable order", async () => {
    const seen: string[] = [];
    for (let page = 1; page <= 3; page++) {
      const r = await get(`/api/agents?limit=50&page=${page}`);
      expect(r.status).toBe(200);
      expect(r.body).toMatchObject({ total: 122, page, limit: 50, pages: 3 });
      expect(r.body.agents.length).toBe(page < 3 ? 50 : 22);
      seen.push(...r.body.agents.map((a: any) => a.id));
    }
    expect(new Set(seen).size).toBe(122);
    expect(seen).toEqual([...seen].sort());
    const beyond = await get("/api/agents?limit=50&page=4");
    expect(beyond.body).toMatchObject({ agents: [], total: 122, page: 4 });
  }, 60_000);

  test("q searches ids, type and status filter, and they combine", async () => {
    const q1 = await get("/api/agents?q=dev-01&limit=100");
    expect(q1.body.total).toBe(10);
    expect(q1.body.agents.every((a: any) => a.id.includes("dev-01"))).toBe(true);

    const byType = await get("/api/agents?type=monitor");
    expect(byType.body.agents.map((a: any) => a.id)).toEqual(["monitor/boiler-1"]);
    expect(byType.body.agents[0]).toMatchObject({
      type: "monitor",
      key: "boiler-1",
      status: "idle",
      episodes: 2,
      seq: 2,
    });

    expect((await post("/api/agents/counter/dev-005/pause")).status).toBe(200);
    expect((await post("/api/agents/counter/dev-017/pause")).status).toBe(200);
    try {
      const paused = await get("/api/agents?status=paused");
      expect(paused.body.agents.map((a: any) => [a.id, a.status, a.reason])).toEqual([
        ["counter/dev-005", "paused", "paused by operator"],
        ["counter/dev-017", "paused", "paused by operator"],
      ]);
      const combined = await get("/api/agents?status=paused&type=counter&q=dev-01");
      expect(combined.body.agents.map((a: any) => a.id)).toEqual(["counter/dev-017"]);
      expect((await get("/api/agents?status=paused&type=monitor")).body).toMatchObject({ agents: [], total: 0 });
      // `idle` is what the API shows; the stored `active` is accepted as an alias.
      const idle = await get("/api/agents?status=idle&limit=1");
      expect(idle.body.total).toBe(120);
      expect((await get("/api/agents?status=active&limit=1")).body.total).toBe(120);

      // The CLI reads the same data dir and agrees.
      const cli = await fleet.cli("agents", "--status", "paused");
      expect(cli.code).toBe(0);
      expect(cli.json.agents.map((a: any) => a.id)).toEqual(["counter/dev-005", "counter/dev-017"]);
      expect(cli.json.total).toBe(2);
    } finally {
      await post("/api/agents/counter/dev-005/resume");
      await post("/api/agents/counter/dev-017/resume");
    }
  }, 60_000);

  test("`fleet agents --json` pages like the API", async () => {
    const cli = await fleet.cli("agents", "--type", "counter", "--limit", "50", "--page", "3");
    expect(cli.code).toBe(0);
    const api = await get("/api/agents?type=counter&limit=50&page=3");
    expect(cli.json.total).toBe(120);
    expect(cli.json.agents.map((a: any) => a.id)).toEqual(api.body.agents.map((a: any) => a.id));
    expect(cli.json.agents.length).toBe(20);
    // The CLI takes the status the API shows (`idle`), like the API does.
    const idle = await fleet.cli("agents", "--status", "idle", "--type", "counter", "--limit", "1");
    expect(idle.json.total).toBe(120);
  }, 60_000);
});

describe("one error shape", () => {
  const cases: [string, string, number, string][] = [
    ["GET", "/api/agents?limit=0", 400, "bad_query"],
    ["GET", "/api/agents?limit=abc", 400, "bad_query"],
    ["GET", "/api/agents?limit=5000", 400, "bad_query"],
    ["GET", "/api/agents?page=0", 400, "bad_query"],
    ["GET", "/api/agents?status=sleepy", 400, "bad_query"],
    ["GET", "/api/agents?status=running", 400, "bad_query"],
    ["GET", "/api/agents?type=bad%20type", 400, "bad_query"],
    ["GET", "/api/agents/counter/nope", 404, "not_found"],
    ["GET", "/api/agents/counter/bad%20key", 400, "bad_agent"],
    ["GET", "/api/agents/counter/nope/episodes", 404, "not_found"],
    ["GET", "/api/agents/counter/dev-000/episodes?limit=-1", 400, "bad_query"],
    ["GET", "/api/agents/counter/dev-000/episodes?status=weird", 400, "bad_query"],
    ["GET", "/api/agents/counter/nope/checkpoints", 404, "not_found"],
    ["GET", "/api/episodes/00000000-0000-0000-0000-000000000000", 404, "not_found"],
    ["GET", "/api/episodes/00000000-0000-0000-0000-000000000000/events", 404, "not_found"],
    ["GET", "/api/nothing-here", 404, "not_found"],
    ["POST", "/api/agents/counter/nope/pause", 404, "not_found"],
    ["POST", "/api/agents/counter/dev-000/explode", 404, "not_found"],
    // Numbers are written plainly: no exponent, no spaces, no hex.
    ["GET", "/api/agents?limit=1e2", 400, "bad_query"],
    ["GET", "/api/agents?page=%202", 400, "bad_query"],
    ["GET", "/api/agents/counter/dev-000/episodes?before=0x10", 400, "bad_query"],
    ["GET", "/api/quarantine?limit=abc", 400, "bad_query"],
    ["GET", "/api/quarantine?limit=0", 400, "bad_query"],
    ["POST", "/api/quarantine/1e3/retry", 400, "bad_seq"],
  ];
  const bodies: [string, string, number, string][] = [
    ["/api/send", "{not json", 400, "bad_json"],
    ["/api/send", JSON.stringify({ payload: 1 }), 400, "bad_request"],
    ["/api/send", JSON.stringify({ topic: "nobody/listens/here", payload: 1 }), 404, "no_target"],
    ["/api/send", JSON.stringify({ topic: 5 }), 400, "bad_request"],
    ["/api/send", JSON.stringify({ topic: "api/dev-000/in", payload: 1, id: 7 }), 400, "bad_request"],
    ["/api/send", JSON.stringify({ topic: "api/dev-000/in", payload: 1, colour: "red" }), 400, "bad_request"],
    ["/api/send", "[]", 400, "bad_request"],
    ["/api/agents/counter/dev-000/stimuli", "{not json", 400, "bad_json"],
    ["/api/agents/nosuchtype/k/stimuli", "{}", 404, "not_found"],
  ];
  for (const [path, body, status, code] of bodies) {
    test(`POST ${path} with ${body} -> ${status} ${code}`, async () => {
      const res = await fleet.fetch(path, { method: "POST", body });
      expect(res.status).toBe(status);
      const json = (await res.json()) as { error: { code: string; message: string } };
      expect(json.error.code).toBe(code);
      expect(json.error.message.length).toBeGreaterThan(5);
    }, 60_000);
  }

  test("a bad /api/send body is refused naming the field, and records nothing", async () => {
    const before = (await fleet.episodes("counter/dev-002")).length;
    const res = await fleet.fetch("/api/send", {
      method: "POST",
      body: JSON.stringify({ topic: "api/dev-002/in", payload: { n: 1 }, id: 42 }),
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as any).error).toEqual({ code: "bad_request", message: "body id must be a string" });
    const stimuli = await fleet.query("SELECT count(*) AS n FROM stimuli WHERE agent = ?", ["counter/dev-002"]);
    expect(Number(stimuli[0]!.n)).toBe(0);
    expect((await fleet.episodes("counter/dev-002")).length).toBe(before);
  }, 60_000);

  for (const [method, path, status, code] of cases) {
    test(`${method} ${path} -> ${status} ${code}`, async () => {
      const res = await fleet.fetch(path, { method });
      expect(res.status).toBe(status);
      expect(res.headers.get("content-type")).toContain("application/json");
      const body = (await res.json()) as any;
      expect(Object.keys(body)).toEqual(["error"]);
      expect(body.error.code).toBe(code);
      expect(typeof body.error.message).toBe("string");
      expect(body.error.message.length).toBeGreaterThan(5);
    }, 60_000);
  }
});

describe("episodes, event logs, decisions, checkpoints", () => {
  test("an agent's episodes page newest first with next_before, and match `fleet episodes --json`", async () => {
    const all = await get("/api/agents/counter/dev-000/episodes");
    expect(all.body.agent).toBe("counter/dev-000");
    expect(all.body.episodes.length).toBe(5);
    expect(all.body.next_before).toBeNull();
    const starts = all.body.episodes.map((e: any) => e.started_at);
    expect(starts).toEqual([...starts].sort((a: number, b: number) => b - a));

    const paged: string[] = [];
    let cursor: number | null = null;
    for (let i = 0; i < 5; i++) {
      const r: any = await get(
        `/api/agents/counter/dev-000/episodes?limit=2${cursor !== null ? `&before=${cursor}` : ""}`,
      );
      paged.push(...r.body.episodes.map((e: any) => e.id));
      cursor = r.body.next_before;
      if (cursor === null) break;
    }
    expect(paged).toEqual(all.body.episodes.map((e: any) => e.id));

    const cli = await fleet.cli("episodes", "counter/dev-000");
    expect(cli.code).toBe(0);
    expect(cli.json.agent).toBe("counter/dev-000");
    expect(cli.json.episodes.map((e: any) => [e.id, e.status, e.stimulus, e.checkpoint])).toEqual(
      all.body.episodes.map((e: any) => [e.id, e.status, e.stimulus, e.checkpoint]),
    );

    const failed = await get("/api/agents/thrower/x/episodes?status=failed");
    expect(failed.body.episodes.map((e: any) => [e.status, e.error_kind])).toEqual([["failed", "threw"]]);
    expect((await get("/api/agents/thrower/x/episodes?status=committed")).body.episodes).toEqual([]);
  }, 60_000);

  test("an episode shows its event log and its decisions", async () => {
    const eps = (await get("/api/agents/monitor/boiler-1/episodes")).body.episodes;
    const alert = eps.find((e: any) => e.stimulus === "id:t1");
    const r = await get(`/api/episodes/${alert.id}`);
    expect(r.status).toBe(200);
    expect(r.body).toMatchObject({ id: alert.id, agent: "monitor/boiler-1", status: "committed", stimulus: "id:t1" });
    const kinds = r.body.events.map((e: any) => e.kind);
    expect(kinds[0]).toBe("stimulus");
    expect(kinds.at(-1)).toBe("end");
    expect(kinds).toContain("decide");
    expect(kinds).toContain("tool");
    expect(r.body.events.map((e: any) => e.seq)).toEqual(r.body.events.map((_: unknown, i: number) => i));
    expect(r.body.events.length).toBe(r.body.event_count);
    expect(r.body.decisions).toEqual([
      { seq: kinds.indexOf("decide"), name: "alert", data: { value: 91.5, threshold: 80 } },
    ]);

    const onlyDecisions = await get(`/api/episodes/${alert.id}/events?kind=decide`);
    expect(onlyDecisions.body.events.map((e: any) => e.kind)).toEqual(["decide"]);
    expect(onlyDecisions.body.decisions).toEqual(r.body.decisions);

    const show = await fleet.cli("show", alert.id);
    expect(show.code).toBe(0);
    expect(show.json.events.map((e: any) => e.kind)).toEqual(kinds);

    const failed = (await get("/api/agents/thrower/x/episodes")).body.episodes[0];
    const f = await get(`/api/episodes/${failed.id}`);
    expect(f.body.events.at(-1)).toMatchObject({ kind: "failure", data: { kind: "threw" } });
    expect(f.body.decisions).toEqual([]);
  }, 60_000);

  test("the agent shows its newest checkpoints; the chain pages and links parent to child", async () => {
    const a = await get("/api/agents/counter/dev-000");
    expect(a.body).toMatchObject({ id: "counter/dev-000", seq: 5, episodes: 5 });
    expect(a.body.checkpoints.map((c: any) => c.seq)).toEqual([5, 4, 3, 2, 1]);
    expect(a.body.checkpoints[0].hash).toBe(a.body.checkpoint);

    const first = await get("/api/agents/counter/dev-000/checkpoints?limit=3");
    expect(first.body.checkpoints.map((c: any) => c.seq)).toEqual([5, 4, 3]);
    expect(first.body.next_before).toBe(3);
    const rest = await get(`/api/agents/counter/dev-000/checkpoints?limit=3&before=${first.body.next_before}`);
    expect(rest.body.checkpoints.map((c: any) => c.seq)).toEqual([2, 1]);
    expect(rest.body.next_before).toBeNull();
    const chain = [...first.body.checkpoints, ...rest.body.checkpoints];
    for (let i = 0; i < chain.length - 1; i++) expect(chain[i].parent).toBe(chain[i + 1].hash);
    expect(chain.at(-1).parent).toBeNull();
    expect(chain.every((c: any) => c.collected === false)).toBe(true);
  }, 60_000);
});

describe("live and health endpoints", () => {
  test("/api/events streams a new episode as it commits, and a closed stream frees its slot", async () => {
    const ac = new AbortController();
    const res = await fleet.fetch("/api/events", { signal: ac.signal });
    expect(res.headers.get("content-type")).toStartWith("text/event-stream");
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let text = "";
    await waitFor(
      async () => (await scrape(base)).text.includes("fleet_sse_clients 1"),
      10_000,
      "one SSE client in /metrics",
    );
    await publishQos1(client, "api/dev-002/in", { id: "live-1" });
    const deadline = Date.now() + 30_000;
    while (!/event: episode\ndata: \{[^\n]*"agent":"counter\/dev-002"/.test(text)) {
      if (Date.now() > deadline) throw new Error(`no episode event; got:\n${text.slice(-2000)}`);
      const { value, done } = await reader.read();
      if (done) throw new Error("stream ended");
      text += dec.decode(value, { stream: true });
    }
    expect(text).toContain("event: health");
    expect(text).toMatch(/event: status\ndata: \{"agent":"counter\/dev-002","status":"running"\}/);
    ac.abort();
    await waitFor(
      async () => sampleValue(await scrape(base), "fleet_sse_clients") === 0,
      10_000,
      "the SSE client to be released",
    );
  }, 60_000);

  test("/metrics of the real process counts its episodes by type", async () => {
    const x = await scrape(base);
    expect(sampleValue(x, "fleet_episodes_total", { type: "counter", outcome: "committed" })).toBeGreaterThanOrEqual(6);
    expect(sampleValue(x, "fleet_episodes_total", { type: "monitor", outcome: "committed" })).toBe(2);
    expect(sampleValue(x, "fleet_episodes_total", { type: "thrower", outcome: "failed" })).toBe(1);
    expect(sampleValue(x, "fleet_stimuli_total", { source: "mqtt" })).toBeGreaterThanOrEqual(9);
    expect(sampleValue(x, "fleet_broker_clients")).toBeGreaterThanOrEqual(1);
  }, 60_000);
});

// Last in the file: the health test above reads a rate over the last minute of episodes.
describe("fleet numbers and flags", () => {
  test.each([
    [["agents", "--limit", "1e2"], '--limit must be an integer from 1 to 100000, got "1e2"'],
    [["agents", "--page", "0"], "--page must be an integer from 1 to 9007199254740991, got 0"],
    [["episodes", "counter/dev-000", "--limit", "ten"], '--limit must be an integer from 1 to 100000, got "ten"'],
    [["quarantine", "list", "--limit=-1"], "--limit must be an integer from 1 to 10000, got -1"],
    [["agents", "--bogus"], "Unknown option '--bogus'"],
    [["quarantine", "retry", "0x10"], "stimulus seq (the SEQ column) must be an integer from 0 to"],
    [["gc", "--dry-run", "--now", "soon"], "--now (epoch milliseconds) must be an integer from 0 to"],
  ])(
    "`fleet %j` is a usage error naming the bad flag or number (exit 2)",
    async (args, message) => {
      const r = await fleet.cli(...args);
      expect(r.code).toBe(2);
      expect(r.stderr).toContain(message);
    },
    60_000,
  );
});
