/**
 * `publish(topic, payload, { retain?, qos? })`: queues an MQTT publish that goes out after
 * the episode commits. Own `fleet/agents/<type>/<key>/...` topics are always allowed, except the
 * three the gateway speaks for (`out`, `status`, `inbox`: consumers trust what is there);
 * anything else must match the type's `publish` patterns and be a valid device topic.
 */
import { z } from "zod";
import { checkDevicePublishTopic, checkTopicName, matchTopic } from "../../../broker/index.ts";
import { arity, deny, encodePayload, parseToolArgs, type ToolContext, type ToolOutcome } from "./types.ts";

const NAMES = ["topic", "payload", "options"] as const;

/** The publish tool's arguments. */
export const PublishArgs = z.tuple(
  [
    z.string({ error: "must be a string" }),
    z.unknown(),
    z
      .strictObject(
        {
          retain: z.boolean({ error: "must be true or false" }).optional(),
          qos: z.literal([0, 1], { error: "must be 0 or 1" }).optional(),
        },
        { error: "must be an object { retain?, qos? }" },
      )
      .optional(),
  ],
  arity(NAMES),
);

/** Own topics only the gateway publishes to: `ctx.emit` is how an agent writes `out`. */
const GATEWAY_OWN = ["out", "status", "inbox"];

/** Queue one publish, or deny it. */
export function publish(ctx: ToolContext, raw: readonly unknown[]): ToolOutcome {
  const parsed = parseToolArgs("publish", NAMES, PublishArgs, raw);
  if (!parsed.ok) return parsed.outcome;
  const [topic, payload, opts] = parsed.args;
  const own = `fleet/agents/${ctx.agent.type}/${ctx.agent.key}/`;
  // Own topics skip the fleet/ namespace rule, never the MQTT ones (no wildcards, at most 100 levels, ...):
  // a topic the broker refuses would be refused after the commit, at every retry.
  const shape = !topic.startsWith(own) ? checkDevicePublishTopic(topic) : checkTopicName(topic);
  if (!shape.ok) return deny(`topic "${topic}": ${shape.reason}`);
  if (topic.startsWith(own) && GATEWAY_OWN.includes(topic.slice(own.length)))
    return deny(`topic "${topic}" is the gateway's to publish (ctx.emit writes out)`);
  if (!topic.startsWith(own) && !ctx.type.publish.some((f) => matchTopic(f, topic) !== null)) {
    return deny(`topic "${topic}" is not allowed by agents.${ctx.type.name}.publish`);
  }
  // What a device could not send the broker, an agent may not either (retained, it would stay in memory).
  const body = encodePayload(payload);
  const max = ctx.spec.broker.max_packet_bytes;
  const bytes = Buffer.byteLength(body) + Buffer.byteLength(topic) + 16; // + the PUBLISH header, at most
  if (bytes > max) return deny(`payload of ${bytes} bytes with its topic exceeds [broker] max_packet_bytes (${max})`);
  ctx.publishes.push({ topic, payload: body, qos: opts?.qos ?? 1, retain: opts?.retain ?? false });
  return { ok: true, result: { queued: true, topic } };
}
