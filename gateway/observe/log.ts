/**
 * The gateway's logger: structured JSON lines (pino) with bound context (`agent`,
 * `episode`, `stimulus`); a human-friendly format when stdout is a terminal.
 */
import pino, { type Logger } from "pino";

/** Build the process logger. `FLEET_LOG_LEVEL` sets the level (default info). */
export function createLogger(opts: { pretty?: boolean; level?: string } = {}): Logger {
  const level = opts.level ?? process.env.FLEET_LOG_LEVEL ?? "info";
  const pretty = opts.pretty ?? (process.stdout.isTTY === true && process.env.FLEET_LOG_FORMAT !== "json");
  if (pretty) {
    return pino(
      { level, base: undefined },
      pino.transport({
        target: "pino-pretty",
        options: { colorize: true, translateTime: "SYS:HH:MM:ss.l", ignore: "pid,hostname" },
      }),
    );
  }
  return pino({ level, base: { svc: "fleet" }, timestamp: pino.stdTimeFunctions.isoTime });
}

/**
 * At most one log line per key per `everyMs`, saying how many occurrences it stands for (a
 * refusal that repeats every second must not fill the log). `due(key)` counts one occurrence and,
 * when the key's line is due now, returns how many there were since its last line (this one
 * included); else null. Past `maxKeys` keys, those whose line is older than `everyMs` are forgotten.
 */
export class LogThrottle {
  private readonly last = new Map<string, { at: number; since: number }>();

  constructor(
    private readonly everyMs: number,
    private readonly now: () => number = Date.now,
    private readonly maxKeys = 10_000,
  ) {}

  due(key: string): number | null {
    const at = this.now();
    let l = this.last.get(key);
    if (!l) {
      if (this.last.size >= this.maxKeys) this.forget(at);
      this.last.set(key, (l = { at: Number.NEGATIVE_INFINITY, since: 0 }));
    }
    l.since++;
    if (at - l.at < this.everyMs) return null;
    const count = l.since;
    l.at = at;
    l.since = 0;
    return count;
  }

  private forget(at: number): void {
    for (const [key, l] of this.last) if (at - l.at >= this.everyMs) this.last.delete(key);
  }
}
