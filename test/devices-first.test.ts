/**
 * Devices first: an intake burst (stimuli recorded faster than the burst rate) lowers the
 * episode slots to a quarter of max_concurrent_episodes, and a window below the rate restores
 * them. The clock is injected; a burst's windows close on a real timer, or by hand.
 */
import { describe, expect, test } from "bun:test";
import { IntakePressure, QuietLane, QuietPace, burstSlots, pressesIntake } from "../gateway/fleet/index.ts";
import { waitFor } from "./helpers/gateway.ts";

/** A pressure watch on a hand-moved clock, recording every change. */
function watch(rate = 1000, windowMs = 20) {
  let t = 1_000_000;
  const changes: boolean[] = [];
  const p = new IntakePressure(
    (burst) => changes.push(burst),
    () => t,
    rate,
    windowMs,
  );
  return { p, changes, advance: (ms: number) => (t += ms) };
}

describe("devices first", () => {
  test("a burst's slots are a quarter of max_concurrent_episodes, never fewer than one", () => {
    expect([1, 2, 4, 8, 10, 64].map(burstSlots)).toEqual([1, 1, 1, 2, 3, 16]);
  });

  test("only stimuli someone waits on count toward a burst: not the gateway's own timers and wake-ups", () => {
    const kinds = ["mqtt", "inbox", "webhook", "manual", "timer", "wake"] as const;
    expect(kinds.filter(pressesIntake)).toEqual(["mqtt", "inbox", "webhook", "manual"]);
  });

  test("the pace lets two starts through at once, then one per mean turn over its share of a slot", () => {
    const pace = new QuietPace(0.5, 2);
    const t = 1_000;
    // No turn seen yet: nothing to pace by.
    expect([pace.take(t, 1), pace.take(t, 1), pace.take(t, 1)]).toEqual([true, true, true]);
    pace.ran(40); // mean 40 ms at half a slot: a start per 80 ms
    expect(pace.take(t, 1)).toBe(true);
    expect(pace.take(t, 1)).toBe(true);
    expect(pace.take(t, 1)).toBe(false);
    expect(pace.nextAt(t, 1)).toBe(t + 80);
    expect(pace.take(t + 79, 1)).toBe(false);
    expect(pace.take(t + 80, 1)).toBe(true);
    // Slower turns (a contended box) slow the pace: the mean moves a fifth of the way per turn.
    pace.ran(140); // 0.8 * 40 + 0.2 * 140 = 60: a start per 120 ms
    expect(pace.nextAt(t + 80, 1)).toBe(t + 80 + 120);
    // A quiet spell refills the bucket to its two starts, no more.
    expect([pace.take(t + 10_000, 1), pace.take(t + 10_000, 1), pace.take(t + 10_000, 1)]).toEqual([true, true, false]);
  });

  test("a burst's cap of more slots paces in proportion: four slots, four times the starts", () => {
    const pace = new QuietPace(0.5, 2);
    pace.ran(40);
    const t = 1_000;
    // Eight at once (two per slot), then one per 20 ms (40 ms / (0.5 x 4)).
    const first = Array.from({ length: 9 }, () => pace.take(t, 4));
    expect(first.filter(Boolean)).toHaveLength(8);
    expect(pace.nextAt(t, 4)).toBe(t + 20);
    expect(pace.take(t + 20, 4)).toBe(true);
    expect(pace.take(t + 20, 4)).toBe(false);
  });

  test("one quiet agent's episode at a time holds the lane; one beside it yields only during a burst", () => {
    const lane = new QuietLane();
    const first = lane.enter(true);
    expect(first.yields).toBe(false);
    expect(lane.enter(true).yields).toBe(true);
    expect(lane.enter(false).yields).toBe(false);
    // The holder ends: the next episode takes the lane, burst or not; leaving twice frees it once.
    first.leave();
    const next = lane.enter(true);
    expect(next.yields).toBe(false);
    first.leave();
    expect(lane.enter(true).yields).toBe(true);
    next.leave();
    expect(lane.enter(true).yields).toBe(false);
  });

  test("stimuli below the rate are not a burst, however long they go on", () => {
    const { p, changes, advance } = watch(1000, 20);
    // 19 per 20 ms window = 950/s.
    for (let w = 0; w < 50; w++) {
      p.recorded(19);
      advance(20);
    }
    expect(changes).toEqual([]);
    expect(p.burst).toBe(false);
    p.stop();
  });

  test("a window at the rate starts a burst at once; a quiet window ends it", async () => {
    const { p, changes } = watch(1000, 20);
    p.recorded(10);
    expect(p.burst).toBe(false);
    p.recorded(10); // 20 in one 20 ms window: 1000/s
    expect(p.burst).toBe(true);
    expect(changes).toEqual([true]);
    // Nothing more arrives: the next window check ends the burst.
    await waitFor(() => !p.burst, 3000, "the burst to end", 2);
    expect(changes).toEqual([true, false]);
    p.stop();
  });

  test("a burst lasts while every window reaches the rate", () => {
    // Windows closed by hand (the timer's window is a minute here).
    const { p, changes } = watch(1000, 60_000);
    p.recorded(60_000);
    expect(changes).toEqual([true]);
    for (let w = 0; w < 5; w++) {
      p.recorded(60_000);
      p.closeWindow();
    }
    expect(changes).toEqual([true]);
    expect(p.burst).toBe(true);
    p.recorded(59_999);
    p.closeWindow();
    expect(changes).toEqual([true, false]);
    p.stop();
  });

  test("stop() ends a burst in progress and says so", () => {
    const { p, changes } = watch(1000, 20);
    p.recorded(50);
    p.stop();
    expect(p.burst).toBe(false);
    expect(changes).toEqual([true, false]);
  });
});
