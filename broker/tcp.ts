/**
 * MQTT over TCP: Node's `net` server (works under Bun), each socket wrapped in a
 * GuardedConnection before aedes sees it.
 */
import { createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket } from "node:tls";
import type { Duplex } from "node:stream";
import { PacketSizeGuard } from "./guard.ts";
import { GuardedConnection, type GuardViolation, type Traffic } from "./connection.ts";

/** What a listener needs from the broker. */
export interface ListenerHooks {
  readonly maxPacketBytes: number;
  /** Where every connection's bytes are counted. */
  readonly traffic: Traffic;
  /**
   * Hand a guarded connection to aedes; `host` is its peer's address (`remote` adds the port where there is one).
   * `identity`, on a listener that takes the user name from client certificates (`TlsPem.identity`): the verified
   * certificate's subject CN, or null when it has none (or several).
   */
  accept(conn: Duplex, remote: string, host: string, identity?: string | null): void;
  /** The guard closed a connection. */
  violation(v: GuardViolation, remote: string): void;
}

function socketTransport(socket: Socket) {
  return {
    pause: () => void socket.pause(),
    resume: () => void socket.resume(),
    write(chunk: Uint8Array, done: (err?: Error | null) => void) {
      if (socket.write(chunk)) done();
      else socket.once("drain", () => done());
    },
    end: () => void socket.end(),
    destroy: () => void socket.destroy(),
  };
}

/** PEM contents for a TLS listener; with `ca`, clients must present a certificate it signed. */
export interface TlsPem {
  readonly cert: string;
  readonly key: string;
  readonly ca?: string | null;
  /** With `ca`: revoked client certificates (PEM CRLs), refused in the handshake. */
  readonly crl?: string | null;
  /** With `ca`: each connection's certificate CN goes to `accept` as its `identity`. */
  readonly identity?: boolean;
}

/** A TCP (or, with `tls`, TLS) listener for MQTT clients. */
export class TcpListener {
  private readonly server: Server;
  private readonly tls: TlsPem | null;
  /** Whether connections carry their client certificate's CN (`TlsPem.identity`). */
  private readonly identity: boolean;
  private readonly sockets = new Set<Socket>();
  private closed: Promise<void> | null = null;

  constructor(
    private readonly hooks: ListenerHooks,
    tls: TlsPem | null = null,
  ) {
    this.identity = Boolean(tls?.ca && tls.identity);
    this.tls = tls;
    this.server = tls
      ? createTlsServer(secureOptions(tls), (socket) => this.onSocket(socket))
      : createServer((socket) => this.onSocket(socket));
  }

  /** New CRLs for the handshakes to come (a TLS listener with `ca`); throws on PEM it cannot use. */
  setCrl(crl: string | null): void {
    if (!this.tls?.ca) throw new Error("a CRL needs a TLS listener that asks for client certificates");
    (this.server as TlsServer).setSecureContext(secureOptions({ ...this.tls, crl }));
  }

  /** Listen; resolves with the bound port. */
  listen(host: string, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.server.once("error", onError);
      this.server.listen({ host, port }, () => {
        this.server.off("error", onError);
        resolve((this.server.address() as AddressInfo).port);
      });
    });
  }

  /** Stop accepting new connections; open ones stay. */
  stopAccepting(): Promise<void> {
    // The close callback only fires once every connection has ended, so do not wait for it here.
    this.closed ??= new Promise((resolve) => this.server.close(() => resolve()));
    return Promise.resolve();
  }

  /** Destroy every open connection and wait for the server to be fully closed. */
  async closeAll(): Promise<void> {
    await this.stopAccepting();
    for (const socket of this.sockets) socket.destroy();
    await this.closed;
  }

  private onSocket(socket: Socket): void {
    this.sockets.add(socket);
    socket.setNoDelay(true);
    const remote = `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`;
    const guard = new PacketSizeGuard(this.hooks.maxPacketBytes);
    const conn = new GuardedConnection(
      socketTransport(socket),
      guard,
      (v) => this.hooks.violation(v, remote),
      this.hooks.traffic,
    );
    socket.on("data", (chunk: Buffer) => conn.receive(chunk));
    socket.on("end", () => conn.receiveEnd());
    socket.on("error", (err) => conn.destroy(err));
    socket.on("close", () => {
      this.sockets.delete(socket);
      conn.destroy();
    });
    const identity = this.identity ? certificateName(socket as TLSSocket) : undefined;
    this.hooks.accept(conn, remote, socket.remoteAddress ?? "?", identity);
  }
}

/** A TLS listener's options: with `ca`, a client certificate it signed (and no CRL revoked) is required. */
export function secureOptions(tls: TlsPem) {
  return {
    cert: tls.cert,
    key: tls.key,
    ...(tls.ca ? { ca: tls.ca, requestCert: true, rejectUnauthorized: true } : {}),
    ...(tls.ca && tls.crl ? { crl: tls.crl } : {}),
  };
}

/**
 * The subject CN of the certificate a client presented, verified by the handshake (`rejectUnauthorized`); null
 * when it has none, or several (Node gives an array then: which one names the device would be a guess).
 */
export function certificateName(socket: TLSSocket): string | null {
  if (!socket.authorized) return null;
  const cn: unknown = socket.getPeerCertificate()?.subject?.CN;
  return typeof cn === "string" && cn !== "" ? cn : null;
}
