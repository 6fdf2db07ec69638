/**
 * The central view against a real sqld: `fleet agents|episodes|show|verify|audit --central` and
 * the `fleet central` API read what synthetic gateways pushed (test/helpers/ops.ts) with their
 * own replicators. Flags parse as the local commands parse them, an unknown --fleet is an error,
 * episodes page with --before, an episode is found by a unique prefix, API errors carry a code,
 * and a resharded fleet whose newest layout has a shard that never reported says so.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import {
  CentralError,
  CentralReader,
  type CentralServer,
  enableReplication,
  isLoopback,
  Replicator,
  serverUrl,
  startCentralServer,
} from "../gateway/replication/index.ts";
import { appendAudit } from "../gateway/store/index.ts";
import { SyntheticFleet } from "./helpers/ops.ts";
import { runCli } from "./helpers/gateway.ts";
import { Sqld } from "./helpers/sqld.ts";

// The command-line tests start the CLI several times each: seconds apiece on a busy 2-core machine.
setDefaultTimeout(60_000);

const quiet = pino({ level: "silent" });
const NOW = Date.now();
const dirs: string[] = [];
let sqld: Sqld;
let reader: CentralReader;
let server: CentralServer;
/** Gateway ids by the fleet id they pushed under. */
const gateways = new Map<string, string>();
/** Episode ids of t/a in fleet north, newest first. */
let northA: string[] = [];

/** Gateway ids of the two gateways that both push as fleet `twin`. */
const twins: string[] = [];
/** Gateway ids of the two gateways that share the fleet name plant-7 (the docs allow it), in push order. */
let plant7: string[] = [];
/** Each gateway's operator actions, pushed beside its episodes: their times (ms after NOW - 100 s). */
const PLANT7_AUDIT = [
  [10, 40, 50],
  [20, 40], // its seq 2 at the same millisecond as the other's seq 2
];

/**
 * A synthetic gateway with `keys` agents of type t and 5 episodes each (started at the same times on
 * every gateway), and an operator action at each of `audit`'s times, pushed as `fleet` at `at`.
 */
async function pushed(fleet: string, keys: string[], at: number, audit: number[] = []): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), "fleet-central-view-"));
  dirs.push(dir);
  const f = await SyntheticFleet.create(dir, { types: [{ name: "t", keys }], keep: 0, episodesDays: 30, dedupDays: 7 });
  await enableReplication(f.store, sqld.url);
  await f.commit(keys.length * 5, NOW - 600_000, 1000);
  for (const ms of audit)
    await appendAudit(f.store, {
      at: NOW - 100_000 + ms,
      actor: "ops",
      action: "agent.pause",
      target: "t/x",
      status: 200,
      detail: null,
    });
  const spec = { url: sqld.url, auth_token_env: null, interval_ms: 50, batch_rows: 500, required: true };
  const r = new Replicator({
    store: f.store,
    spec: { ...spec, max_backlog_mb: 1024 },
    fleet,
    log: quiet,
    now: () => at,
  });
  await r.drain();
  await r.stop();
  gateways.set(fleet, f.store.gatewayId);
  await f.close();
  return f.store.gatewayId;
}

beforeAll(async () => {
  sqld = await Sqld.start();
  await pushed("north", ["a", "b"], NOW - 5000);
  // plant: one gateway, then resharded into 3, of which shards 1 and 2 have pushed (3 has not started).
  await pushed("plant", ["p1", "p2", "p3", "p4"], NOW - 4000);
  await pushed("plant-shard-1-of-3", ["p1", "p2"], NOW - 3000);
  await pushed("plant-shard-2-of-3", ["p3"], NOW - 2000);
  plant7 = [
    await pushed("plant-7", ["x"], NOW - 1500, PLANT7_AUDIT[0]),
    await pushed("plant-7", ["x"], NOW - 1400, PLANT7_AUDIT[1]),
  ];
  // Two gateways under one fleet name, each with an agent t/x (minted together: their ids share a prefix).
  twins.push(await pushed("twin", ["x"], NOW - 1300, [60]), await pushed("twin", ["x"], NOW - 1000, [70]));
  reader = await CentralReader.open(sqld.url);
  server = startCentralServer({ reader, port: 0 });
  northA = (await reader.episodes("t/a", { fleet: "north", limit: 100 })).map((e) => e.id);
}, 120_000);

afterAll(async () => {
  server?.stop();
  reader?.close();
  await sqld?.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** The CLI against the center, with no fleet.toml to name a token. */
const central = (...args: string[]) =>
  runCli([...args, "--central", sqld.url, "--config", join(tmpdir(), "no-such-fleet.toml")]);
const api = async (path: string) => {
  const res = await fetch(`${server.url}${path}`);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
};

describe("fleet <read command> --central: the command line", () => {
  test("numbers parse as the local commands parse them: anything but a plain integer in range is exit 2", async () => {
    const cases: [string[], string][] = [
      [["agents", "--limit", "1e2"], "--limit must be an integer from 1 to 100000"],
      [["agents", "--limit", "0"], "--limit must be an integer from 1 to 100000"],
      [["agents", "--page", "0"], "--page must be an integer from 1"],
      [["episodes", "t/a", "--limit", "abc"], "--limit must be an integer from 1 to 100000"],
      [["episodes", "t/a", "--before", "soon"], "--before must be an integer from 0"],
      [["audit", "--limit", "1e2"], "--limit must be an integer from 1 to 100000"],
    ];
    for (const [args, message] of cases) {
      const r = await central(...args);
      expect({ args, code: r.code, err: r.stderr.includes(message) }).toEqual({ args, code: 2, err: true });
    }
  });

  test("a --fleet the center has never heard of is exit 1 with verify's message, for every command", async () => {
    for (const args of [["agents"], ["episodes", "t/a"], ["audit"], ["verify"]]) {
      const r = await central(...args, "--fleet", "nosuch");
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr).toContain('no fleet or gateway "nosuch" in the central database');
    }
  });

  test("an agent id that is not type/key is exit 2; one no gateway read has is exit 1 naming it", async () => {
    for (const args of [
      ["verify", "--agent", "bogus"],
      ["episodes", "bogus"],
    ]) {
      const r = await central(...args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
    }
    expect((await central("verify", "--agent", "bogus")).stderr).toContain(
      '--agent needs an agent <type>/<key>, got "bogus"',
    );
    for (const args of [
      ["verify", "--agent", "t/nope"],
      ["episodes", "t/nope"],
      ["episodes", "t/a", "--fleet", "twin"], // t/a is north's, not twin's
      ["verify", "--agent", "t/a", "--fleet", "twin"],
    ]) {
      const r = await central(...args);
      expect({ args, code: r.code, out: r.stdout }).toEqual({ args, code: 1, out: "" });
      expect(r.stderr).toContain(`no agent ${args.includes("t/nope") ? "t/nope" : "t/a"} in the central database`);
    }
  });

  test("verify --agent counts the agent once per gateway that has it, and verifies only those", async () => {
    const one = await central("verify", "--agent", "t/a", "--json");
    expect(one.code).toBe(0);
    const report = one.json as { agents: number; fleets: { gateway: string; agents: number }[] };
    expect([report.agents, report.fleets]).toEqual([1, [expect.objectContaining({ gateway: gateways.get("north") })]]);
    const human = await central("verify", "--agent", "t/x", "--fleet", "twin");
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(
      /^verified 2 gateway\(s\) at the center: 2 agent\(s\), \d+ checkpoint\(s\), 10 episode/,
    );
  });

  test("rows of two gateways of one fleet name are told apart by their GATEWAY column", async () => {
    expect(twins[0]!.slice(0, 8)).toBe(twins[1]!.slice(0, 8)); // UUIDv7s minted together
    /** The GATEWAY cells of a table, each checked to be a prefix (at least 8 characters) of a twin's id. */
    const cells = (out: string) => {
      const [head, ...rows] = out.split("\n").filter((l) => l.startsWith("twin") || l.startsWith("FLEET"));
      const at = head!.indexOf("GATEWAY");
      expect(at).toBeGreaterThan(0);
      const values = rows.map((r) => r.slice(at).split(/\s+/)[0]!);
      for (const v of values) {
        expect(v.length).toBeGreaterThanOrEqual(8);
        expect(twins.filter((t) => t.startsWith(v))).toHaveLength(1);
      }
      return values;
    };
    const agents = await central("agents", "--fleet", "twin");
    expect(new Set(cells(agents.stdout)).size).toBe(2);
    const episodes = await central("episodes", "t/x", "--fleet", "twin");
    expect(new Set(cells(episodes.stdout)).size).toBe(2);
    const audit = await central("audit", "--fleet", "twin");
    expect(new Set(cells(audit.stdout)).size).toBe(2);
  });

  test("agents pages with --page: a page with more after it ends with `more: --page N`, as locally", async () => {
    const first = await central("agents", "--fleet", "plant", "--limit", "2");
    expect([first.code, first.stdout.includes("\n3 agent(s)\nmore: --page 2\n")]).toEqual([0, true]);
    const json = await central("agents", "--fleet", "plant", "--limit", "2", "--json");
    expect((json.json as { next_page: number | null }).next_page).toBe(2);
    const last = await central("agents", "--fleet", "plant", "--limit", "2", "--page", "2");
    expect(last.stdout).not.toContain("more:");
  });

  test("a --central URL the libSQL client refuses, or one carrying a token, is exit 2 before any read", async () => {
    const config = ["--config", join(tmpdir(), "no-such-fleet.toml")];
    for (const [url, says] of [
      [`${sqld.url}?x=1`, 'query parameter the libSQL client does not take ("x")'],
      [`${sqld.url}?tls=yes`, "tls parameter that is not 0 or 1"],
      [`${sqld.url}?authToken=SECRET-JWT`, "must not carry a token as ?authToken="],
      ["ftp://central", "must be an http://"],
    ] as const) {
      const r = await runCli(["agents", "--central", url, ...config]);
      expect({ url, code: r.code, says: r.stderr.includes(says) }).toEqual({ url, code: 2, says: true });
      expect(r.stderr).not.toContain("SECRET");
    }
    const serve = await runCli(["central", "--url", `${sqld.url}?x=1`, ...config]);
    expect([serve.code, serve.stderr.includes("--url ")]).toEqual([2, true]);
    // tls=0, the client's own parameter, is taken.
    expect((await runCli(["agents", "--central", `${sqld.url}?tls=0`, "--fleet", "north", ...config])).code).toBe(0);
  });

  test("episodes page with --before: a full page ends with `more: --before MS`; the next goes on", async () => {
    expect(northA).toHaveLength(5);
    const seen: string[] = [];
    let before: string[] = [];
    for (let page = 0; page < 4; page++) {
      const r = await central("episodes", "t/a", "--fleet", "north", "--limit", "2", "--json", ...before);
      expect(r.code).toBe(0);
      const out = r.json as { episodes: { id: string }[]; next_before: number | null };
      seen.push(...out.episodes.map((e) => e.id));
      if (out.next_before === null) break;
      before = ["--before", String(out.next_before)];
    }
    expect(seen).toEqual(northA);
    const human = await central("episodes", "t/a", "--fleet", "north", "--limit", "2");
    expect(human.stdout).toMatch(/more: --before \d+/);
  });

  test("show takes a unique id prefix of at least 4 characters, as locally; an ambiguous one is refused", async () => {
    const id = northA[0]!;
    const r = await central("show", id.slice(0, 30));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`episode    ${id}`);
    // UUIDv7 ids minted together share their first characters.
    const ambiguous = await central("show", id.slice(0, 4));
    expect(ambiguous.code).toBe(1);
    expect(ambiguous.stderr).toContain(`more than one episode starts with ${id.slice(0, 4)}`);
    const none = await central("show", "ffffffff");
    expect(none.code).toBe(1);
    expect(none.stderr).toContain("no episode starts with ffffffff");
  });

  test("new shard 3/3 never reported: agents and verify say its agents are missing; no bare OK", async () => {
    const line =
      "fleet plant: layout of 3 shards: shard 3/3 has not reported yet; its agents are missing from this view";
    const agents = await central("agents", "--fleet", "plant");
    expect(agents.code).toBe(0);
    expect(agents.stdout).toContain("3 agent(s)");
    expect(agents.stdout).toContain(line);
    const verify = await central("verify", "--fleet", "plant");
    expect(verify.code).toBe(0);
    expect(verify.stdout).not.toContain(": OK");
    expect(verify.stdout).toContain("INCOMPLETE");
    expect(verify.stdout).toContain(line);
    const json = await central("verify", "--json");
    expect((json.json as { incomplete: unknown }).incomplete).toEqual([
      { fleet: "plant", shards: 3, missing: ["3/3"] },
    ]);
    // One shard read on its own, and a whole fleet, are complete.
    expect((await central("verify", "--fleet", "plant-shard-1-of-3")).stdout).toContain(": OK");
    const north = await central("verify", "--fleet", "north");
    expect([north.code, north.stdout.includes(": OK"), north.stdout.includes("warning")]).toEqual([0, true, false]);
  });
});

describe("fleet central: the JSON API", () => {
  test("bad query values and bad paths are 400 naming what is wrong; errors carry a code", async () => {
    const gw = gateways.get("north")!;
    for (const q of ["limit=abc", "limit=1e2", "limit=0", "offset=-1"]) {
      const r = await api(`/api/fleets/${gw}/agents?${q}`);
      expect({ q, status: r.status, code: (r.body.error as { code: string }).code }).toEqual({
        q,
        status: 400,
        code: "bad_query",
      });
      expect((r.body.error as { message: string }).message).toContain(q.split("=")[0]!);
    }
    expect((await api(`/api/fleets/${gw}/agents/t/a/episodes?before=yesterday`)).status).toBe(400);
    for (const path of ["/api/fleets/%E0%A4%A/agents", "/api/episodes/%"]) {
      const r = await api(path);
      expect({ path, status: r.status, code: (r.body.error as { code: string }).code }).toEqual({
        path,
        status: 400,
        code: "bad_request",
      });
    }
    const nosuch = await api("/api/fleets/nosuch/agents");
    expect(nosuch.status).toBe(404);
    expect(nosuch.body.error).toEqual({
      code: "not_found",
      message: 'no fleet or gateway "nosuch" in the central database',
    });
    expect((await api("/api/fleets/nosuch/audit")).status).toBe(404);
    expect(((await api("/api/nothing")).body.error as { code: string }).code).toBe("not_found");
  });

  test("agents show as idle, as the gateway's API shows them, in the counts and the list", async () => {
    const fleets = (await api("/api/fleets")).body.fleets as { fleet: string; agents: Record<string, number> }[];
    expect(fleets.find((f) => f.fleet === "north")!.agents).toEqual({ idle: 2 });
    const list = (await api(`/api/fleets/north/agents?status=idle`)).body as {
      agents: { status: string }[];
      total: number;
    };
    expect([list.total, ...list.agents.map((a) => a.status)]).toEqual([2, "idle", "idle"]);
  });

  test("episodes page with next_before; an episode is found by a unique prefix, an ambiguous one is 409", async () => {
    const seen: string[] = [];
    let next: number | null = null;
    for (let page = 0; page < 4; page++) {
      const q: string = next === null ? "" : `&before=${next}`;
      const r = await api(`/api/fleets/north/agents/t/a/episodes?limit=2${q}`);
      expect(r.status).toBe(200);
      seen.push(...(r.body.episodes as { id: string }[]).map((e) => e.id));
      next = (r.body.next_before as number | null | undefined) ?? null;
      if (next === null) break;
    }
    expect(seen).toEqual(northA);
    const one = await api(`/api/episodes/${northA[1]!.slice(0, 30)}`);
    expect([one.status, (one.body.episode as { id: string }).id]).toEqual([200, northA[1]!]);
    const ambiguous = await api(`/api/episodes/${northA[1]!.slice(0, 4)}`);
    expect([ambiguous.status, (ambiguous.body.error as { code: string }).code]).toEqual([409, "ambiguous"]);
  });

  test("a fleet whose newest layout misses a shard says which, in /api/fleets and in its agents", async () => {
    const gap = [{ fleet: "plant", shards: 3, missing: ["3/3"] }];
    expect((await api("/api/fleets")).body.incomplete).toEqual(gap);
    const plant = await api("/api/fleets/plant/agents");
    expect([plant.body.total, plant.body.incomplete]).toEqual([3, gap]);
    expect((await api(`/api/fleets/${gateways.get("north")!}/agents`)).body.incomplete).toEqual([]);
  });
});

/** Every page of `path` (a `?limit=` query) by next_before: the rows of each, in order, and the cursors handed out. */
async function pages<R>(path: string, rows: string): Promise<{ seen: R[]; cursors: unknown[] }> {
  const seen: R[] = [];
  const cursors: unknown[] = [];
  let next: unknown = null;
  for (let page = 0; page < 20; page++) {
    const r = await api(`${path}${next === null ? "" : `&before=${encodeURIComponent(String(next))}`}`);
    expect(r.status).toBe(200);
    seen.push(...(r.body[rows] as R[]));
    next = r.body.next_before ?? null;
    if (next === null) return { seen, cursors };
    cursors.push(next);
  }
  throw new Error(`${path}: more than 20 pages`);
}

/** A record as these tests tell them apart: which gateway's which seq. */
const place = (r: { gateway: string; seq: number }) => `${r.gateway}#${r.seq}`;

describe("paging a read of several gateways (two gateways named plant-7)", () => {
  test("audit: each page size walks every record once, newest first; a SEQ still pages one gateway", async () => {
    const all = (await api("/api/fleets/plant-7/audit?limit=100")).body.records as {
      gateway: string;
      seq: number;
      at: number;
    }[];
    const want = plant7.flatMap((gw, i) => PLANT7_AUDIT[i]!.map((_, s) => `${gw}#${s + 1}`));
    expect(all.map(place).sort()).toEqual(want.sort());
    expect(all.map((r) => r.at)).toEqual(all.map((r) => r.at).sort((a, b) => b - a));
    for (const limit of [1, 2, 3, 4]) {
      const { seen, cursors } = await pages<{ gateway: string; seq: number }>(
        `/api/fleets/plant-7/audit?limit=${limit}`,
        "records",
      );
      expect({ limit, seen: seen.map(place) }).toEqual({ limit, seen: all.map(place) });
      for (const c of cursors) expect(typeof c).toBe("string");
    }
    // Every fleet at once pages the same way.
    const everyAll = (await api("/api/audit?limit=100")).body.records as { gateway: string; seq: number }[];
    expect(everyAll.length).toBeGreaterThan(all.length); // the twins' records too
    const everyFleet = (await pages<{ gateway: string; seq: number }>("/api/audit?limit=2", "records")).seen;
    expect(everyFleet.map(place)).toEqual(everyAll.map(place));
    // One gateway: its log in seq order, paged by a plain SEQ as before.
    const one = await pages<{ seq: number }>(`/api/fleets/${plant7[0]}/audit?limit=2`, "records");
    expect([one.seen.map((r) => r.seq), one.cursors]).toEqual([[3, 2, 1], [2]]);
    // A SEQ on a read of both is refused, saying why and what to do.
    const refused = await api("/api/fleets/plant-7/audit?limit=2&before=2");
    expect([refused.status, (refused.body.error as { code: string }).code]).toEqual([400, "bad_query"]);
    expect((refused.body.error as { message: string }).message).toContain('"plant-7" covers 2 gateways');
    expect((await api("/api/fleets/plant-7/audit?before=12:x")).status).toBe(400);
  });

  test("episodes that start in the same millisecond on both gateways are all paged; a plain MS bounds", async () => {
    const all = (await api("/api/fleets/plant-7/agents/t/x/episodes?limit=100")).body.episodes as {
      id: string;
      gateway: string;
      startedAt: number;
    }[];
    expect(all).toHaveLength(10);
    const key = (e: { id: string; gateway: string }) => `${e.gateway}/${e.id}`;
    expect(new Set(all.map(key)).size).toBe(10);
    for (const limit of [1, 2, 3]) {
      const { seen } = await pages<{ id: string; gateway: string }>(
        `/api/fleets/plant-7/agents/t/x/episodes?limit=${limit}`,
        "episodes",
      );
      expect({ limit, seen: seen.map(key) }).toEqual({ limit, seen: all.map(key) });
    }
    const bound = all[4]!.startedAt; // the third start time: two episodes on each gateway started before it
    const older = (await api(`/api/fleets/plant-7/agents/t/x/episodes?before=${bound}`)).body.episodes as {
      startedAt: number;
    }[];
    expect(older.map((e) => e.startedAt)).toEqual(all.filter((e) => e.startedAt < bound).map((e) => e.startedAt));
    expect(older).toHaveLength(4);
    // One gateway pages by start time, as before.
    const one = await api(`/api/fleets/${plant7[1]}/agents/t/x/episodes?limit=2`);
    expect(typeof one.body.next_before).toBe("number");
  });

  test("fleet audit|episodes --central --fleet plant-7 page on with the --before a full page ends with", async () => {
    const walk = async (args: string[], rows: string) => {
      const seen: string[] = [];
      let before: string[] = [];
      for (let page = 0; page < 10; page++) {
        const r = await central(...args, "--fleet", "plant-7", "--limit", "2", "--json", ...before);
        expect(r.code).toBe(0);
        const out = r.json as Record<string, unknown>;
        seen.push(
          ...(out[rows] as { gateway: string; seq?: number; id?: string }[]).map(
            (x) => `${x.gateway}#${x.seq ?? x.id}`,
          ),
        );
        if (out.next_before === null) return seen;
        before = ["--before", String(out.next_before)];
      }
      throw new Error("more than 10 pages");
    };
    const audit = await walk(["audit"], "records");
    expect(audit).toEqual(
      ((await api("/api/fleets/plant-7/audit")).body.records as { gateway: string; seq: number }[]).map(place),
    );
    expect(audit).toHaveLength(5);
    expect(await walk(["episodes", "t/x"], "episodes")).toHaveLength(10);
    const human = await central("audit", "--fleet", "plant-7", "--limit", "2");
    expect(human.stdout).toMatch(/more: --before \d+:\S+:\d+/);
    const refused = await central("audit", "--fleet", "plant-7", "--limit", "2", "--before", "2");
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain('"plant-7" covers 2 gateways');
    const one = await central("audit", "--fleet", plant7[0]!, "--limit", "2", "--before", "2", "--json");
    expect((one.json as { records: { seq: number }[] }).records.map((r) => r.seq)).toEqual([1]);
  }, 120_000);
});

describe("fleet central: where it listens", () => {
  test("127.0.0.0/8 and ::1 are loopback; an IPv6 address is printed in brackets", () => {
    for (const h of ["127.0.0.1", "127.0.0.2", "127.255.0.9", "::1", "[::1]", "localhost"])
      expect(isLoopback(h)).toBe(true);
    for (const h of ["0.0.0.0", "10.0.0.1", "128.0.0.1", "::", "127.0.0.256", "example.com"])
      expect(isLoopback(h)).toBe(false);
    expect(serverUrl("::1", 58101)).toBe("http://[::1]:58101");
    expect(serverUrl("127.0.0.1", 8090)).toBe("http://127.0.0.1:8090");
  });

  test("with a token: the page loads without one, with its security headers; every /api call needs it", async () => {
    const s = startCentralServer({ reader, port: 0, token: "s3cret" });
    try {
      const page = await fetch(`${s.url}/`);
      expect(page.status).toBe(200);
      expect(page.headers.get("x-frame-options")).toBe("DENY");
      expect(page.headers.get("x-content-type-options")).toBe("nosniff");
      expect(page.headers.get("cache-control")).toBe("no-store");
      const csp = page.headers.get("content-security-policy") ?? "";
      for (const d of ["default-src 'none'", "connect-src 'self'", "form-action 'none'", "frame-ancestors 'none'"])
        expect(csp).toContain(d);
      expect(csp).not.toContain("unsafe");
      // Only the page's own inline style and script may run: the CSP names them by their hashes.
      const html = await page.text();
      const hash = (tag: string) => {
        const text = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(html)![1]!;
        return `'sha256-${createHash("sha256").update(text).digest("base64")}'`;
      };
      expect(csp).toContain(`script-src ${hash("script")};`);
      expect(csp).toContain(`style-src ${hash("style")};`);
      const call = async (authorization?: string) => {
        const res = await fetch(`${s.url}/api/fleets`, { headers: authorization ? { authorization } : {} });
        return [res.status, res.status === 401 ? ((await res.json()) as { error: unknown }).error : null];
      };
      expect(await call()).toEqual([401, { code: "unauthorized", message: "bearer token required" }]);
      expect(await call("Bearer wrong")).toEqual([401, { code: "unauthorized", message: "bearer token refused" }]);
      expect(await call("Bearer s3cret")).toEqual([200, null]);
    } finally {
      s.stop();
    }
  });

  test("--host 127.0.0.2 serves without a token; off loopback it needs one", async () => {
    const s = startCentralServer({ reader, host: "127.0.0.2", port: 0 });
    try {
      expect(s.url).toMatch(/^http:\/\/127\.0\.0\.2:\d+$/);
      expect((await fetch(`${s.url}/api/fleets`)).status).toBe(200);
    } finally {
      s.stop();
    }
    expect(() => startCentralServer({ reader, host: "0.0.0.0", port: 0 })).toThrow("FLEET_CENTRAL_API_TOKEN");
  });
});

describe("a center that stops answering", () => {
  test("a central read fails after its timeout, naming the server, instead of hanging", async () => {
    // Accepts connections and never answers: a frozen sqld, or a dead peer behind a live proxy.
    const frozen = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      const started = Date.now();
      const err = await CentralReader.open(`http://127.0.0.1:${frozen.port}`, undefined, { timeoutMs: 300 }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(CentralError);
      expect((err as Error).message).toBe(`central server http://127.0.0.1:${frozen.port} did not answer within 0.3 s`);
      expect(Date.now() - started).toBeLessThan(20_000);
    } finally {
      frozen.stop(true);
    }
  });
});
