/**
 * State migrations (docs/upgrading.md) on a real gateway: the door watcher runs version 1, its
 * module is replaced by version 2 (`defineAgent({ version: 2, migrate })`) while the fleet runs,
 * and each agent's first episode on the new code migrates its state inside that episode's commit
 * (the sealed checkpoint records version 2, migrated from 1); `fleet verify` passes and the
 * migrating episode replays MATCH. A migration that throws leaves the v1 checkpoint and
 * quarantines the stimulus; a deploy that lowers `version` is refused as a reload error.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { hexOfSql } from "../gateway/store/index.ts";
import { cleanupAll, publishQos1, ROOT, runCli, TestFleet, waitFor } from "./helpers/gateway.ts";
import { agentType, fleetHeader } from "./helpers/toml.ts";

const SDK = join(ROOT, "agents/sdk/index.ts");
/** A shipped example with its SDK import pointed at this checkout (so the copy runs from the test's dir). */
const example = (name: string) =>
  readFileSync(join(ROOT, "agents/examples", `${name}.ts`), "utf8").replace('"../sdk/index.ts"', JSON.stringify(SDK));
/** Version 2 whose migration throws: it must change nothing. */
const BROKEN_V2 = example("door-watcher-v2").replace(
  "if (fromVersion !== 1) throw",
  'throw new Error("migration bug");\n    if (fromVersion !== 1) throw',
);

interface Row {
  [k: string]: unknown;
}

/** A fleet in a folder of its own (readable by the sandbox's uid) with a copy of door-watcher v1 as `door.ts`. */
function doorFleet(): { fleet: TestFleet; door: string } {
  const fleet = new TestFleet("");
  if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
  const door = join(fleet.dir, "door.ts");
  writeFileSync(door, example("door-watcher"));
  return { fleet, door };
}

/** The door type's table: it may publish alerts, and alerts after an hour open. */
const doorType = (door: string) =>
  agentType("door", door, ["doors/+/state"], {
    extra: 'tools = ["publish"]\npublish = ["alerts/doors/#"]\nconfig = { open_after = "1h" }\n',
  });

afterAll(cleanupAll);

describe("state migrations", () => {
  test("v1 -> v2 on live agents: migrated in their next episode, sealed with the version, verify passes; " +
    "a throwing migration quarantines and keeps v1; lowering version is refused", async () => {
    const { fleet, door } = doorFleet();
    const bad = join(fleet.dir, "door-bad.ts");
    writeFileSync(bad, example("door-watcher"));
    writeFileSync(
      fleet.configPath,
      fleetHeader("e2e-migrations") +
        doorType(door) +
        agentType("door-bad", bad, ["bad/+/state"], {
          extra: 'config = { open_after = "1h" }\n\n[agents.door-bad.retry]\nmax_attempts = 1\nbackoff_ms = 10\n',
        }),
    );
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      await publishQos1(c, "doors/d1/state", "open");
      await publishQos1(c, "doors/d2/state", "open");
      await publishQos1(c, "bad/b1/state", "open");
      await fleet.waitCommitted("door/d1", 1);
      await fleet.waitCommitted("door/d2", 1);
      await fleet.waitCommitted("door-bad/b1", 1);
      const before = await fleet.agent("door-bad/b1");
      const head = (agent: string) =>
        fleet.query<Row>(
          `SELECT c.state, c.state_version, c.migrated_from, ${hexOfSql("c.hash")} AS hash FROM agents a ` +
            "JOIN checkpoints c ON c.hash = a.head_hash WHERE a.id = ?",
          [agent],
        );
      expect((await head("door/d1"))[0]?.state_version).toBeNull();

      // Version 2 replaces version 1 while the fleet runs.
      writeFileSync(door, example("door-watcher-v2"));
      writeFileSync(bad, BROKEN_V2);
      await waitFor(
        async () => (await fleet.query("SELECT hash FROM spec_versions")).length >= 2,
        20_000,
        "the new code deployed",
      );
      await publishQos1(c, "doors/d1/state", "closed");
      await publishQos1(c, "doors/d2/state", "open");
      await publishQos1(c, "bad/b1/state", "closed");
      await fleet.waitCommitted("door/d1", 2);
      await fleet.waitCommitted("door/d2", 2);

      const d1 = (await head("door/d1"))[0]!;
      expect(d1.state_version).toBe(2);
      expect(d1.migrated_from).toBe(1);
      expect(JSON.parse(String(d1.state))).toEqual({ door: "closed", alerts: 0, openings: 0 });
      const d2 = (await head("door/d2"))[0]!;
      const s2 = JSON.parse(String(d2.state));
      expect(s2.door).toBe("open");
      expect(typeof s2.opened_at).toBe("number");
      expect(s2.alarm).toMatch(/\.w1$/);
      // The migrating episode's log says so, and it replays MATCH on the bundle it ran.
      const [migrating] = (await fleet.episodes("door/d1")).filter((e) => e.status === "committed");
      const shown = await fleet.cli("show", migrating!.id);
      expect(shown.json.events.some((e: Row) => e.kind === "migrate")).toBe(true);
      expect((await fleet.cli("replay", migrating!.id)).json.verdict).toBe("MATCH");
      // The next episode runs on version 2 without migrating again.
      await publishQos1(c, "doors/d1/state", "open");
      await fleet.waitCommitted("door/d1", 3);
      const d1b = (await head("door/d1"))[0]!;
      expect(d1b.state_version).toBe(2);
      expect(d1b.migrated_from).toBeNull();
      expect(JSON.parse(String(d1b.state)).openings).toBe(1);

      // The throwing migration: the episode failed, the stimulus is quarantined, the v1 checkpoint stands.
      const failed = await fleet.waitEpisodes(
        "door-bad/b1",
        (eps) => eps.find((e) => e.status === "failed"),
        30_000,
        "the failed migration",
      );
      expect(failed.error_kind).toBe("threw");
      expect(failed.error).toContain("migration bug");
      const quarantined = await waitFor(
        async () =>
          (await fleet.query("SELECT state FROM stimuli WHERE agent = 'door-bad/b1' AND state = 'quarantined'"))[0],
        30_000,
        "the stimulus quarantined",
      );
      expect(quarantined).toBeDefined();
      const b1 = (await head("door-bad/b1"))[0]!;
      expect(b1.hash).toBe(before?.checkpoint);
      expect(b1.state_version).toBeNull();
      expect(JSON.parse(String(b1.state)).open).toBe(true);

      const verify = await fleet.cli("verify");
      expect(verify.code).toBe(0);

      // A deploy that lowers version is refused; the fleet keeps running version 2.
      writeFileSync(door, example("door-watcher"));
      const error = await waitFor(
        async () => {
          const body = (await (await fleet.fetch("/api/fleet")).json()) as { spec_error?: string | null };
          return body.spec_error ?? undefined;
        },
        30_000,
        "a reload error for the lowered version",
      );
      expect(error).toContain("agents.door.module is version 1");
      expect(error).toContain("lower than version 2");
      // `fleet deploy --check` foretells the refusal, besides what its replays find.
      const check = await fleet.cli("deploy", "--check", fleet.configPath, "--json");
      expect(check.code).toBe(1);
      expect(check.json.ok).toBe(false);
      expect(check.json.refusals).toEqual([expect.stringContaining("agents.door.module is version 1")]);
      const told = await runCli(["deploy", "--check", fleet.configPath, "--data-dir", fleet.dataDir]);
      expect(told.stdout).toContain("refused: agents.door.module is version 1");
      expect(told.stdout).toMatch(/NOT OK: .*a reload would refuse it/);
      await publishQos1(c, "doors/d1/state", "closed");
      await fleet.waitCommitted("door/d1", 4);
      expect((await head("door/d1"))[0]!.state_version).toBe(2);

      // A restart with the lowered module still in place does not slip it through: the gateway
      // starts on the version that ran before, and says why.
      const running = ((await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string }).spec_version;
      await c.endAsync();
      expect(await fleet.stop()).toBe(0);
      await fleet.start();
      const after = (await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string; spec_error: string };
      expect(after.spec_version).toBe(running);
      expect(after.spec_error).toContain("not applied at start");
      expect(after.spec_error).toContain("lower than version 2");
      const c2 = await fleet.mqtt();
      await publishQos1(c2, "doors/d1/state", "open");
      await fleet.waitCommitted("door/d1", 5);
      expect((await head("door/d1"))[0]!.state_version).toBe(2);
    } finally {
      await fleet.dispose();
    }
  }, 240_000);
  test("a subprocess claiming another state version than its code's fails as protocol; deploys go on", async () => {
    const fleet = new TestFleet("");
    if (process.getuid?.() === 0) chmodSync(fleet.dir, 0o755);
    // A copy in the fleet's folder, to edit later: its imports pointed at this checkout.
    const module = join(fleet.dir, "forger.ts");
    const fixture = (name: string) => readFileSync(join(ROOT, "test/fixtures/hostile", name), "utf8");
    writeFileSync(module, fixture("forged-version.ts").replace('"../../../agents/sdk/index.ts"', JSON.stringify(SDK)));
    writeFileSync(
      join(fleet.dir, "channel.ts"),
      fixture("channel.ts").replace('"../../../agents/protocol.ts"', JSON.stringify(join(ROOT, "agents/protocol.ts"))),
    );
    writeFileSync(
      fleet.configPath,
      fleetHeader("e2e-forged-version") +
        agentType("forger", module, ["forge/+/in"], {
          dedup: "id",
          extra: "\n[agents.forger.retry]\nmax_attempts = 1\nbackoff_ms = 10\n",
        }),
    );
    const failure = async (agent: string) => {
      const [e] = await fleet.waitEpisodes(
        agent,
        (eps) => {
          const list = eps.filter((x) => x.status === "failed");
          return list.length > 0 ? list : undefined;
        },
        30_000,
        `the failed episode of ${agent}`,
      );
      return e!;
    };
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      // A new agent claiming version 999 (Number.MAX_SAFE_INTEGER alike), and one claiming a migration never due.
      await publishQos1(c, "forge/a/in", { id: "f1", version: 999 });
      await publishQos1(c, "forge/b/in", { id: "f2", version: Number.MAX_SAFE_INTEGER });
      await publishQos1(c, "forge/m/in", { id: "f3", version: 1, migrated_from: 1 });
      for (const [agent, says] of [
        ["forger/a", "reported state version 999; its code declares version 1"],
        ["forger/b", `reported state version ${Number.MAX_SAFE_INTEGER}; its code declares version 1`],
        ["forger/m", "reported a migration from version 1; none was due"],
      ] as const) {
        const e = await failure(agent);
        expect(e.error_kind).toBe("protocol");
        const shown = await fleet.cli("show", e.id);
        expect(String(shown.json.error)).toContain(says);
      }
      // Nothing was committed: no checkpoint carries the claimed version.
      const stamped = await fleet.query<Row>("SELECT state_version FROM checkpoints WHERE state_version IS NOT NULL");
      expect(stamped).toEqual([]);
      // Its honest claim (the version its code declares) commits; an edit of the module deploys.
      await publishQos1(c, "forge/h/in", { id: "h1", version: 1 });
      await fleet.waitCommitted("forger/h", 1);
      const before = ((await (await fleet.fetch("/api/fleet")).json()) as { spec_version: string }).spec_version;
      writeFileSync(module, `${readFileSync(module, "utf8")}export const edited = true;\n`);
      await waitFor(
        async () => {
          const body = (await (await fleet.fetch("/api/fleet")).json()) as {
            spec_version: string;
            spec_error?: string;
          };
          if (body.spec_error) throw new Error(`the edit was refused: ${body.spec_error}`);
          return body.spec_version !== before;
        },
        20_000,
        "the edited module deployed",
      );
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("replaying version-1 history on version 2 migrates first, compares behaviour, not the migration", async () => {
    const { fleet, door } = doorFleet();
    const v2 = join(fleet.dir, "door-v2.ts");
    writeFileSync(v2, example("door-watcher-v2"));
    writeFileSync(fleet.configPath, fleetHeader("e2e-migrations-replay") + doorType(door));
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      for (const [i, state] of ["open", "closed", "open"].entries()) {
        await publishQos1(c, "doors/d1/state", state);
        await fleet.waitCommitted("door/d1", i + 1);
      }
      const r = await fleet.cli("replay", "--agent", "door/d1", "--module", v2);
      // Version 2 adds `openings` to its "opened" decision: that change is what the replays show. The
      // episode in between (closed) migrates its v1 state first and decides as v1 did: MATCH.
      const { results } = r.json as { results: { verdict: string; divergence?: { at: string } }[] };
      expect(results.map((x) => x.divergence?.at ?? x.verdict)).toEqual(["decision #1", "MATCH", "decision #1"]);
      expect(r.code).toBe(1);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);

  test("a young agent's first episode, replayed on version 2 from its init, is compared by behaviour", async () => {
    const { fleet, door } = doorFleet();
    const v2 = join(fleet.dir, "door-v2.ts");
    writeFileSync(v2, example("door-watcher-v2"));
    const toml = fleetHeader("e2e-migrations-young") + doorType(door);
    writeFileSync(fleet.configPath, toml);
    try {
      await fleet.start();
      const c = await fleet.mqtt();
      // Its first episode is fresh: replayed, version 2's init runs (no migrate) and ends in the new shape.
      for (const [i, state] of ["closed", "closed"].entries()) {
        await publishQos1(c, "doors/d1/state", state);
        await fleet.waitCommitted("door/d1", i + 1);
      }
      const r = await fleet.cli("replay", "--agent", "door/d1", "--module", v2);
      const { results } = r.json as { results: { verdict: string; divergence?: { at: string } }[] };
      expect(results.map((x) => x.divergence?.at ?? x.verdict)).toEqual(["MATCH", "MATCH"]);
      expect(r.code).toBe(0);
      // The upgrade of docs/upgrading.md, checked before it is deployed: OK.
      const candidate = join(fleet.dir, "fleet.v2.toml");
      writeFileSync(candidate, toml.replace(JSON.stringify(door), JSON.stringify(v2)));
      const check = await runCli(["deploy", "--check", candidate, "--data-dir", fleet.dataDir, "--json"]);
      expect(check.json).toMatchObject({ ok: true, types: [{ type: "door", counts: { MATCH: 2, DIVERGED: 0 } }] });
      expect(check.code).toBe(0);
    } finally {
      await fleet.dispose();
    }
  }, 120_000);
});
