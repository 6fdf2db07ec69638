/**
 * Helpers for the stimulus-source end-to-end tests (test/e2e.sources.test.ts), on top of the
 * shared gateway harness (test/helpers/gateway.ts): fixture paths, read-only queries over
 * the fleet's libSQL file (committed episodes with their stimulus kind and emitted data,
 * timer fires, the timer meta row), the HTTP API, and small counting utilities.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { idOfSql, specOfSql, STATUS_COMMITTED } from "../../gateway/store/index.ts";
import { ROOT, waitFor, type TestFleet } from "./gateway.ts";

/** Absolute path of a fixture agent of these tests (world-readable: episodes run as other uids). */
export const sourceAgent = (name: "recorder" | "recorder-v2" | "relay"): string =>
  join(ROOT, "test/fixtures/sources", `${name}.ts`);

/** What the recorder fixtures emit once per episode. */
export interface Emitted {
  readonly module: "recorder" | "recorder-v2";
  readonly tag: string | null;
  readonly count: number;
  readonly kind: string;
  readonly id: string;
  readonly topic: string | null;
  readonly payload: any;
}

/** A committed episode joined with its stimulus and its first emitted value. */
export interface CommittedEpisode {
  readonly id: string;
  readonly agent: string;
  readonly sid: string;
  readonly kind: string;
  readonly spec_version: string;
  readonly started_at: number;
  readonly ended_at: number;
  readonly emit: Emitted | null;
}

/** Committed episodes (optionally of one agent), oldest first, straight from the store. */
export async function committed(f: TestFleet, agent?: string): Promise<CommittedEpisode[]> {
  const rows = await f.query<{
    id: string;
    agent: string;
    sid: string;
    kind: string;
    spec_version: string;
    started_at: number;
    ended_at: number;
    emit: string | null;
  }>(
    `SELECT ${idOfSql("e.id")} AS id, e.agent, e.stimulus_id AS sid, s.kind,
            ${specOfSql("e.spec_version")} AS spec_version,
            e.started_at, e.ended_at,
            (SELECT v.data FROM events v WHERE v.episode = e.id AND v.kind = 'emit' ORDER BY v.seq LIMIT 1) AS emit
       FROM episodes e JOIN stimuli s ON s.seq = e.stimulus_seq
      WHERE e.status = ${STATUS_COMMITTED} ${agent ? "AND e.agent = ?" : ""}
      ORDER BY e.started_at, e.id`,
    agent ? [agent] : [],
  );
  return rows.map((r) => ({
    ...r,
    started_at: Number(r.started_at),
    ended_at: Number(r.ended_at),
    emit: r.emit === null ? null : ((JSON.parse(r.emit) as { data: Emitted }).data ?? null),
  }));
}

/** Wait (bounded) until `agent` has at least `n` committed episodes matching `pred`. */
export async function waitCommitted(
  f: TestFleet,
  agent: string,
  n: number,
  timeoutMs = 20_000,
  pred: (e: CommittedEpisode) => boolean = () => true,
): Promise<CommittedEpisode[]> {
  let seen = 0;
  try {
    return await waitFor(
      async () => {
        const eps = (await committed(f, agent)).filter(pred);
        seen = eps.length;
        return eps.length >= n ? eps : undefined;
      },
      timeoutMs,
      `${n} committed episode(s) of ${agent}`,
      50,
    );
  } catch (err) {
    throw new Error(`${(err as Error).message}; saw ${seen}\n${f.logTail(15)}`);
  }
}

/** Scheduled times (ms) of the timer fires recorded for an agent, ascending. */
export async function timerFires(f: TestFleet, agent: string): Promise<number[]> {
  const rows = await f.query<{ sid: string }>(
    "SELECT sid FROM stimuli WHERE agent = ? AND kind = 'timer' ORDER BY sid",
    [agent],
  );
  return rows.map((r) => Number(r.sid.slice("timer:".length))).sort((a, b) => a - b);
}

/** Scheduled times (ms) of the timer fires recorded for each of `agents`, read in one query (one snapshot). */
export async function timerFiresOf(f: TestFleet, agents: readonly string[]): Promise<Map<string, number[]>> {
  const rows = await f.query<{ agent: string; sid: string }>(
    `SELECT agent, sid FROM stimuli WHERE kind = 'timer' AND agent IN (${agents.map(() => "?").join(",")})`,
    [...agents],
  );
  const out = new Map(agents.map((a) => [a, [] as number[]]));
  for (const r of rows) out.get(r.agent)!.push(Number(r.sid.slice("timer:".length)));
  for (const fires of out.values()) fires.sort((a, b) => a - b);
  return out;
}

/** Payloads of an agent's timer stimuli by scheduled time. */
export async function timerPayloads(
  f: TestFleet,
  agent: string,
): Promise<{ sid: string; received_at: number; payload: { scheduled_at: number; fired_at: number } }[]> {
  const rows = await f.query<{ sid: string; received_at: number; payload: ArrayBuffer }>(
    "SELECT sid, received_at, payload FROM stimuli WHERE agent = ? AND kind = 'timer' ORDER BY seq",
    [agent],
  );
  return rows.map((r) => ({
    sid: r.sid,
    received_at: Number(r.received_at),
    payload: JSON.parse(new TextDecoder().decode(r.payload)),
  }));
}

/** The durable "last fire handled" of a timer type, or null. */
export async function lastFireMeta(f: TestFleet, type: string): Promise<number | null> {
  const rows = await f.query<{ value: string }>("SELECT value FROM meta WHERE key = ?", [`timer:${type}`]);
  return rows[0] ? Number(rows[0].value) : null;
}

/** Stimuli still waiting (state queued), fleet-wide or for one agent. */
export async function queuedCount(f: TestFleet, agent?: string): Promise<number> {
  const rows = await f.query<{ n: number }>(
    `SELECT count(*) AS n FROM stimuli WHERE state = 'queued' ${agent ? "AND agent = ?" : ""}`,
    agent ? [agent] : [],
  );
  return Number(rows[0]?.n ?? 0);
}

/** Every value that occurs more than once. */
export function duplicatesOf<T>(values: readonly T[]): T[] {
  const seen = new Map<T, number>();
  for (const v of values) seen.set(v, (seen.get(v) ?? 0) + 1);
  return [...seen].filter(([, n]) => n > 1).map(([v]) => v);
}

/** Gaps in a sorted list of interval-aligned times: the missing multiples of `step` between first and last. */
export function gapsIn(sorted: readonly number[], step: number): number[] {
  const out: number[] = [];
  for (let i = 1; i < sorted.length; i++) for (let t = sorted[i - 1]! + step; t < sorted[i]!; t += step) out.push(t);
  return out;
}

/** An HTTP answer from the gateway. */
export interface ApiResponse {
  readonly status: number;
  readonly body: any;
}

/** Call the running gateway's HTTP API; the body is parsed when it is JSON. */
export async function api(f: TestFleet, path: string, init: RequestInit = {}): Promise<ApiResponse> {
  const res = await f.fetch(path, init);
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, body };
}

/** POST a manual stimulus to an agent (JSON body, optional Idempotency-Key). */
export function postStimulus(
  f: TestFleet,
  agent: string,
  payload: unknown,
  idempotencyKey?: string,
): Promise<ApiResponse> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
  return api(f, `/api/agents/${agent}/stimuli`, { method: "POST", headers, body: JSON.stringify(payload) });
}

/** The agent as GET /api/agents/<type>/<key> shows it, or null on 404. */
export async function agentInfo(
  f: TestFleet,
  agent: string,
): Promise<{ status: string; reason: string | null; queued: number; episodes: number } | null> {
  const r = await api(f, `/api/agents/${agent}`);
  return r.status === 200 ? r.body : null;
}

/** Poll until `probe` holds; resolves with the elapsed ms since `since` (for "takes effect within" checks). */
export async function msUntil(
  since: number,
  probe: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<number> {
  await waitFor(async () => (await probe()) || undefined, timeoutMs, what, 25);
  return Date.now() - since;
}

/** Gateway log lines (JSON) written since the last `---- start` marker, i.e. by the running gateway. */
export function currentLog(f: TestFleet): Record<string, any>[] {
  let text = "";
  try {
    text = readFileSync(f.logPath, "utf8");
  } catch {
    return [];
  }
  const start = text.lastIndexOf("---- start");
  return text
    .slice(Math.max(start, 0))
    .split("\n")
    .flatMap((line) => {
      if (!line.startsWith("{")) return [];
      try {
        return [JSON.parse(line) as Record<string, any>];
      } catch {
        return [];
      }
    });
}

/** Sleep until `offsetMs` after the next multiple of `stepMs` (aligns a restart to a timer window). */
export async function sleepToWindow(stepMs: number, offsetMs: number): Promise<void> {
  const now = Date.now();
  let at = Math.floor(now / stepMs) * stepMs + offsetMs;
  if (at <= now) at += stepMs;
  await Bun.sleep(at - now);
}

/**
 * "No further episode", proven without sleeping: send `agent` a sentinel (a manual stimulus)
 * and wait for its episode. An agent runs its stimuli one at a time in FIFO order, so when the
 * sentinel's episode has committed, anything recorded before it (a duplicate that slipped
 * through dedup) has run too. Returns the agent's committed episodes before the sentinel's,
 * oldest first; the sentinel's own episode is left out.
 */
export async function committedBeforeSentinel(f: TestFleet, agent: string): Promise<CommittedEpisode[]> {
  const res = await postStimulus(f, agent, { sentinel: true }, `sentinel-${Bun.randomUUIDv7()}`);
  if (res.status !== 202) throw new Error(`sentinel for ${agent} refused: ${res.status} ${JSON.stringify(res.body)}`);
  const sid = (res.body as { stimulus: string }).stimulus;
  await waitCommitted(f, agent, 1, 20_000, (e) => e.sid === sid);
  const all = await committed(f, agent);
  return all.slice(
    0,
    all.findIndex((e) => e.sid === sid),
  );
}
