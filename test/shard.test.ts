/**
 * Agent shards (docs/shards.md): rendezvous ownership, the shard names, and routing on a shard
 * (its own agents are targets, the others' are named, forwarded sends keep the sender's ids).
 */
import { describe, expect, test } from "bun:test";
import pino from "pino";
import { fleetTimers, type BackgroundHost } from "../gateway/fleet/index.ts";
import { createRouter } from "../gateway/intake/index.ts";
import { fleetLayout, gatewaysFor, layoutGaps } from "../gateway/replication/index.ts";
import {
  ownerShard,
  ownsAgent,
  parseShard,
  parseShardFleetName,
  shardClientId,
  shardFleetName,
} from "../gateway/shard.ts";
import { compileSpec } from "../gateway/spec/index.ts";

const agents = Array.from({ length: 1000 }, (_, i) => `counter/d${i}`);

describe("ownership", () => {
  test("every agent is owned by exactly one shard, and the shards share the agents about evenly", () => {
    for (const count of [1, 2, 3, 5]) {
      const per = new Array<number>(count).fill(0);
      for (const a of agents) {
        const owners = Array.from({ length: count }, (_, i) => i + 1).filter((i) => ownsAgent({ index: i, count }, a));
        expect(owners).toEqual([ownerShard(a, count)]);
        per[owners[0]! - 1]!++;
      }
      for (const n of per) expect(n).toBeGreaterThan((1000 / count) * 0.8);
    }
  });

  test("ownership is stable: the same ids give the same shards on every machine and release", () => {
    // SHA-256 of "<agent>\n<index>": pinned so a change of the hashing is caught (it would move agents).
    expect(["temp/a", "temp/b", "temp/boiler-1", "counter/d0", "counter/d1"].map((a) => ownerShard(a, 2))).toEqual([
      2, 2, 1, 1, 2,
    ]);
    expect(["temp/a", "temp/b", "temp/boiler-1", "counter/d0"].map((a) => ownerShard(a, 4))).toEqual([3, 4, 4, 4]);
  });

  test("growing from 2 to 3 shards moves agents only to the new shard", () => {
    const moved = agents.filter((a) => ownerShard(a, 2) !== ownerShard(a, 3));
    expect(moved.every((a) => ownerShard(a, 3) === 3)).toBe(true);
    expect(moved.length).toBeGreaterThan(250);
    expect(moved.length).toBeLessThan(420);
  });

  test("an unsharded gateway owns every agent", () => {
    expect(agents.every((a) => ownsAgent(null, a))).toBe(true);
  });
});

describe("shard names", () => {
  test('"i/N" parses; anything else says what is wrong', () => {
    expect(parseShard("2/4")).toEqual({ index: 2, count: 4 });
    expect(parseShard("1/1")).toEqual({ index: 1, count: 1 });
    for (const bad of ["", "2", "2/", "/4", "a/b", "2/4/1", "-1/2", "1.5/2"]) expect(parseShard(bad)).toContain("i/N");
    expect(parseShard("0/2")).toContain("from 1 to N");
    expect(parseShard("5/4")).toContain("from 1 to N");
    expect(parseShard("1/0")).toContain("from 1 to 64");
    expect(parseShard("1/65")).toContain("from 1 to 64");
  });

  test("each shard replicates as <fleet>-shard-<i>-of-<N> and has a session of its own", () => {
    expect(shardFleetName("plant-7", { index: 2, count: 3 })).toBe("plant-7-shard-2-of-3");
    expect(shardFleetName("plant-7", null)).toBe("plant-7");
    expect(parseShardFleetName("plant-7-shard-2-of-3")).toEqual({ fleet: "plant-7", shard: { index: 2, count: 3 } });
    expect(parseShardFleetName("plant-7")).toBeNull();
    expect(parseShardFleetName("plant-7-shard-4-of-3")).toBeNull();
    expect(shardClientId("fleet-plant-7", { index: 2, count: 3 })).toBe("fleet-plant-7-shard-2");
    expect(shardClientId("fleet-plant-7", null)).toBe("fleet-plant-7");
  });
});

const FLEET = (shard: string) => `
[fleet]
name = "s"
shard = "${shard}"

[broker]
url = "mqtt://127.0.0.1:1883"

[agents.temp]
module = "agent.ts"
subscribe = ["sensors/+/temperature"]

[agents.all]
module = "agent.ts"
subscribe = ["sensors/#"]
key = "main"
`;

const router = async (shard: string) => createRouter((await compileSpec(FLEET(shard), "/srv/fleet.toml")).spec);

describe("routing on a shard", () => {
  test("a message's agents are targets on their owner and named as elsewhere on the other shards", async () => {
    const [one, two] = [await router("1/2"), await router("2/2")];
    for (const key of ["a", "b", "boiler-1", "x9"]) {
      const topic = `sensors/${key}/temperature`;
      const [r1, r2] = [one(topic), two(topic)];
      const all = [...r1.targets, ...r2.targets].map((t): string => t.agent).sort();
      expect(all).toEqual([`all/main`, `temp/${key}`].sort());
      for (const [r, index] of [
        [r1, 1],
        [r2, 2],
      ] as const) {
        for (const t of r.targets) expect(ownerShard(t.agent, 2)).toBe(index);
        for (const e of r.elsewhere) expect(e.shard).toBe(3 - index);
        expect(r.targets.length + r.elsewhere.length).toBe(2);
      }
    }
  });

  test("an inbox of another shard's agent is not refused there: it is named as elsewhere", async () => {
    const owner = ownerShard("temp/a", 2);
    const other = await router(`${3 - owner}/2`);
    const r = other("fleet/agents/temp/a/inbox");
    expect(r).toMatchObject({ targets: [], inbox: true, problems: [], elsewhere: [{ agent: "temp/a", shard: owner }] });
    // An inbox naming no agent of the fleet is still a problem on every shard.
    expect(other("fleet/agents/nope/a/inbox").problems).toEqual(['no agent type "nope" in this fleet']);
  });

  test("a message no agent can take is recorded as rejected by shard 1 only", async () => {
    const topic = "sensors/bad key/temperature";
    expect((await router("1/2"))(topic).problems).toHaveLength(1);
    expect((await router("2/2"))(topic).problems).toEqual([]);
  });

  test("a forwarded send becomes the inbox stimulus a send within one gateway would have made", async () => {
    const owner = ownerShard("temp/a", 2);
    const ep = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
    const r = (await router(`${owner}/2`))(`fleet/sends/temp/a/${ep}/3`);
    expect(r.targets.map((t): string => t.agent)).toEqual(["temp/a"]);
    expect(r.inbox).toBe(true);
    expect({ ...r.forwarded }).toEqual({ sid: `inbox:${ep}:3` as never, topic: "fleet/agents/temp/a/inbox" });
    expect((await router(`${3 - owner}/2`))(`fleet/sends/temp/a/${ep}/3`).targets).toEqual([]);
  });

  test("a forwarded send naming no agent of the fleet is refused", async () => {
    const route = await router("1/2");
    for (const topic of ["fleet/sends/nope/a/e/0", "fleet/sends/temp/a/e", "fleet/sends/temp/bad key/e/0"])
      expect(route(topic)).toMatchObject({ targets: [], inbox: true, elsewhere: [] });
    expect(route("fleet/sends/temp/a/e")).toMatchObject({
      problems: [expect.stringContaining("not a forwarded send")],
    });
  });
});

describe("timers on a shard", () => {
  test("an every timer fires only for the agents this shard owns, whatever else its data dir holds", async () => {
    const sv = await compileSpec(
      `[fleet]\nshard = "1/2"\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n` +
        `[agents.tick]\nmodule = "agent.ts"\nsubscribe = ["tick/+"]\nkey = "{1}"\nevery = "10s"\n`,
      "/srv/fleet.toml",
    );
    const keys = Array.from({ length: 20 }, (_, i) => `t${i}`);
    const recorded: string[] = [];
    const now = 1_000_000;
    const host = {
      spec: sv,
      store: {
        getMeta: async () => String(now - 15_000), // a fire was missed: caught up at start
        setMeta: async () => undefined,
        deployedOfType: async () => keys.map((key) => ({ key })),
      },
      intake: { record: async (targets: { agent: string }[]) => void recorded.push(...targets.map((t) => t.agent)) },
      log: pino({ level: "silent" }),
    } as unknown as BackgroundHost;
    const timers = fleetTimers(host, () => now);
    await timers.update(sv.spec);
    await timers.stop();
    const mine = keys.map((k) => `tick/${k}`).filter((a) => ownerShard(a, 2) === 1);
    expect(mine.length).toBeGreaterThan(0);
    expect(recorded.sort()).toEqual(mine.sort());
  });
});

describe("the central view of a sharded fleet", () => {
  const gw = (gateway: string, fleet: string, firstPushAt: number) => ({
    gateway,
    fleet,
    firstPushAt,
    lastPushAt: firstPushAt,
    pushedRows: 0,
    backlogRows: 0,
    backlogBytes: 0,
    lagS: 0,
    lostRows: 0,
    schemaVersion: 3,
  });
  const all = fleetLayout([
    gw("g0", "plant", 1),
    gw("g1", "plant-shard-1-of-2", 10),
    gw("g2", "plant-shard-2-of-2", 11),
    gw("g3", "plant-shard-1-of-3", 20),
    gw("g4", "plant-shard-2-of-3", 21),
    gw("g5", "plant-shard-3-of-3", 22),
    gw("o1", "other", 5),
  ]);
  const ids = (gs: readonly { gateway: string }[]) => gs.map((g) => g.gateway).sort();

  test("the layout that first pushed last is the fleet; older ones (unsharded, fewer shards) are superseded", () => {
    expect(all.map((g) => [g.gateway, g.base, g.shard, g.superseded])).toEqual([
      ["g0", "plant", null, true],
      ["g1", "plant", "1/2", true],
      ["g2", "plant", "2/2", true],
      ["g3", "plant", "1/3", false],
      ["g4", "plant", "2/3", false],
      ["g5", "plant", "3/3", false],
      ["o1", "other", null, false],
    ]);
  });

  test("3 shards, then 2, then 3 again: only the newest 3-shard layout is current, by generation not count", () => {
    const regrown = fleetLayout([
      gw("a1", "r-shard-1-of-3", 10),
      gw("a2", "r-shard-2-of-3", 11),
      gw("a3", "r-shard-3-of-3", 12),
      gw("b1", "r-shard-1-of-2", 20),
      gw("b2", "r-shard-2-of-2", 21),
      gw("c1", "r-shard-1-of-3", 30),
      gw("c2", "r-shard-2-of-3", 31),
    ]);
    expect(ids(gatewaysFor(regrown, "r"))).toEqual(["c1", "c2"]);
    expect(regrown.filter((g) => g.superseded).map((g) => g.gateway)).toEqual(["a1", "a2", "a3", "b1", "b2"]);
    // Shard 3 of the new layout has not pushed yet: a gap, not the old generation's shard 3 in its place.
    expect(layoutGaps(regrown, "r")).toEqual([{ fleet: "r", shards: 3, missing: ["3/3"] }]);
    // A reshard to the same count: each shard's newer gateway is the current one.
    const same = fleetLayout(
      [gw("a1", "r-shard-1-of-2", 10), gw("a2", "r-shard-2-of-2", 11)].concat([
        gw("n1", "r-shard-1-of-2", 20),
        gw("n2", "r-shard-2-of-2", 21),
      ]),
    );
    expect(ids(gatewaysFor(same, "r"))).toEqual(["n1", "n2"]);
  });

  test("a fleet's name reads its current shards; a fleet id or gateway id reads what it names", () => {
    expect(ids(gatewaysFor(all, "plant"))).toEqual(["g3", "g4", "g5"]);
    expect(ids(gatewaysFor(all))).toEqual(["g3", "g4", "g5", "o1"]);
    expect(ids(gatewaysFor(all, "plant-shard-2-of-2"))).toEqual(["g2"]);
    expect(ids(gatewaysFor(all, "g0"))).toEqual(["g0"]);
    expect(ids(gatewaysFor(all, "other"))).toEqual(["o1"]);
    expect(gatewaysFor(all, "nope")).toEqual([]);
  });
});
