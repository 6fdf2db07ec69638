/**
 * The data-lifecycle commands (`verify`, `show`, `replay`, `backup`, `quarantine`, `gc`, `agents`,
 * `state`, `pause|resume|retire`, ...) on a stopped gateway's data dir, as an operator runs them:
 * what they say about damaged or unknown records, and that every mistake is one line and the right exit
 * code. The data dir is filled in-process through the gateway's own commit path (test/helpers/ops.ts).
 */
import { Database } from "bun:sqlite";
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "./helpers/gateway.ts";
import { describeSend, stopOnSignals } from "../gateway/cli/index.ts";
import { localActor } from "../gateway/ops/index.ts";
import { startTicks } from "../gateway/pids.ts";
import { SyntheticFleet } from "./helpers/ops.ts";
import { Store } from "../gateway/store/index.ts";
import type { AgentId, StimulusId } from "../gateway/types.ts";

const dirs: string[] = [];
afterAll(() => {
  if (!process.env.FLEET_E2E_KEEP) for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A stopped fleet of two agents (meter/m1, meter/m2) with `episodes` committed episodes; its CLI. */
async function stoppedFleet(episodes = 6, opts: { dedupDays?: number; quarantineDays?: number } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "fleet-ops-cli-"));
  dirs.push(dir);
  const fleet = await SyntheticFleet.create(dir, {
    types: [{ name: "meter", keys: ["m1", "m2"] }],
    keep: 0,
    episodesDays: 30,
    dedupDays: opts.dedupDays ?? 7,
    ...(opts.quarantineDays === undefined ? {} : { quarantineDays: opts.quarantineDays }),
  });
  await fleet.commit(episodes, Date.now() - 60_000, 1000);
  await fleet.checkpointWal();
  await fleet.close();
  const dataDir = join(dir, "data");
  const cli = (...args: string[]) => runCli(["--config", fleet.configPath, "--data-dir", dataDir, ...args]);
  const sqlite = () => new Database(join(dataDir, "fleet.db"));
  return { dir, dataDir, cli, sqlite };
}

/** Flip one byte near the end of the newest episode's event log (`episodes.log`); that episode's id. */
function damageNewestLog(db: Database, fromEnd: number, xor: number): string {
  const row = db
    .query("SELECT rowid, lower(hex(id)) AS id, log FROM episodes ORDER BY started_at DESC LIMIT 1")
    .get() as { rowid: number; id: string; log: Uint8Array };
  const bytes = new Uint8Array(row.log);
  bytes[bytes.length - fromEnd]! ^= xor;
  db.query("UPDATE episodes SET log = ? WHERE rowid = ?").run(bytes, row.rowid);
  const h = row.id;
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** One line on stderr, no stack frame, no SQL. */
function oneLine(stderr: string): string {
  const lines = stderr.trimEnd().split("\n");
  expect(lines).toHaveLength(1);
  expect(stderr).not.toMatch(/\n\s+at |Failed query|params:/);
  return lines[0]!;
}

describe("a damaged event log", () => {
  // Malformed JSONB (SQLite refuses the query), and JSONB whose text is no longer UTF-8.
  for (const [what, fromEnd, xor, cause] of [
    ["malformed", 2, 16, "malformed JSON"],
    ["not UTF-8", 20, 255, "not valid UTF-8"],
  ] as const) {
    test(`(${what}) is named by verify as a broken record, and the other agents are still checked`, async () => {
      const f = await stoppedFleet();
      const db = f.sqlite();
      const episode = damageNewestLog(db, fromEnd, xor);
      db.close();
      const v = await f.cli("verify", "--json");
      expect(v.code).toBe(1);
      expect(v.json).toMatchObject({ agents: 2, checkpoints: 6, episodes: 6 });
      expect(v.json.problems).toEqual([
        { agent: expect.any(String), record: `episode ${episode}`, problem: expect.stringContaining(cause) },
      ]);
      expect(v.json.problems[0].problem).toStartWith("event log unreadable: ");
      const text = await f.cli("verify");
      expect(text.code).toBe(1);
      expect(text.stdout).toContain(`BROKEN episode ${episode}: event log unreadable:`);
    });
  }

  test("makes show, replay and trace fail with one line naming the episode", async () => {
    const f = await stoppedFleet();
    const db = f.sqlite();
    const episode = damageNewestLog(db, 2, 16);
    db.close();
    for (const cmd of ["show", "replay", "trace"]) {
      const r = await f.cli(cmd, episode);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toBe(`fleet: episode ${episode}: event log unreadable: malformed JSON`);
    }
  });

  test("is counted UNREPLAYABLE by replay --agent, which goes on with the other episodes", async () => {
    const f = await stoppedFleet();
    const db = f.sqlite();
    const episode = damageNewestLog(db, 2, 16);
    const agent = (db.query("SELECT agent FROM episodes ORDER BY started_at DESC LIMIT 1").get() as { agent: string })
      .agent;
    db.close();
    const r = await f.cli("replay", "--agent", agent);
    expect(r.stdout).toContain(`UNREPLAYABLE ${episode} ${agent}: episode ${episode}: event log unreadable`);
    expect(r.stdout).toMatch(/\d\/3 episode\(s\) MATCH, \d DIVERGED, 1 UNREPLAYABLE/);
    const json = await f.cli("replay", "--agent", agent, "--json");
    expect(json.json).toMatchObject({ episodes: 3, unreplayable: 1 });
  });

  test("is counted UNREPLAYABLE by deploy --check, not FAILED against the new code", async () => {
    const f = await stoppedFleet();
    const db = f.sqlite();
    damageNewestLog(db, 2, 16);
    db.close();
    const r = await f.cli("deploy", "--check", "--type", "meter", "--json");
    expect(r.json.types[0].counts).toMatchObject({ FAILED: 0, UNREPLAYABLE: 1 });
  });

  test("backup writes the copy, then fails naming the broken record; restore refuses that copy", async () => {
    const f = await stoppedFleet();
    const db = f.sqlite();
    const episode = damageNewestLog(db, 2, 16);
    db.close();
    const file = join(f.dir, "b.db");
    const b = await f.cli("backup", file);
    expect(b.code).toBe(1);
    expect(oneLine(b.stderr)).toBe(
      `fleet: copy written to ${file}, but it does not verify: it fails verification (1 problem(s)); ` +
        `first: episode ${episode}: event log unreadable: malformed JSON`,
    );
    expect(existsSync(file)).toBe(true);
    const r = await runCli(["--config", join(f.dir, "fleet.toml"), "--data-dir", join(f.dir, "new"), "restore", file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("fails verification");
    expect(existsSync(join(f.dir, "new", "fleet.db"))).toBe(false);
  });
});

describe("replay", () => {
  test("an unknown episode id or prefix is an error on stderr, exit 1, as in show", async () => {
    const f = await stoppedFleet(2);
    for (const id of ["0000", "ffffffff-ffff"]) {
      const r = await f.cli("replay", id);
      expect(r.code).toBe(1);
      expect(r.stdout).toBe("");
      expect(oneLine(r.stderr)).toStartWith(`fleet: no episode `);
    }
    const short = await f.cli("replay", "01a");
    expect([short.code, oneLine(short.stderr)]).toEqual([
      1,
      'fleet: an episode id prefix needs at least 4 characters, got "01a"',
    ]);
  });

  test("an episode whose log or checkpoint no longer matches its hash is UNREPLAYABLE, saying so", async () => {
    const f = await stoppedFleet(2);
    const db = f.sqlite();
    const ids = db.query("SELECT lower(hex(id)) AS id FROM episodes LIMIT 2").all() as { id: string }[];
    const [id, other] = [ids[0]!.id, ids[1]!.id];
    const uuidOf = (h: string) =>
      [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join("-");
    const [uuid, otherUuid] = [uuidOf(id), uuidOf(other)];
    db.run(`UPDATE episodes SET log = jsonb(replace(json(log), '"reading"', '"edited"')) WHERE id = x'${id}'`);
    db.run(`UPDATE checkpoints SET state = '{"edited":1}' WHERE episode = x'${other}'`);
    db.close();
    const log = await f.cli("replay", uuid, "--json");
    expect([log.code, log.json.verdict, log.json.reason]).toEqual([
      1,
      "UNREPLAYABLE",
      "its event log does not match its hash (see fleet verify)",
    ]);
    const state = await f.cli("replay", otherUuid, "--json");
    expect([state.code, state.json.verdict, state.json.reason]).toEqual([
      1,
      "UNREPLAYABLE",
      "its checkpoint does not match its hash",
    ]);
  });

  test("--agent with nothing replayable counts it UNREPLAYABLE and exits 1", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    db.run("DELETE FROM spec_versions"); // every episode's spec version gone: none can be replayed
    db.close();
    const r = await f.cli("replay", "--agent", "meter/m1");
    expect(r.code).toBe(1);
    expect(r.stdout).toContain("0/2 episode(s) MATCH, 0 DIVERGED, 2 UNREPLAYABLE");
    expect(r.stdout).toContain("UNREPLAYABLE ");
    expect(r.stdout).not.toContain("SKIPPED");
    expect(oneLine(r.stderr)).toBe("fleet: none of meter/m1's 2 committed episode(s) could be replayed");
  });
});

describe("trace", () => {
  test("says when the stimulus was received and when the episode started", async () => {
    const f = await stoppedFleet(2);
    const db = f.sqlite();
    const row = db.query("SELECT lower(hex(id)) AS id, started_at FROM episodes LIMIT 1").get() as {
      id: string;
      started_at: number;
    };
    db.close();
    const h = row.id;
    const r = await f.cli(
      "trace",
      `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`,
    );
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    // The synthetic stimulus is received 3 ms before its episode starts (test/helpers/ops.ts).
    const received = new Date(row.started_at - 3).toISOString();
    expect(r.stdout).toContain(`received ${received}, started ${new Date(row.started_at).toISOString()}`);
  });
});

describe("wakeups", () => {
  test("a wake-up due at 0 (ctx.wakeAt(0)) shows its due time, the epoch, not '-'", async () => {
    const f = await stoppedFleet(1);
    const db = f.sqlite();
    db.query(
      `INSERT INTO wakeups (id, gateway, agent, due_at, payload, set_by, created_at)
       VALUES ('ep.w1', 'g', 'meter/m1', 0, 'null', 'ep', 1)`,
    ).run();
    db.close();
    const r = await f.cli("wakeups", "meter/m1");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("1970-01-01 00:00:00");
  });
});

describe("errors are one line", () => {
  test("a data dir with no fleet database is one line naming it, exit 1, without the usage", async () => {
    const dir = join(mkdtempSync(join(tmpdir(), "fleet-ops-cli-")), "none");
    dirs.push(dir);
    for (const args of [["agents"], ["episodes", "meter/m1"], ["verify"], ["gc", "--dry-run"]]) {
      const r = await runCli([...args, "--data-dir", dir]);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr.trim()).toBe(`fleet: no fleet data in ${dir} (start the gateway first, or pass --data-dir)`);
    }
  });

  test("a backup that cannot be written says where and why, without a stack", async () => {
    const f = await stoppedFleet(2);
    const r = await f.cli("backup", "/proc/fleet-backup-test.db");
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toStartWith("fleet: cannot write a backup to /proc/fleet-backup-test.db: ");
  });
});

/** Quarantine the stimuli of `agent`'s episodes (as if each failed its retries); their seqs, oldest first. */
function quarantine(db: Database, agent: string, doneAt = Date.now()): number[] {
  db.query(
    "UPDATE stimuli SET state = 'quarantined', attempts = 3, last_error = 'boom', done_at = ? WHERE agent = ?",
  ).run(doneAt, agent);
  return (db.query("SELECT seq FROM stimuli WHERE agent = ? ORDER BY seq").all(agent) as { seq: number }[]).map(
    (r) => r.seq,
  );
}

describe("quarantine on a stopped gateway", () => {
  test("a retry for a retired agent is refused as the running gateway refuses it, and stays quarantined", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    const [seq] = quarantine(db, "meter/m1");
    db.close();
    expect((await f.cli("retire", "meter/m1")).code).toBe(0);
    const r = await f.cli("quarantine", "retry", String(seq));
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`fleet: stimulus ${seq} not retried: agent is retired`);
    const list = await f.cli("quarantine", "--json");
    expect(list.json.stimuli.map((s: { seq: number }) => s.seq)).toContain(seq);
    // Dropping it is still the operator's to do.
    expect((await f.cli("quarantine", "drop", String(seq))).code).toBe(0);
  });

  test("a retry for an agent that is not retired is requeued for the next start", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    const [seq] = quarantine(db, "meter/m2");
    db.close();
    const r = await f.cli("quarantine", "retry", String(seq));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`stimulus ${seq} requeued for meter/m2 (gateway stopped; runs at next start)`);
  });
});

describe("retention and the quarantine", () => {
  test("gc keeps quarantined stimuli past dedup_days, and their ids stay duplicates", async () => {
    const f = await stoppedFleet(6, { dedupDays: 1 });
    const db = f.sqlite();
    const old = Date.now() - 10 * 86_400_000;
    const seqs = quarantine(db, "meter/m1", old);
    db.query("UPDATE stimuli SET done_at = ? WHERE agent = 'meter/m2'").run(old); // finished long ago
    db.close();
    const gc = await f.cli("gc", "--json");
    expect(gc.code).toBe(0);
    expect(gc.json.stimuliForgotten).toBe(3); // meter/m2's, not the quarantined ones
    const list = await f.cli("quarantine", "--json");
    expect(list.json.stimuli.map((s: { seq: number }) => s.seq).sort()).toEqual(seqs);
    const store = await Store.open(join(f.dataDir, "fleet.db"), { synchronous: "normal" });
    try {
      const again = await store.intake([
        {
          agent: "meter/m1" as AgentId,
          type: "meter",
          key: "m1",
          sid: "s:0" as StimulusId, // meter/m1's first stimulus, quarantined
          kind: "mqtt",
          topic: "sensors/m1/temperature",
          payload: new TextEncoder().encode("{}"),
          receivedAt: Date.now(),
        },
      ]);
      expect(again[0]!.seq).toBeNull();
    } finally {
      await store.close();
    }
  });
});

describe("quarantine_days", () => {
  test("a stimulus quarantined longer is dropped by gc, its id still a duplicate; a younger one stays", async () => {
    const f = await stoppedFleet(6, { quarantineDays: 5 });
    const db = f.sqlite();
    const expired = quarantine(db, "meter/m1", Date.now() - 6 * 86_400_000);
    const young = quarantine(db, "meter/m2", Date.now() - 4 * 86_400_000);
    db.close();
    const preview = await f.cli("gc", "--dry-run", "--json");
    expect(preview.json.quarantineExpired).toBe(expired.length);
    const gc = await f.cli("gc", "--json");
    expect(gc.code).toBe(0);
    expect(gc.json.quarantineExpired).toBe(expired.length);
    expect(gc.stdout).not.toContain("quarantined stimulus");
    const list = await f.cli("quarantine", "--json");
    expect(list.json.stimuli.map((s: { seq: number }) => s.seq).sort()).toEqual(young);
    const rows = f.sqlite();
    const states = rows.query("SELECT state, count(*) AS n FROM stimuli WHERE agent = 'meter/m1' GROUP BY state").all();
    rows.close();
    // Dropped, not forgotten: the id is remembered dedup_days (7) from the drop.
    expect(states).toEqual([{ state: "dropped", n: expired.length }]);
    const human = await f.cli("gc");
    expect(human.stdout).toContain("0 quarantined stimulus(es) past quarantine_days dropped");
  });

  test("quarantine_days = 0 keeps the quarantine until an operator retries or drops it", async () => {
    const f = await stoppedFleet(4, { quarantineDays: 0 });
    const db = f.sqlite();
    const seqs = quarantine(db, "meter/m1", Date.now() - 400 * 86_400_000);
    db.close();
    const gc = await f.cli("gc", "--json");
    expect(gc.json.quarantineExpired).toBe(0);
    const list = await f.cli("quarantine", "--json");
    expect(list.json.stimuli.map((s: { seq: number }) => s.seq).sort()).toEqual(seqs);
  });
});

describe("an unknown agent", () => {
  test("is `no agent <id>` and exit 1 for verify, episodes, wakeups, replay and state", async () => {
    const f = await stoppedFleet(2);
    for (const args of [
      ["verify", "--agent", "nosuch/x"],
      ["episodes", "nosuch/x"],
      ["wakeups", "nosuch/x"],
      ["replay", "--agent", "nosuch/x"],
      ["state", "nosuch/x"],
      ["episodes", "nosuch/x", "--json"],
    ]) {
      const r = await f.cli(...args);
      expect({ args, code: r.code, stdout: r.stdout }).toEqual({ args, code: 1, stdout: "" });
      expect(oneLine(r.stderr)).toBe("fleet: no agent nosuch/x");
    }
  });
});

describe("start on a data dir in use", () => {
  test("is one line naming the data dir, exit 1", async () => {
    const f = await stoppedFleet(1);
    // The sandbox ledger names its gateway by pid and start time: here, this live test process.
    const stat = readFileSync(`/proc/${process.pid}/stat`, "utf8");
    const ticks = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
    writeFileSync(join(f.dataDir, "sandboxes"), `gateway ${process.pid} ${ticks}\n`);
    // An expected refusal, not a bug: one line even where FLEET_DEBUG=1 prints unexpected errors whole.
    const args = ["--config", join(f.dir, "fleet.toml"), "--data-dir", f.dataDir, "start", "--http-port", "0"];
    const r = await runCli([...args, "--mqtt-port", "0"], { env: { FLEET_DEBUG: "1" } });
    expect(r.code).toBe(1);
    const lines = r.stderr.trimEnd().split("\n");
    expect(lines.at(-1)).toBe(`fleet: another gateway is running on the data dir ${f.dataDir}`);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });
});

describe("operator actions on a stopped gateway", () => {
  test("pause, resume, retire --drain, quarantine retry|drop and gc are in the audit log as local:<user>", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    const [s1, s2] = quarantine(db, "meter/m1");
    db.close();
    const actor = localActor(); // e.g. local:root, also with $USER unset
    for (const args of [
      ["pause", "meter/m1"],
      ["resume", "meter/m1"],
      ["quarantine", "retry", String(s1)],
      ["quarantine", "drop", String(s2)],
      ["retire", "meter/m2", "--drain"],
      ["gc"],
      ["gc", "--now", String(Date.now())],
    ])
      expect((await f.cli(...args)).code).toBe(0);
    // Refusals are recorded too, with the status the HTTP route would answer.
    expect((await f.cli("pause", "meter/m2")).code).toBe(1); // retired: nothing was queued to drain
    expect((await f.cli("pause", "nosuch/x")).code).toBe(1);
    const audit = await f.cli("audit", "--json");
    const rows = audit.json.records.map((r: Record<string, unknown>) => [
      r.actor,
      r.action,
      r.target,
      r.status,
      r.detail,
    ]);
    expect(rows.reverse()).toEqual([
      [actor, "agent.pause", "meter/m1", 200, null],
      [actor, "agent.resume", "meter/m1", 200, null],
      [actor, "quarantine.retry", `stimulus ${s1}`, 200, null],
      [actor, "quarantine.drop", `stimulus ${s2}`, 200, null],
      [actor, "agent.retire", "meter/m2", 200, "drain"],
      [actor, "gc", null, 200, null],
      [actor, "gc", null, 200, expect.stringMatching(/^--now \d+$/)],
      [actor, "agent.pause", "meter/m2", 409, null],
      [actor, "agent.pause", "nosuch/x", 404, null],
    ]);
  });

  test("local:<user> is the uid's name in /etc/passwd, whatever $USER says", async () => {
    const passwd = () => "root:x:0:0:root:/root:/bin/bash\nfleet:x:998:998::/var/lib/fleet:/usr/sbin/nologin\n";
    expect(localActor(0, passwd)).toBe("local:root");
    expect(localActor(998, passwd)).toBe("local:fleet");
    const f = await stoppedFleet(1);
    const r = await runCli(["pause", "meter/m1", "--data-dir", f.dataDir, "--config", join(f.dir, "fleet.toml")], {
      env: { USER: "", LOGNAME: "" },
    });
    expect(r.code).toBe(0);
    const audit = await f.cli("audit", "--json");
    expect(audit.json.records[0].actor).toBe(localActor());
    expect(audit.json.records[0].actor).not.toBe("local:unknown");
  });

  test("pausing a failed agent is refused and keeps its reason; resume tries it again", async () => {
    const f = await stoppedFleet(2);
    const db = f.sqlite();
    const why = "checkpoint meter/m1#2 abc: hash mismatch";
    db.query("UPDATE agents SET status = 'failed', reason = ? WHERE id = 'meter/m1'").run(why);
    const agent = () => db.query("SELECT status, reason FROM agents WHERE id = 'meter/m1'").get();
    const r = await f.cli("pause", "meter/m1");
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      `fleet: meter/m1 failed (${why}): it runs nothing to pause; resume tries it again, retire ends it`,
    );
    expect(agent()).toEqual({ status: "failed", reason: why });
    expect((await f.cli("resume", "meter/m1")).code).toBe(0);
    expect(agent()).toEqual({ status: "active", reason: null });
    db.close();
  });

  test("a refused pause, resume or retire is one line starting with `fleet:`", async () => {
    const f = await stoppedFleet(2);
    expect((await f.cli("retire", "meter/m1")).code).toBe(0);
    const r = await f.cli("resume", "meter/m1");
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe("fleet: meter/m1 is retired");
    const none = await f.cli("pause", "nosuch/x");
    expect(oneLine(none.stderr)).toBe("fleet: no agent nosuch/x");
    // The running gateway's refusal too: a stand-in for its HTTP API answering as it does.
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      fetch: () => Response.json({ error: { code: "conflict", message: "meter/m1 is retired" } }, { status: 409 }),
    });
    try {
      writeFileSync(
        join(f.dataDir, "gateway.json"),
        JSON.stringify({ http_port: server.port, mqtt_port: 1, pid: process.pid }),
      );
      const live = await f.cli("resume", "meter/m1");
      expect({ code: live.code, stdout: live.stdout }).toEqual({ code: 1, stdout: "" });
      expect(oneLine(live.stderr)).toBe("fleet: meter/m1 is retired");
    } finally {
      server.stop(true);
    }
  });
});

describe("fleet send", () => {
  test("its errors are one line on stderr starting with `fleet:`, nothing on stdout", async () => {
    const f = await stoppedFleet(1);
    const stopped = await f.cli("send", "meter/m1/in", "{}");
    expect({ code: stopped.code, stdout: stopped.stdout }).toEqual({ code: 1, stdout: "" });
    expect(oneLine(stopped.stderr)).toBe("fleet: the gateway is not running (start it with `fleet start`)");
    // The running gateway's refusal: a stand-in for its HTTP API answering as it does.
    const message = "no agent subscribes to meter/m1/in";
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      fetch: () => Response.json({ error: { code: "no_target", message } }, { status: 404 }),
    });
    try {
      writeFileSync(
        join(f.dataDir, "gateway.json"),
        JSON.stringify({ http_port: server.port, mqtt_port: 1, pid: process.pid }),
      );
      const live = await f.cli("send", "meter/m1/in", "{}");
      expect({ code: live.code, stdout: live.stdout }).toEqual({ code: 1, stdout: "" });
      expect(oneLine(live.stderr)).toBe(`fleet: ${message}`);
    } finally {
      server.stop(true);
    }
  });
});

describe("reads from the running gateway", () => {
  test("a read answered by an error status exits 1 with the server's message, printing nothing as data", async () => {
    const f = await stoppedFleet(1);
    // A stand-in for the running gateway at its request cap: every call is answered 503 busy.
    const message = "too busy: 64 requests in flight; retry shortly";
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      fetch: () =>
        Response.json({ error: { code: "busy", message } }, { status: 503, headers: { "retry-after": "1" } }),
    });
    try {
      writeFileSync(
        join(f.dataDir, "gateway.json"),
        JSON.stringify({ http_port: server.port, mqtt_port: 1, pid: process.pid }),
      );
      for (const [args, what] of [
        [["status"], "status"],
        [["status", "--json"], "status"],
        [["quarantine"], "quarantine"],
        [["quarantine", "--json"], "quarantine"],
        // Not the newest stored spec version in place of the running one: refused.
        [["deploy", "--check"], "deploy --check"],
      ] as const) {
        const r = await f.cli(...args);
        expect({ args, code: r.code, stdout: r.stdout }).toEqual({ args, code: 1, stdout: "" });
        expect(oneLine(r.stderr)).toBe(`fleet: ${what}: the running gateway answered HTTP 503: ${message}`);
      }
    } finally {
      server.stop(true);
    }
  });
});

describe("a fleet.toml that does not load", () => {
  test("still names the data dir when it is TOML; when it is not, the command is exit 1, not ./.fleet", async () => {
    const f = await stoppedFleet(2);
    const edited = join(f.dir, "edited.toml"); // an edit a running gateway would refuse: an unknown key
    writeFileSync(edited, `[fleet]\ndata_dir = ${JSON.stringify(f.dataDir)}\nbogus_key = 1\n`);
    const agents = await runCli(["agents", "--json", "--config", edited]);
    expect(agents.code).toBe(0);
    expect(agents.json.agents.map((a: { id: string }) => a.id)).toEqual(["meter/m1", "meter/m2"]);
    const broken = join(f.dir, "broken.toml");
    writeFileSync(broken, `[fleet\ndata_dir = ${JSON.stringify(f.dataDir)}\n`);
    const status = await runCli(["status", "--config", broken]);
    expect({ code: status.code, stdout: status.stdout }).toEqual({ code: 1, stdout: "" });
    expect(oneLine(status.stderr)).toStartWith(`fleet: invalid fleet spec: ${broken}:1:`);
  });
});

describe("fleet agents", () => {
  test("lists each agent's queue length in a QUEUED column", async () => {
    const f = await stoppedFleet(6);
    const db = f.sqlite();
    db.query("UPDATE stimuli SET state = 'queued', done_at = NULL WHERE agent = 'meter/m1'").run();
    db.close();
    const r = await f.cli("agents");
    expect(r.code).toBe(0);
    const [head, ...rows] = r.stdout.trimEnd().split("\n");
    const cols = head!.split(/\s+/);
    expect(cols).toContain("QUEUED");
    const queued = (id: string) => rows.find((l) => l.startsWith(id))!.split(/\s+/)[cols.indexOf("QUEUED")];
    expect([queued("meter/m1"), queued("meter/m2")]).toEqual(["3", "0"]);
  });
});

describe("fleet agents paging", () => {
  test("a page that does not reach the last agent ends with `more: --page N`", async () => {
    const f = await stoppedFleet(2);
    const first = await f.cli("agents", "--limit", "1");
    expect(first.stdout.trimEnd().split("\n").slice(-2)).toEqual(["2 agent(s)", "more: --page 2"]);
    expect((await f.cli("agents", "--limit", "1", "--json")).json.next_page).toBe(2);
    const last = await f.cli("agents", "--limit", "1", "--page", "2");
    expect(last.stdout.trimEnd().split("\n").at(-1)).toBe("2 agent(s)");
    expect((await f.cli("agents", "--json")).json.next_page).toBeNull();
  });
});

describe("command-line mistakes", () => {
  test("a negative number reaches the flag's range check (exit 2), not the parser's 'ambiguous'", async () => {
    const f = await stoppedFleet(2);
    for (const [args, message] of [
      [["state", "meter/m1", "--at", "-1"], 'fleet: --at must be a checkpoint number (1, 2, ...), got "-1"'],
      [["quarantine", "--limit", "-5"], "fleet: --limit must be an integer from 1 to 10000, got -5"],
      [["episodes", "meter/m1", "--limit", "-5"], "fleet: --limit must be an integer from 1 to 100000, got -5"],
    ] as const) {
      const r = await f.cli(...args);
      expect({ args, code: r.code, first: r.stderr.split("\n")[0] }).toEqual({ args, code: 2, first: message });
    }
  });

  test("an option the command does not take is exit 2 naming it, and nothing is done", async () => {
    const f = await stoppedFleet(2);
    for (const [args, message] of [
      [["retire", "meter/m1", "--dry-run"], "fleet: retire does not take --dry-run"],
      [["pause", "meter/m1", "--drain"], "fleet: pause does not take --drain"],
      [["episodes", "meter/m1", "--state", "failed"], "fleet: episodes does not take --state"],
      [["agents", "--kind", "mqtt"], "fleet: agents does not take --kind"],
      [["status", "--limit", "3"], "fleet: status does not take --limit"],
      [["token", "list", "--scope", "read"], "fleet: token does not take --scope"],
      [["device", "remove", "d1", "--dry-run"], "fleet: device does not take --dry-run"],
    ] as const) {
      const r = await f.cli(...args);
      expect({ args, code: r.code, first: r.stderr.split("\n")[0] }).toEqual({ args, code: 2, first: message });
    }
    const agents = await f.cli("agents", "--json");
    expect(agents.json.agents.map((a: { status: string }) => a.status)).toEqual(["idle", "idle"]);
    // Each command's own options still parse (the central ones reach the central code: no server there).
    expect((await f.cli("retire", "meter/m2", "--drain")).code).toBe(0);
    expect((await f.cli("episodes", "meter/m1", "--status", "failed", "--kind", "mqtt", "--limit", "5")).code).toBe(0);
    expect((await f.cli("gc", "--dry-run", "--now", String(Date.now()))).code).toBe(0);
  });

  test("fleet --help lists every option; a command's --help prints that command's usage only", async () => {
    const all = await runCli(["--help"]);
    expect(all.code).toBe(0);
    for (const option of ["wakeups <type/key> [--state", "--page", "--before", "--json", "--data-dir /var/lib/<user>"])
      expect(all.stdout).toContain(option);
    const agents = await runCli(["agents", "--help"]);
    expect(agents.code).toBe(0);
    const lines = agents.stdout.trimEnd().split("\n");
    expect(lines[0]).toBe("usage: fleet agents …");
    expect(lines).toContain("  agents [--type T] [--status S] [--limit N] [--page N]");
    expect(agents.stdout).toContain("--central URL");
    expect(agents.stdout).toContain("Common: --config FILE");
    expect(agents.stdout).not.toContain("install-service");
    const retire = await runCli(["retire", "--help"]);
    expect(retire.stdout).toContain("retire <type/key> --drain");
    expect(retire.stdout).not.toContain("agents [--type");
  });

  test("agents --status takes only an agent status (exit 2 listing them); draining is one", async () => {
    const f = await stoppedFleet(2);
    const bad = await f.cli("agents", "--status", "bogus");
    expect(bad.code).toBe(2);
    expect(bad.stderr.split("\n")[0]).toBe(
      'fleet: --status must be one of idle, paused, draining, retired, failed; got "bogus"',
    );
    expect((await f.cli("agents", "--status", "draining")).code).toBe(0);
  });

  test("state --at with --diff is refused (exit 2) instead of ignoring --at", async () => {
    const f = await stoppedFleet(4);
    const r = await f.cli("state", "meter/m1", "--at", "1", "--diff", "1..2");
    expect(r.code).toBe(2);
    expect(r.stderr.split("\n")[0]).toBe(
      "fleet: --at and --diff do not go together: --diff A..B names both checkpoints",
    );
  });

  test("state --at a collected checkpoint --json is an error saying so, not `null`", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    db.query("UPDATE checkpoints SET state = NULL WHERE agent = 'meter/m1' AND seq = 1").run();
    db.close();
    const r = await f.cli("state", "meter/m1", "--at", "1", "--json");
    expect({ code: r.code, stdout: r.stdout }).toEqual({ code: 1, stdout: "" });
    expect(oneLine(r.stderr)).toBe(
      "fleet: meter/m1 #1: its state was collected by retention (the hash stays in the chain)",
    );
    const text = await f.cli("state", "meter/m1", "--at", "1");
    expect(text.stdout).toContain("(state collected by retention; the hash stays in the chain)");
  });

  test("state of a checkpoint whose stored state does not hash to it is refused, --at and --diff alike", async () => {
    const f = await stoppedFleet(4);
    const db = f.sqlite();
    db.query(`UPDATE checkpoints SET state = '{"forged":true}' WHERE agent = 'meter/m1' AND seq = 1`).run();
    db.close();
    for (const args of [
      ["--at", "1"],
      ["--at", "1", "--json"],
      ["--diff", "1..2"],
    ]) {
      const r = await f.cli("state", "meter/m1", ...args);
      expect({ code: r.code, stdout: r.stdout }).toEqual({ code: 1, stdout: "" });
      expect(oneLine(r.stderr)).toMatch(
        /^fleet: checkpoint meter\/m1#1 \([0-9a-f]{12}…\): hash mismatch .*fleet verify/,
      );
      expect(r.stderr).not.toContain("forged");
    }
    expect((await f.cli("state", "meter/m1", "--at", "2")).code).toBe(0);
  });

  test("gc --now on a running gateway is a one-line refusal, exit 1 (not the usage)", async () => {
    const f = await stoppedFleet(1);
    // A live gateway as the CLI sees one: gateway.json naming a live process (this one).
    writeFileSync(join(f.dataDir, "gateway.json"), JSON.stringify({ http_port: 1, mqtt_port: 1, pid: process.pid }));
    const r = await f.cli("gc", "--now", String(Date.now()));
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      "fleet: gc --now works only with --dry-run or on a stopped gateway's data dir: " +
        "the running gateway collects on its own clock",
    );
  });

  test("a gateway.json whose pid is now another process's (a reused pid) names no running gateway", async () => {
    const f = await stoppedFleet(1);
    // As a gateway killed with -9 (or a power cut) leaves it: its pid is a live process now, started at another time.
    const start = startTicks(process.pid)!;
    const left = (pidStart: string) =>
      writeFileSync(
        join(f.dataDir, "gateway.json"),
        JSON.stringify({ http_port: 1, mqtt_port: 1, pid: process.pid, pid_start: pidStart }),
      );
    left(String(Number(start) + 1));
    const stale = await f.cli("gc", "--now", String(Date.now()), "--json");
    expect({ code: stale.code, stderr: stale.stderr }).toEqual({ code: 0, stderr: "" });
    expect(stale.json).toMatchObject({ tombstoned: 0, episodesDeleted: 0 });
    const send = await f.cli("send", "meter/m1/in", "{}");
    expect(oneLine(send.stderr)).toBe("fleet: the gateway is not running (start it with `fleet start`)");
    // The same pid at the same time after boot, in the boot before this one (a power cut): no gateway runs.
    writeFileSync(
      join(f.dataDir, "gateway.json"),
      JSON.stringify({ http_port: 1, mqtt_port: 1, pid: process.pid, pid_start: start, boot_id: "0-before" }),
    );
    const rebooted = await f.cli("gc", "--now", String(Date.now()), "--json");
    expect({ code: rebooted.code, stderr: rebooted.stderr }).toEqual({ code: 0, stderr: "" });
    // The same pid started when the file says: that gateway runs.
    left(start);
    const live = await f.cli("gc", "--now", String(Date.now()));
    expect(live.code).toBe(1);
    expect(oneLine(live.stderr)).toStartWith("fleet: gc --now works only with --dry-run or on a stopped gateway");
  });
});

describe("fleet start's stop signals", () => {
  /** The handler with a drain that ends when `finish` is called; the exit codes and warnings it gave. */
  function handler() {
    let finish = () => {};
    const exits: number[] = [];
    const warnings: unknown[] = [];
    const log = { info: () => {}, warn: (o: unknown) => void warnings.push(o) } as never;
    const drain = () => new Promise<void>((r) => (finish = r));
    const signal = stopOnSignals(drain, log, (code) => void exits.push(code));
    const end = async () => {
      finish();
      await Bun.sleep(0);
    };
    return { signal, exits, warnings, finish: end };
  }

  test("a drain that finishes exits 0", async () => {
    const h = handler();
    h.signal("SIGTERM");
    expect(h.exits).toEqual([]);
    await h.finish();
    expect(h.exits).toEqual([0]);
  });

  test("a second SIGINT or SIGTERM during the drain exits at once, 130 or 143, never 0", async () => {
    for (const [second, code] of [
      ["SIGINT", 130],
      ["SIGTERM", 143],
    ] as const) {
      const h = handler();
      h.signal("SIGTERM");
      h.signal(second);
      expect(h.exits).toEqual([code]);
      expect(h.warnings).toEqual([{ signal: second, exit_code: code }]);
      await h.finish(); // the process is gone by then; the handler exits no second time
      expect(h.exits).toEqual([code]);
    }
  });
});

describe("reshard", () => {
  test('into one shard advises running it unsharded, not shard = "i/1"', async () => {
    const f = await stoppedFleet(2);
    const r = await f.cli("reshard", "--from", f.dataDir, "--to", "1", "--out", join(f.dir, "one-"));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("Start the gateway unsharded (no [fleet] shard) on that data dir.");
    expect(r.stdout).not.toContain('"i/1"');
  });
});

describe("fleet send's text", () => {
  test("names the targets another shard owns (not recorded here) and the refused ones, not only the accepted", () => {
    const text = describeSend({
      accepted: [{ agent: "counter/b4", sid: "id:cli-2" }],
      duplicates: [],
      refused: [{ agent: "door/b4", code: "retired", reason: "door/b4 is retired" }],
      elsewhere: [{ agent: "watch/b4", shard: 2 }],
    });
    expect(text.split("\n")).toEqual([
      "accepted 1, duplicates 0, refused 1, on other shards 1",
      "  counter/b4 id:cli-2",
      "  door/b4 refused (retired): door/b4 is retired",
      "  watch/b4 NOT recorded here: owned by shard 2 (send it to that shard's gateway)",
    ]);
    // Unsharded, nothing refused: as before.
    expect(describeSend({ accepted: [{ agent: "counter/a", sid: "u:1" }], duplicates: [], refused: [] })).toBe(
      "accepted 1, duplicates 0\n  counter/a u:1",
    );
  });
});
