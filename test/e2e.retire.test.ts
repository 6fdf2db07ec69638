/**
 * Retiring an agent that still has stimuli waiting: they are refused with a recorded reason
 * (state `rejected`), never left queued forever, and the agent's history stays.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { TestFleet, connectMqtt, publishQos1, waitFor } from "./helpers/gateway.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

let fleet: TestFleet;

/** The agent as the running gateway's API shows it (with its live queue length). */
async function apiAgent(id: string): Promise<{ status: string; queued: number }> {
  return (await (await fleet.fetch(`/api/agents/${id}`)).json()) as { status: string; queued: number };
}

beforeAll(async () => {
  fleet = new TestFleet(fleetHeader("retire-test") + counterType("counter", "meters/+/reading"));
  await fleet.start();
}, 60_000);

afterAll(async () => {
  await fleet?.dispose();
}, 60_000);

test("retiring an agent refuses the stimuli still waiting for it, with the reason recorded", async () => {
  const client = await connectMqtt(fleet.mqttPort);
  try {
    await publishQos1(client, "meters/m1/reading", { id: "r0", v: 0 });
    await fleet.waitCommitted("counter/m1", 1);
    expect((await fleet.cli("pause", "counter/m1")).code).toBe(0);
    for (let i = 1; i <= 3; i++) await publishQos1(client, "meters/m1/reading", { id: `r${i}`, v: i });
    await waitFor(
      async () => (await apiAgent("counter/m1")).queued === 3 || undefined,
      10_000,
      "3 stimuli waiting while paused",
    );

    expect((await fleet.cli("retire", "counter/m1")).code).toBe(0);
    const rows = await waitFor(
      async () => {
        const r = await fleet.query<{ sid: string; state: string; last_error: string | null }>(
          "SELECT sid, state, last_error FROM stimuli WHERE agent = ? AND sid != 'id:r0' ORDER BY seq",
          ["counter/m1"],
        );
        return r.length === 3 && r.every((x) => x.state === "rejected") ? r : undefined;
      },
      10_000,
      "the waiting stimuli to be refused",
    );
    expect(rows.map((r) => r.sid)).toEqual(["id:r1", "id:r2", "id:r3"]);
    for (const r of rows) expect(r.last_error).toContain("agent is retired");
    const agent = await apiAgent("counter/m1");
    expect(agent.status).toBe("retired");
    expect(agent.queued).toBe(0);
    // History is kept: the one committed episode is still there.
    expect((await fleet.episodes("counter/m1")).filter((e) => e.status === "committed")).toHaveLength(1);
  } finally {
    client.end(true);
  }
}, 60_000);
