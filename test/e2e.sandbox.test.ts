/**
 * The episode sandbox end to end (issue 9): what an agent can reach of the gateway's files and
 * processes, and what a gateway killed with -9 leaves behind. Real gateway process, real MQTT,
 * real sandboxed episode subprocesses (bubblewrap + uid 65534 when run as root), real libSQL file.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import { ROOT, TestFleet, cleanupAll, publishQos1, subscribe, waitFor, type Subscription } from "./helpers/gateway.ts";
import { agentBlock, fleetHeader, policyAgent } from "./helpers/policy.ts";

const IS_ROOT = process.getuid?.() === 0;
const MARKER = "gateway-env-marker-7f3a";
const bwrapHere = Bun.spawnSync(["sh", "-c", "command -v bwrap"]).exitCode === 0;

afterAll(() => cleanupAll(), 60_000);

const modeOf = (p: string) => statSync(p).mode & 0o777;

describe("an agent cannot read the database, the gateway's files or other agents", () => {
  let fleet: TestFleet;
  let client: MqttClient;
  let outs: Subscription;

  beforeAll(async () => {
    fleet = new TestFleet(
      fleetHeader("e2e-sandbox-files") +
        agentBlock("snoop", policyAgent("snoop")) +
        agentBlock("steady", policyAgent("steady")),
      { env: { FLEET_TEST_MARKER: MARKER } },
    );
    // A data dir left by an older version: world-readable dir and file. Start makes them private.
    mkdirSync(fleet.dataDir, { recursive: true });
    chmodSync(fleet.dataDir, 0o755);
    writeFileSync(join(fleet.dataDir, "notes.txt"), "old");
    chmodSync(join(fleet.dataDir, "notes.txt"), 0o644);
    await fleet.start();
    client = await fleet.mqtt();
    outs = await subscribe(client, "fleet/agents/+/+/out");
    // Something in the db and its WAL worth stealing.
    await publishQos1(client, "steady/a/in", { id: "s1" });
    await outs.next((m) => m.json?.agent === "steady/a", 20_000, "steady's out");
  }, 60_000);

  afterAll(async () => {
    await fleet?.dispose();
  }, 60_000);

  test("the data dir is 0700 and every file in it 0600 (fleet.db, -wal, -shm, gateway.json), an older one included", () => {
    expect(modeOf(fleet.dataDir).toString(8)).toBe("700");
    for (const name of ["fleet.db", "fleet.db-wal", "fleet.db-shm", "gateway.json", "notes.txt"])
      expect({ name, mode: modeOf(join(fleet.dataDir, name)).toString(8) }).toEqual({ name, mode: "600" });
  });

  test.if(IS_ROOT || bwrapHere)(
    "every attempt to read the db, its WAL, gateway.json, fleet.toml, another agent's module or the gateway's /proc fails",
    async () => {
      const db = join(fleet.dataDir, "fleet.db");
      const gw = fleet.pid;
      const ask = {
        id: "snoop-1",
        read: [
          db,
          `${db}-wal`,
          `${db}-shm`,
          join(fleet.dataDir, "gateway.json"),
          fleet.configPath,
          policyAgent("steady"),
          `/proc/${gw}/environ`,
          `/proc/${gw}/cmdline`,
        ],
        readlink: [`/proc/${gw}/cwd`, `/proc/${gw}/exe`],
        list: [fleet.dataDir, fleet.dir],
      };
      await publishQos1(client, "snoop/a/in", ask);
      const out = await outs.next((m) => m.json?.data?.id === "snoop-1", 20_000, "snoop's out");
      const seen = out.json.data.seen as Record<string, { ok: boolean; code?: string; sample?: string }>;
      const attempts = [
        ...ask.read.map((p) => `read ${p}`),
        ...ask.readlink.map((p) => `readlink ${p}`),
        ...ask.list.map((p) => `list ${p}`),
      ];
      expect(Object.keys(seen).sort()).toEqual(attempts.sort());
      const succeeded = Object.entries(seen).filter(([, s]) => s.ok);
      expect(succeeded).toEqual([]);
      for (const [, s] of Object.entries(seen)) expect(["ENOENT", "EACCES", "EPERM"]).toContain(s.code!);
      // What it saw is in its checkpoint too (the state is what the test reads back, not a log line).
      const [row] = await fleet.query<{ state: string }>(
        "SELECT c.state FROM checkpoints c JOIN agents a ON a.head_hash = c.hash WHERE a.id = 'snoop/a'",
      );
      expect(JSON.parse(row!.state).seen).toEqual(seen);
      expect(JSON.stringify(seen)).not.toContain(MARKER);
      if (IS_ROOT) expect(out.json.data.uid).toBe(65534);
    },
    60_000,
  );
});

describe("what an episode sends is parsed and bounded in the gateway", () => {
  let fleet: TestFleet;
  let client: MqttClient;
  const RAW = join(ROOT, "test/fixtures/unit/raw-ipc.ts");
  const retry = "retry = { max_attempts = 2, backoff_ms = 0 }\n";

  beforeAll(async () => {
    fleet = new TestFleet(
      fleetHeader("e2e-sandbox-ipc") +
        agentBlock("raw", RAW, { extra: retry }) +
        agentBlock("steady", policyAgent("steady")),
    );
    await fleet.start();
    client = await fleet.mqtt();
  }, 60_000);

  afterAll(async () => {
    await fleet?.dispose();
  }, 60_000);

  /** Wait until `agent`'s only stimulus is quarantined; returns its failed episodes. */
  async function quarantined(agent: string) {
    const stim = await waitFor(
      async () =>
        (
          await fleet.query<{ state: string; attempts: number }>(
            "SELECT state, attempts FROM stimuli WHERE agent = ?",
            [agent],
          )
        ).find((s) => s.state === "quarantined"),
      30_000,
      `quarantine of ${agent}'s stimulus`,
    );
    expect(stim.attempts).toBe(2);
    return fleet.episodes(agent);
  }

  test("a log record with an invalid level is a recorded protocol failure, retried, then quarantined", async () => {
    await publishQos1(client, "raw/badlog/in", { id: "l1", records: [{ k: "log", level: "shout", msg: "boom" }] });
    const eps = await quarantined("raw/badlog");
    expect(eps.map((e) => [e.status, e.error_kind])).toEqual([
      ["failed", "protocol"],
      ["failed", "protocol"],
    ]);
    const shown = await fleet.cli("show", eps[0]!.id);
    expect(shown.json.events.at(-1)).toMatchObject({ kind: "failure", data: { kind: "protocol" } });
    expect(shown.json.events.at(-1).data.message).toContain(`"level":"shout"`);
  }, 60_000);

  test("a 64 MB message is refused as too_large and nothing of it reaches the database or the log", async () => {
    await publishQos1(client, "raw/huge/in", { id: "h1", huge_mb: 64 });
    const eps = await quarantined("raw/huge");
    expect(eps.map((e) => e.error_kind)).toEqual(["too_large", "too_large"]);
    const [{ n }] = (await fleet.query<{ n: number }>(
      "SELECT coalesce(max(length(data)), 0) AS n FROM events WHERE episode IN (SELECT id FROM episodes WHERE agent = 'raw/huge')",
    )) as [{ n: number }];
    expect(n).toBeLessThan(4096);
    // The fleet goes on.
    const outs = await subscribe(client, "fleet/agents/steady/+/out");
    await publishQos1(client, "steady/a/in", { id: "after" });
    await outs.next((m) => m.json?.data?.id === "after", 20_000, "steady's out after the hostile episodes");
  }, 60_000);
});
