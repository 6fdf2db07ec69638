/**
 * `agent-fleets/testing` fails what the gateway fails and delivers what it delivers (explore-m M12,
 * m3): the episode timeout, the size of the state, the publish tool's arguments and topics, log lines,
 * the timer payload, http/llm without a fake, a failed run's effects, and state given without a version.
 */
import { describe, expect, test } from "bun:test";
import { z } from "zod";
import { defineAgent, ToolDenied, ToolFailed } from "agent-fleets";
import {
  DEFAULT_TIMEOUT_MS,
  MAX_RECORD_BYTES,
  MAX_RECORDS,
  MAX_STATE_BYTES,
  stimuli,
  testAgent,
} from "agent-fleets/testing";
import { MAX_LOG_CHARS } from "../agents/protocol.ts";
import { CHILD_LIMITS, publishTool } from "../gateway/episode/index.ts";
import { compileSpec, DEFAULT_BUDGET } from "../gateway/spec/index.ts";

const ping = stimuli.manual(null);

describe("agent-fleets/testing keeps the gateway's limits", () => {
  test("a never-settling handler fails at the timeout (the gateway's default); later effects dropped", async () => {
    expect(DEFAULT_TIMEOUT_MS).toBe(DEFAULT_BUDGET.episode_timeout_ms);
    let late: unknown = null;
    const hangs = defineAgent<{ n: number }>({
      init: () => ({ n: 0 }),
      async onStimulus(_s, ctx) {
        ctx.state.n += 1;
        ctx.emit({ early: true });
        await Bun.sleep(300);
        try {
          ctx.emit({ late: true });
        } catch (err) {
          late = err;
        }
      },
    });
    const agent = testAgent(hangs, { timeoutMs: 100, state: { n: 5 } });
    const run = await agent.run(ping);
    expect(run.status).toBe("failed");
    expect(run.error?.message).toBe("timeout: episode exceeded 100 ms");
    expect(run.emits).toEqual([]);
    expect(agent.state).toEqual({ n: 5 });
    await Bun.sleep(400);
    expect(String(late)).toContain("has ended (it timed out)");
    expect(run.emits).toEqual([]);
  });

  test("state larger than an episode may send the gateway fails as too_large, naming the state", async () => {
    expect(MAX_STATE_BYTES).toBe(CHILD_LIMITS.max_record_bytes);
    const big = defineAgent<{ blob: string }, { mb: number }>({
      init: () => ({ blob: "" }),
      onStimulus(_s, ctx) {
        ctx.state.blob = "x".repeat(ctx.config.mb * 1024 * 1024);
      },
    });
    const nine = await testAgent(big, { config: { mb: 9 } }).run(ping);
    expect(nine.status).toBe("failed");
    expect(nine.error?.message).toMatch(/^too_large: agent state is \d+ bytes as JSON, more than the 8388608/);
    expect((await testAgent(big, { config: { mb: 7 } }).run(ping)).status).toBe("committed");
  });

  test("more records than an episode may write fail it as flood, even when the agent catches the error", async () => {
    expect([MAX_RECORDS, MAX_RECORD_BYTES]).toEqual([CHILD_LIMITS.max_records, CHILD_LIMITS.max_record_bytes]);
    const noisy = defineAgent<Record<string, never>, { n: number; blob?: number }>({
      init: () => ({}),
      onStimulus(_s, ctx) {
        for (let i = 0; i < ctx.config.n; i++) {
          try {
            ctx.decide("tick", ctx.config.blob ? "z".repeat(ctx.config.blob) : i);
          } catch {
            // swallowed: the episode fails all the same
          }
        }
      },
    });
    const many = await testAgent(noisy, { config: { n: MAX_RECORDS + 5 } }).run(ping);
    expect(many.error?.message).toBe(`flood: episode wrote more than ${MAX_RECORDS} records`);
    const big = await testAgent(noisy, { config: { n: 9, blob: 1024 * 1024 } }).run(ping);
    expect(big.error?.message).toBe(`flood: episode records exceed ${MAX_RECORD_BYTES} bytes`);
    expect((await testAgent(noisy, { config: { n: MAX_RECORDS } }).run(ping)).status).toBe("committed");
  });

  test("log lines are cut where the gateway cuts them", async () => {
    const chatty = defineAgent({ init: () => ({}), onStimulus: (_s, ctx) => ctx.log("y".repeat(10_000)) });
    const run = await testAgent(chatty).run(ping);
    expect(run.logs[0]).toHaveLength(MAX_LOG_CHARS);
  });
});

describe("agent-fleets/testing checks the publish tool as the gateway does", () => {
  const publisher = defineAgent<Record<string, never>, { topic: string; options?: unknown }>({
    init: () => ({}),
    async onStimulus(_s, ctx) {
      await ctx.tools.publish(ctx.config.topic, 1, ctx.config.options as never);
    },
  });
  const attempt = async (topic: string, options?: unknown, publish: readonly string[] | null = ["alerts/#"]) => {
    const run = await testAgent(publisher, {
      type: "lab",
      key: "k1",
      config: { topic, ...(options === undefined ? {} : { options }) },
      ...(publish ? { publish } : {}),
    }).run(ping);
    return run.status === "committed" ? "ok" : run.error instanceof ToolDenied ? run.error.reason : String(run.error);
  };

  test("topics and options are denied where the gateway's publish tool denies them, with its reasons", async () => {
    const gateway = { agent: { type: "lab", key: "k1" }, type: { name: "lab", publish: ["alerts/#"] } };
    const spec = { broker: { max_packet_bytes: 1 << 20 } };
    const cases: [string, unknown?][] = [
      ["alerts/boiler"],
      ["fleet/agents/lab/k1/notes"],
      ["not/allowed"],
      ["alerts/boiler", { qos: 1, retain: true }],
      ["alerts/boiler", { qos: 2 }],
      ["alerts/boiler", { retain: "yes" }],
      ["alerts/boiler", { priority: 1 }],
      ["alerts/#"],
      ["$SYS/x"],
      ["fleet/other"],
      ["fleet/agents/other/k9/inbox"],
      ["fleet/agents/lab/k1/out"],
      ["fleet/agents/lab/k1/+"],
      [`alerts/${"a/".repeat(99)}z`],
      [`fleet/agents/lab/k1/${"a/".repeat(96)}z`],
    ];
    for (const [topic, options] of cases) {
      const args = options === undefined ? [topic, 1] : [topic, 1, options];
      const r = publishTool({ ...gateway, spec, publishes: [] } as never, args);
      const expected = r.ok ? "ok" : (r.result as { reason: string }).reason;
      expect({ args, kit: await attempt(topic, options) }).toEqual({ args, kit: expected });
    }
    // A topic the broker refuses is denied at the call, not refused after the commit (at every retry).
    const deep = publishTool({ ...gateway, spec, publishes: [] } as never, [`alerts/${"a/".repeat(99)}z`, 1]);
    expect((deep.result as { reason: string }).reason).toEndWith(": topic of more than 100 levels");
    // Without the type's publish list the kit allows any topic a device could publish to.
    expect(await attempt("not/allowed", undefined, null)).toBe("ok");
  });

  test("a failed run lists no emits, publishes or sends: the gateway delivers none of them", async () => {
    const fails = defineAgent({
      init: () => ({}),
      async onStimulus(_s, ctx) {
        ctx.emit({ a: 1 });
        await ctx.tools.publish("alerts/x", 1);
        await ctx.send("other/k", 1);
        throw new Error("after the effects");
      },
    });
    const run = await testAgent(fails).run(ping);
    expect(run.status).toBe("failed");
    expect({ emits: run.emits, published: run.published, sent: run.sent }).toEqual({
      emits: [],
      published: [],
      sent: [],
    });
    expect(run.toolCalls.map((c) => c.tool)).toEqual(["publish", "send"]);
  });
});

describe("agent-fleets/testing stimuli and defaults match the gateway", () => {
  test("a timer stimulus carries the type's timer as the gateway compiles it", async () => {
    const sv = await compileSpec('[agents.t]\nmodule = "t.ts"\nevery = "60s"\n', "/srv/fleet.toml");
    const payload = stimuli.timer(1000).payload as { timer: unknown };
    expect(payload.timer).toEqual(sv.spec.agents.t!.timer);
  });

  test("http and llm without a fake throw ToolFailed, so an agent's fallback runs", async () => {
    const fallback = defineAgent({
      init: () => ({}),
      async onStimulus(_s, ctx) {
        try {
          await ctx.tools.llm({ prompt: "hi" });
        } catch (err) {
          ctx.decide("fallback", { failed: err instanceof ToolFailed });
        }
      },
    });
    const run = await testAgent(fallback).run(ping);
    expect(run.decisions).toEqual([{ name: "fallback", data: { failed: true } }]);
  });

  test("config is typed as the schema's input: a key the schema defaults may be left out", async () => {
    const Config = z.object({ threshold: z.number(), hysteresis: z.number().default(2) });
    const thermo = defineAgent<Record<string, never>, z.infer<typeof Config>>({
      config: Config,
      init: () => ({}),
      onStimulus: (_s, ctx) => ctx.emit(ctx.config),
    });
    // No cast: this line is what tsc refused (TS2741, hysteresis missing) while config was the output type.
    const run = await testAgent(thermo, { config: { threshold: 80 } }).run(ping);
    expect(run.emits).toEqual([{ threshold: 80, hysteresis: 2 }]);
  });

  test("state given without stateVersion is taken as the agent's own version: no migration runs", async () => {
    const v2 = defineAgent<{ v: 2 }>({
      version: 2,
      migrate: () => {
        throw new Error("migrate ran");
      },
      init: () => ({ v: 2 }),
      onStimulus: () => {},
    });
    const agent = testAgent(v2, { state: { v: 2 } });
    const run = await agent.run(ping);
    expect(run.status).toBe("committed");
    expect(run.migratedFrom).toBeNull();
    expect(agent.stateVersion).toBe(2);
  });
});
