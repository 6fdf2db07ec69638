/**
 * `GET /api/events`: live fleet facts as Server-Sent Events for the dashboard.
 *
 * Streams `episode` and `status` facts from the event bus and a periodic `health` tick
 * (computed once per tick for all connections, and only while someone listens). A client
 * that stops reading is never allowed to grow memory: past `maxBuffered` queued events its
 * new events are dropped and, once it drains, it gets one `resync` event telling it to
 * re-read the API. Disconnects unsubscribe at once. A stream lives no longer than the
 * credential that opened it: asked before every write (every event, every health tick), a
 * revoked token or an ended session closes it instead.
 */
import type { FleetEventMap, FleetEvents } from "../events.ts";

/** What the stream needs. */
export interface EventStreamDeps {
  readonly events: FleetEvents;
  /** The health body sent on every tick. */
  readonly health: () => Promise<unknown>;
  readonly tickMs?: number;
  /** Events queued for one connection before new ones are dropped (default 500). */
  readonly maxBuffered?: number;
  /**
   * Streams open at once, read per request (default: no bound of its own). Past it a new one is a
   * 503: streams stay open for hours, and must leave room for the API's other requests.
   */
  readonly maxStreams?: () => number;
  readonly onError?: (err: unknown) => void;
}

interface Client {
  readonly ctrl: ReadableStreamDefaultController<Uint8Array>;
  /** Only facts about this agent, when set (`?agent=type/key`). */
  readonly agent: string | null;
  /** Whether the credential that opened the stream still admits it. */
  readonly admitted: () => boolean;
  dropped: number;
  close(): void;
}

const enc = new TextEncoder();
const STREAMED = ["episode", "status"] as const satisfies readonly (keyof FleetEventMap)[];

/** One hub per HTTP server: fans bus facts out to every SSE connection. */
export class EventStream {
  private readonly clients = new Set<Client>();
  private readonly offs: (() => void)[] = [];
  private tick: ReturnType<typeof setInterval> | null = null;
  private nextId = 1;
  private closed = false;
  private readonly maxBuffered: number;

  constructor(private readonly deps: EventStreamDeps) {
    this.maxBuffered = deps.maxBuffered ?? 500;
  }

  /** Open connections. */
  get size(): number {
    return this.clients.size;
  }

  /**
   * Answer one `GET /api/events` (pass Bun's server to lift its idle timeout for this request);
   * `admitted` says whether its credential still holds (false: the stream ends at its next write).
   */
  handle(
    req: Request,
    server?: { timeout(req: Request, seconds: number): void },
    admitted: () => boolean = () => true,
  ): Response {
    if (this.closed) return new Response("shutting down", { status: 503 });
    const max = this.deps.maxStreams?.() ?? Number.POSITIVE_INFINITY;
    if (this.clients.size >= max)
      return Response.json(
        { error: { code: "busy", message: `${this.clients.size} event streams open (at most ${max}); retry later` } },
        { status: 503, headers: { "retry-after": "5" } },
      );
    server?.timeout(req, 0);
    const agent = new URL(req.url).searchParams.get("agent");
    let client!: Client;
    const stream = new ReadableStream<Uint8Array>({
      start: (ctrl) => {
        let open = true;
        client = {
          ctrl,
          agent,
          admitted,
          dropped: 0,
          close: () => {
            if (!open) return;
            open = false;
            this.clients.delete(client);
            if (this.clients.size === 0) this.idle();
            try {
              ctrl.close();
            } catch {
              // already closed by the peer
            }
          },
        };
        // `retry` makes EventSource reconnect quickly after a gateway restart.
        ctrl.enqueue(enc.encode(`retry: 2000\n: fleet events\n\n`));
        this.clients.add(client);
        this.busy();
        void this.sendHealth([client]);
      },
      cancel: () => client.close(),
    });
    req.signal.addEventListener("abort", () => client.close(), { once: true });
    return new Response(stream, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-store",
        connection: "keep-alive",
        "x-accel-buffering": "no",
      },
    });
  }

  /** Close every connection and stop listening. */
  close(): void {
    this.closed = true;
    for (const c of [...this.clients]) c.close();
    this.idle();
  }

  private busy(): void {
    if (this.offs.length > 0) return;
    for (const kind of STREAMED) {
      this.offs.push(this.deps.events.on(kind, (e) => this.broadcast(kind, e, e.agent)));
    }
    this.tick = setInterval(() => void this.sendHealth([...this.clients]), this.deps.tickMs ?? 5000);
    this.tick.unref?.();
  }

  private idle(): void {
    for (const off of this.offs.splice(0)) off();
    if (this.tick) clearInterval(this.tick);
    this.tick = null;
  }

  private async sendHealth(to: Client[]): Promise<void> {
    if (to.length === 0) return;
    try {
      const body = await this.deps.health();
      for (const c of to) this.write(c, "health", body);
    } catch (err) {
      this.deps.onError?.(err);
    }
  }

  private broadcast(kind: string, data: unknown, agent: string): void {
    for (const c of this.clients) if (c.agent === null || c.agent === agent) this.write(c, kind, data);
  }

  private write(c: Client, event: string, data: unknown): void {
    if (!this.clients.has(c)) return;
    // Revoked token, signed-out or expired session: nothing more goes out, the stream ends.
    if (!c.admitted()) {
      c.close();
      return;
    }
    const queued = 1 - (c.ctrl.desiredSize ?? 0);
    // Once dropping, keep dropping until the backlog is half gone, then say so once.
    if (queued >= (c.dropped > 0 ? this.maxBuffered / 2 : this.maxBuffered)) {
      c.dropped++;
      return;
    }
    try {
      if (c.dropped > 0) {
        c.ctrl.enqueue(frame(this.nextId++, "resync", { dropped: c.dropped }));
        c.dropped = 0;
      }
      c.ctrl.enqueue(frame(this.nextId++, event, data));
    } catch {
      c.close();
    }
  }
}

function frame(id: number, event: string, data: unknown): Uint8Array {
  return enc.encode(`id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}
