/**
 * A Unix datagram socket that receives what a process sends to `NOTIFY_SOCKET`, as systemd's would
 * (sd_notify(3)): each datagram is one message of `KEY=VALUE` lines. Through libc (`bun:ffi`), as
 * gateway/systemd.ts sends.
 */
import { rmSync } from "node:fs";
import { dlopen, FFIType, ptr } from "bun:ffi";
import { socketAddress } from "../../gateway/systemd.ts";
import { waitFor } from "./gateway.ts";

const { symbols: c } = dlopen("libc.so.6", {
  socket: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
  bind: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
  recv: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i64 },
  close: { args: [FFIType.i32], returns: FFIType.i32 },
});
const MSG_DONTWAIT = 0x40;

/** One received message: its fields, and when it came (ms, monotonic). */
export interface Notification {
  readonly fields: Readonly<Record<string, string>>;
  readonly at: number;
}

/** A bound notification socket; `received` grows as `poll` reads. */
export class NotifySocket {
  readonly received: Notification[] = [];
  private readonly fd: number;
  private readonly buf = new Uint8Array(4096);

  /** Bind at `path` (a file path, or `@name` in the abstract namespace). */
  constructor(readonly path: string) {
    const addr = socketAddress(path);
    this.fd = c.socket(1, 2, 0);
    if (this.fd < 0 || c.bind(this.fd, ptr(addr.bytes), addr.length) !== 0)
      throw new Error(`cannot bind a datagram socket at ${path}`);
  }

  /** Read every datagram waiting, without blocking. */
  poll(): Notification[] {
    for (;;) {
      const n = Number(c.recv(this.fd, ptr(this.buf), this.buf.length, MSG_DONTWAIT));
      if (n < 0) return this.received;
      const fields: Record<string, string> = {};
      for (const line of Buffer.from(this.buf.subarray(0, n)).toString("utf8").split("\n")) {
        const eq = line.indexOf("=");
        if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
      }
      this.received.push({ fields, at: performance.now() });
    }
  }

  /** Wait for the first message (from `from` on) that has `key` (and `value`, if given). */
  async next(key: string, value?: string, timeoutMs = 15_000, from = 0): Promise<Notification> {
    return waitFor(
      () =>
        this.poll()
          .slice(from)
          .find((m) => key in m.fields && (value === undefined || m.fields[key] === value)),
      timeoutMs,
      `a notification with ${key}${value === undefined ? "" : `=${value}`}`,
    );
  }

  close(): void {
    c.close(this.fd);
    if (!this.path.startsWith("@")) rmSync(this.path, { force: true });
  }
}
