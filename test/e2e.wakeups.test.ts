/**
 * Durable wake-ups end to end on the real gateway process (agents/README.md "Wake-ups",
 * docs/guarantees.md): a wake-up fires once as a `wake` stimulus with its payload, a
 * cancelled one never fires, the cap holds, a wake-up survives `kill -9` of the gateway
 * (and one that fell due while it was down fires at start), `fleet trace` links the two
 * episodes both ways, the API and CLI list them, and replay stays MATCH.
 * Fixture agent: test/fixtures/wake/waker.ts.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { cleanupAll, publishQos1, runCli, TestFleet, waitFor, type EpisodeJson } from "./helpers/gateway.ts";
import { idOfSql, STATUS_COMMITTED } from "../gateway/store/index.ts";
import { signedInPage } from "./helpers/browser.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

setDefaultTimeout(120_000);
afterAll(cleanupAll);

const WAKER = fileURLToPath(new URL("./fixtures/wake/waker.ts", import.meta.url));

const TOML =
  fleetHeader("e2e-wakeups") +
  agentType("waker", WAKER, ["cmd/+"], {
    extra: "max_wakeups = 3\n\n[agents.waker.retry]\nmax_attempts = 1\n",
  }) +
  agentType("blocker", WAKER, ["blk/+"], { extra: "max_wakeups = 600\nmax_queue = 1\n" });

interface Emitted {
  woke?: { id: string; due_at: number; set_by: string };
  id?: string;
  payload?: unknown;
  set?: string[];
  refused?: string;
}

/** Every `emit` of an agent's committed episodes, oldest first, with the episode that made it. */
async function emits(fleet: TestFleet, agent: string): Promise<(Emitted & { episode: string })[]> {
  const rows = await fleet.query<{ episode: string; data: string }>(
    `SELECT ${idOfSql("e.episode")} AS episode, e.data FROM events e JOIN episodes ep ON ep.id = e.episode
     WHERE ep.agent = ? AND ep.status = ${STATUS_COMMITTED} AND e.kind = 'emit' ORDER BY ep.started_at, e.seq`,
    [agent],
  );
  return rows.map((r) => ({ episode: r.episode, ...(JSON.parse(r.data) as { data: Emitted }).data }));
}

/** Wait until the agent has emitted something that satisfies `pred`; returns all emits. */
async function waitEmit(fleet: TestFleet, agent: string, pred: (e: Emitted) => boolean, what: string) {
  return waitFor(
    async () => {
      const all = await emits(fleet, agent);
      return all.some(pred) ? all : undefined;
    },
    60_000,
    what,
    100,
  );
}

async function command(fleet: TestFleet, key: string, cmd: object): Promise<void> {
  const c = await fleet.mqtt({ clientId: `cmd-${key}-${Math.random().toString(36).slice(2)}` });
  await publishQos1(c, `cmd/${key}`, cmd);
  c.end(true);
}

describe("durable wake-ups on the real gateway", () => {
  // Made in beforeAll, not at collection: another file's cleanupAll must not remove it.
  let fleet: TestFleet;
  beforeAll(() => {
    fleet = new TestFleet(TOML);
  });

  test("a wake-up fires once as a `wake` stimulus with its payload and names the episode that set it", async () => {
    await fleet.start();
    await command(fleet, "a", { in: "1s", data: { door: "d1" } });
    const all = await waitEmit(fleet, "waker/a", (e) => e.woke !== undefined, "the wake episode");
    const setter = all.find((e) => e.set)!;
    const woke = all.filter((e) => e.woke);
    expect(woke).toHaveLength(1);
    expect(woke[0]).toMatchObject({
      id: `wake:${setter.set![0]}`,
      payload: { door: "d1" },
      woke: { id: setter.set![0], set_by: setter.episode },
    });
    const rows = await fleet.query("SELECT state FROM wakeups WHERE id = ?", [setter.set![0]!]);
    expect(rows).toEqual([{ state: "fired" }]);
  });

  test("fleet trace follows a wake-up both ways: its episode's cause, and what the setter woke", async () => {
    const all = await emits(fleet, "waker/a");
    const setter = all.find((e) => e.set)!;
    const wakeEp = all.find((e) => e.woke)!;
    const up = await fleet.cli("trace", wakeEp.episode);
    expect(up.code).toBe(0);
    expect(up.json.upstream.map((n: { episode: string }) => n.episode)).toEqual([setter.episode]);
    expect(up.json.episode.stimulus).toMatchObject({ kind: "wake", set_by: setter.episode });
    const down = await fleet.cli("trace", setter.episode);
    const wake = down.json.episode.effects.find((e: { kind: string }) => e.kind === "wake");
    expect(wake).toMatchObject({ id: setter.set![0], state: "fired" });
    expect(wake.episodes.map((n: { episode: string }) => n.episode)).toEqual([wakeEp.episode]);
  });

  test("a cancelled wake-up never fires; one set after it does", async () => {
    await command(fleet, "b", { in: "2s", data: "cancelled" });
    await waitEmit(fleet, "waker/b", (e) => e.set !== undefined, "the first wake-up set");
    await command(fleet, "b", { cancel: "first" });
    await command(fleet, "b", { in: "3s", data: "sentinel" });
    const all = await waitEmit(fleet, "waker/b", (e) => e.payload === "sentinel", "the sentinel wake-up");
    expect(all.filter((e) => e.woke).map((e) => e.payload)).toEqual(["sentinel"]);
    const states = await fleet.query<{ payload: string; state: string }>(
      "SELECT payload, state FROM wakeups WHERE agent = 'waker/b' ORDER BY created_at",
    );
    expect(states).toEqual([
      { payload: '"cancelled"', state: "cancelled" },
      { payload: '"sentinel"', state: "fired" },
    ]);
  });

  test("max_wakeups caps what is pending: the fourth throws ToolDenied inside the agent", async () => {
    await command(fleet, "c", { in: "1h", many: 5 });
    const all = await waitEmit(fleet, "waker/c", (e) => e.refused !== undefined, "the refusal");
    expect(all.find((e) => e.refused)).toMatchObject({ refused: "ToolDenied" });
    expect((all.find((e) => e.refused) as { set: string[] }).set).toHaveLength(3);
  });

  test("the API and `fleet wakeups` list an agent's wake-ups with their state", async () => {
    const res = await fleet.fetch("/api/agents/waker/c/wakeups?state=pending");
    expect(res.status).toBe(200);
    const body = (await res.json()) as { wakeups: { state: string; payload: unknown }[] };
    expect(body.wakeups.map((w) => w.state)).toEqual(["pending", "pending", "pending"]);
    const bad = await fleet.fetch("/api/agents/waker/c/wakeups?state=soon");
    expect(bad.status).toBe(400);
    const cli = await fleet.cli("wakeups", "waker/b");
    expect(cli.code).toBe(0);
    expect(cli.json.wakeups.map((w: { state: string }) => w.state).sort()).toEqual(["cancelled", "fired"]);
    // What settled each: the episode that cancelled it, the episode that ran the one that fired.
    const ran = (await emits(fleet, "waker/b")).find((e) => e.woke && e.payload === "sentinel")!;
    const fired = cli.json.wakeups.find((w: { state: string }) => w.state === "fired");
    expect(fired.done_by).toBe(ran.episode);
    expect(cli.json.wakeups.find((w: { state: string }) => w.state === "cancelled").done_by).toMatch(/^[0-9a-f-]{36}$/);
    const api = (await (await fleet.fetch("/api/agents/waker/b/wakeups?state=fired")).json()) as {
      wakeups: { done_by: string | null }[];
    };
    expect(api.wakeups.map((w) => w.done_by)).toEqual([ran.episode]);
  });

  test("a wake-up survives kill -9 and fires once; one due while the gateway was down fires at start", async () => {
    await command(fleet, "d", { in: "2s", data: "across a crash" });
    const [set] = await waitEmit(fleet, "waker/d", (e) => e.set !== undefined, "the wake-up set");
    await fleet.kill();
    // Due while the gateway is down.
    await Bun.sleep(2500);
    await fleet.start();
    const all = await waitEmit(fleet, "waker/d", (e) => e.woke !== undefined, "the wake episode after restart");
    // A later sentinel proves nothing else was coming for the first wake-up.
    await command(fleet, "d", { in: 0, data: "sentinel" });
    const after = await waitEmit(fleet, "waker/d", (e) => e.payload === "sentinel", "the sentinel");
    expect(after.filter((e) => e.woke?.id === set!.set![0])).toHaveLength(1);
    expect(all.length).toBeGreaterThanOrEqual(2);
    const episodes: EpisodeJson[] = await fleet.episodes("waker/d");
    expect(episodes.filter((e) => e.stimulus === `wake:${set!.set![0]}`)).toHaveLength(1);
  });

  test("a paused agent's 600 undeliverable wake-ups do not hold up another agent's wake-up", async () => {
    const b = await fleet.mqtt({ clientId: "cmd-blocker" });
    await publishQos1(b, "blk/b1", { at: Date.now() + 2000, many: 600 });
    b.end(true);
    await fleet.waitEpisodes("blocker/b1", (eps) => eps.length === 1, 30_000, "the blocker's wake-ups");
    expect((await fleet.fetch("/api/agents/blocker/b1/pause", { method: "POST" })).status).toBe(200);
    await Bun.sleep(2500); // its wake-ups are due now: one fills its queue, the others are refused
    await command(fleet, "victim", { in: "2s", data: "on time" });
    const all = await waitEmit(fleet, "waker/victim", (e) => e.woke !== undefined, "the victim's wake-up");
    const woke = all.find((e) => e.woke)!;
    // When it was delivered (its stimulus recorded), not when its episode ended: the episode's
    // own run is the machine's load, and the blocker's wake-ups would hold up the delivery.
    const [row] = await fleet.query<{ late: number }>(
      `SELECT s.received_at - w.due_at AS late FROM wakeups w JOIN stimuli s ON s.sid = 'wake:' || w.id
        WHERE w.id = ?`,
      [woke.woke!.id],
    );
    expect(row!.late).toBeLessThan(1500);
  });

  test("the dashboard's agent page lists the wake-ups with their state and the episode that set each", async () => {
    const { browser, page } = await signedInPage(fleet);
    try {
      await page.goto(`${fleet.httpUrl}/#/agents/waker/b`);
      const rows = page.getByTestId("wakeups").locator("tr[data-wake]");
      await waitFor(async () => (await rows.count()) === 2, 30_000, "two wake-up rows");
      const states = await rows.evaluateAll((rs) => rs.map((r) => r.getAttribute("data-state")));
      expect(states.sort()).toEqual(["cancelled", "fired"]);
      const cancelled = page.getByTestId("wakeups").locator('tr[data-state="cancelled"]');
      expect(await cancelled.textContent()).toContain('"cancelled"');
      expect(await cancelled.locator("a").count()).toBe(2); // set by, cancelled by
    } finally {
      await browser.close();
    }
  });

  test("replay: every committed episode that set, cancelled or received a wake-up is MATCH", async () => {
    for (const agent of ["waker/a", "waker/b", "waker/c", "waker/d"]) {
      const r = await fleet.cli("replay", "--agent", agent);
      expect([agent, r.code, r.json.diverged]).toEqual([agent, 0, 0]);
      expect(r.json.matched).toBe(r.json.episodes);
    }
    await fleet.stop();
  });
});

test("a reload lowering max_wakeups below what is pending stops only new wake-ups; cancels still commit", async () => {
  const toml = (max: number) =>
    fleetHeader("e2e-wakeups-cap") +
    agentType("waker", WAKER, ["cmd/+"], { extra: `max_wakeups = ${max}\n\n[agents.waker.retry]\nmax_attempts = 1\n` });
  const fleet = new TestFleet(toml(30));
  await fleet.start();
  await command(fleet, "e", { in: "1h", many: 20 });
  const [set] = await waitEmit(fleet, "waker/e", (e) => e.set !== undefined, "20 wake-ups set");
  expect(set!.set).toHaveLength(20);
  const version = async () =>
    ((await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string }).spec_version;
  const before = await version();
  writeFileSync(fleet.configPath, toml(10));
  await waitFor(async () => (await version()) !== before, 30_000, "the reload");
  await command(fleet, "e", { in: "1h" });
  await waitEmit(fleet, "waker/e", (e) => e.refused !== undefined, "the denied wake-up");
  await command(fleet, "e", { cancel: "first" });
  const all = await waitEmit(fleet, "waker/e", (e) => "was_pending" in e, "the cancel");
  expect(all.find((e) => e.refused)).toMatchObject({ refused: "ToolDenied", set: [] });
  expect(all.find((e) => "was_pending" in e)).toMatchObject({ was_pending: true });
  const episodes: EpisodeJson[] = await fleet.episodes("waker/e");
  expect(episodes.map((e) => e.status)).toEqual(["committed", "committed", "committed"]);
  expect(await fleet.query("SELECT COUNT(*) AS n FROM wakeups WHERE state = 'pending'")).toEqual([{ n: 19 }]);
  await fleet.stop();
});

test("`fleet wakeups` refuses a bad --state with a clear first line and the usage", async () => {
  const r = await runCli(["wakeups", "waker/a", "--state", "soon", "--data-dir", "/nonexistent"]);
  expect(r.code).toBe(2);
  expect(r.stderr.split("\n")[0]).toBe('fleet: --state must be one of pending, fired, cancelled, dropped; got "soon"');
});
