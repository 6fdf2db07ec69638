/**
 * OpenTelemetry export (`[telemetry] otlp_endpoint`): one span per episode, exported over
 * OTLP/HTTP with the official SDK. It is an observer: it reads a committed (or failed)
 * episode from the store after the fact and never sits on the commit path, so a slow or
 * dead collector costs a bounded export queue, never an episode.
 *
 * Ids are derived, not stored: an episode's span id is BLAKE3("span:" + episode id), so
 * an episode that an agent's `ctx.send` caused names its sender's span as parent and
 * inherits its trace id: one trace crosses every agent a stimulus reaches (a wake-up's
 * episode is likewise the child of the episode that set it). A stimulus that came in with a
 * W3C `traceparent` (a webhook, `POST /api/send`) makes its episode the child of that remote
 * span, in that trace. Any other root episode's trace id is BLAKE3("trace:" + agent +
 * stimulus id), the same on every retry. Tool calls
 * are child spans, decisions and outputs are span events.
 *
 * Spans the collector did not take (down, an error status, no answer in time) are lost: they are
 * counted by reason (`fleet_telemetry_spans_dropped_total`) and logged, a line a minute at most.
 */
import { context, type SpanContext, SpanKind, SpanStatusCode, TraceFlags, trace } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  BatchSpanProcessor,
  type IdGenerator,
  RandomIdGenerator,
  type ReadableSpan,
  type SpanExporter,
  TracerProvider,
} from "@opentelemetry/sdk-trace";
import type { Logger } from "pino";
import type { FleetEvents } from "../events.ts";
import { blake3Hex } from "../hash.ts";
import type { EpisodeRow, EventRow, Store } from "../store/index.ts";
import { parseTraceparent, sentBy, setBy } from "../types.ts";

/** The episode whose send or wake-up is this stimulus, if one is. */
function causeOf(stimulusId: string): string | undefined {
  return sentBy(stimulusId) ?? setBy(stimulusId);
}

/** The span id every episode gets (16 hex). */
export async function episodeSpanId(episode: string): Promise<string> {
  return (await blake3Hex(`span:${episode}`)).slice(0, 16);
}

/** The trace id of an episode that no other episode caused (32 hex). */
export async function rootTraceId(agent: string, stimulusId: string): Promise<string> {
  return (await blake3Hex(`trace:${agent}:${stimulusId}`)).slice(0, 32);
}

/** An id generator the exporter asks for the span (and root trace) id we derived. */
class DerivedIds implements IdGenerator {
  private readonly random = new RandomIdGenerator();
  next: { traceId?: string; spanId?: string } = {};
  generateTraceId(): string {
    const id = this.next.traceId ?? this.random.generateTraceId();
    this.next.traceId = undefined;
    return id;
  }
  generateSpanId(): string {
    const id = this.next.spanId ?? this.random.generateSpanId();
    this.next.spanId = undefined;
    return id;
  }
}

/** What the exporter needs to know about the fleet. */
export interface TelemetryOptions {
  readonly endpoint: string;
  readonly serviceName: string;
  readonly fleet: string;
  readonly gateway: string;
  readonly log: Logger;
  /** Batch delay, ms (default 1000). */
  readonly delayMs?: number;
  /** The clock of the drop warnings' rate limit (tests). */
  readonly now?: () => number;
  /** The exporter (tests); default OTLP/HTTP to `endpoint`. */
  readonly exporter?: SpanExporter;
}

/** Why spans were lost: the collector answered an error status, did not answer in time, or was not reachable. */
export type SpanDropReason = "rejected" | "timeout" | "unreachable";

/** At most one warning about dropped spans per this many ms. */
export const DROP_LOG_EVERY_MS = 60_000;

function dropReason(err: Error | undefined): SpanDropReason {
  // OTLPExporterError carries the HTTP status as `code`.
  const status = (err as { code?: unknown } | undefined)?.code;
  if (typeof status === "number" && status > 0) return "rejected";
  return /timed? ?out|timeout/i.test(err?.message ?? "") ? "timeout" : "unreachable";
}

/**
 * The exporter, watched: the SDK drops a batch the collector did not take without a word. Counts
 * those spans by reason and warns, the first time at once, then at most once a minute with the
 * counts since the last line; an export that works again after a loss says so.
 */
export class WatchedExporter implements SpanExporter {
  readonly dropped: Record<SpanDropReason, number> = { rejected: 0, timeout: 0, unreachable: 0 };
  private unlogged = 0;
  private lastLog = -Infinity;

  constructor(
    private readonly inner: SpanExporter,
    private readonly log: Logger,
    private readonly now: () => number,
  ) {}

  export(spans: ReadableSpan[], done: Parameters<SpanExporter["export"]>[1]): void {
    this.inner.export(spans, (result) => {
      // ExportResultCode.SUCCESS is 0.
      if (result.code === 0) this.recovered();
      else this.lost(spans.length, result.error);
      done(result);
    });
  }

  private lost(n: number, err: Error | undefined): void {
    const reason = dropReason(err);
    this.dropped[reason] += n;
    this.unlogged += n;
    if (this.now() - this.lastLog < DROP_LOG_EVERY_MS) return;
    this.lastLog = this.now();
    this.log.warn(
      { dropped: this.unlogged, by_reason: { ...this.dropped }, err: err?.message },
      `telemetry: the collector did not take ${this.unlogged} span(s) (${reason}); they are lost`,
    );
    this.unlogged = 0;
  }

  private recovered(): void {
    if (this.unlogged === 0) return;
    this.log.warn(
      { dropped: this.unlogged, by_reason: { ...this.dropped } },
      `telemetry: the collector takes spans again; ${this.unlogged} more span(s) were lost since the last warning`,
    );
    this.unlogged = 0;
    this.lastLog = this.now();
  }

  shutdown(): Promise<void> {
    return this.inner.shutdown();
  }

  forceFlush(): Promise<void> {
    return this.inner.forceFlush?.() ?? Promise.resolve();
  }
}

function parse(row: EventRow): Record<string, unknown> {
  try {
    return JSON.parse(row.data) as Record<string, unknown>;
  } catch {
    return {};
  }
}

/** Exports a span for every episode the gateway finishes. */
export class EpisodeTelemetry {
  private readonly ids = new DerivedIds();
  private readonly provider: TracerProvider;
  private readonly exporter: WatchedExporter;
  private readonly traceIds = new Map<string, string>();
  private chain: Promise<void> = Promise.resolve();
  private off: (() => void) | null = null;

  constructor(
    private readonly store: Store,
    private readonly opts: TelemetryOptions,
  ) {
    const url = opts.endpoint.replace(/\/+$/, "");
    const exporter = (this.exporter = new WatchedExporter(
      opts.exporter ?? new OTLPTraceExporter({ url: url.endsWith("/v1/traces") ? url : `${url}/v1/traces` }),
      opts.log,
      opts.now ?? Date.now,
    ));
    this.provider = new TracerProvider({
      idGenerator: this.ids,
      resource: resourceFromAttributes({
        "service.name": opts.serviceName,
        "fleet.name": opts.fleet,
        "fleet.gateway": opts.gateway,
      }),
      spanProcessors: [
        new BatchSpanProcessor({ exporter, scheduledDelayMillis: opts.delayMs ?? 1000, maxQueueSize: 10_000 }),
      ],
    });
  }

  /** Spans the collector did not take, by reason, since start. */
  get dropped(): Readonly<Record<SpanDropReason, number>> {
    return this.exporter.dropped;
  }

  /** Start exporting the episodes reported on `events`. */
  attach(events: FleetEvents): void {
    this.off ??= events.on("episode", (e) => {
      // One at a time, in order: a parent's trace id is known before its children's.
      this.chain = this.chain.then(() =>
        this.export(e.episode).catch((err: unknown) =>
          this.opts.log.warn({ err, episode: e.episode }, "telemetry: span not exported"),
        ),
      );
    });
  }

  /** Stop listening, export what is queued, close the exporter. */
  async close(): Promise<void> {
    this.off?.();
    this.off = null;
    await this.chain;
    await this.provider.shutdown();
  }

  /** The remote parent a root episode's stimulus arrived with (`traceparent`), if any. */
  private async remoteParent(ep: EpisodeRow): Promise<{ traceId: string; spanId: string } | null> {
    const s = await this.store.getStimulus(ep.stimulusSeq);
    return parseTraceparent(s?.traceparent);
  }

  /** The trace id of an episode: inherited from the episode that caused its stimulus, else derived. */
  private async traceIdOf(ep: EpisodeRow, depth = 0): Promise<string> {
    const known = this.traceIds.get(ep.id);
    if (known) return known;
    const sender = causeOf(ep.stimulusId);
    const parent = sender && depth < 32 ? await this.store.getEpisode(sender) : undefined;
    const id = parent
      ? await this.traceIdOf(parent, depth + 1)
      : ((await this.remoteParent(ep))?.traceId ?? (await rootTraceId(ep.agent, ep.stimulusId)));
    if (this.traceIds.size > 10_000) this.traceIds.clear();
    this.traceIds.set(ep.id, id);
    return id;
  }

  private async export(id: string): Promise<void> {
    const ep = await this.store.getEpisode(id);
    if (!ep) return;
    const events = await this.store.listEvents(id);
    const traceId = await this.traceIdOf(ep);
    const sender = causeOf(ep.stimulusId);
    const parentSpan = sender ? await episodeSpanId(sender) : ((await this.remoteParent(ep))?.spanId ?? null);
    const parentCtx = parentSpan
      ? trace.setSpanContext(context.active(), {
          traceId,
          spanId: parentSpan,
          traceFlags: TraceFlags.SAMPLED,
          isRemote: true,
        } satisfies SpanContext)
      : context.active();
    const tracer = this.provider.getTracer("agent-fleets");
    const stimulus = parse(events.find((e) => e.kind === "stimulus") ?? ({ data: "{}" } as EventRow));
    this.ids.next = { traceId, spanId: await episodeSpanId(ep.id) };
    const span = tracer.startSpan(
      `episode ${ep.agent}`,
      {
        kind: SpanKind.CONSUMER,
        startTime: ep.startedAt,
        attributes: {
          "fleet.agent": ep.agent,
          "fleet.episode": ep.id,
          "fleet.stimulus.id": ep.stimulusId,
          "fleet.stimulus.kind": String(stimulus.kind ?? ""),
          ...(typeof stimulus.topic === "string" ? { "messaging.destination.name": stimulus.topic } : {}),
          "fleet.attempt": ep.attempt,
          "fleet.spec_version": ep.specVersion,
          ...(ep.checkpoint ? { "fleet.checkpoint": ep.checkpoint } : {}),
        },
      },
      parentCtx,
    );
    const spanCtx = trace.setSpan(context.active(), span);
    for (const e of events) {
      const d = parse(e);
      if (e.kind === "decide") span.addEvent(`decide ${String(d.name)}`, { data: JSON.stringify(d.data ?? null) });
      else if (e.kind === "emit") span.addEvent("emit", { data: JSON.stringify(d.data ?? null) });
      else if (e.kind === "tool") {
        const args = Array.isArray(d.args) ? d.args : [];
        // Tool calls carry no timing of their own in the log: they span the episode.
        const child = tracer.startSpan(
          `tool ${String(d.tool)}`,
          {
            kind: SpanKind.CLIENT,
            startTime: ep.startedAt,
            attributes: {
              "fleet.tool": String(d.tool),
              "fleet.tool.ok": d.ok === true,
              ...(d.tool === "publish" || d.tool === "send" ? { "fleet.tool.target": String(args[0]) } : {}),
            },
          },
          spanCtx,
        );
        if (d.ok !== true) child.setStatus({ code: SpanStatusCode.ERROR, message: JSON.stringify(d.result ?? null) });
        child.end(ep.endedAt);
      }
    }
    if (ep.status === "committed") span.setStatus({ code: SpanStatusCode.OK });
    else span.setStatus({ code: SpanStatusCode.ERROR, message: `${ep.errorKind ?? "failed"}: ${ep.error ?? ""}` });
    span.end(ep.endedAt);
  }
}
