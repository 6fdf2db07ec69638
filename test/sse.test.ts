/**
 * The dashboard's live stream (`GET /api/events`): facts from the event bus arrive as
 * server-sent events, a client that stops reading costs a bounded buffer and later gets
 * one `resync`, and a disconnect unsubscribes at once.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { FleetEvents } from "../gateway/events.ts";
import { EventStream } from "../gateway/observe/index.ts";
import { waitFor } from "./helpers/gateway.ts";

const listeners = (events: FleetEvents) => {
  const l = (events as unknown as { listeners: Record<string, unknown[]> }).listeners;
  return (l.episode?.length ?? 0) + (l.status?.length ?? 0);
};

/** Read SSE frames from a response body until `until` holds (bounded). */
async function readFrames(
  body: ReadableStream<Uint8Array>,
  until: (frames: { event: string; data: any }[]) => boolean,
  timeoutMs = 5000,
) {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  const frames: { event: string; data: any }[] = [];
  const deadline = Date.now() + timeoutMs;
  try {
    while (!until(frames)) {
      if (Date.now() > deadline) throw new Error(`timed out; got ${frames.map((f) => f.event).join(",")}`);
      const next = await Promise.race([reader.read(), Bun.sleep(Math.max(1, deadline - Date.now())).then(() => null)]);
      if (next === null) continue; // re-check the deadline
      const { value, done } = next;
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i: number;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1];
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (event && data) frames.push({ event, data: JSON.parse(data) });
      }
    }
  } finally {
    reader.releaseLock();
  }
  return frames;
}

const episode = (i: number, agent = "t/a") => ({
  episode: `e${i}`,
  agent,
  type: "t",
  stimulus: `s${i}`,
  status: "committed" as const,
  checkpoint: null,
  ms: 1,
  waitMs: 2,
  quarantined: false,
});

let hub: EventStream | null = null;
afterEach(() => hub?.close());

describe("GET /api/events", () => {
  test("streams episode and status facts, and a health tick", async () => {
    const events = new FleetEvents();
    hub = new EventStream({ events, health: async () => ({ ok: 1 }), tickMs: 50 });
    const res = hub.handle(new Request("http://x/api/events"));
    expect(res.headers.get("content-type")).toStartWith("text/event-stream");
    events.emit("status", { agent: "t/a", status: "running" });
    events.emit("episode", episode(1));
    const frames = await readFrames(
      res.body!,
      (f) => f.filter((x) => x.event === "health").length >= 2 && f.some((x) => x.event === "episode"),
    );
    expect(frames.find((f) => f.event === "status")?.data).toEqual({ agent: "t/a", status: "running" });
    expect(frames.find((f) => f.event === "episode")?.data.episode).toBe("e1");
  });

  test("?agent= narrows the stream to one agent", async () => {
    const events = new FleetEvents();
    hub = new EventStream({ events, health: async () => ({}), tickMs: 60_000 });
    const res = hub.handle(new Request("http://x/api/events?agent=t/b"));
    events.emit("episode", episode(1, "t/a"));
    events.emit("episode", episode(2, "t/b"));
    const frames = await readFrames(res.body!, (f) => f.some((x) => x.event === "episode"));
    expect(frames.filter((f) => f.event === "episode").map((f) => f.data.episode)).toEqual(["e2"]);
  });

  test("a client that stops reading buffers at most maxBuffered events, then gets one resync", async () => {
    const events = new FleetEvents();
    hub = new EventStream({ events, health: async () => ({}), tickMs: 60_000, maxBuffered: 20 });
    const res = hub.handle(new Request("http://x/api/events"));
    await Bun.sleep(10); // let the initial health frame go out
    for (let i = 0; i < 1000; i++) events.emit("episode", episode(i));
    // Now read everything that was buffered, then one more fact arrives.
    const frames = await readFrames(res.body!, (f) => f.filter((x) => x.event === "episode").length >= 15);
    expect(frames.filter((f) => f.event === "episode").length).toBe(15);
    events.emit("episode", episode(5000));
    const more = await readFrames(res.body!, (f) => f.some((x) => x.event === "episode" && x.data.episode === "e5000"));
    // What was buffered (20 frames with the stream's preamble and first health) came through; the rest was dropped.
    expect(more.filter((f) => f.event === "episode" && f.data.episode !== "e5000").length).toBeLessThanOrEqual(20 - 15);
    const resync = more.find((f) => f.event === "resync");
    expect(resync?.data.dropped).toBeGreaterThanOrEqual(1000 - 20);
    expect(more.findIndex((f) => f.event === "resync")).toBeLessThan(more.findIndex((f) => f.data.episode === "e5000"));
  });

  test("past maxStreams a new stream is a 503 with Retry-After; a closed one frees its place", async () => {
    const events = new FleetEvents();
    hub = new EventStream({ events, health: async () => ({}), tickMs: 60_000, maxStreams: () => 2 });
    const ac = new AbortController();
    const first = hub.handle(new Request("http://x/api/events", { signal: ac.signal }));
    hub.handle(new Request("http://x/api/events"));
    expect(first.status).toBe(200);
    const third = hub.handle(new Request("http://x/api/events"));
    expect(third.status).toBe(503);
    expect(third.headers.get("retry-after")).toBe("5");
    expect(((await third.json()) as { error: { code: string } }).error.code).toBe("busy");
    expect(hub.size).toBe(2);
    ac.abort();
    await waitFor(() => hub!.size === 1, 2000, "the aborted client to be dropped");
    expect(hub.handle(new Request("http://x/api/events")).status).toBe(200);
  });

  test("a disconnect unsubscribes from the bus; no listener or timer is left behind", async () => {
    const events = new FleetEvents();
    hub = new EventStream({ events, health: async () => ({}), tickMs: 20 });
    const ac = new AbortController();
    const res = hub.handle(new Request("http://x/api/events", { signal: ac.signal }));
    const res2 = hub.handle(new Request("http://x/api/events"));
    expect(hub.size).toBe(2);
    expect(listeners(events)).toBe(2); // one per fact kind for the hub, not per client
    ac.abort();
    await waitFor(() => hub!.size === 1, 2000, "the aborted client to be dropped");
    await res2.body!.cancel();
    await waitFor(() => hub!.size === 0, 2000, "the cancelled client to be dropped");
    expect(listeners(events)).toBe(0);
    void res;
  });

  test("over real HTTP, closing the connection frees the client", async () => {
    const events = new FleetEvents();
    const stream = (hub = new EventStream({ events, health: async () => ({ up: true }), tickMs: 50 }));
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      routes: { "/api/events": (req, srv) => stream.handle(req, srv) },
    });
    try {
      const ac = new AbortController();
      const res = await fetch(`http://127.0.0.1:${server.port}/api/events`, { signal: ac.signal });
      await readFrames(res.body!, (f) => f.some((x) => x.event === "health"));
      expect(stream.size).toBe(1);
      ac.abort();
      await waitFor(() => stream.size === 0, 5000, "the server to notice the disconnect");
      expect(listeners(events)).toBe(0);
    } finally {
      void server.stop(true);
    }
  });
});
