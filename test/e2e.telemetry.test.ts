/**
 * OpenTelemetry: with `[telemetry] otlp_endpoint`, every episode is a span exported over
 * OTLP/HTTP to a receiver this test runs; an episode caused by another agent's `ctx.send`
 * is a child of the sender's span in the same trace; tool calls are child spans; a webhook
 * carrying a W3C `traceparent` puts its episode in the caller's trace. A dead
 * collector costs nothing but the spans, which are counted and logged.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { cleanupAll, publishQos1, TestFleet, waitFor } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { fleetHeader, q, relayChainTypes } from "./helpers/toml.ts";

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  attributes: { key: string; value: Record<string, unknown> }[];
  status?: { code?: number };
}

/** OTLP/JSON ids are hex; some encoders send base64: normalise to hex. */
const hex = (id: string | undefined) =>
  !id ? "" : /^[0-9a-f]+$/.test(id) ? id : Buffer.from(id, "base64").toString("hex");

const received: OtlpSpan[] = [];
const receiver = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  async fetch(req) {
    if (new URL(req.url).pathname !== "/v1/traces") return new Response("not found", { status: 404 });
    const body = (await req.json()) as {
      resourceSpans: { scopeSpans: { spans: OtlpSpan[] }[] }[];
    };
    for (const rs of body.resourceSpans ?? [])
      for (const ss of rs.scopeSpans ?? [])
        for (const s of ss.spans ?? [])
          received.push({ ...s, traceId: hex(s.traceId), spanId: hex(s.spanId), parentSpanId: hex(s.parentSpanId) });
    return Response.json({});
  },
});

const chain = (endpoint: string) =>
  fleetHeader("otel", { extra: `\n[telemetry]\notlp_endpoint = ${q(endpoint)}\nservice_name = "otel-test"\n` }) +
  relayChainTypes() +
  '\n[hooks.door]\nagent = "relay/d2"\n';

const attr = (s: OtlpSpan, key: string) => {
  const v = s.attributes.find((a) => a.key === key)?.value;
  return v ? Object.values(v)[0] : undefined;
};

afterAll(async () => {
  await cleanupAll();
  receiver.stop(true);
});

describe("spans over OTLP/HTTP", () => {
  let fleet: TestFleet;
  beforeAll(async () => {
    fleet = new TestFleet(chain(`http://127.0.0.1:${receiver.port}`));
    await fleet.start();
    await publishQos1(await fleet.mqtt(), "door/d1/event", { open: true });
    await fleet.waitCommitted("alerter/d1", 1);
  });

  test("each episode is a span; the alerter's is a child of the relay's, in one trace", async () => {
    const relayEp = (await fleet.episodes("relay/d1"))[0]!;
    const alerterEp = (await fleet.episodes("alerter/d1"))[0]!;
    await waitFor(() => received.some((s) => attr(s, "fleet.episode") === alerterEp.id), 30_000, "alerter span");
    const relay = received.find((s) => attr(s, "fleet.episode") === relayEp.id)!;
    const alerter = received.find((s) => attr(s, "fleet.episode") === alerterEp.id)!;
    expect(relay.name).toBe("episode relay/d1");
    expect(attr(relay, "messaging.destination.name")).toBe("door/d1/event");
    expect(relay.parentSpanId).toBe("");
    expect(alerter.name).toBe("episode alerter/d1");
    expect(alerter.traceId).toBe(relay.traceId);
    expect(alerter.parentSpanId).toBe(relay.spanId);
    expect(attr(alerter, "fleet.stimulus.kind")).toBe("inbox");
  });

  test("a webhook's traceparent makes its episode a child of the caller's span, in the caller's trace", async () => {
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const parent = "00f067aa0ba902b7";
    const post = (body: object, traceparent: string) =>
      fetch(`${fleet.httpUrl}/hooks/door`, {
        method: "POST",
        headers: { "content-type": "application/json", traceparent },
        body: JSON.stringify(body),
      });
    expect((await post({ open: true, n: 1 }, `00-${traceId}-${parent}-01`)).status).toBe(202);
    // A malformed header is ignored: that episode starts a trace of its own.
    expect((await post({ open: true, n: 2 }, "00-not-a-trace-01")).status).toBe(202);
    const eps = await fleet.waitCommitted("relay/d2", 2);
    const [second, first] = eps;
    await waitFor(() => received.some((s) => attr(s, "fleet.episode") === second!.id), 30_000, "webhook spans");
    await waitFor(() => received.some((s) => attr(s, "fleet.episode") === first!.id), 30_000, "webhook spans");
    const traced = received.find((s) => attr(s, "fleet.episode") === first!.id)!;
    expect([traced.traceId, traced.parentSpanId]).toEqual([traceId, parent]);
    const untraced = received.find((s) => attr(s, "fleet.episode") === second!.id)!;
    expect(untraced.parentSpanId).toBe("");
    expect(untraced.traceId).not.toBe(traceId);
  });

  test("replay of exported episodes stays MATCH: telemetry changes nothing an episode records", async () => {
    for (const agent of ["relay/d1", "alerter/d1", "relay/d2"]) {
      const r = await fleet.cli("replay", "--agent", agent);
      expect([agent, r.code, r.json.diverged]).toEqual([agent, 0, 0]);
      expect(r.json.matched).toBe(r.json.episodes);
    }
  });

  test("tool calls are child spans of their episode", async () => {
    const alerterEp = (await fleet.episodes("alerter/d1"))[0]!;
    const alerter = received.find((s) => attr(s, "fleet.episode") === alerterEp.id)!;
    await waitFor(() => received.some((s) => s.parentSpanId === alerter.spanId), 30_000, "tool span");
    const tool = received.find((s) => s.parentSpanId === alerter.spanId)!;
    expect(tool.name).toBe("tool publish");
    expect(attr(tool, "fleet.tool.target")).toBe("alerts/d1");
    expect(tool.traceId).toBe(alerter.traceId);
  });
});

describe("a dead collector", () => {
  test("episodes commit as usual when the OTLP endpoint does not answer; lost spans are counted, logged", async () => {
    const dead = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("") });
    const url = `http://127.0.0.1:${dead.port}`;
    dead.stop(true); // nothing listens there any more
    const fleet = new TestFleet(chain(url));
    await fleet.start();
    const client = await fleet.mqtt();
    for (let i = 0; i < 3; i++) await publishQos1(client, "door/d1/event", { n: i });
    expect(await fleet.waitCommitted("alerter/d1", 3)).toHaveLength(3);
    // The exporter retries a refused connection for a few seconds before it gives the batch up.
    const dropped = await waitFor(
      async () => {
        const v = sampleValue(await scrape(fleet.httpUrl), "fleet_telemetry_spans_dropped_total", {
          reason: "unreachable",
        });
        return v !== undefined && v > 0 ? v : undefined;
      },
      60_000,
      "spans counted as dropped in /metrics",
      250,
    );
    expect(dropped).toBeGreaterThan(0);
    expect(readFileSync(fleet.logPath, "utf8")).toContain("telemetry: the collector did not take");
    expect(await fleet.stop()).toBe(0);
  }, 120_000);
});
