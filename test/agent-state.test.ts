/**
 * State that JSON would not give back as the agent left it fails the episode as `invalid_state`,
 * naming where, in the gateway's subprocess and in `agent-fleets/testing` alike; nothing is
 * checkpointed (a `migrate` or `init` without a `return` used to commit `null`).
 */
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { fileURLToPath } from "node:url";
import type { ParentMessage } from "../agents/protocol.ts";
import { stimuli, testAgent } from "agent-fleets/testing";
import { defaultSpawnOptions, type RunResult, runEpisode } from "../gateway/episode/index.ts";
import shapes from "./fixtures/unit/state-shapes.ts";

setDefaultTimeout(60_000);

const MODULE = fileURLToPath(new URL("./fixtures/unit/state-shapes.ts", import.meta.url));
const SPAWN = defaultSpawnOptions();
const LIMITS = {
  timeoutMs: 20_000,
  memoryMb: 256,
  maxRecords: 1000,
  maxRecordBytes: 1024 * 1024,
  maxOpenFiles: 256,
  maxProcesses: 4096,
};

/** One episode in the gateway's subprocess: fresh (`init`), from version-1 state (`migrate`), or from v2 state. */
function live(opts: { init?: string; migrateFrom?: unknown; make?: string }): Promise<RunResult> {
  const start: Extract<ParentMessage, { t: "start" }> = {
    t: "start",
    episode: "0190f000-0000-7000-8000-0000000000a1",
    agent: { type: "unit", key: "k1", id: "unit/k1" },
    module: MODULE,
    config: opts.init === undefined ? {} : { init: opts.init },
    state: opts.migrateFrom ?? { n: 5 },
    state_version: opts.migrateFrom === undefined ? 2 : 1,
    fresh: opts.init !== undefined,
    stimulus: { id: "id:1", kind: "manual", payload: { make: opts.make }, received_at: 1_700_000_000_000 },
    replay: null,
    limits: { max_records: 1000, max_record_bytes: 1024 * 1024 },
    wakes: { pending: [], max: 100 },
  };
  const noTools = async () => ({ ok: false, result: { error: "denied", reason: "no tools" } });
  return runEpisode(start, LIMITS, noTools, SPAWN);
}

/** The same episode in the testing kit: the failure's message, or null when it committed. */
async function kit(opts: { init?: string; migrateFrom?: unknown; make?: string }): Promise<string | null> {
  const agent = testAgent(shapes, {
    config: opts.init === undefined ? {} : { init: opts.init },
    ...(opts.init === undefined
      ? { state: opts.migrateFrom ?? { n: 5 }, stateVersion: opts.migrateFrom === undefined ? 2 : 1 }
      : {}),
  });
  const run = await agent.run(stimuli.manual({ make: opts.make }));
  if (run.status === "committed") return null;
  // Nothing was checkpointed: the state is what it was.
  expect(agent.state).toEqual((opts.init === undefined ? (opts.migrateFrom ?? { n: 5 }) : undefined) as never);
  return run.error?.message ?? "";
}

const REFUSED: [string, { init?: string; migrateFrom?: unknown; make?: string }, string][] = [
  [
    "init without a return",
    { init: "undefined" },
    "init() returned state that cannot be checkpointed as JSON: state is undefined (a missing return?)",
  ],
  [
    "migrate without a return",
    { migrateFrom: { make: "undefined" } },
    "migrate() from version 1 returned state that cannot be checkpointed as JSON: state is undefined",
  ],
  [
    "a Map from init",
    { init: "map" },
    "init() returned state that cannot be checkpointed as JSON: state.readings is a Map",
  ],
  ["state set to undefined", { make: "undefined" }, "agent state cannot be checkpointed as JSON: state is undefined"],
  ["a Map", { make: "map" }, "state.readings is a Map"],
  ["a Set deep inside", { make: "set" }, "state.seen[0].ids is a Set"],
  ["a Date", { make: "date" }, "state.at is a Date"],
  ["a class instance", { make: "instance" }, "state.last is an instance of Reading"],
  ["a function", { make: "function" }, "state.f is a function"],
  ["NaN", { make: "nan" }, "state.mean is NaN"],
  ["undefined in an array", { make: "array-undefined" }, "state.list[1] is undefined"],
  ["a BigInt", { make: "bigint" }, 'state["big n"] is a BigInt'],
  [
    "a cycle",
    { make: "cycle" },
    "state.self.self.self.self.self.self.self.self… nests deeper than 199 levels (a cycle?)",
  ],
];

describe("state JSON would not give back as it is fails the episode as invalid_state", () => {
  for (const [name, opts, message] of REFUSED)
    test(`${name}: gateway and testing kit alike`, async () => {
      const r = await live(opts);
      if (r.ok) throw new Error(`committed ${JSON.stringify(r.state)}`);
      expect(r.kind).toBe("invalid_state");
      expect(r.message).toContain(message);
      expect(await kit(opts)).toBe(r.message);
    });
});

describe("plain JSON state commits", () => {
  for (const [make, state] of [
    ["undefined-key", { n: 1 }],
    ["null", null],
    ["null-proto", { n: 1 }],
  ] as const)
    test(`${make}: gateway and testing kit alike`, async () => {
      const r = await live({ make });
      if (!r.ok) throw new Error(`${r.kind}: ${r.message}`);
      expect(r.state).toEqual(state);
      const agent = testAgent(shapes, { state: { n: 5 }, stateVersion: 2 });
      const run = await agent.run(stimuli.manual({ make }));
      expect(run.status).toBe("committed");
      expect(run.state).toEqual(state);
    });
});
