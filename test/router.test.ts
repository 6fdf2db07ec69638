/**
 * Routing (topic -> agents) and stimulus ids (the dedup key intake records per agent).
 */
import { describe, expect, test } from "bun:test";
import { stimulusId } from "../gateway/intake/index.ts";
import { createRouter, renderKey, type Route } from "../gateway/intake/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";

const FLEET = `
[agents.temp]
module = "agent.ts"
subscribe = ["sensors/+/temperature"]

[agents.any-sensor]
module = "agent.ts"
subscribe = ["sensors/+/+"]
key = "{1}.{2}"

[agents.line]
module = "agent.ts"
subscribe = ["site/+/line/+/state"]
key = "{2}-at-{1}"

[agents.logs]
module = "agent.ts"
subscribe = ["logs/#"]

[agents.dual]
module = "agent.ts"
subscribe = ["dual/+/a", "dual/+/#"]
key = "{1}"

[agents.fixed]
module = "agent.ts"
subscribe = ["plant/alarm"]
key = "main"
`;

const route = createRouter((await compileSpec(FLEET, "/srv/fleet.toml")).spec);

/** Target agent ids of a route, sorted. */
const agents = (r: Route): string[] => r.targets.map((t): string => t.agent).sort();

describe("router: subscribe patterns and key templates", () => {
  test("a '+' capture becomes the key ({1})", () => {
    const r = route("sensors/boiler-1/temperature");
    expect(r.inbox).toBe(false);
    expect(r.problems).toEqual([]);
    const temp = r.targets.find((t) => t.type.name === "temp");
    expect(temp).toMatchObject({ agent: "temp/boiler-1", key: "boiler-1" });
  });

  test("several captures fill {1} and {2} in template order", () => {
    const r = route("site/north/line/7/state");
    expect(r.targets).toHaveLength(1);
    expect(r.targets[0]).toMatchObject({ agent: "line/7-at-north", key: "7-at-north" });
    expect(r.targets[0]!.type.name).toBe("line");
  });

  test("a '#' capture spans levels, joined with '.' so it stays one key", () => {
    expect(agents(route("logs/edge/gw-1/kernel"))).toEqual(["logs/edge.gw-1.kernel"]);
    expect(agents(route("logs/one"))).toEqual(["logs/one"]);
  });

  test("a pattern without wildcards routes to its fixed key", () => {
    expect(agents(route("plant/alarm"))).toEqual(["fixed/main"]);
  });

  test("one message matching two types gives one target per type", () => {
    const r = route("sensors/boiler-1/temperature");
    expect(agents(r)).toEqual(["any-sensor/boiler-1.temperature", "temp/boiler-1"]);
    expect(r.problems).toEqual([]);
  });

  test("a type that matches through two of its patterns gives one target", () => {
    const r = route("dual/x/a");
    expect(agents(r)).toEqual(["dual/x"]);
    expect(agents(route("dual/x/b/c"))).toEqual(["dual/x"]);
  });

  test("a topic nobody subscribes to has no targets and no problems", () => {
    expect(route("kitchen/toaster")).toEqual({ targets: [], inbox: false, problems: [] });
    expect(route("sensors/boiler-1")).toEqual({ targets: [], inbox: false, problems: [] });
  });

  test("a capture that is not a valid key is a problem, not a target", () => {
    const r = route("sensors/bad key/temperature");
    expect(r.targets).toEqual([]);
    expect(r.problems.length).toBe(2); // temp and any-sensor both matched
    expect(r.problems.join("\n")).toContain("gives no valid key for temp");
  });

  test("a key longer than 128 bytes is a problem that says so; 128 bytes is a key", () => {
    const long = "k".repeat(129);
    const r = route(`sensors/${long}/temperature`);
    expect(r.targets).toEqual([]);
    expect(r.problems[0]).toContain("is longer than 128 bytes (129)");
    expect(route(`sensors/${"k".repeat(128)}/temperature`).targets.length).toBeGreaterThan(0);
    const inbox = route(`fleet/agents/temp/${long}/inbox`);
    expect(inbox.problems[0]).toContain("is longer than 128 bytes (129)");
  });

  test("an empty '#' capture (the parent level) is a problem, not an agent with an empty key", () => {
    const r = route("logs");
    expect(r.targets).toEqual([]);
    expect(r.problems).toEqual([`topic "logs" gives no valid key for logs (template {1})`]);
  });
});

describe("router: inbox topics", () => {
  test("fleet/agents/<type>/<key>/inbox addresses that agent directly", () => {
    const r = route("fleet/agents/temp/boiler-9/inbox");
    expect(r.inbox).toBe(true);
    expect(r.problems).toEqual([]);
    expect(r.targets).toHaveLength(1);
    expect(r.targets[0]).toMatchObject({ agent: "temp/boiler-9", key: "boiler-9" });
    expect(r.targets[0]!.type.name).toBe("temp");
  });

  test("an inbox of an unknown type is a problem with no target", () => {
    const r = route("fleet/agents/nope/k/inbox");
    expect(r).toEqual({ targets: [], inbox: true, problems: ['no agent type "nope" in this fleet'] });
  });

  test("an inbox whose key is not a valid agent key is a problem with no target", () => {
    const r = route("fleet/agents/temp/bad key/inbox");
    expect(r).toEqual({
      targets: [],
      inbox: true,
      problems: ['"bad key" is not a valid agent key: it may only hold A-Z a-z 0-9 _ . : @ -'],
    });
  });

  test("other fleet/ topics are not inboxes and route nowhere", () => {
    expect(route("fleet/agents/temp/boiler-1/out")).toEqual({ targets: [], inbox: false, problems: [] });
    expect(route("fleet/agents/temp/a/b/inbox")).toEqual({ targets: [], inbox: false, problems: [] });
  });
});

describe("renderKey", () => {
  test("fills captures by position and refuses a missing or empty result", () => {
    expect(renderKey("{2}_{1}", ["a", "b"])).toBe("b_a");
    expect(renderKey("k-{1}", ["x/y"])).toBe("k-x.y");
    expect(renderKey("{3}", ["a", "b"])).toBeNull();
    expect(renderKey("{1}", [""])).toBeNull();
  });
});

describe("stimulusId", () => {
  const enc = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));
  const idOf = async (dedup: string | null, topic: string, value: unknown): Promise<string> =>
    stimulusId(dedup, topic, enc(value), value);

  test("uses the dedup field when it is a string", async () => {
    expect(await idOf("id", "sensors/a/temperature", { id: "m-17", t: 80 })).toBe("id:m-17");
  });

  test("uses the dedup field when it is a number", async () => {
    expect(await idOf("id", "sensors/a/temperature", { id: 17, t: 80 })).toBe("id:17");
  });

  test("the dedup field alone decides: other topic or payload, same id", async () => {
    const a = await idOf("id", "sensors/a/temperature", { id: "m-1", t: 80 });
    const b = await idOf("id", "sensors/b/temperature", { id: "m-1", t: 99 });
    expect(a).toBe(b);
  });

  test("falls back to a content hash when the field is absent, empty or not a string/number", async () => {
    for (const value of [{ t: 80 }, { id: "", t: 80 }, { id: true }, { id: { nested: 1 } }, [1, 2], 81.5]) {
      expect(await idOf("id", "sensors/a/temperature", value)).toMatch(/^h:[0-9a-f]{64}$/);
    }
  });

  test("falls back to a content hash when the type has no dedup field", async () => {
    expect(await idOf(null, "sensors/a/temperature", { id: "m-1" })).toMatch(/^h:[0-9a-f]{64}$/);
  });

  test("a non-JSON payload is hashed", async () => {
    const bytes = new TextEncoder().encode("not json");
    expect(await stimulusId("id", "t", bytes, undefined)).toMatch(/^h:[0-9a-f]{64}$/);
  });

  test("the content hash is stable for the same topic and payload", async () => {
    expect(await idOf(null, "sensors/a/temperature", { t: 80 })).toBe(
      await idOf(null, "sensors/a/temperature", { t: 80 }),
    );
  });

  test("the content hash differs with the topic", async () => {
    expect(await idOf(null, "sensors/a/temperature", { t: 80 })).not.toBe(
      await idOf(null, "sensors/b/temperature", { t: 80 }),
    );
  });

  test("the content hash differs with the payload", async () => {
    expect(await idOf(null, "sensors/a/temperature", { t: 80 })).not.toBe(
      await idOf(null, "sensors/a/temperature", { t: 81 }),
    );
  });
});
