/**
 * Retiring with grace (docs/upgrading.md): `fleet retire <agent> --drain` and removing a type
 * from fleet.toml. A draining agent takes no new stimuli but runs every one queued before the
 * drain, then is retired; its history stays verifiable and replayable. Episodes wait on a gate
 * server the test answers, so stimuli are really queued behind a running one when the drain starts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { bundleOfSql, specOfSql, STATUS_COMMITTED } from "../gateway/store/index.ts";
import { TestFleet, cleanupAll, publishQos1, runCli, subscribe, waitFor } from "./helpers/gateway.ts";
import { agentType, counterType, fleetHeader } from "./helpers/toml.ts";

const SLOW = 120_000;
const GATED = join(import.meta.dir, "fixtures/ops/gated.ts");
const gatedType = (name: string) =>
  agentType(name, GATED, [`${name}/+/in`], {
    dedup: "id",
    extra: `tools = ["http"]\nhttp_hosts = ["127.0.0.1"]\n\n[agents.${name}.budget]\nepisode_timeout_ms = 60000\n`,
  });
const BASE = fleetHeader("e2e-drain") + counterType("counter", "count/+/tick");
const TOML = BASE + gatedType("gated") + gatedType("doomed");

/** The gate: each request waits until the test opens it. */
const arrived = new Set<string>();
let open = false;
const waiting: (() => void)[] = [];
const gate = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  async fetch(req) {
    arrived.add(new URL(req.url).pathname.slice(1));
    if (!open) await new Promise<void>((r) => waiting.push(r));
    return Response.json({ ok: true });
  },
});
const url = (id: string) => `http://127.0.0.1:${gate.port}/${id}`;
function setGate(to: boolean): void {
  open = to;
  if (to) for (const w of waiting.splice(0)) w();
}

let fleet: TestFleet;

interface ApiAgent {
  status: string;
  reason: string | null;
  queued: number;
}
const apiAgent = async (id: string) => (await (await fleet.fetch(`/api/agents/${id}`)).json()) as ApiAgent;
const stimuli = (agent: string) =>
  fleet.query<{ sid: string; state: string }>("SELECT sid, state FROM stimuli WHERE agent = ? ORDER BY seq", [agent]);

/** Publish stimuli `ids` for `agent` (type/key) and wait until the first is running at the gate. */
async function queueBehindRunning(agent: string, ids: readonly string[]): Promise<void> {
  const [type, key] = agent.split("/");
  const client = await fleet.mqtt({ clientId: `drain-${key}` });
  for (const id of ids) await publishQos1(client, `${type}/${key}/in`, { id, url: url(id) });
  await waitFor(() => arrived.has(ids[0]!) || undefined, 30_000, `${ids[0]} running at the gate`);
  expect((await apiAgent(agent)).queued).toBe(ids.length);
}

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
}, SLOW);

afterAll(async () => {
  setGate(true);
  await cleanupAll();
  gate.stop(true);
}, 60_000);

describe("fleet retire --drain", () => {
  test(
    "the agent refuses new stimuli, runs every queued one, then is retired; its history verifies and replays",
    async () => {
      setGate(false);
      await queueBehindRunning("gated/g1", ["s1", "s2", "s3"]);
      const statuses = await subscribe(await fleet.mqtt({ clientId: "drain-status" }), "fleet/agents/gated/g1/status");

      const drained = await fleet.cli("retire", "gated/g1", "--drain");
      expect(drained.code).toBe(0);
      expect(drained.json).toMatchObject({
        ok: true,
        agent: "gated/g1",
        action: "retire",
        drain: true,
        status: "draining",
      });
      const during = await apiAgent("gated/g1");
      expect(during.status).toBe("draining");
      expect(during.queued).toBe(3);
      await statuses.next((m) => m.json?.status === "draining", 10_000, "the draining status");
      const listed = await fleet.cli("agents", "--status", "draining");
      expect(listed.json.agents.map((a: { id: string }) => a.id)).toEqual(["gated/g1"]);

      // New stimuli are refused from every source while it drains.
      const sent = await fleet.fetch("/api/send", {
        method: "POST",
        body: JSON.stringify({ topic: "gated/g1/in", payload: { id: "late", url: url("late") } }),
      });
      expect(sent.status).toBe(409);
      expect(((await sent.json()) as { error: { message: string } }).error.message).toContain("draining");
      // So are operator actions that would undo it.
      const pause = await fleet.fetch("/api/agents/gated/g1/pause", { method: "POST" });
      expect(pause.status).toBe(409);
      expect(((await pause.json()) as { error: { code: string } }).error.code).toBe("draining");

      setGate(true);
      const retired = await statuses.next((m) => m.json?.status === "retired", 60_000, "the retired status");
      expect(retired.json.reason).toBe("retired by operator after draining its queue");
      expect(await apiAgent("gated/g1")).toMatchObject({ status: "retired", queued: 0 });
      // Every stimulus queued before the drain ran; none was refused; the late one was never recorded.
      expect(await stimuli("gated/g1")).toEqual([
        { sid: "id:s1", state: "done" },
        { sid: "id:s2", state: "done" },
        { sid: "id:s3", state: "done" },
      ]);
      const eps = await fleet.episodes("gated/g1");
      expect(eps.filter((e) => e.status === "committed")).toHaveLength(3);

      expect((await fleet.cli("verify", "--agent", "gated/g1")).code).toBe(0);
      const replay = await fleet.cli("replay", "--agent", "gated/g1");
      expect(replay.code).toBe(0);
      expect(replay.json).toMatchObject({ episodes: 3, matched: 3, diverged: 0 });
    },
    SLOW,
  );

  test(
    "a drain ordered while the agent's last stimulus runs retires it once that episode commits",
    async () => {
      setGate(false);
      await queueBehindRunning("gated/g2", ["last"]);
      const statuses = await subscribe(await fleet.mqtt({ clientId: "drain-last" }), "fleet/agents/gated/g2/status");
      const drained = await fleet.cli("retire", "gated/g2", "--drain");
      expect(drained.json).toMatchObject({ ok: true, status: "draining" });
      setGate(true);
      const retired = await statuses.next((m) => m.json?.status === "retired", 60_000, "the retired status");
      expect(retired.json.reason).toBe("retired by operator after draining its queue");
      expect(await apiAgent("gated/g2")).toMatchObject({ status: "retired", queued: 0 });
      expect(await stimuli("gated/g2")).toEqual([{ sid: "id:last", state: "done" }]);
    },
    SLOW,
  );

  test(
    "an agent with nothing queued is retired at once; retiring a retired agent with --drain is a no-op",
    async () => {
      setGate(true);
      const client = await fleet.mqtt({ clientId: "drain-idle" });
      await publishQos1(client, "count/idle/tick", { id: "t1" });
      await fleet.waitCommitted("counter/idle", 1);
      const r = await fleet.cli("retire", "counter/idle", "--drain");
      expect(r.json).toMatchObject({ ok: true, status: "retired" });
      expect((await apiAgent("counter/idle")).status).toBe("retired");
      const again = await fleet.cli("retire", "counter/idle", "--drain");
      expect(again.code).toBe(0);
      expect(again.json.status).toBe("retired");
    },
    SLOW,
  );

  test("bad inputs: --drain with pause, drain=yes, drain on pause over HTTP, an unknown agent", async () => {
    const base = ["--data-dir", fleet.dataDir];
    const cli = await runCli(["pause", "counter/c1", "--drain", ...base]);
    expect(cli.code).toBe(2);
    expect(cli.stderr).toContain("fleet: pause does not take --drain");
    const yes = await fleet.fetch("/api/agents/counter/c1/retire?drain=yes", { method: "POST" });
    expect(yes.status).toBe(400);
    const onPause = await fleet.fetch("/api/agents/counter/c1/pause?drain=1", { method: "POST" });
    expect(onPause.status).toBe(400);
    const ghost = await fleet.fetch("/api/agents/counter/ghost/retire?drain=1", { method: "POST" });
    expect(ghost.status).toBe(404);
  });
});

describe("removing a type from fleet.toml", () => {
  test(
    "its agents drain on the spec that still had the type, then retire; history verifies and replays",
    async () => {
      setGate(true);
      const client = await fleet.mqtt({ clientId: "drain-type" });
      // doomed/quiet has history and nothing queued: it is retired at the reload.
      await publishQos1(client, "doomed/quiet/in", { id: "q1" });
      await fleet.waitCommitted("doomed/quiet", 1);
      setGate(false);
      await queueBehindRunning("doomed/busy", ["b1", "b2", "b3"]);
      const before = ((await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string }).spec_version;

      writeFileSync(fleet.configPath, BASE + gatedType("gated"));
      const busy = await waitFor(
        async () => {
          const a = await apiAgent("doomed/busy");
          return a.status === "draining" ? a : undefined;
        },
        30_000,
        "doomed/busy draining after the reload",
      );
      expect(busy.reason).toMatch(/^type doomed removed from fleet\.toml \(spec [0-9a-f]{12}\); draining/);
      // The reload walks the type's agents one after another: doomed/quiet may come a moment later.
      await waitFor(async () => (await apiAgent("doomed/quiet")).status === "retired" || undefined, 10_000, "quiet");

      setGate(true);
      const done = await waitFor(
        async () => {
          const a = await apiAgent("doomed/busy");
          return a.status === "retired" ? a : undefined;
        },
        60_000,
        "doomed/busy retired after draining",
      );
      expect(done.reason).toMatch(/^type doomed removed from fleet\.toml \(spec [0-9a-f]{12}\)$/);
      expect((await stimuli("doomed/busy")).map((s) => s.state)).toEqual(["done", "done", "done"]);
      const eps = await fleet.query<{ spec_version: string; bundle: string | null }>(
        `SELECT ${specOfSql("spec_version")} AS spec_version, ${bundleOfSql("bundle")} AS bundle FROM episodes
          WHERE agent = ? AND status = ${STATUS_COMMITTED}`,
        ["doomed/busy"],
      );
      // They ran on the last version that had the type (its pinned code), so a replay finds it.
      expect(eps.map((e) => e.spec_version)).toEqual([before, before, before]);
      for (const e of eps) expect(e.bundle).toMatch(/^[0-9a-f]{64}$/);

      expect((await fleet.cli("verify")).code).toBe(0);
      const replay = await fleet.cli("replay", "--agent", "doomed/busy");
      expect(replay.code).toBe(0);
      expect(replay.json).toMatchObject({ episodes: 3, matched: 3 });
    },
    SLOW,
  );

  test(
    "a drain left unfinished by a stop finishes after the restart",
    async () => {
      setGate(false);
      await queueBehindRunning("gated/g9", ["r1", "r2"]);
      expect((await fleet.cli("retire", "gated/g9", "--drain")).json.status).toBe("draining");
      await fleet.kill();
      setGate(true);
      await fleet.start();
      const a = await waitFor(
        async () => {
          const x = await apiAgent("gated/g9");
          return x.status === "retired" ? x : undefined;
        },
        60_000,
        "gated/g9 retired after the restart",
      );
      expect(a.queued).toBe(0);
      expect((await stimuli("gated/g9")).map((s) => s.state)).toEqual(["done", "done"]);
    },
    SLOW,
  );
  test(
    "a type removed while the gateway was stopped drains at start as at a hot reload; brought back, it returns",
    async () => {
      writeFileSync(fleet.configPath, BASE + gatedType("gated") + gatedType("late"));
      await waitFor(
        async () =>
          ((await (await fleet.fetch("/api/fleet")).json()) as { types?: Record<string, unknown> }).types?.late,
        30_000,
        "type late deployed",
      );
      setGate(false);
      await queueBehindRunning("late/l1", ["l1", "l2", "l3"]);
      await fleet.kill();
      writeFileSync(fleet.configPath, BASE + gatedType("gated"));
      setGate(true);
      await fleet.start();
      const a = await waitFor(
        async () => {
          const x = await apiAgent("late/l1");
          return x.status === "retired" ? x : undefined;
        },
        60_000,
        "late/l1 retired after draining at start",
      );
      expect(a.reason).toMatch(/^type late removed from fleet\.toml \(spec [0-9a-f]{12}\)$/);
      expect((await stimuli("late/l1")).map((s) => s.state)).toEqual(["done", "done", "done"]);

      writeFileSync(fleet.configPath, BASE + gatedType("gated") + gatedType("late"));
      await waitFor(async () => (await apiAgent("late/l1")).status === "idle" || undefined, 30_000, "late/l1 back");
    },
    SLOW,
  );
});
