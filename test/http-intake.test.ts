import { describe, expect, test } from "bun:test";
import { intakeResponse, refusedResponse } from "../gateway/http/index.ts";
import type { AgentId } from "../gateway/types.ts";

describe("the HTTP answer to one recorded stimulus", () => {
  const agent = "counter/dev-1" as AgentId;

  test("a stimulus refused because the queue is full is 429 with Retry-After", async () => {
    const res = intakeResponse(
      {
        accepted: [],
        duplicates: [],
        refused: [{ agent, code: "queue_full", reason: "waiting line at capacity (max_queue 5)" }],
      },
      agent,
    );
    expect(res.status).toBe(429);
    expect(res.headers.get("retry-after")).toBe("5");
    expect(await res.json()).toEqual({
      error: { code: "queue_full", message: "waiting line at capacity (max_queue 5)" },
    });
  });

  test("a stimulus that would create an agent past max_agents is 429 max_agents with Retry-After", async () => {
    const reason = "no new agent: type counter has max_agents (3)";
    const res = intakeResponse(
      { accepted: [], duplicates: [], refused: [{ agent, code: "max_agents", reason }] },
      agent,
    );
    expect(res.status).toBe(429);
    expect(res.headers.get("retry-after")).toBe("60");
    expect(await res.json()).toEqual({ error: { code: "max_agents", message: reason } });
  });

  test("a stimulus refused for a retired agent is 409, whatever its reason says", async () => {
    const res = intakeResponse(
      { accepted: [], duplicates: [], refused: [{ agent, code: "retired", reason: "queue full (no, retired)" }] },
      agent,
    );
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("refused");
  });

  test("accepted is 202 with the stimulus id, a duplicate 200 with the original", async () => {
    const accepted = intakeResponse({ accepted: [{ agent, sid: "s1", seq: 9 }], duplicates: [], refused: [] }, agent);
    expect(accepted.status).toBe(202);
    expect(await accepted.json()).toEqual({ stimulus: "s1", agent, seq: 9, duplicate: false });
    const dup = intakeResponse({ accepted: [], duplicates: [{ agent, sid: "s1" }], refused: [] }, agent);
    expect(dup.status).toBe(200);
    expect(await dup.json()).toEqual({ stimulus: "s1", agent, duplicate: true });
  });
});

describe("the HTTP answer when every target refused a stimulus", () => {
  const a = "counter/a" as AgentId;
  const b = "counter/b" as AgentId;
  const full = { agent: a, code: "queue_full" as const, reason: "queue full" };
  const retired = { agent: b, code: "retired" as const, reason: "retired" };
  const report = (...refused: (typeof full | typeof retired)[]) => ({ accepted: [], duplicates: [], refused });

  test("a full queue among the reasons is 429 queue_full with Retry-After: a retry can succeed", async () => {
    for (const r of [report(full), report(retired, full)]) {
      const res = refusedResponse(r, "why", { ...r });
      expect(res.status).toBe(429);
      expect(res.headers.get("retry-after")).toBe("5");
      expect(await res.json()).toEqual({ ...r, error: { code: "queue_full", message: "why" } });
    }
  });

  test("only permanent refusals (retired, draining) are 409 refused without Retry-After", async () => {
    const draining = { agent: a, code: "draining" as const, reason: "draining" };
    const res = refusedResponse({ accepted: [], duplicates: [], refused: [retired, draining] }, "why");
    expect(res.status).toBe(409);
    expect(res.headers.get("retry-after")).toBeNull();
    expect(await res.json()).toEqual({ error: { code: "refused", message: "why" } });
  });
});
