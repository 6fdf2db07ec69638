/**
 * Which agents count as flooded (gateway/fleet/flood.ts): a backlog while another agent has work or
 * started an episode within the window; a backlog with no one to yield to is not a flood.
 */
import { describe, expect, test } from "bun:test";
import { FLOOD_BACKLOG, FLOOD_PEERS_WINDOW_MS, FloodRule } from "../gateway/fleet/index.ts";
import type { AgentId } from "../gateway/types.ts";

const a = "t/a" as AgentId;
const b = "t/b" as AgentId;

/** A rule over a fake queue book, scheduler and clock. */
function rule() {
  const queued = new Map<AgentId, number>();
  const world = { busy: 1, now: 1_000_000 };
  const floods = new FloodRule({
    queued: (agent) => queued.get(agent) ?? 0,
    contendingAgents: () => world.busy,
    now: () => world.now,
  });
  return { floods, queued, world };
}

describe("the flood rule", () => {
  test("a backlog while another agent has work now is a flood; a shorter queue never is", () => {
    const { floods, queued, world } = rule();
    world.busy = 2;
    queued.set(a, FLOOD_BACKLOG);
    expect(floods.flooded(a)).toBe(true);
    queued.set(a, FLOOD_BACKLOG - 1);
    expect(floods.flooded(a)).toBe(false);
  });

  test("a backlog with no other agent busy is a flood while another agent's episode started within the window", () => {
    const { floods, queued, world } = rule();
    queued.set(a, 50);
    floods.started(b);
    world.now += FLOOD_PEERS_WINDOW_MS;
    expect(floods.flooded(a)).toBe(true);
    world.now += 1;
    expect(floods.flooded(a)).toBe(false);
  });

  test("an agent alone with a backlog is not a flood: its own episodes do not count as another's", () => {
    const { floods, queued } = rule();
    queued.set(a, 5000);
    expect(floods.flooded(a)).toBe(false);
    for (let i = 0; i < 20; i++) floods.started(a);
    expect(floods.flooded(a)).toBe(false);
  });

  test("another agent's latest start is remembered through a run of the flooded agent's own", () => {
    const { floods, queued, world } = rule();
    queued.set(a, 100);
    queued.set(b, 100);
    floods.started(b);
    world.now += 1000;
    for (let i = 0; i < 10; i++) floods.started(a);
    // For a, b started 1 s ago; for b, a started just now.
    expect(floods.flooded(a)).toBe(true);
    expect(floods.flooded(b)).toBe(true);
    world.now += FLOOD_PEERS_WINDOW_MS - 1000 + 1;
    expect(floods.flooded(a)).toBe(false);
    expect(floods.flooded(b)).toBe(true);
  });
});
