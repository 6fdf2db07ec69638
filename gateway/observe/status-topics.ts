/**
 * The gateway's facts on MQTT (docs/mqtt.md): every failed episode on `fleet/episodes` (the one that
 * quarantined its stimulus too, marked `quarantined`), each agent's status retained on
 * `fleet/agents/<type>/<key>/status`, the fleet summary retained on `fleet/health`. A committed
 * episode reaches `fleet/episodes` through its outbox rows (episode/executor.ts), with what it publishes.
 */
import type { Logger } from "pino";
import type { Broker } from "../../broker/index.ts";
import type { FleetEvents } from "../events.ts";
import { topics } from "../protocol.ts";
import type { ShardSpec } from "../shard.ts";
import type { Store } from "../store/index.ts";
import { parseAgentId, shownStatus } from "../types.ts";

/** What `publishFacts` keeps track of. */
export interface FactsState {
  /**
   * A status could not be published (an external broker out of reach): the retained copy there may be
   * stale until statuses are published again (the gateway does it when its connection is back).
   */
  statusMissed: boolean;
}

/** Publish episode failures and status changes; `broker` is read per fact (it starts after the bus). */
export function publishFacts(events: FleetEvents, broker: () => Broker | undefined): FactsState {
  const state: FactsState = { statusMissed: false };
  events.on("episode", (e) => {
    if (e.status === "committed") return;
    const body = {
      episode: e.episode,
      agent: e.agent,
      stimulus: e.stimulus,
      status: "failed",
      kind: e.kind,
      checkpoint: e.checkpoint,
      ms: Math.round(e.ms),
      // The last attempt: no retry follows, the stimulus waits in the quarantine.
      quarantined: e.quarantined,
    };
    void broker()
      ?.publish(topics.episodes, JSON.stringify(body))
      .catch(() => undefined);
  });
  events.on("status", (e) => {
    const a = parseAgentId(e.agent);
    const b = broker();
    if (!a || !b) return;
    const body: Record<string, unknown> = { status: e.status };
    if (e.reason) body.reason = e.reason;
    if (e.checkpoint) body.checkpoint = e.checkpoint;
    void b.publish(topics.status(a.type, a.key), JSON.stringify(body), { qos: 1, retain: true }).catch(() => {
      state.statusMissed = true;
    });
  });
  return state;
}

const PAGE = 250;

/**
 * Emit every agent's current status again, marked `republished` (no transition: metrics do not count
 * it): retained topics live in aedes' memory, lost on restart. Keyset pages of 250, each followed by a
 * turn of the event loop, so with 100,000 agents the gateway serves MQTT and HTTP meanwhile (it runs
 * after the gateway is up).
 * `stopped` ends it early (the gateway is stopping).
 */
export async function republishStatuses(
  store: Pick<Store, "agentStatusPage">,
  events: FleetEvents,
  stopped: () => boolean = () => false,
): Promise<number> {
  let n = 0;
  for (let after = ""; !stopped(); ) {
    const rows = await store.agentStatusPage(after, PAGE);
    for (const a of rows) {
      const status = shownStatus(a.status);
      events.emit("status", {
        agent: a.id,
        status,
        ...(a.reason ? { reason: a.reason } : {}),
        checkpoint: a.headHash,
        republished: true,
      });
    }
    n += rows.length;
    if (rows.length < PAGE) return n;
    after = rows.at(-1)!.id;
    await new Promise((r) => setImmediate(r));
  }
  return n;
}

/**
 * Publish the fleet summary, retained; a failure is logged (the next tick tries again). While the
 * gateway's connection to an external broker is down (at start it is not up yet) there is nothing
 * to say: the broker client logs its own state, and the next tick publishes. A shard also publishes it
 * on `fleet/health/<i>-of-<N>`, which no other shard overwrites.
 */
export async function publishHealth(
  broker: Broker,
  health: () => Promise<unknown>,
  log: Logger,
  shard: ShardSpec | null = null,
): Promise<void> {
  if (broker.stats().external?.connected === false) return;
  try {
    const body = JSON.stringify(await health());
    await broker.publish(topics.health, body, { qos: 0, retain: true });
    if (shard) await broker.publish(topics.shardHealth(shard.index, shard.count), body, { qos: 0, retain: true });
  } catch (err) {
    log.warn({ err }, "health publish failed");
  }
}
