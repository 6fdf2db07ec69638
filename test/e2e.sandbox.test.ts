/**
 * The episode sandbox end to end (issue 9): what an agent can reach of the gateway's files and
 * processes, and what a gateway killed with -9 leaves behind. Real gateway process, real MQTT,
 * real sandboxed episode subprocesses (bubblewrap + a uid of their own when run as root), real libSQL file.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { MqttClient } from "mqtt";
import {
  ROOT,
  TestFleet,
  alive,
  cleanupAll,
  cpuTicks,
  fixture,
  publishQos1,
  reap,
  subscribe,
  waitFor,
  type Subscription,
} from "./helpers/gateway.ts";
import { agentBlock, fleetHeader, isSandboxUid, policyAgent, uidClaimsWork } from "./helpers/policy.ts";
import { fleetHeader as loopbackHeader } from "./helpers/toml.ts";
import { defaultSpawnOptions, MemoryCgroups } from "../gateway/episode/index.ts";
import { DEFAULT_SANDBOX_UIDS } from "../gateway/spec/index.ts";
import { MAX_JSON_DEPTH } from "../agents/protocol.ts";

const IS_ROOT = process.getuid?.() === 0;
const MARKER = "gateway-env-marker-7f3a";
/** Bubblewrap works here (installed is not enough: root without CAP_SYS_ADMIN cannot make its mounts). */
const bwrapHere = defaultSpawnOptions("auto", { allowWeak: true }).bwrap !== null;

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

  test("the data dir is 0700 and its files 0600 (fleet.db, -wal, -shm, gateway.json), an older one included", () => {
    expect(modeOf(fleet.dataDir).toString(8)).toBe("700");
    for (const name of ["fleet.db", "fleet.db-wal", "fleet.db-shm", "gateway.json", "notes.txt"])
      expect({ name, mode: modeOf(join(fleet.dataDir, name)).toString(8) }).toEqual({ name, mode: "600" });
  });

  // Bubblewrap's view: without it (root's "uid" sandbox) other agents' modules and /proc are readable; the data dir
  // is not (runner.test.ts, "without namespaces").
  test.if(bwrapHere)(
    "every attempt to read the db, its WAL, gateway.json, fleet.toml, another agent or the gateway's /proc fails",
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
      if (IS_ROOT) expect(isSandboxUid(out.json.data.uid)).toBe(true);
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
        agentBlock("raw", RAW, { extra: retry, budget: { episode_timeout_ms: 30_000 } }) +
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
    expect(eps.map((e) => [e.error_kind, e.error?.slice(0, 200)])).toEqual([
      ["too_large", expect.stringContaining("records from the subprocess exceeded")],
      ["too_large", expect.stringContaining("records from the subprocess exceeded")],
    ]);
    const [{ n }] = (await fleet.query<{ n: number }>(
      "SELECT coalesce(max(length(data)), 0) AS n FROM events " +
        "WHERE episode IN (SELECT id FROM episodes WHERE agent = 'raw/huge')",
    )) as [{ n: number }];
    expect(n).toBeLessThan(4096);
    // The fleet goes on.
    const outs = await subscribe(client, "fleet/agents/steady/+/out");
    await publishQos1(client, "steady/a/in", { id: "after" });
    await outs.next((m) => m.json?.data?.id === "after", 20_000, "steady's out after the hostile episodes");
  }, 60_000);

  test("a message nested 1,100 deep fails as protocol (JSONB could not hold it); the gateway stays ready", async () => {
    await publishQos1(client, "raw/deep/in", { id: "d1", deep: 1100 });
    const eps = await quarantined("raw/deep");
    expect(eps.map((e) => [e.error_kind, e.error])).toEqual([
      ["protocol", `subprocess sent a message nested deeper than ${MAX_JSON_DEPTH} levels (arrays and objects)`],
      ["protocol", `subprocess sent a message nested deeper than ${MAX_JSON_DEPTH} levels (arrays and objects)`],
    ]);
    expect((await fleet.fetch("/readyz")).status).toBe(200);
  }, 60_000);

  test("a payload nested 1,500 deep reaches the agent as its text, and its episode commits", async () => {
    const outs = await subscribe(client, "fleet/agents/steady/+/out");
    const text = `{"id":"deep-payload","d":${"[".repeat(1500)}${"]".repeat(1500)}}`;
    await client.publishAsync("steady/b/in", text, { qos: 1 });
    // steady echoes `payload.id`: a string payload has none.
    const out = await outs.next((m) => m.json?.agent === "steady/b", 20_000, "steady/b's out");
    expect(out.json.data).toEqual({ n: 1, id: null });
    const [episode] = await fleet.episodes("steady/b");
    expect(episode!.status).toBe("committed");
    const shown = await fleet.cli("show", episode!.id);
    expect(shown.json.events[0]).toMatchObject({ kind: "stimulus", data: { payload: text } });
    expect((await fleet.fetch("/readyz")).status).toBe(200);
  }, 60_000);
});

describe("leftover sandboxes and the weak fallback", () => {
  test.if(bwrapHere)(
    'sandbox = "uid" is refused at start where bubblewrap works, naming what it does not isolate and how to accept it',
    async () => {
      const fleet = new TestFleet(
        loopbackHeader("e2e-sandbox-weak", { drainTimeoutMs: 5000, fleet: 'sandbox = "uid"' }),
      );
      try {
        const err = await fleet.start().then(
          () => null,
          (e: Error) => e,
        );
        expect(err?.message).toContain('sandbox = "uid" is refused');
        expect(err?.message).toContain("network");
        expect(err?.message).toContain("allow_weak_sandbox = true");
      } finally {
        await fleet.dispose();
      }
    },
    60_000,
  );

  test.if(IS_ROOT)(
    "with allow_weak_sandbox = true the weak sandbox starts, and the log warns what it does not isolate",
    async () => {
      const fleet = new TestFleet(
        loopbackHeader("e2e-sandbox-weak-ok", {
          drainTimeoutMs: 5000,
          fleet: 'sandbox = "uid"\nallow_weak_sandbox = true',
        }),
      );
      try {
        await fleet.start();
        const warning = readFileSync(fleet.logPath, "utf8")
          .split("\n")
          .find((l) => l.includes("WITHOUT namespaces"));
        expect(warning).toBeDefined();
        expect(warning).toContain("network");
        // Where episodes get memory cgroups (root, cgroup v1), whatever an episode leaves running is killed with it.
        expect(warning!.includes("detached children")).toBe(MemoryCgroups.open() === null);
      } finally {
        await fleet.dispose();
      }
    },
    60_000,
  );

  test.if(IS_ROOT)(
    "[fleet] sandbox_uids picks the uids episodes run as, and a range too small to give each its own is warned of",
    async () => {
      // Outside the default's blocks: a range set in fleet.toml that another gateway holds is refused.
      const first = 1_900_000_000;
      const fleet = new TestFleet(
        loopbackHeader("e2e-sandbox-uids", { drainTimeoutMs: 5000, fleet: `sandbox_uids = "${first}:2"` }) +
          agentBlock("probe", policyAgent("probe")),
      );
      try {
        await fleet.start();
        const c = await fleet.mqtt();
        const outs = await subscribe(c, "fleet/agents/probe/+/out");
        for (const id of ["u1", "u2", "u3"]) await publishQos1(c, `probe/${id}/in`, { id });
        const uids = new Set<number>();
        for (let i = 0; i < 3; i++) uids.add((await outs.next(() => true, 20_000, "a probe's out")).json.data.uid);
        for (const uid of uids) expect(uid === first || uid === first + 1).toBe(true);
        const warning = readFileSync(fleet.logPath, "utf8")
          .split("\n")
          .find((l) => l.includes("sandbox_uids holds 2 uid(s)"));
        // 4 episodes at once and twice the 4 warm spares (the default): 12 processes.
        expect(warning).toContain("for up to 12 sandboxed processes");
        expect(warning).toContain("share a uid");
      } finally {
        await fleet.dispose();
      }
    },
    60_000,
  );

  test.if(uidClaimsWork())(
    "two gateways on one machine: their default sandbox_uids are distinct blocks; a range set on them fails",
    async () => {
      const fleets = ["a", "b"].map(
        (name) =>
          new TestFleet(
            loopbackHeader(`e2e-sandbox-two-${name}`, { drainTimeoutMs: 5000 }) +
              agentBlock("probe", policyAgent("probe")),
          ),
      );
      const [a, b] = fleets as [TestFleet, TestFleet];
      let over: TestFleet | null = null;
      try {
        for (const fleet of fleets) await fleet.start();
        const uidOf = async (fleet: TestFleet) => {
          const c = await fleet.mqtt();
          const outs = await subscribe(c, "fleet/agents/probe/+/out");
          await publishQos1(c, "probe/u1/in", { id: "u1" });
          return (await outs.next(() => true, 20_000, "a probe's out")).json.data.uid as number;
        };
        const [uidA, uidB] = [await uidOf(a), await uidOf(b)];
        expect(isSandboxUid(uidA) && isSandboxUid(uidB)).toBe(true);
        const blockStart = (uid: number) => uid - ((uid - DEFAULT_SANDBOX_UIDS.first) % DEFAULT_SANDBOX_UIDS.count);
        expect(blockStart(uidB)).not.toBe(blockStart(uidA));
        // A gateway not in the default block moved past one another gateway held, and said so. Which one
        // moved depends on what else runs: another test file's gateway may hold the default block while a
        // starts, and let it go before b does (b then takes the default block, below a's).
        const movers = [
          [a, uidA],
          [b, uidB],
        ] as const;
        const moved = movers.filter(([, uid]) => blockStart(uid) !== DEFAULT_SANDBOX_UIDS.first);
        expect(moved.length).toBeGreaterThanOrEqual(1); // two distinct blocks: at most one is the default
        for (const [fleet, uid] of moved) {
          const line = readFileSync(fleet.logPath, "utf8")
            .split("\n")
            .find((l) => l.includes("the default sandbox_uids"));
          // The holder is named: the other gateway here, or whatever else held the block (a replay, a check).
          const holder = /held by pid (\d+) \(([^)]+)\)/.exec(line ?? "");
          expect(holder?.[2]).toBeTruthy();
          const other = fleet === a ? b : a;
          if (Number(holder![1]) === other.pid) expect(holder![2]).toBe(`the gateway of ${other.dataDir}`);
          expect(line).toContain(`episodes here run as ${blockStart(uid)}-`);
          // The holder's pid is a field of its own: `pid` is the logger's, the process that wrote the line.
          const fields = JSON.parse(line!) as { pid?: number; holder_pid: number };
          expect(fields.holder_pid).toBe(Number(holder![1]));
          expect(fields.pid).not.toBe(fields.holder_pid);
        }
        // A range set in fleet.toml is not moved: the gateway names whose uids they are and does not start.
        over = new TestFleet(
          loopbackHeader("e2e-sandbox-two-over", { drainTimeoutMs: 5000, fleet: `sandbox_uids = "${uidA}:100"` }),
        );
        const err = await over.start().then(
          () => null,
          (e: Error) => e,
        );
        expect(err?.message).toContain(`overlaps the uids ${blockStart(uidA)}-`);
        expect(err?.message).toContain(`pid ${a.pid} (the gateway of ${a.dataDir})`);
      } finally {
        for (const fleet of [...fleets, ...(over ? [over] : [])]) await fleet.dispose();
      }
    },
    90_000,
  );

  test.if(IS_ROOT)(
    "a sandbox a kill -9 left behind (a spinning episode, no namespaces) is reaped when the data dir starts again",
    async () => {
      const fleet = new TestFleet(
        loopbackHeader("e2e-sandbox-leftover", {
          drainTimeoutMs: 5000,
          fleet: 'sandbox = "uid"\nallow_weak_sandbox = true',
        }) + agentBlock("loops", fixture("loops"), { budget: { episode_timeout_ms: 60_000 } }),
      );
      let left: number[] = [];
      try {
        await fleet.start();
        const c = await fleet.mqtt();
        await publishQos1(c, "loops/k/in", { id: "spin" });
        await waitFor(
          () => fleet.descendants().some((p) => cpuTicks(p) >= 100),
          60_000,
          "an episode spinning for a CPU second",
        );
        left = await fleet.kill({ reap: false });
        // Without a pid namespace nothing ties the spinning agent to its dead gateway (RLIMIT_CPU is 122 s away).
        const spinning = left.filter((p) => alive(p) && cpuTicks(p) >= 100);
        expect(spinning.length).toBeGreaterThan(0);
        await fleet.start();
        await waitFor(() => spinning.every((p) => !alive(p)), 5_000, `leftover ${spinning.join(", ")} reaped`, 50);
        expect(readFileSync(fleet.logPath, "utf8")).toContain("left by a previous run");
      } finally {
        reap(left);
        await fleet.dispose();
      }
    },
    90_000,
  );

  test.if(bwrapHere)(
    "after a kill -9 while warm spares start, nothing of the old run's sandboxes is left once it starts again",
    async () => {
      const fleet = new TestFleet(
        loopbackHeader("e2e-sandbox-spares", { drainTimeoutMs: 5000, fleet: "warm_spares = 4" }) +
          agentBlock("steady", policyAgent("steady")),
      );
      let left: number[] = [];
      try {
        await fleet.start();
        const c = await fleet.mqtt();
        const outs = await subscribe(c, "fleet/agents/+/+/out");
        // Each episode takes a spare and starts its replacement: kill while replacements are being set up.
        for (let i = 0; i < 3; i++) await publishQos1(c, "steady/a/in", { id: `w${i}` });
        await outs.next((m) => m.json?.data?.id === "w0", 20_000, "the first episode");
        const rootsNow = () =>
          readFileSync(join(fleet.dataDir, "sandboxes"), "utf8")
            .split("\n")
            .filter((l) => l.startsWith("root "))
            .map((l) => l.slice(5));
        const oldRoots = rootsNow();
        expect(oldRoots.length).toBeGreaterThan(0);
        left = await fleet.kill({ reap: false });
        expect(left.length).toBeGreaterThan(0);
        await fleet.start();
        await waitFor(() => left.every((p) => !alive(p)), 10_000, `old sandboxes ${left.join(", ")} gone`, 50);
        // The old run's staging roots are gone whole; the new run's hold its spares and the emptied
        // roots it keeps for reuse (at most 8), nothing more.
        for (const r of oldRoots) expect({ r, there: existsSync(r) }).toEqual({ r, there: false });
        for (const r of rootsNow()) expect(readdirSync(r).length).toBeLessThanOrEqual(4 + 8 + 1);
      } finally {
        reap(left);
        await fleet.dispose();
      }
    },
    90_000,
  );
});

// A real gateway, bundles and warm spares and all: memory no RSS shows (an unmapped memfd) ends the
// episode as oom where the gateway makes memory cgroups (root, cgroup v1).
describe.if(MemoryCgroups.open() !== null && Bun.which("python3") !== null)("memory the RSS watch cannot see", () => {
  test("an episode holding 300 MB in a memfd with memory_mb = 128 fails as oom; the log names the cgroup", async () => {
    const fleet = new TestFleet(
      fleetHeader("e2e-sandbox-memfd") +
        // 20 s, not the default 5: the assertion is how the episode ends, not how fast the kernel stops it (a
        // full suite run once saw no OOM kill within 5 s: the memfd's writes stalled at the limit instead).
        agentBlock("memfd", join(ROOT, "test/fixtures/unit/memfd.ts"), {
          budget: { memory_mb: 128, episode_timeout_ms: 20_000 },
        }),
    );
    try {
      await fleet.start();
      const line = readFileSync(fleet.logPath, "utf8")
        .split("\n")
        .find((l) => l.includes('"sandbox"'));
      expect(line).toContain("a memory cgroup of memory_mb");
      const client = await fleet.mqtt();
      const episodes = await subscribe(client, "fleet/episodes");
      await publishQos1(client, "memfd/a/in", { id: "m1", mb: 300 });
      const failed = await episodes.next((m) => m.json?.agent === "memfd/a", 30_000, "memfd's episode");
      expect(failed.json).toMatchObject({ status: "failed", kind: "oom" });
    } finally {
      await fleet.dispose();
    }
  }, 90_000);
});
