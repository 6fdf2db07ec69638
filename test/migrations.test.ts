/**
 * State versions in-process (docs/upgrading.md): `defineAgent({ version, migrate })` checks its
 * input, `agent-fleets/testing` migrates like the gateway (a throw changes nothing), the protocol
 * refuses malformed versions, and a checkpoint seals its state version only when it has one, so
 * checkpoints written before versions existed keep their hashes.
 */
import { describe, expect, test } from "bun:test";
import { parseChildMessage, parseRecord } from "../agents/protocol.ts";
import { defineAgent } from "agent-fleets";
import { stimuli, testAgent } from "agent-fleets/testing";
import v2 from "../agents/examples/door-watcher-v2.ts";
import { confirmStateVersion } from "../gateway/episode/index.ts";
import { sealCheckpoint, verifyCheckpointRow } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const V1_STATE = { open: true, since: 1000, alarm: "ep.w1", alerts: 2 };

describe("defineAgent version", () => {
  test("defaults to 1 and refuses a version that is not a positive integer", () => {
    const base = { init: () => ({}), onStimulus: () => {} };
    expect(defineAgent(base).version).toBe(1);
    expect(defineAgent({ ...base, version: 3 }).version).toBe(3);
    for (const bad of [0, -1, 1.5, Number.NaN])
      expect(() => defineAgent({ ...base, version: bad })).toThrow("positive integer");
  });
});

describe("agent-fleets/testing migrates like the gateway", () => {
  test("state an older version wrote is migrated in the first run, once", async () => {
    const agent = testAgent(v2, { state: V1_STATE, stateVersion: 1, config: { open_after: "1h" } });
    const first = await agent.run(stimuli.mqtt("doors/k1/state", "closed"));
    expect(first.status).toBe("committed");
    expect(first.migratedFrom).toBe(1);
    expect(first.state).toEqual({ door: "closed", alerts: 2, openings: 0 });
    expect(agent.stateVersion).toBe(2);
    const second = await agent.run(stimuli.mqtt("doors/k1/state", "open"));
    expect(second.migratedFrom).toBeNull();
    expect(second.state.openings).toBe(1);
  });

  test("a migration that throws fails the episode and keeps the old state and version", async () => {
    const broken = defineAgent<{ n: number }>({
      version: 2,
      migrate: () => {
        throw new Error("migration bug");
      },
      init: () => ({ n: 0 }),
      onStimulus: () => {},
    });
    const agent = testAgent(broken, { state: { old: true }, stateVersion: 1 });
    const run = await agent.run(stimuli.manual({}));
    expect(run.status).toBe("failed");
    expect(run.error?.message).toBe("migration bug");
    expect(agent.state as unknown).toEqual({ old: true });
    expect(agent.stateVersion).toBe(1);
  });

  test("newer state than the code, or an older one without migrate, fails with the versions named", async () => {
    const plain = defineAgent({ version: 2, init: () => ({}), onStimulus: () => {} });
    const newer = await testAgent(plain, { state: {}, stateVersion: 3 }).run(stimuli.manual({}));
    expect(newer.error?.message).toContain("written by version 3 of its code; this code is version 2");
    const noMigrate = await testAgent(plain, { state: {}, stateVersion: 1 }).run(stimuli.manual({}));
    expect(noMigrate.error?.message).toContain("has no migrate()");
  });
});

describe("protocol", () => {
  test("done carries a version and what it migrated from; bad values are malformed", () => {
    expect(parseChildMessage({ t: "done", state: {}, version: 2, migrated_from: 1 })).toEqual({
      t: "done",
      state: {},
      version: 2,
      migrated_from: 1,
    });
    for (const bad of [{ version: 0 }, { version: "2" }, { version: 1.5 }, { migrated_from: -1 }])
      expect(parseChildMessage({ t: "done", state: {}, ...bad })).toBeNull();
    expect(parseRecord({ k: "migrate", from: 1, to: 2 }, { replay: false })).toEqual({ k: "migrate", from: 1, to: 2 });
    expect(parseRecord({ k: "migrate", from: "1", to: 2 }, { replay: false })).toBeNull();
  });
});

describe("the state version a checkpoint records is the gateway's", () => {
  const v2code = { declared: 2, previous: 1, fresh: false };
  test("the code's declared version is stamped, with the migration due from the previous checkpoint", () => {
    expect(confirmStateVersion({ version: 2, migratedFrom: 1 }, v2code)).toEqual({ version: 2, migratedFrom: 1 });
    expect(confirmStateVersion({ version: 2 }, { ...v2code, previous: 2 })).toEqual({ version: 2 });
    expect(confirmStateVersion({ version: 2 }, { ...v2code, fresh: true })).toEqual({ version: 2 });
    expect(confirmStateVersion({}, { declared: 1, previous: 1, fresh: true })).toEqual({ version: 1 });
  });

  test.each([
    ["a version the code does not declare", { version: 999 }, { declared: 1, previous: 1, fresh: false }],
    ["the largest safe integer", { version: Number.MAX_SAFE_INTEGER }, { declared: 1, previous: 1, fresh: true }],
    ["a migration from another version", { version: 2, migratedFrom: 7 }, v2code],
    ["no migration where one was due", { version: 2 }, v2code],
    ["a migration of new state", { version: 2, migratedFrom: 1 }, { ...v2code, fresh: true }],
    ["success on state newer than the code", { version: 2 }, { ...v2code, previous: 3 }],
  ])("%s is a protocol failure", (_what, claim, known) => {
    const r = confirmStateVersion(claim, known);
    expect("kind" in r && r.kind).toBe("protocol");
  });

  test("when the code's version could not be read, only a claim that changes nothing is stamped", () => {
    expect(confirmStateVersion({ version: 3 }, { declared: null, previous: 3, fresh: false })).toEqual({ version: 3 });
    const forged = confirmStateVersion({ version: 999 }, { declared: null, previous: 1, fresh: false });
    expect("kind" in forged && forged.kind).toBe("infra");
    const migrated = confirmStateVersion(
      { version: 2, migratedFrom: 1 },
      { declared: null, previous: 1, fresh: false },
    );
    expect("kind" in migrated && migrated.kind).toBe("infra");
  });
});

describe("sealed checkpoints with state versions", () => {
  const rec = {
    agent: "door/d1",
    seq: 3,
    parent: null,
    episode: "ep-3",
    spec_version: "a".repeat(64),
    state: { door: "open" },
  };
  const row = (hash: string, stateText: string, stateVersion: number | null, migratedFrom: number | null) => ({
    hash,
    gateway: "gw",
    agent: rec.agent as AgentId,
    seq: rec.seq,
    parent: rec.parent,
    episode: rec.episode,
    specVersion: rec.spec_version,
    state: stateText,
    createdAt: 1,
    stateVersion,
    migratedFrom,
  });

  test("the version is sealed: changing it afterwards breaks the hash; no version hashes as before", async () => {
    const plain = await sealCheckpoint(rec);
    const versioned = await sealCheckpoint({ ...rec, state_version: 2, migrated_from: 1 });
    expect(versioned.hash).not.toBe(plain.hash);
    expect(await verifyCheckpointRow(row(versioned.hash, versioned.stateText, 2, 1))).toEqual(rec.state);
    await expect(verifyCheckpointRow(row(versioned.hash, versioned.stateText, 1, null))).rejects.toThrow(
      "hash mismatch",
    );
    expect(await verifyCheckpointRow(row(plain.hash, plain.stateText, null, null))).toEqual(rec.state);
  });
});
