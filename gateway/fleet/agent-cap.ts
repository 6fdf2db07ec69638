/**
 * Stimuli refused because they would create one agent more than its type's `max_agents`
 * (the queue book refuses them): each is a fact on the bus, counted by metrics, and the log
 * gets one line per type a minute at most, with how many were refused since the last one
 * (one agent sending to fresh keys, or a device publishing them, refuses thousands).
 */
import type { Logger } from "pino";
import type { FleetEvents } from "../events.ts";

/** A type's refusals are logged once per this long at most. */
export const AGENT_CAP_LOG_EVERY_MS = 60_000;

/** The queue book's `onCapped`: emit the fact, and log it when the type's last line is a minute old. */
export function agentCapNotices(
  log: Pick<Logger, "warn">,
  events: FleetEvents,
  now: () => number = Date.now,
): (type: string, max: number) => void {
  const last = new Map<string, { at: number; since: number }>();
  return (type, max) => {
    events.emit("agentRefused", { type, max });
    let l = last.get(type);
    if (!l) last.set(type, (l = { at: Number.NEGATIVE_INFINITY, since: 0 }));
    l.since++;
    const at = now();
    if (at - l.at < AGENT_CAP_LOG_EVERY_MS) return;
    log.warn(
      { type, max_agents: max, refused: l.since },
      `stimuli refused: they would create more agents of type ${type} than max_agents (${max})`,
    );
    l.at = at;
    l.since = 0;
  };
}
