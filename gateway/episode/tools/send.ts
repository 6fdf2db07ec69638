/**
 * `send(agentId, payload)` (also `ctx.send`): queues an inbox message for another agent,
 * delivered after the episode commits. The target's type must be in the fleet, and the
 * target admitted by the queue book like any other stimulus (not retired, queue not full, and
 * a target with no agent yet only while its type has fewer than `max_agents`).
 * A target another shard owns is forwarded through the broker after the commit instead.
 */
import { z } from "zod";
import { ownsAgent } from "../../shard.ts";
import { type AdmissionCode, type AgentId, keyProblem, parseAgentId } from "../../types.ts";
import { arity, deny, encodePayload, parseToolArgs, type ToolContext, type ToolOutcome } from "./types.ts";

const NAMES = ["agent", "payload"] as const;

/** The send tool's arguments: the target is parsed into its type and key here. */
export const SendArgs = z.tuple(
  [
    z.string({ error: "must be an agent id <type>/<key>" }).transform((id, ctx) => {
      const target = parseAgentId(id);
      if (target) return target;
      // Say why a <type>/<key> is not one (a key over 128 bytes...), and do not echo all of a long one.
      const slash = id.indexOf("/");
      const why = slash > 0 ? keyProblem(id.slice(slash + 1)) : null;
      const shown = JSON.stringify(id.length > 80 ? `${id.slice(0, 80)}...` : id);
      ctx.addIssue({
        code: "custom",
        message: `must be an agent id <type>/<key>${why ? `: its key ${why}` : ""}, got ${shown}`,
      });
      return z.NEVER;
    }),
    z.unknown(),
  ],
  arity(NAMES),
);

/** Queue one inbox message, or deny it. */
export async function send(ctx: ToolContext, raw: readonly unknown[]): Promise<ToolOutcome> {
  const parsed = parseToolArgs("send", NAMES, SendArgs, raw);
  if (!parsed.ok) return parsed.outcome;
  const [target, payload] = parsed.args;
  const type = ctx.spec.agents[target.type];
  if (!type) return deny(`no agent type "${target.type}" in this fleet`);
  // A loop between agents (A sends to B, B to A, ...) stops here: each message is one send further
  // from what came from outside the fleet (a reading, a timer, a webhook), and past the limit none goes.
  const maxHops = ctx.spec.fleet.max_send_hops;
  if (maxHops > 0) {
    const hops = await ctx.sendHops();
    if (hops >= maxHops)
      return refuse(
        ctx,
        target.id,
        "send_hops",
        `this episode's stimulus is already ${hops} sends from where it came into the fleet ` +
          `([fleet] max_send_hops = ${maxHops}); agents sending to each other in a loop?`,
      );
  }
  // What a device could not send the broker, an agent may not send another either (it is a stimulus, or a publish).
  const body = encodePayload(payload);
  const max = ctx.spec.broker.max_packet_bytes;
  const bytes = Buffer.byteLength(body);
  if (bytes > max) return deny(`payload of ${bytes} bytes exceeds [broker] max_packet_bytes (${max})`);
  // Another shard's agent: its own gateway admits it when the forward arrives (docs/shards.md).
  if (!ownsAgent(ctx.spec.fleet.shard, target.id)) {
    ctx.sends.push({ to: target, payload: body, forward: true });
    return { ok: true, result: { queued: true, to: target.id } };
  }
  const admission = ctx.env.admit?.(target.id, type.max_queue, type.max_agents) ?? { ok: true };
  if (!admission.ok) return refuse(ctx, target.id, admission.code, admission.message);
  ctx.sends.push({ to: target, payload: body });
  return { ok: true, result: { queued: true, to: target.id } };
}

/** Deny a send to `to` that intake would refuse too: counted and logged as such (`sendRefused`). */
function refuse(ctx: ToolContext, to: AgentId, code: AdmissionCode | "send_hops", why: string): ToolOutcome {
  const reason = `send to ${to} refused: ${why}`;
  ctx.env.sendRefused?.(to, code, `${reason} (sent by ${ctx.agent.id})`);
  return deny(reason);
}
