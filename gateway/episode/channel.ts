/**
 * The gateway's end of the episode channel: the subprocess writes one JSON message per line
 * to fd 3 (agents/protocol.ts `CHILD_CHANNEL_FD`), the gateway reads it in chunks and never
 * holds more than the cap of one message. Bun's own `ipc` channel hands over whole messages
 * only after buffering them (a 64 MB message cost the gateway ~1 GB), so the size has to be
 * checked here, while the bytes arrive.
 */
import { closeSync } from "node:fs";
import { jsonNestedDeeper } from "../../agents/protocol.ts";

/** A line that is not JSON. */
export const MALFORMED: unique symbol = Symbol("malformed");
/** A line of JSON nested deeper than `MAX_JSON_DEPTH` (an event log could not hold it). */
export const TOO_DEEP: unique symbol = Symbol("too deep");

/** Where the reader delivers. */
export interface ChannelSink {
  /** One complete message (or MALFORMED), with its size on the wire in bytes. */
  message(raw: unknown, bytes: number): void;
  /**
   * A message grew past `cap()` bytes: reading stopped, nothing of it was kept but its kind (its
   * `t`, when its first bytes say, as the host writes them: `{"t":"done",...`), or null.
   */
  oversize(bytes: number, cap: number, kind: string | null): void;
}

/** Splits chunks into newline-delimited JSON messages, refusing a line past `cap()` bytes before buffering it. */
export class LineReader {
  private parts: Uint8Array[] = [];
  private size = 0;
  /** Blank lines since the last message. */
  private blank = 0;
  private stopped = false;
  private readonly decoder = new TextDecoder();

  constructor(
    private readonly cap: () => number,
    private readonly sink: ChannelSink,
  ) {}

  /** Whether reading should go on. */
  get open(): boolean {
    return !this.stopped;
  }

  /** Feed one chunk; returns false once the reader stopped (oversize). */
  push(chunk: Uint8Array): boolean {
    let start = 0;
    while (!this.stopped) {
      const nl = chunk.indexOf(10, start);
      const piece = chunk.subarray(start, nl < 0 ? chunk.length : nl);
      const total = this.size + piece.length;
      if (total + this.blank > this.cap()) {
        this.stopped = true;
        const kind = kindOf(this.parts[0] ?? piece);
        this.parts = [];
        this.sink.oversize(total + this.blank, this.cap(), kind);
        return false;
      }
      if (nl < 0) {
        if (piece.length > 0) this.parts.push(piece.slice());
        this.size = total;
        return true;
      }
      const line = this.parts.length === 0 ? piece : concat([...this.parts, piece], total);
      this.parts = [];
      this.size = 0;
      start = nl + 1;
      // Blank lines count toward the next message (and past the cap, stop the reader): a flood of
      // newlines is no free work on the gateway's thread.
      if (total === 0) {
        this.blank++;
        continue;
      }
      let raw: unknown = MALFORMED;
      try {
        raw = JSON.parse(this.decoder.decode(line));
      } catch {
        // stays MALFORMED
      }
      if (raw !== MALFORMED && jsonNestedDeeper(line)) raw = TOO_DEEP;
      const bytes = total + this.blank;
      this.blank = 0;
      this.sink.message(raw, bytes);
    }
    return false;
  }
}

/** The `t` a message starts with (`{"t":"done"`), from its first bytes; null when they do not say. */
function kindOf(head: Uint8Array): string | null {
  return /^\{"t":"([a-z_]{1,16})"/.exec(new TextDecoder().decode(head.subarray(0, 24)))?.[1] ?? null;
}

function concat(parts: readonly Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Our end of the channel being read; `stop` cancels the read (the child may have left a writer behind). */
export interface Pump {
  readonly done: Promise<void>;
  stop(): void;
}

/** Read our end of the channel (`fd`) into `reader` until EOF, the reader stops or `stop`; then close the fd. */
export function pump(fd: number, reader: LineReader): Pump {
  const stream = Bun.file(fd).stream().getReader();
  const done = (async () => {
    try {
      for (;;) {
        const { value, done } = await stream.read();
        if (done || !reader.push(value)) break;
      }
    } catch {
      // the pipe broke or the read was cancelled: the exit handler reports the end
    } finally {
      await stream.cancel().catch(() => undefined);
      // Bun does not close an extra stdio pipe of a subprocess by itself.
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
  })();
  return { done, stop: () => void stream.cancel().catch(() => undefined) };
}
