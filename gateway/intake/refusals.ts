/**
 * Intake refusals (a full queue, a retired or draining agent) in the log: one line per agent
 * and reason a minute at most, with how many were refused since the last one. An agent paused
 * with a full queue refuses its due wake-up every second and its timer every fire, for as long
 * as it stays paused; a line each time filled the log (164k lines in minutes). Each refusal is
 * still counted (`fleet_intake_refused_total`, from the `refused` fact).
 */
import type { Logger } from "pino";
import type { FleetEvents, FleetEventMap } from "../events.ts";
import { LogThrottle } from "../observe/index.ts";
import type { AdmissionCode, AgentId } from "../types.ts";

/** One refused target (intake.ts `Refusal`). */
interface Refused {
  readonly agent: AgentId;
  /** `send_hops`: a send past `[fleet] max_send_hops` (a loop between agents), refused by the send tool. */
  readonly code: AdmissionCode | "send_hops" | "disk_low";
  readonly reason: string;
}

/** An agent's refusals for one reason are logged once per this long at most. */
export const REFUSAL_LOG_EVERY_MS = 60_000;

/** Emits each refusal as a fact and logs it when its agent's line for that reason is a minute old. */
export class RefusalLog {
  private readonly lines: LogThrottle;

  constructor(
    private readonly log: Pick<Logger, "warn">,
    private readonly events: FleetEvents,
    now: () => number = Date.now,
  ) {
    this.lines = new LogThrottle(REFUSAL_LOG_EVERY_MS, now);
  }

  /** Note the refusals of one intake from `source` (a message on `topic`, a timer fire, a wake-up...). */
  note(refused: readonly Refused[], source: FleetEventMap["intake"]["source"], topic: string | null): void {
    for (const r of refused) {
      this.events.emit("refused", { source, type: r.agent.slice(0, r.agent.indexOf("/")), code: r.code });
      // max_agents refusals are logged by type, once a minute at most (fleet/agent-cap.ts): a flood of new keys.
      // And a data disk low on space once when it starts and once when it ends (observe/disk.ts).
      if (r.code === "max_agents" || r.code === "disk_low") continue;
      const count = this.lines.due(`${r.agent}\n${r.code}`);
      if (count !== null)
        this.log.warn({ agent: r.agent, topic, source, refused: count }, `stimulus refused: ${r.reason}`);
    }
  }
}
