/**
 * `agent-fleets/testing`: authors unit-test an agent in-process, importing the package by
 * name (package.json `exports`) exactly as they would from their own app.
 */
import { describe, expect, test } from "bun:test";
import { defineAgent, ToolDenied } from "agent-fleets";
import { stimuli, testAgent } from "agent-fleets/testing";
import tempMonitor from "../agents/examples/temp-monitor.ts";

describe("agent-fleets/testing runs an agent's episodes in-process", () => {
  test("the temp monitor alerts once above the threshold and clears below the hysteresis band", async () => {
    const agent = testAgent(tempMonitor, { key: "boiler-1", config: { threshold: 80, hysteresis: 2 } });
    const hot = await agent.run(stimuli.mqtt("sensors/boiler-1/temperature", { value: 85 }));
    expect(hot.status).toBe("committed");
    expect(hot.decisions.map((d) => d.name)).toEqual(["alert"]);
    expect(hot.published).toEqual([
      { topic: "alerts/boiler-1", payload: expect.objectContaining({ level: "alert", value: 85, threshold: 80 }) },
    ]);

    const stillHot = await agent.run(stimuli.mqtt("sensors/boiler-1/temperature", { value: 79 }));
    expect(stillHot.decisions).toEqual([]); // inside the band: no flapping

    const cool = await agent.run(stimuli.mqtt("sensors/boiler-1/temperature", { value: 70 }));
    expect(cool.decisions.map((d) => d.name)).toEqual(["clear"]);
    expect(agent.state).toMatchObject({ alarm: false, count: 3, last: 70 });
  });

  test("state carries from one episode to the next and starts from init", async () => {
    const counter = defineAgent<{ n: number }>({
      init: () => ({ n: 10 }),
      onStimulus(_s, ctx) {
        ctx.state.n += 1;
        ctx.emit({ n: ctx.state.n });
      },
    });
    const agent = testAgent(counter);
    await agent.run(stimuli.manual(null));
    const second = await agent.run(stimuli.manual(null));
    expect(second.emits).toEqual([{ n: 12 }]);
    expect(agent.history.map((r) => r.state.n)).toEqual([11, 12]);
  });

  test("a throwing episode fails and leaves the state as it was, like an uncommitted checkpoint", async () => {
    const flaky = defineAgent<{ n: number }>({
      init: () => ({ n: 0 }),
      onStimulus(stimulus, ctx) {
        ctx.state.n += 1;
        if (stimulus.payload === "boom") throw new Error("sensor offline");
      },
    });
    const agent = testAgent(flaky);
    await agent.run(stimuli.manual("ok"));
    const failed = await agent.run(stimuli.manual("boom"));
    expect(failed.status).toBe("failed");
    expect(failed.error?.message).toBe("sensor offline");
    expect(agent.state).toEqual({ n: 1 });
  });

  test("ctx.tools.send and ctx.send are one tool: both are recorded as sent", async () => {
    const relay = defineAgent({
      init: () => ({}),
      async onStimulus(_s, ctx) {
        await ctx.tools.send("door/d1", { via: "tools" });
        await ctx.send("door/d2", { via: "ctx" });
      },
    });
    const run = await testAgent(relay).run(stimuli.manual(null));
    expect(run.sent).toEqual([
      { to: "door/d1", payload: { via: "tools" } },
      { to: "door/d2", payload: { via: "ctx" } },
    ]);
    const denied = await testAgent(relay, { tools: ["publish"] }).run(stimuli.manual(null));
    expect(denied.status).toBe("failed");
    expect(denied.error).toBeInstanceOf(ToolDenied);
  });

  test("a tool outside the allowlist throws ToolDenied and is recorded as denied", async () => {
    const caller = defineAgent<{ denied: string | null }>({
      init: () => ({ denied: null }),
      async onStimulus(_s, ctx) {
        try {
          await ctx.tools.http("https://example.invalid/");
        } catch (err) {
          if (err instanceof ToolDenied) ctx.state.denied = err.tool;
        }
      },
    });
    const agent = testAgent(caller, { tools: ["publish"] });
    const run = await agent.run(stimuli.manual(null));
    expect(run.state.denied).toBe("http");
    expect(run.toolCalls).toEqual([
      { tool: "http", args: ["https://example.invalid/"], ok: false, result: expect.any(ToolDenied) },
    ]);
  });

  test("tool fakes answer calls, and now() and random() are deterministic", async () => {
    const summariser = defineAgent<{ text?: string; at?: number; r?: number }>({
      init: () => ({}),
      async onStimulus(_s, ctx) {
        const out = await ctx.tools.llm({ prompt: "summarise" });
        ctx.state.text = out.text;
        ctx.state.at = ctx.now();
        ctx.state.r = ctx.random();
      },
    });
    const fakes = {
      llm: () => ({ text: "all quiet", usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 } }),
    };
    const a = testAgent(summariser, { fakes, now: () => 5_000 });
    const b = testAgent(summariser, { fakes, now: () => 5_000 });
    const [ra, rb] = [await a.run(stimuli.timer(5_000)), await b.run(stimuli.timer(5_000))];
    expect(ra.state).toEqual({ text: "all quiet", at: 5_000, r: rb.state.r });
  });

  test("state that is not JSON fails the episode, as it would in the gateway", async () => {
    const worse = defineAgent<{ n: bigint }>({
      init: () => ({ n: 0n }),
      onStimulus() {},
    });
    const failed = await testAgent(worse).run(stimuli.manual(null));
    expect(failed.status).toBe("failed");
    expect(failed.error?.message).toMatch(/BigInt|serializ/i);
  });
});
