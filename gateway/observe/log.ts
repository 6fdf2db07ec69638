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
