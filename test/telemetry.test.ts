/**
 * OTLP export failures are not silent: spans the collector did not take are counted by reason and
 * logged, the first loss at once, then a line a minute at most with the counts since the last.
 */
import { describe, expect, test } from "bun:test";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { type SpanExporter, SimpleSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import pino from "pino";
import { DROP_LOG_EVERY_MS, WatchedExporter } from "../gateway/telemetry/index.ts";

function logged() {
  const lines: { level: number; msg: string; dropped?: number }[] = [];
  return { lines, log: pino({ level: "debug" }, { write: (l: string) => void lines.push(JSON.parse(l)) }) };
}

/** Export `n` spans through `exporter`, one export each. */
async function spans(exporter: SpanExporter, n: number): Promise<void> {
  const provider = new TracerProvider({ spanProcessors: [new SimpleSpanProcessor({ exporter })] });
  for (let i = 0; i < n; i++) provider.getTracer("t").startSpan(`s${i}`).end();
  // A failed export rejects the flush: what the exporter counted is the point here.
  await provider.forceFlush().catch(() => undefined);
}

/** An exporter whose every export ends as `outcome` says. */
function scripted(outcome: { failing: Error | null }): SpanExporter {
  return {
    export: (_spans, done) => done(outcome.failing ? { code: 1, error: outcome.failing } : { code: 0 }),
    shutdown: async () => {},
  };
}

describe("spans the OTLP collector did not take", () => {
  test("are counted by reason and warned about once a minute at most, then once when export works again", async () => {
    let clock = 1_000_000;
    const outcome = { failing: new Error("connect ECONNREFUSED 127.0.0.1:1") as Error | null };
    const { lines, log } = logged();
    const watched = new WatchedExporter(scripted(outcome), log, () => clock);
    await spans(watched, 3);
    expect(watched.dropped).toEqual({ rejected: 0, timeout: 0, unreachable: 3 });
    expect(lines.map((l) => [l.msg, l.dropped])).toEqual([
      ["telemetry: the collector did not take 1 span(s) (unreachable); they are lost", 1],
    ]);
    clock += DROP_LOG_EVERY_MS;
    outcome.failing = new Error("Request timed out");
    await spans(watched, 1);
    expect(watched.dropped).toEqual({ rejected: 0, timeout: 1, unreachable: 3 });
    expect(lines.at(-1)!).toMatchObject({
      msg: "telemetry: the collector did not take 3 span(s) (timeout); they are lost",
      dropped: 3,
    });
    await spans(watched, 2);
    outcome.failing = null;
    await spans(watched, 1);
    expect(lines.at(-1)!.msg).toBe(
      "telemetry: the collector takes spans again; 2 more span(s) were lost since the last warning",
    );
    expect(lines).toHaveLength(3);
    expect(lines.every((l) => l.level === 40)).toBe(true);
  });

  test("the real OTLP exporter's failures: an error status is rejected, nobody listening is unreachable", async () => {
    const collector = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("no", { status: 400 }) });
    const dead = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("") });
    const deadUrl = `http://127.0.0.1:${dead.port}/v1/traces`;
    dead.stop(true);
    try {
      const { log } = logged();
      const rejected = new WatchedExporter(
        new OTLPTraceExporter({ url: `http://127.0.0.1:${collector.port}/v1/traces` }),
        log,
        Date.now,
      );
      await spans(rejected, 1);
      expect(rejected.dropped).toEqual({ rejected: 1, timeout: 0, unreachable: 0 });
      const unreachable = new WatchedExporter(new OTLPTraceExporter({ url: deadUrl }), log, Date.now);
      await spans(unreachable, 1);
      expect(unreachable.dropped).toEqual({ rejected: 0, timeout: 0, unreachable: 1 });
    } finally {
      collector.stop(true);
    }
  }, 60_000);
});
