/**
 * systemd's service notifications (sd_notify(3)): what `fleet start` tells the service manager
 * that runs it under `Type=notify` (`fleet install-service`, docs/deploy.md). Without
 * `NOTIFY_SOCKET` in the environment (a terminal, a test, another supervisor) nothing is sent.
 *
 *  - `READY=1` once MQTT and HTTP listen: `systemctl start` returns then, not when the process forks;
 *  - while starting, `EXTEND_TIMEOUT_USEC` every few seconds: a start that migrates or recovers a
 *    large store takes as long as it takes, while one whose thread is stuck is killed;
 *  - `WATCHDOG=1` at half of `WatchdogSec`, but only while the gateway makes progress: its thread
 *    turns (a stuck loop sends nothing) and no commit has waited longer than the watchdog's
 *    interval (a wedged store). Missed pings make systemd kill and restart the gateway;
 *  - `STATUS=` a one-line summary (`systemctl status`), `RELOADING=1` around a SIGHUP reload, and
 *    `STOPPING=1` with the drain's time (`EXTEND_TIMEOUT_USEC`) on SIGTERM.
 *
 * The datagram goes out through libc (`bun:ffi`): neither Bun nor Node sends on a Unix datagram socket.
 */
import { dlopen, FFIType, ptr, read } from "bun:ffi";

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const MSG_NOSIGNAL = 0x4000;
/** A manager that does not read its socket (its queue full) must not block the gateway's thread: EAGAIN instead. */
const MSG_DONTWAIT = 0x40;
/** sockaddr_un: a 16-bit family, then 108 bytes of path. */
const SUN_PATH_MAX = 108;
/** How often a start in progress extends systemd's start timeout, and by how much each time. */
export const START_HEARTBEAT_MS = 10_000;
export const START_EXTEND_MS = 60_000;
/** A drain's bound is the spec's `drain_timeout_ms`; the stop's release of the rest gets this much beside it. */
export const STOP_SLACK_MS = 30_000;

/** Where and how to notify, from the environment systemd gives its service. */
export interface NotifyTarget {
  /** The socket's address, `@` for the abstract namespace. */
  readonly socket: string;
  /** `WatchdogSec` (ms) when the watchdog watches this process, else null. */
  readonly watchdogMs: number | null;
}

/**
 * What the environment asks for: null without `NOTIFY_SOCKET`, an error for an address this cannot
 * use (not absolute nor abstract, too long, `vsock:`), else the target.
 */
export function notifyTarget(
  env: Record<string, string | undefined>,
  pid: number,
): NotifyTarget | { readonly error: string } | null {
  const socket = env.NOTIFY_SOCKET;
  if (socket === undefined || socket === "") return null;
  if (!socket.startsWith("/") && !socket.startsWith("@"))
    return { error: `NOTIFY_SOCKET=${socket} is not a Unix socket path (absolute or @abstract)` };
  if (Buffer.byteLength(socket) >= SUN_PATH_MAX) return { error: `NOTIFY_SOCKET is longer than ${SUN_PATH_MAX} bytes` };
  // WATCHDOG_PID names the process systemd watches: a child that inherited the variables is not it.
  const watchedPid = env.WATCHDOG_PID;
  const usec = Number(env.WATCHDOG_USEC);
  const watched = watchedPid === undefined || watchedPid === "" || Number(watchedPid) === pid;
  const watchdogMs = watched && Number.isSafeInteger(usec) && usec > 0 ? Math.max(1, Math.floor(usec / 1000)) : null;
  return { socket, watchdogMs };
}

/** The sockaddr_un bytes and their length for `sendto`. */
export function socketAddress(socket: string): { bytes: Uint8Array; length: number } {
  const path = Buffer.from(socket);
  // Abstract: a leading NUL, and the length counts the name only (no terminating NUL).
  if (socket.startsWith("@")) path[0] = 0;
  const bytes = new Uint8Array(2 + SUN_PATH_MAX);
  new DataView(bytes.buffer).setUint16(0, AF_UNIX, true);
  bytes.set(path, 2);
  return { bytes, length: 2 + path.length + (socket.startsWith("@") ? 0 : 1) };
}

function libc() {
  const symbols = {
    socket: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    sendto: {
      args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32, FFIType.ptr, FFIType.u32],
      returns: FFIType.i64,
    },
    close: { args: [FFIType.i32], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  } as const;
  let last: unknown;
  for (const name of ["libc.so.6", "libc.so"]) {
    try {
      return dlopen(name, symbols).symbols;
    } catch (err) {
      last = err;
    }
  }
  throw new Error(`cannot load libc for systemd notifications: ${String(last)}`);
}

/** Sends notifications to one socket; each `send` is one datagram. */
export class Notifier {
  private readonly c = libc();
  private readonly fd: number;
  private readonly address: { bytes: Uint8Array; length: number };

  constructor(readonly target: NotifyTarget) {
    this.address = socketAddress(target.socket);
    this.fd = this.c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (this.fd < 0) throw new Error(`socket(AF_UNIX, SOCK_DGRAM) failed: errno ${this.errno()}`);
  }

  /** Send `KEY=VALUE` lines (a STATUS loses its newlines). Returns the errno on failure, 0 when sent. */
  send(fields: Readonly<Record<string, string | number>>): number {
    const text = Object.entries(fields)
      .map(([k, v]) => `${k}=${String(v).replace(/\n/g, " ")}`)
      .join("\n");
    const msg = Buffer.from(text);
    const sent = this.c.sendto(
      this.fd,
      ptr(msg),
      msg.length,
      MSG_NOSIGNAL | MSG_DONTWAIT,
      ptr(this.address.bytes),
      this.address.length,
    );
    return Number(sent) === msg.length ? 0 : this.errno() || -1;
  }

  close(): void {
    this.c.close(this.fd);
  }

  private errno(): number {
    const p = this.c.__errno_location();
    return p === null ? -1 : read.i32(p, 0);
  }
}

/** The microseconds of CLOCK_MONOTONIC, as `RELOADING=1` pairs with them (`MONOTONIC_USEC`). */
export function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}

/** What the service notifications watch of a running gateway. */
export interface Watched {
  /** One line for `systemctl status`. */
  serviceStatus(): string;
  /** How long the oldest write waiting for its commit has waited, in ms (0: none waits). */
  commitStallMs(): number;
}

/** Without a watchdog, how often `STATUS=` is refreshed. */
export const STATUS_EVERY_MS = 10_000;

type Log = { warn(obj: object, msg: string): void; info(obj: object, msg: string): void };

/** Runs `fn` every `ms` until the returned function is called (tests drive it by hand). */
export type Repeat = (fn: () => void, ms: number) => () => void;

const repeatEvery: Repeat = (fn, ms) => {
  const timer = setInterval(fn, ms);
  timer.unref?.();
  return () => clearInterval(timer);
};

/** The notifications of one `fleet start`, from starting to stopping (the module comment says which). */
export class SystemdService {
  private cancel: (() => void) | null = null;
  private state: "starting" | "ready" | "reloading" | "stopping" = "starting";
  private failed = false;
  private stalled = false;

  constructor(
    private readonly notifier: Pick<Notifier, "send" | "close" | "target">,
    private readonly log: Log,
    private readonly repeat: Repeat = repeatEvery,
  ) {}

  /**
   * The service of this process, when systemd runs it with `NOTIFY_SOCKET`: its variables leave the
   * environment (as sd_notify's `unset_environment`), so no process started from here inherits them.
   * Null without the socket; null with a warning logged when it cannot be used.
   */
  static fromEnv(log: Log, env: Record<string, string | undefined> = process.env, pid = process.pid) {
    const target = notifyTarget(env, pid);
    for (const name of ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]) delete env[name];
    if (target === null) return null;
    if ("error" in target) {
      log.warn({ error: target.error }, "systemd: not notifying the service manager");
      return null;
    }
    try {
      return new SystemdService(new Notifier(target), log);
    } catch (err) {
      log.warn({ err }, "systemd: not notifying the service manager (Type=notify will time out: use Type=simple)");
      return null;
    }
  }

  /** `WatchdogSec` in ms when systemd watches this process, else null. */
  get watchdogMs(): number | null {
    return this.notifier.target.watchdogMs;
  }

  /** The start began: keep extending the start timeout while the thread turns. */
  starting(): void {
    const extend = () => this.send({ EXTEND_TIMEOUT_USEC: START_EXTEND_MS * 1000 });
    this.send({ STATUS: "starting: opening the store, recovering episodes, binding MQTT and HTTP" });
    extend();
    this.every(START_HEARTBEAT_MS, extend);
  }

  /** Listening: ready, then the watchdog's pings (gated on progress) and the status line. */
  ready(gw: Watched): void {
    if (this.state !== "starting") return;
    this.state = "ready";
    this.send({ READY: 1, STATUS: gw.serviceStatus() });
    const watchdog = this.watchdogMs;
    this.every(watchdog === null ? STATUS_EVERY_MS : Math.max(1, Math.floor(watchdog / 2)), () => this.tick(gw));
  }

  /**
   * A SIGHUP reload: `RELOADING=1` (with the monotonic clock, as `Type=notify-reload` wants), the reload,
   * then `READY=1` whether it applied or was refused (the status line and the logs say which). Before
   * ready or once stopping, only the reload runs: a `READY=1` then would say what is not so.
   */
  async reload(run: () => Promise<void>, gw: Watched): Promise<void> {
    if (this.state !== "ready") return run();
    this.state = "reloading";
    this.send({ RELOADING: 1, MONOTONIC_USEC: monotonicUsec().toString(), STATUS: "reloading fleet.toml" });
    try {
      await run();
    } finally {
      if (this.state === "reloading") {
        this.state = "ready";
        this.send({ READY: 1, STATUS: gw.serviceStatus() });
      }
    }
  }

  /** A stop signal: stopping, with the drain's bound and the rest of the stop as the new stop timeout. */
  stopping(drainMs: number): void {
    this.state = "stopping";
    this.stopTimer();
    this.send({
      STOPPING: 1,
      EXTEND_TIMEOUT_USEC: (drainMs + STOP_SLACK_MS) * 1000,
      STATUS: `draining: in-flight episodes finish (at most ${Math.ceil(drainMs / 1000)} s), queued stimuli stay`,
    });
  }

  close(): void {
    this.stopTimer();
    this.notifier.close();
  }

  private tick(gw: Watched): void {
    try {
      this.watch(gw);
    } catch (err) {
      // No ping either: a gateway that cannot say how it is is not known to be well.
      this.log.warn({ err }, "systemd: reading the gateway's state failed");
    }
  }

  private watch(gw: Watched): void {
    const watchdog = this.watchdogMs;
    const stall = gw.commitStallMs();
    const wedged = watchdog !== null && stall >= watchdog;
    if (wedged && !this.stalled)
      this.log.warn(
        { stalled_ms: stall, watchdog_ms: watchdog },
        "watchdog: a commit has waited longer than WatchdogSec: no more pings, systemd restarts the gateway",
      );
    else if (!wedged && this.stalled) this.log.info({}, "watchdog: commits progress again, pings resumed");
    this.stalled = wedged;
    const status = wedged ? `stalled: a commit has waited ${Math.round(stall / 1000)} s` : gw.serviceStatus();
    this.send(watchdog === null || wedged ? { STATUS: status } : { WATCHDOG: 1, STATUS: status });
  }

  private every(ms: number, fn: () => void): void {
    this.stopTimer();
    this.cancel = this.repeat(fn, ms);
  }

  private stopTimer(): void {
    this.cancel?.();
    this.cancel = null;
  }

  private send(fields: Readonly<Record<string, string | number>>): void {
    const errno = this.notifier.send(fields);
    if (errno === 0) {
      this.failed = false;
      return;
    }
    // One warning per run of failures, not one per tick.
    if (!this.failed) this.log.warn({ errno, socket: this.notifier.target.socket }, "systemd: a notification failed");
    this.failed = true;
  }
}
