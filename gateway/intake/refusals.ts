/**
 * Intake refusals (a full queue, a retired or draining agent) in the log: one line per agent
 * and reason a minute at most, with how many were refused since the last one. An agent paused
 * with a full queue refuses its due wake-up every second and its timer every fire, for as long
 * as it stays paused; a line each time filled the log (164k lines in minutes). Each refusal is
 * still counted (`fleet_intake_refused_total`, from the `refused` fact).
 */
import type { Logger } from "pino";
import type { FleetEvents, FleetEventMap } from "../events.ts";
import type { AdmissionCode, AgentId } from "../types.ts";

/** One refused target (intake.ts `Refusal`). */
interface Refused {
  readonly agent: AgentId;
  readonly code: AdmissionCode;
  readonly reason: string;
}

/** An agent's refusals for one reason are logged once per this long at most. */
export const REFUSAL_LOG_EVERY_MS = 60_000;
/** Past this many (agent, reason) entries, those whose line is older than a minute are forgotten. */
const MAX_TRACKED = 10_000;

/** Emits each refusal as a fact and logs it when its agent's line for that reason is a minute old. */
export class RefusalLog {
  private readonly last = new Map<string, { at: number; since: number }>();

  constructor(
    private readonly log: Pick<Logger, "warn">,
    private readonly events: FleetEvents,
    private readonly now: () => number = Date.now,
  ) {}

  /** Note the refusals of one intake from `source` (a message on `topic`, a timer fire, a wake-up...). */
  note(refused: readonly Refused[], source: FleetEventMap["intake"]["source"], topic: string | null): void {
    const at = this.now();
    for (const r of refused) {
      this.events.emit("refused", { source, type: r.agent.slice(0, r.agent.indexOf("/")), code: r.code });
      // max_agents refusals are logged by type, once a minute at most (fleet/agent-cap.ts): a flood of new keys.
      if (r.code === "max_agents") continue;
      const key = `${r.agent}\n${r.code}`;
      let l = this.last.get(key);
      if (!l) {
        if (this.last.size >= MAX_TRACKED) this.forget(at);
        this.last.set(key, (l = { at: Number.NEGATIVE_INFINITY, since: 0 }));
      }
      l.since++;
      if (at - l.at < REFUSAL_LOG_EVERY_MS) continue;
      this.log.warn({ agent: r.agent, topic, source, refused: l.since }, `stimulus refused: ${r.reason}`);
      l.at = at;
      l.since = 0;
    }
  }

  private forget(at: number): void {
    for (const [key, l] of this.last) if (at - l.at >= REFUSAL_LOG_EVERY_MS) this.last.delete(key);
  }
}
