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
  /** Bytes received from and sent to clients, all listeners. */
  readonly bytesReceived: number;
  readonly bytesSent: number;
}

/** The topics and payloads of a snapshot, by Mosquitto's names. */
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
    [`${SYS_PREFIX}publish/messages/received`, n(s.received)],
    [`${SYS_PREFIX}publish/messages/sent`, n(s.sent)],
    [`${SYS_PREFIX}publish/messages/dropped`, n(s.dropped)],
    [`${SYS_PREFIX}bytes/received`, n(s.bytesReceived)],
    [`${SYS_PREFIX}bytes/sent`, n(s.bytesSent)],
  ]);
}

/**
 * Publishes the tree every `intervalMs`: the whole tree at the first refresh, then (as Mosquitto) only
 * what changed. Uptime changes at every refresh, so a subscriber also sees the broker is alive.
 */
export class SysTree {
  private timer: ReturnType<typeof setInterval> | null = null;
  private readonly last = new Map<string, string>();

  constructor(
    private readonly intervalMs: number,
    private readonly snapshot: () => SysSnapshot,
    /** A retained QoS 0 publish to `topic`; must not throw. */
    private readonly publish: (topic: string, payload: string) => void,
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
    let published = 0;
    for (const [topic, payload] of sysMessages(this.snapshot())) {
      if (this.last.get(topic) === payload) continue;
      this.last.set(topic, payload);
      this.publish(topic, payload);
      published++;
    }
    return published;
  }
}
