/**
 * MQTT over WebSocket on Bun.serve's native WebSocket server (aedes over the `ws` package
 * has been reported broken under Bun). Each socket is a GuardedConnection like TCP; the
 * MQTT byte stream is the concatenation of binary messages, so packets may span frames.
 */
import type { Server, ServerWebSocket } from "bun";
import { PacketSizeGuard } from "./guard.ts";
import { GuardedConnection } from "./connection.ts";
import { type ListenerHooks, secureOptions, type TlsPem } from "./tcp.ts";

interface WsData {
  remote: string;
  conn: GuardedConnection | null;
  /** Write callbacks waiting for the socket to drain. */
  drains: (() => void)[];
}

/** Subprotocols MQTT clients ask for ("mqttv3.1" is MQTT 3.1's name). */
const SUBPROTOCOLS = ["mqtt", "mqttv3.1"] as const;

function pickSubprotocol(header: string | null): string | null {
  const offered = (header ?? "").split(",").map((p) => p.trim());
  return SUBPROTOCOLS.find((p) => offered.includes(p)) ?? null;
}

function wsTransport(ws: ServerWebSocket<WsData>) {
  return {
    // Bun's WebSocket server has no inbound pause; the flood bound lives in `message`.
    pause: () => {},
    resume: () => {},
    write(chunk: Uint8Array, done: (err?: Error | null) => void) {
      const sent = ws.send(chunk);
      if (sent > 0) done();
      else if (sent === -1) ws.data.drains.push(() => done());
      else done(new Error("websocket closed"));
    },
    end: () => ws.close(1000),
    destroy: () => ws.terminate(),
  };
}

/** A WebSocket listener for MQTT clients (any path; subprotocol `mqtt`). */
export class WsListener {
  private server: Server<WsData> | null = null;
  /** Servers a new CRL replaced: no longer listening, their connections still open until they end. */
  private readonly retired: Server<WsData>[] = [];
  private listening: { host: string; port: number; tls: TlsPem | null } | null = null;

  constructor(private readonly hooks: ListenerHooks) {}

  /** Listen (WSS when `tls` is given); resolves with the bound port. */
  listen(host: string, port: number, tls: TlsPem | null = null): Promise<number> {
    const hooks = this.hooks;
    // Bun buffers a whole frame before `message`; cap frames so a huge one never reaches memory.
    const maxFrame = hooks.maxPacketBytes + 16;
    // Packets waiting for aedes beyond this close the connection (no inbound pause on WS).
    const maxBacklog = Math.max(4 * hooks.maxPacketBytes, 1 << 20);
    this.server = Bun.serve<WsData>({
      hostname: host,
      port,
      ...(tls ? { tls: secureOptions(tls) } : {}),
      fetch(req, server) {
        const protocol = pickSubprotocol(req.headers.get("sec-websocket-protocol"));
        const remote = server.requestIP(req)?.address ?? "?";
        const upgraded = server.upgrade(req, {
          data: { remote, conn: null, drains: [] },
          headers: protocol ? { "Sec-WebSocket-Protocol": protocol } : {},
        });
        return upgraded ? undefined : new Response("MQTT over WebSocket only\n", { status: 426 });
      },
      websocket: {
        maxPayloadLength: maxFrame,
        open(ws) {
          const guard = new PacketSizeGuard(hooks.maxPacketBytes);
          const remote = ws.data.remote;
          const conn = new GuardedConnection(wsTransport(ws), guard, (v) => hooks.violation(v, remote), hooks.traffic);
          ws.data.conn = conn;
          hooks.accept(conn, ws.data.remote, ws.data.remote);
        },
        message(ws, message) {
          const conn = ws.data.conn;
          if (!conn) return;
          if (typeof message === "string") {
            // MQTT-6.0.0-1: MQTT travels in binary frames only.
            conn.destroy();
            return;
          }
          conn.receive(message);
          if (conn.readableLength > maxBacklog)
            conn.destroy(new Error("websocket client floods faster than the broker reads"));
        },
        drain(ws) {
          const waiting = ws.data.drains.splice(0);
          for (const done of waiting) done();
        },
        close(ws, code, reason) {
          // Bun refused a frame over maxPayloadLength (seen in Bun 1.4.5 as 1006 "Received too
          // big message"; 1009 is the standard code): an oversized packet.
          if (code === 1009 || /too big/i.test(reason)) {
            hooks.violation({ ok: false, kind: "oversized", packetBytes: maxFrame + 1 }, ws.data.remote);
          }
          ws.data.conn?.destroy();
        },
      },
    });
    this.listening = { host, port: this.server.port ?? port, tls };
    return Promise.resolve(this.listening.port);
  }

  /**
   * New CRLs for the handshakes to come (a WSS listener with `ca`). Bun's server takes no new TLS options
   * while it runs, so a new one takes the port over; the old one stops listening and keeps its connections.
   */
  async setCrl(crl: string | null): Promise<void> {
    const was = this.listening;
    if (!was?.tls?.ca || !this.server) throw new Error("a CRL needs a WSS listener that asks for client certificates");
    const old = this.server;
    // Its promise waits for every open connection to end: the port is free before that.
    void old.stop(false).catch(() => undefined);
    this.retired.push(old);
    try {
      await this.listen(was.host, was.port, { ...was.tls, crl });
    } catch (err) {
      // The new options did not take (PEM Bun cannot use): listen as before rather than not at all.
      await this.listen(was.host, was.port, was.tls);
      throw err;
    }
  }

  /** Stop accepting new connections; open ones stay. */
  stopAccepting(): Promise<void> {
    // stop(false)'s promise waits for every open websocket to close: do not wait for it here.
    void this.server?.stop(false);
    return Promise.resolve();
  }

  /** Close every connection and the listener. */
  async closeAll(): Promise<void> {
    await Promise.all([this.server, ...this.retired.splice(0)].map((s) => s?.stop(true)));
    this.server = null;
  }
}
