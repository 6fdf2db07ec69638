/**
 * Provenance from the CLI against a real gateway: `fleet trace` follows a two-agent chain
 * (device -> relay -> send -> alerter -> publish) both ways, and `fleet state` shows what an
 * agent knew at any checkpoint and what changed between two.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { diffJson } from "../gateway/ops/index.ts";
import { join } from "node:path";
import { cleanupAll, openDbFile, publishQos1, runCli, TestFleet } from "./helpers/gateway.ts";
import { fleetHeader, relayChainTypes } from "./helpers/toml.ts";

const TOML = fleetHeader("history") + relayChainTypes();

let fleet: TestFleet;
beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
  const client = await fleet.mqtt();
  await publishQos1(client, "door/d1/event", { open: true });
  await publishQos1(client, "door/d1/event", { open: false });
  await fleet.waitCommitted("relay/d1", 2);
  await fleet.waitCommitted("alerter/d1", 2);
});
afterAll(cleanupAll);

describe("fleet trace", () => {
  test("from the device's episode down: relay -> send -> alerter -> publish, across agents", async () => {
    const [first] = (await fleet.episodes("relay/d1")).sort((a, b) => a.started_at - b.started_at);
    const r = await fleet.cli("trace", first!.id);
    expect(r.code).toBe(0);
    const t = r.json;
    expect(t.upstream).toEqual([]);
    expect(t.episode).toMatchObject({
      agent: "relay/d1",
      status: "committed",
      stimulus: { kind: "mqtt", topic: "door/d1/event", sent_by: null, payload_hash: expect.any(String) },
    });
    const send = t.episode.effects.find((e: { kind: string }) => e.kind === "send");
    expect(send).toMatchObject({ to: "alerter/d1", ok: true });
    expect(send.episodes).toHaveLength(1);
    expect(send.episodes[0]).toMatchObject({
      agent: "alerter/d1",
      status: "committed",
      stimulus: { kind: "inbox", sent_by: first!.id },
    });
    expect(send.episodes[0].effects).toContainEqual({ kind: "publish", topic: "alerts/d1", seq: 0, ok: true });
  });

  test("from a published topic up: finds the alerter's newest episode and its cause", async () => {
    const r = await fleet.cli("trace", "--topic", "alerts/d1");
    expect(r.code).toBe(0);
    const alerterEpisodes = (await fleet.episodes("alerter/d1")).sort((a, b) => b.started_at - a.started_at);
    expect(r.json.episode.episode).toBe(alerterEpisodes[0]!.id);
    expect(r.json.upstream).toHaveLength(1);
    expect(r.json.upstream[0]).toMatchObject({ agent: "relay/d1", stimulus: { kind: "mqtt", topic: "door/d1/event" } });

    const human = await fleet.cli("trace", alerterEpisodes[0]!.id.slice(0, 13));
    expect(human.code).toBe(0);
  });

  test("an unknown episode or topic is one clear line and exit 1", async () => {
    const r = await fleet.cli("trace", "0000ffff");
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe("fleet: no episode starts with 0000ffff");
    // A prefix too short to name one episode says so, for trace and show alike.
    const prefix = (await fleet.episodes("relay/d1"))[0]!.id.slice(0, 3);
    for (const cmd of ["trace", "show"]) {
      const short = await fleet.cli(cmd, prefix);
      expect([short.code, short.stderr.trim()]).toEqual([
        1,
        `fleet: an episode id prefix needs at least 4 characters, got "${prefix}"`,
      ]);
    }
    const t = await fleet.cli("trace", "--topic", "alerts/nobody");
    expect(t.code).toBe(1);
    expect(t.stderr).toContain("no committed episode published to alerts/nobody");
    // An agent's id where an episode's belongs says so, for trace and show alike.
    for (const cmd of ["trace", "show"]) {
      const a = await fleet.cli(cmd, "alerter/d1");
      expect(a.code).toBe(1);
      expect(a.stderr.trim()).toBe(
        "fleet: no episode alerter/d1 (alerter/d1 is an agent's id: `fleet episodes alerter/d1` lists its episodes)",
      );
    }
  });
});

describe("fleet state", () => {
  test("--json prints the state object; --at shows an older checkpoint", async () => {
    const now = await fleet.cli("state", "alerter/d1");
    expect(now.code).toBe(0);
    expect(now.json).toMatchObject({ alerts: 2 });
    const first = await fleet.cli("state", "alerter/d1", "--at", "1");
    expect(first.json).toMatchObject({ alerts: 1 });
  });

  test("--diff A..B is a JSON Patch from one checkpoint to the other", async () => {
    const r = await fleet.cli("state", "alerter/d1", "--diff", "1..2");
    expect(r.code).toBe(0);
    expect(r.json.patch).toContainEqual({ op: "replace", path: "/alerts", from_value: 1, value: 2 });
  });

  test("a checkpoint that does not exist, or a bad --at, is refused with a clear line", async () => {
    const missing = await fleet.cli("state", "alerter/d1", "--at", "99");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("has no checkpoint #99 (head is #2)");
    const bad = await fleet.cli("state", "alerter/d1", "--at", "two");
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--at must be a checkpoint number (1, 2, ...), got "two"');
  });
});

describe("diffJson", () => {
  test("adds, removes and replaces by JSON Pointer, objects by key and arrays by index", () => {
    expect(diffJson({ a: 1, b: { c: [1, 2, 3] }, "x/y": 1 }, { a: 2, b: { c: [1, 5] }, d: true })).toEqual([
      { op: "replace", path: "/a", from_value: 1, value: 2 },
      { op: "replace", path: "/b/c/1", from_value: 2, value: 5 },
      { op: "remove", path: "/b/c/2", from_value: 3 },
      { op: "remove", path: "/x~1y", from_value: 1 },
      { op: "add", path: "/d", value: true },
    ]);
    expect(diffJson({ same: [1, { k: "v" }] }, { same: [1, { k: "v" }] })).toEqual([]);
    expect(diffJson(1, "1")).toEqual([{ op: "replace", path: "", from_value: 1, value: "1" }]);
  });
});

describe("reading the data dir", () => {
  test("fleet show takes a unique id prefix and prints every event line whole", async () => {
    const [ep] = await fleet.episodes("alerter/d1");
    const r = await runShow(ep!.id.slice(0, 18));
    expect(r.code).toBe(0);
    expect(r.json.id).toBe(ep!.id);
    const human = await runShowHuman(ep!.id.slice(0, 18));
    const stimulusLine = human.split("\n").find((l) => l.includes(" stimulus "));
    expect(stimulusLine).toBeDefined();
    expect(stimulusLine!.endsWith("}")).toBe(true); // not cut at 160 characters
  });

  test("fleet agents --json reports how many stimuli wait for each agent", async () => {
    expect((await fleet.cli("pause", "relay/d1")).code).toBe(0);
    const client = await fleet.mqtt();
    for (let i = 0; i < 3; i++) await publishQos1(client, "door/d1/event", { waiting: i });
    const r = await fleet.cli("agents", "--type", "relay");
    expect(r.code).toBe(0);
    expect(r.json.agents).toContainEqual(expect.objectContaining({ id: "relay/d1", queued: 3 }));
    expect((await fleet.cli("resume", "relay/d1")).code).toBe(0);
  });
});

function runShow(id: string) {
  return fleet.cli("show", id);
}

async function runShowHuman(id: string): Promise<string> {
  return (await runCli(["show", id, "--data-dir", fleet.dataDir])).stdout;
}

describe("the same over HTTP", () => {
  const get = async (path: string) => {
    const res = await fleet.fetch(path);
    return { status: res.status, body: (await res.json()) as any };
  };

  test("GET /api/episodes/<id>/trace and /api/trace?topic= return the lineage", async () => {
    const [relayEp] = (await fleet.episodes("relay/d1")).sort((a, b) => a.started_at - b.started_at);
    const byId = await get(`/api/episodes/${relayEp!.id}/trace`);
    expect(byId.status).toBe(200);
    expect(byId.body.episode.effects.find((e: { kind: string }) => e.kind === "send").episodes).toHaveLength(1);
    const byTopic = await get("/api/trace?topic=alerts/d1");
    expect(byTopic.status).toBe(200);
    expect(byTopic.body.episode.agent).toBe("alerter/d1");
    expect(byTopic.body.upstream[0].agent).toBe("relay/d1");
    expect((await get("/api/trace")).status).toBe(400);
    expect((await get("/api/episodes/ffffffff/trace")).body.error.code).toBe("not_found");
  });

  test("GET /api/agents/<t>/<k>/state and state/diff", async () => {
    const at1 = await get("/api/agents/alerter/d1/state?at=1");
    expect(at1.status).toBe(200);
    expect(at1.body).toMatchObject({ seq: 1, state: { alerts: 1 }, collected: false });
    const diff = await get("/api/agents/alerter/d1/state/diff?from=1&to=2");
    expect(diff.body.patch).toContainEqual({ op: "replace", path: "/alerts", from_value: 1, value: 2 });
    const bad = await get("/api/agents/alerter/d1/state?at=zero");
    expect(bad.status).toBe(400);
    expect(bad.body.error.code).toBe("bad_query");
  });

  test("a checkpoint whose stored state does not hash to it is 409 tampered, not shown under its hash", async () => {
    const db = openDbFile(join(fleet.dataDir, "fleet.db"));
    const where = "WHERE agent = 'alerter/d1' AND seq = 1";
    const state = (await db.execute(`SELECT state FROM checkpoints ${where}`)).rows[0]!.state as string;
    await db.execute(`UPDATE checkpoints SET state = '{"alerts":1000}' ${where}`);
    try {
      for (const path of ["/api/agents/alerter/d1/state?at=1", "/api/agents/alerter/d1/state/diff?from=1&to=2"]) {
        const r = await get(path);
        expect([r.status, r.body.error.code]).toEqual([409, "tampered"]);
        expect(r.body.error.message).toContain("hash mismatch");
      }
      expect((await get("/api/agents/alerter/d1/state?at=2")).status).toBe(200);
    } finally {
      await db.execute({ sql: `UPDATE checkpoints SET state = ? ${where}`, args: [state] });
      db.close();
    }
  });
});
