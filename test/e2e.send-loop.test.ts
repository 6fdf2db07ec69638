/**
 * A loop between agents (A sends to B, B answers A, ...) is stopped by `[fleet] max_send_hops`: each
 * message is one send further from what came into the fleet, and the send past the limit is denied
 * (ToolDenied, recorded), though the episode that tried it commits. Wake-ups between sends do not
 * restart the count, and a new message from outside starts a rally of its own.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { cleanupAll, fixture, TestFleet } from "./helpers/gateway.ts";
import { sampleValue, scrape } from "./helpers/prom.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

afterAll(async () => {
  await cleanupAll();
}, 60_000);

const PINGPONG = fixture("pingpong");
const toml = (maxHops: number) =>
  fleetHeader("send-loop", { fleet: `max_send_hops = ${maxHops}` }) +
  agentType("a", PINGPONG, ["a/+/in"], { extra: 'tools = ["send"]\n' }) +
  agentType("b", PINGPONG, ["b/+/in"], { extra: 'tools = ["send"]\n' });

/** The committed episodes of `agent`, oldest first. */
async function committed(fleet: TestFleet, agent: string) {
  return (await fleet.episodes(agent)).filter((e) => e.status === "committed").reverse();
}

/** Run `body` on a started gateway with `max_send_hops = maxHops`; it stops cleanly after. */
async function withFleet(maxHops: number, body: (fleet: TestFleet) => Promise<void>): Promise<void> {
  const fleet = new TestFleet(toml(maxHops));
  try {
    await fleet.start();
    await body(fleet);
    expect(await fleet.stop()).toBe(0);
  } finally {
    await fleet.dispose();
  }
}

/** The rally ended: `n` committed episodes each, and none more a second later. */
async function rallyEnded(fleet: TestFleet, n: number): Promise<void> {
  await fleet.waitCommitted("b/1", n);
  await Bun.sleep(1000);
  expect(await committed(fleet, "a/1")).toHaveLength(n);
  expect(await committed(fleet, "b/1")).toHaveLength(n);
}

/** Start a rally: a message from outside to a/1 that it answers to b/1. */
async function serve(fleet: TestFleet, ball: Record<string, unknown> = {}): Promise<void> {
  expect((await fleet.cli("send", "a/1/in", JSON.stringify({ to: "b/1", n: 0, ...ball }))).code).toBe(0);
}

describe("[fleet] max_send_hops", () => {
  test("a rally between two agents stops at the limit: the send past it is denied and recorded", async () => {
    await withFleet(5, async (fleet) => {
      // a/1 runs the message from outside (0 sends: n = 0), then b/1 runs n = 1, a/1 2, b/1 3, a/1 4, b/1 5,
      // whose send would be the 6th: denied.
      await serve(fleet);
      await rallyEnded(fleet, 3);
      const last = (await committed(fleet, "b/1")).at(-1)!;
      const [stopped] = await fleet.decisions(last.id);
      expect(stopped).toMatchObject({ name: "stopped", data: { n: 5 } });
      expect((stopped!.data as { reason: string }).reason).toContain(
        "refused: this episode's stimulus is already 5 sends from where it came into the fleet " +
          "([fleet] max_send_hops = 5)",
      );
      // Counted, and logged once for the agent it was refused for.
      const metrics = await scrape(fleet.httpUrl);
      expect(
        sampleValue(metrics, "fleet_intake_refused_total", { source: "inbox", type: "a", reason: "send_hops" }),
      ).toBe(1);
      const logged = fleet
        .logTail(400)
        .split("\n")
        .filter((l) => l.includes("stimulus refused: send to a/1 refused: this episode's stimulus is already 5 sends"));
      expect(logged).toHaveLength(1);
      expect(logged[0]).toContain("(sent by b/1)");
      // A new message from outside starts its own count, though it runs on the same two agents.
      await serve(fleet);
      await rallyEnded(fleet, 6);
    });
  }, 120_000);

  test("wake-ups between the sends are followed: the rally stops after as many sends", async () => {
    await withFleet(3, async (fleet) => {
      // Each answer goes out from a wake-up 10 ms after the message: a/1 (0, wake), b/1 (1, wake), a/1 (2, wake),
      // b/1 (3: its wake-up's send is denied).
      await serve(fleet, { via_wake: true });
      await rallyEnded(fleet, 4);
      const last = (await committed(fleet, "b/1")).at(-1)!;
      expect(await fleet.decisions(last.id)).toMatchObject([
        { name: "stopped", data: { n: 3, reason: expect.stringContaining("max_send_hops = 3") } },
      ]);
    });
  }, 120_000);

  test("0 turns the limit off", async () => {
    await withFleet(0, async (fleet) => {
      await serve(fleet);
      // Well past the default's 16: 20 episodes each.
      await fleet.waitCommitted("b/1", 20, 60_000);
      await fleet.waitCommitted("a/1", 20, 60_000);
    });
  }, 120_000);
});
