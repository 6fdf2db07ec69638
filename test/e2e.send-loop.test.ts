/**
 * A loop between agents (A sends to B, B answers A, ...) is stopped by `[fleet] max_send_hops`: each
 * message is one send further from what came into the fleet, and the send past the limit is denied
 * (ToolDenied, recorded), though the episode that tried it commits. Wake-ups between sends do not
 * restart the count, and a new message from outside starts a rally of its own.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { cleanupAll, fixture, TestFleet } from "./helpers/gateway.ts";
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

describe("[fleet] max_send_hops", () => {
  test("a rally between two agents stops at the limit: the send past it is denied and recorded", async () => {
    const fleet = new TestFleet(toml(5));
    try {
      await fleet.start();
      // a/1 runs the message from outside (0 sends: n = 0), then b/1 runs n = 1, a/1 2, b/1 3, a/1 4, b/1 5,
      // whose send would be the 6th: denied.
      expect((await fleet.cli("send", "a/1/in", JSON.stringify({ to: "b/1", n: 0 }))).code).toBe(0);
      await fleet.waitCommitted("b/1", 3);
      await fleet.waitCommitted("a/1", 3);
      const last = (await committed(fleet, "b/1")).at(-1)!;
      const [stopped] = await fleet.decisions(last.id);
      expect(stopped).toMatchObject({ name: "stopped", data: { n: 5 } });
      expect((stopped!.data as { reason: string }).reason).toContain(
        "refused: this episode's stimulus is already 5 sends from where it came into the fleet " +
          "([fleet] max_send_hops = 5)",
      );
      // Nothing went on after the denial.
      await Bun.sleep(1000);
      expect(await committed(fleet, "a/1")).toHaveLength(3);
      expect(await committed(fleet, "b/1")).toHaveLength(3);

      // A new message from outside starts its own count, though it runs on the same two agents.
      expect((await fleet.cli("send", "a/1/in", JSON.stringify({ to: "b/1", n: 0 }))).code).toBe(0);
      await fleet.waitCommitted("b/1", 6);
      expect(await committed(fleet, "a/1")).toHaveLength(6);
      expect(await fleet.stop()).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("wake-ups between the sends are followed: the rally stops after as many sends", async () => {
    const fleet = new TestFleet(toml(3));
    try {
      await fleet.start();
      // Each answer goes out from a wake-up 10 ms after the message: a/1 (0, wake), b/1 (1, wake), a/1 (2, wake),
      // b/1 (3: its wake-up's send is denied).
      expect((await fleet.cli("send", "a/1/in", JSON.stringify({ to: "b/1", n: 0, via_wake: true }))).code).toBe(0);
      await fleet.waitCommitted("b/1", 4);
      const last = (await committed(fleet, "b/1")).at(-1)!;
      expect(await fleet.decisions(last.id)).toMatchObject([
        { name: "stopped", data: { n: 3, reason: expect.stringContaining("max_send_hops = 3") } },
      ]);
      await Bun.sleep(1000);
      expect(await committed(fleet, "a/1")).toHaveLength(4);
      expect(await committed(fleet, "b/1")).toHaveLength(4);
      expect(await fleet.stop()).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("0 turns the limit off", async () => {
    const fleet = new TestFleet(toml(0));
    try {
      await fleet.start();
      expect((await fleet.cli("send", "a/1/in", JSON.stringify({ to: "b/1", n: 0 }))).code).toBe(0);
      // Well past the default's 16: 20 episodes each.
      await fleet.waitCommitted("b/1", 20, 60_000);
      await fleet.waitCommitted("a/1", 20, 60_000);
      await fleet.stop();
    } finally {
      await fleet.dispose();
    }
  }, 120_000);
});
