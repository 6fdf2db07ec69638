/**
 * Routing (topic -> agents) and stimulus ids (the dedup key intake records per agent).
 */
import { describe, expect, test } from "bun:test";
import { dedupProblem, redeliveryId, stimulusId } from "../gateway/intake/index.ts";
import { createRouter, rememberRoutes, renderKey, type Route } from "../gateway/intake/index.ts";
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
    expect(route("kitchen/toaster")).toEqual({ targets: [], inbox: false, problems: [], elsewhere: [] });
    expect(route("sensors/boiler-1")).toEqual({ targets: [], inbox: false, problems: [], elsewhere: [] });
  });

  test("a capture that is not a valid key is a problem, not a target", () => {
    const r = route("sensors/bad key/temperature");
    expect(r.targets).toEqual([]);
    expect(r.problems.length).toBe(2); // temp and any-sensor both matched
    expect(r.problems.join("\n")).toContain("gives no valid key for temp");
  });

  test("a '.' or '..' level is no key (a URL path would drop it); '...' and 'a.' are keys", () => {
    for (const level of [".", ".."]) {
      const r = route(`sensors/${level}/temperature`);
      expect(r.targets.map((t) => String(t.agent))).toEqual([`any-sensor/${level}.temperature`]);
      expect(r.problems).toEqual([
        `topic "sensors/${level}/temperature" gives no valid key for temp (template {1}): key "${level}" may not be ` +
          `"${level}" (a URL cannot name it)`,
      ]);
      expect(route(`fleet/agents/temp/${level}/inbox`).problems).toEqual([
        `"${level}" is not a valid agent key: it may not be "${level}" (a URL cannot name it)`,
      ]);
    }
    expect(route("sensors/.../temperature").targets.map((t) => String(t.agent))).toContain("temp/...");
    expect(route("sensors/a./temperature").targets.map((t) => String(t.agent))).toContain("temp/a.");
  });

  test("an inbox naming a type every JavaScript object has (toString, constructor) routes nowhere", () => {
    for (const name of ["toString", "constructor", "__proto__", "hasOwnProperty", "valueOf"]) {
      const r = route(`fleet/agents/${name}/dev1/inbox`);
      expect(r.targets).toEqual([]);
      expect(r.problems).toEqual([`no agent type "${name}" in this fleet`]);
    }
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
    expect(r).toEqual({ targets: [], inbox: true, problems: ['no agent type "nope" in this fleet'], elsewhere: [] });
  });

  test("an inbox whose key is not a valid agent key is a problem with no target", () => {
    const r = route("fleet/agents/temp/bad key/inbox");
    expect(r).toEqual({
      targets: [],
      inbox: true,
      problems: ['"bad key" is not a valid agent key: it may only hold A-Z a-z 0-9 _ . : @ -'],
      elsewhere: [],
    });
  });

  test("other fleet/ topics are not inboxes and route nowhere", () => {
    expect(route("fleet/agents/temp/boiler-1/out")).toEqual({ targets: [], inbox: false, problems: [], elsewhere: [] });
    expect(route("fleet/agents/temp/a/b/inbox")).toEqual({ targets: [], inbox: false, problems: [], elsewhere: [] });
  });
});

describe("router: remembered routes", () => {
  const counting = () => {
    const asked: string[] = [];
    const inner = (topic: string): Route => {
      asked.push(topic);
      type Sid = NonNullable<Route["forwarded"]>["sid"];
      const forwarded = topic.startsWith("fleet/sends/") ? { sid: `inbox:${topic}` as Sid, topic } : undefined;
      return { ...route(topic), ...(forwarded ? { forwarded } : {}) };
    };
    return { asked, inner };
  };

  test("a topic routed again gets the route it got the first time, without routing it again", () => {
    const { asked, inner } = counting();
    const remembered = rememberRoutes(inner);
    const first = remembered("sensors/boiler-1/temperature");
    expect(remembered("sensors/boiler-1/temperature")).toBe(first);
    expect(agents(first)).toEqual(["any-sensor/boiler-1.temperature", "temp/boiler-1"]);
    expect(asked).toEqual(["sensors/boiler-1/temperature"]);
  });

  test("it keeps at most its limit of topics, forgetting the oldest first", () => {
    const { asked, inner } = counting();
    const remembered = rememberRoutes(inner, { topics: 2, topicChars: 256 });
    for (const t of ["plant/alarm", "logs/a", "logs/b", "logs/b", "plant/alarm"]) remembered(t);
    // "plant/alarm" was forgotten when "logs/b" came (the third topic), so it is routed again.
    expect(asked).toEqual(["plant/alarm", "logs/a", "logs/b", "plant/alarm"]);
  });

  test("long topics and forwarded sends are routed every time, never kept", () => {
    const { asked, inner } = counting();
    const remembered = rememberRoutes(inner, { topics: 10, topicChars: 20 });
    const long = `logs/${"x".repeat(40)}`;
    const send = "fleet/sends/temp/k1/0190f000-0000-7000-8000-000000000001/1";
    for (let i = 0; i < 2; i++) remembered(long);
    for (let i = 0; i < 2; i++) remembered(send);
    expect(asked).toEqual([long, long, send, send]);
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
  const idOf = (dedup: string | null, value: unknown): string => stimulusId(dedup, value, null);

  test("uses the dedup field when it is a string or a number", () => {
    expect(idOf("id", { id: "m-17", t: 80 })).toBe("id:m-17");
    expect(idOf("id", { id: 17, t: 80 })).toBe("id:17");
  });

  test("a dotted path reaches into the payload", () => {
    expect(idOf("device.seq", { device: { seq: 9 } })).toBe("id:9");
  });

  test("a template joins several fields, and needs every one of them", () => {
    expect(idOf("{device}:{seq}", { device: "door-1", seq: 41 })).toBe("id:door-1:41");
    expect(idOf("{device}:{seq}", { device: "door-1" })).toMatch(/^u:/);
  });

  test("different combinations never make the same id, whatever the values hold", () => {
    const t = "{device}:{seq}";
    expect(idOf(t, { device: "a:b", seq: 1 })).not.toBe(idOf(t, { device: "a", seq: "b:1" }));
    expect(idOf(t, { device: "a\\", seq: ":1" })).not.toBe(idOf(t, { device: "a\\:", seq: "1" }));
    expect(idOf("{device}{seq}", { device: "d1", seq: 23 })).not.toBe(idOf("{device}{seq}", { device: "d12", seq: 3 }));
    expect(idOf("{a}-{b}--{c}", { a: "x-", b: "y", c: "z" })).not.toBe(
      idOf("{a}-{b}--{c}", { a: "x", b: "-y", c: "z" }),
    );
    // The same combination is the same id; a value without the template's characters is as it was.
    expect(idOf(t, { device: "a:b", seq: 1 })).toBe(idOf(t, { device: "a:b", seq: 1 }));
    expect(idOf(t, { device: "door-1", seq: 41 })).toBe("id:door-1:41");
    expect(idOf("{device}{seq}", { device: "door", seq: 7 })).toBe("id:door\u001f7");
  });

  test("a repeated value without a dedup key is a new stimulus each time, never a duplicate", () => {
    const a = idOf(null, { open: true });
    const b = idOf(null, { open: true });
    expect(a).toMatch(/^u:/);
    expect(a).not.toBe(b);
  });

  test("the field absent, empty or not a string/number falls back to the given id", () => {
    const fallback = "r:dev:7:abc" as never;
    for (const value of [{ t: 80 }, { id: "", t: 80 }, { id: true }, { id: { nested: 1 } }, [1, 2], 81.5]) {
      expect(stimulusId("id", value, fallback)).toBe(fallback);
    }
  });

  test("a dedup value with a lone surrogate is no id (as UTF-8 it would equal another), and a webhook says why", () => {
    const fallback = "r:dev:7:abc" as never;
    for (const id of ["\ud800", "a\udc00", "{x}\ud800"]) expect(stimulusId("id", { id }, fallback)).toBe(fallback);
    expect(stimulusId("{d}:{n}", { d: "\udfff", n: 1 }, fallback)).toBe(fallback);
    expect(idOf("id", { id: "\ud83d\ude00" })).toBe("id:\ud83d\ude00");
    expect(dedupProblem("id", { id: "\ud800" })).toContain("well-formed Unicode");
    expect(dedupProblem("id", { id: "\ud83d\ude00" })).toBeNull();
  });

  test("a redelivery id is the same only for the same client, packet id, topic and payload", async () => {
    const base = await redeliveryId("dev", 7, "doors/d1", enc({ open: true }));
    expect(base).toMatch(/^r:dev:7:[0-9a-f]{32}$/);
    expect(await redeliveryId("dev", 7, "doors/d1", enc({ open: true }))).toBe(base);
    expect(await redeliveryId("dev", 8, "doors/d1", enc({ open: true }))).not.toBe(base);
    expect(await redeliveryId("other", 7, "doors/d1", enc({ open: true }))).not.toBe(base);
    expect(await redeliveryId("dev", 7, "doors/d2", enc({ open: true }))).not.toBe(base);
    expect(await redeliveryId("dev", 7, "doors/d1", enc({ open: false }))).not.toBe(base);
  });
});
