/**
 * Stimuli refused because they would create one agent more than its type's `max_agents`
 * (the queue book refuses them): each is a fact on the bus, counted by metrics, and the log
 * gets one line per type a minute at most, with how many were refused since the last one
 * (one agent sending to fresh keys, or a device publishing them, refuses thousands).
 */
import type { Logger } from "pino";
import type { FleetEvents } from "../events.ts";
import { LogThrottle } from "../observe/index.ts";

/** A type's refusals are logged once per this long at most. */
export const AGENT_CAP_LOG_EVERY_MS = 60_000;

/** The queue book's `onCapped`: emit the fact, and log it when the type's last line is a minute old. */
export function agentCapNotices(
  log: Pick<Logger, "warn">,
  events: FleetEvents,
  now: () => number = Date.now,
): (type: string, max: number) => void {
  const lines = new LogThrottle(AGENT_CAP_LOG_EVERY_MS, now);
  return (type, max) => {
    events.emit("agentRefused", { type, max });
    const refused = lines.due(type);
    if (refused === null) return;
    log.warn(
      { type, max_agents: max, refused },
      `stimuli refused: they would create more agents of type ${type} than max_agents (${max})`,
    );
  };
}
