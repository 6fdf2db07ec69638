/**
 * The `$SYS/broker/...` tree of the embedded broker, as Mosquitto names it (`sys_interval`): what a
 * `mosquitto_sub -v -t '$SYS/#'` shows an operator, the broker's counters as retained QoS 0 messages,
 * refreshed every interval. Counts only: no client id appears in it (aedes' own `$SYS/<broker id>/...`
 * events name clients, and hooks.ts forwards none of them).
 */

/** The root of the tree; a topic under `$SYS/` but outside it is aedes' own and reaches no one. */
export const SYS_PREFIX = "$SYS/broker/";

/** What the tree is made from at each refresh. */
export interface SysSnapshot {
  readonly version: string;
  readonly uptimeSeconds: number;
  /** Connected clients, now and at most since the start. */
  readonly connected: number;
  readonly maximum: number;
  /** Persistent (clean session 0) sessions whose client is away. */
  readonly disconnected: number;
  /** Device publishes accepted, PUBLISH packets sent to clients, publishes dropped (refused for good, or past a
   *  queue bound). */
  readonly received: number;
  readonly sent: number;
  readonly dropped: number;
  /** Persistent sessions ended by `session_expiry_days`. */
  readonly sessionsExpired: number;
  /** Subscriptions held: connected clients' and those of persistent sessions whose client is away. */
  readonly subscriptions: number;
  /** Retained messages held, `$SYS` ones included. */
  readonly retained: number;
  /** Bytes received from and sent to clients, all listeners. */
  readonly bytesReceived: number;
  readonly bytesSent: number;
  /** Since the start: CONNECTs accepted, and transport connections (sockets) opened. */
  readonly connects: number;
  readonly sockets: number;
}

/** The topics and payloads of a snapshot's counts, by Mosquitto's names (the loads are `LoadAverages`'). */
export function sysMessages(s: SysSnapshot): Map<string, string> {
  const n = (v: number) => String(Math.max(0, Math.trunc(v)));
  return new Map([
    [`${SYS_PREFIX}version`, s.version],
    [`${SYS_PREFIX}uptime`, `${n(s.uptimeSeconds)} seconds`],
    [`${SYS_PREFIX}clients/connected`, n(s.connected)],
    [`${SYS_PREFIX}clients/disconnected`, n(s.disconnected)],
    [`${SYS_PREFIX}clients/total`, n(s.connected + s.disconnected)],
    [`${SYS_PREFIX}clients/expired`, n(s.sessionsExpired)],
    [`${SYS_PREFIX}clients/maximum`, n(Math.max(s.maximum, s.connected))],
    [`${SYS_PREFIX}subscriptions/count`, n(s.subscriptions)],
    [`${SYS_PREFIX}retained messages/count`, n(s.retained)],
    [`${SYS_PREFIX}publish/messages/received`, n(s.received)],
    [`${SYS_PREFIX}publish/messages/sent`, n(s.sent)],
    [`${SYS_PREFIX}publish/messages/dropped`, n(s.dropped)],
    [`${SYS_PREFIX}bytes/received`, n(s.bytesReceived)],
    [`${SYS_PREFIX}bytes/sent`, n(s.bytesSent)],
  ]);
}

/** The counters a load is kept for, by their name under `load/`. */
const LOADED: readonly (readonly [string, (s: SysSnapshot) => number])[] = [
  ["bytes/received", (s) => s.bytesReceived],
  ["bytes/sent", (s) => s.bytesSent],
  ["connections", (s) => s.connects],
  ["publish/dropped", (s) => s.dropped],
  ["publish/received", (s) => s.received],
  ["publish/sent", (s) => s.sent],
  ["sockets", (s) => s.sockets],
];

/** Mosquitto's three windows: the suffix and its time constant, seconds. */
const WINDOWS: readonly (readonly [string, number])[] = [
  ["1min", 60],
  ["5min", 300],
  ["15min", 900],
];

/**
 * `$SYS/broker/load/<counter>/{1min,5min,15min}`, computed as Mosquitto computes them: at each refresh the
 * counter's rate per minute over the time since the last one, folded into an exponentially weighted moving
 * average with a time constant of 1, 5 or 15 minutes, printed with two decimals. All start at 0.00.
 */
export class LoadAverages {
  private last: { readonly atMs: number; readonly counts: readonly number[] } | null = null;
  private readonly loads = new Float64Array(LOADED.length * WINDOWS.length);

  /** The loads after a snapshot taken at `atMs` (ms, any monotonic clock), by topic. */
  update(atMs: number, s: SysSnapshot): Map<string, string> {
    const counts = LOADED.map(([, read]) => read(s));
    const last = this.last;
    const dt = last === null ? 0 : (atMs - last.atMs) / 1000;
    // A clock that went back moves nothing: the next sample is measured from the last good one.
    const moved = last !== null && dt > 0;
    if (last === null || moved) this.last = { atMs, counts };
    const out = new Map<string, string>();
    for (const [i, [name]] of LOADED.entries()) {
      // A counter that went down (it cannot, short of a restart) adds nothing rather than a negative rate.
      const perMinute = moved ? (Math.max(0, counts[i]! - last.counts[i]!) * 60) / dt : 0;
      for (const [w, [suffix, tau]] of WINDOWS.entries()) {
        const k = i * WINDOWS.length + w;
        if (moved) {
          const keep = Math.exp(-dt / tau);
          this.loads[k] = keep * this.loads[k]! + (1 - keep) * perMinute;
        }
        out.set(`${SYS_PREFIX}load/${name}/${suffix}`, this.loads[k]!.toFixed(2));
      }
    }
    return out;
  }
}

/**
 * Publishes the tree every `intervalMs`: the whole tree at the first refresh, then (as Mosquitto) only
 * what changed. Uptime changes at every refresh, so a subscriber also sees the broker is alive.
 */
export class SysTree {
  private timer: ReturnType<typeof setInterval> | null = null;
  private readonly last = new Map<string, string>();
  private readonly loads = new LoadAverages();

  constructor(
    private readonly intervalMs: number,
    private readonly snapshot: () => SysSnapshot,
    /** A retained QoS 0 publish to `topic`; must not throw. */
    private readonly publish: (topic: string, payload: string) => void,
    /** Clock of the loads, ms. */
    private readonly now: () => number = () => performance.now(),
  ) {
    if (!(intervalMs > 0)) throw new RangeError(`the $SYS interval must be > 0 ms, got ${intervalMs}`);
  }

  start(): void {
    if (this.timer !== null) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  /** Publish what changed since the last refresh; returns how many topics were published. */
  refresh(): number {
    const snapshot = this.snapshot();
    let published = 0;
    for (const [topic, payload] of [...sysMessages(snapshot), ...this.loads.update(this.now(), snapshot)]) {
      if (this.last.get(topic) === payload) continue;
      this.last.set(topic, payload);
      this.publish(topic, payload);
      published++;
    }
    return published;
  }
}
