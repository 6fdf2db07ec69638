/**
 * Intake's writes (Store.intake): the stimuli recorded in one turn of the event loop share one
 * transaction, one job of the group committer, as multi-row INSERTs; an agent seen for the first time
 * gets its row in the same transaction. Each call hears its outcomes (a seq, or null for a duplicate)
 * when the transaction commits and again once it is durable.
 */
import type { InValue, ResultSet } from "@libsql/client";
import type { GroupCommitter, RawStatement } from "./db.ts";
import { chunks } from "./sql.ts";
import type { AgentId, NewStimulus } from "../types.ts";

/**
 * Stimuli go in as multi-row INSERTs of these sizes, largest first (65 rows: 64 + 1): per row,
 * one statement of 64 costs SQLite less than 64 of one (AUTOINCREMENT reads and writes
 * `sqlite_sequence` once per statement) and the gateway's thread fewer calls into the driver,
 * and a few sizes keep the statement cache small.
 */
const STIMULUS_ROWS = [64, 16, 4, 1] as const;
const insertStimuli = new Map(
  STIMULUS_ROWS.map((n) => [
    n,
    "INSERT INTO stimuli (agent, sid, kind, topic, payload, received_at, expires_at, traceparent) VALUES " +
      Array.from({ length: n }, () => "(?,?,?,?,?,?,?,?)").join(",") +
      " ON CONFLICT DO NOTHING",
  ]),
);
/**
 * Run right after an insert that left rows out (`changes()` below the run's length: a duplicate
 * `(agent, sid)`): the seqs the insert can have used, at most one per row of the run, ending at its
 * last inserted row, `last_insert_rowid()`. The range is the run's length, not `changes()`, because
 * a duplicate can use up a seq (AUTOINCREMENT numbers a row before its conflict is found). A run
 * with no duplicate needs no read, and skips it: its rows are the run, in order, numbered one after
 * another up to `last_insert_rowid()` (nothing else writes in between).
 */
const INSERTED_STIMULI =
  "SELECT seq, agent, sid FROM stimuli WHERE seq > last_insert_rowid() - ?1 AND seq <= last_insert_rowid()";

/**
 * The seq of each stimulus of `runs`, in order, or null for a duplicate, from the results of the
 * statements built for them: the highest seq before, then per run its insert and its read.
 */
function insertedSeqs(runs: readonly (readonly NewStimulus[])[], results: readonly ResultSet[]): (number | null)[] {
  const inserts = runs.map((_, r) => results[1 + 2 * r]!);
  const full = (r: number) => inserts[r]!.rowsAffected === runs[r]!.length;
  // The seq of the i-th row of full run r: numbered one after another up to its last.
  const seqInFull = (r: number, i: number) => Number(inserts[r]!.lastInsertRowid) - (runs[r]!.length - 1 - i);
  if (runs.every((_, r) => full(r))) return runs.flatMap((run, r) => run.map((_, i) => seqInFull(r, i)));
  // Rows this transaction inserted, by (agent, sid): the full runs' own, and what the reads after the
  // others found above the seq before (a read may also see a row of an earlier run: the same fact).
  const floor = Number(results[0]!.rows[0]![0]);
  const key = (agent: unknown, sid: unknown) => `${String(agent)}\n${String(sid)}`;
  const inserted = new Map<string, number>();
  for (const [r, run] of runs.entries()) {
    if (full(r)) for (const [i, s] of run.entries()) inserted.set(key(s.agent, s.sid), seqInFull(r, i));
    else
      for (const row of results[2 + 2 * r]!.rows)
        if (Number(row[0]) > floor) inserted.set(key(row[1], row[2]), Number(row[0]));
  }
  return runs.flat().map((s) => {
    const k = key(s.agent, s.sid);
    const seq = inserted.get(k) ?? null;
    inserted.delete(k); // the first of two equal stimuli got the row
    return seq;
  });
}

/** `rows` in runs of the sizes of `STIMULUS_ROWS`, largest first. */
function stimulusRuns<T>(rows: readonly T[]): T[][] {
  const out: T[][] = [];
  let i = 0;
  for (const n of STIMULUS_ROWS) for (; rows.length - i >= n; i += n) out.push(rows.slice(i, i + n));
  return out;
}

/** Result of recording one stimulus: `seq` null means it was a duplicate. */
export interface IntakeOutcome {
  readonly agent: AgentId;
  readonly sid: string;
  readonly seq: number | null;
  readonly receivedAt: number;
}

/** A call waiting for its transaction. */
interface PendingIntake {
  readonly items: readonly NewStimulus[];
  readonly resolve: (o: IntakeOutcome[]) => void;
  readonly reject: (e: unknown) => void;
  readonly committed: ((o: IntakeOutcome[]) => void) | undefined;
}

/** The transactions intake's calls share; one per store. */
export class IntakeBatches {
  private pending: PendingIntake[] = [];
  /** Agents known to have a row: their INSERT OR IGNORE can be skipped. */
  private readonly knownAgents = new Set<string>();

  constructor(
    private readonly writer: GroupCommitter,
    /** Stamped on the agents rows first sight creates. */
    private readonly gatewayId: string,
  ) {}

  /** Record `items` with the other calls of this turn of the event loop (Store.intake). */
  add(items: readonly NewStimulus[], committed?: (outcomes: IntakeOutcome[]) => void): Promise<IntakeOutcome[]> {
    if (items.length === 0) {
      committed?.([]);
      return Promise.resolve([]);
    }
    return new Promise((resolve, reject) => {
      this.pending.push({ items, resolve, reject, committed });
      if (this.pending.length === 1) setImmediate(() => void this.flush());
    });
  }

  /** Write whatever waits (the store closes). */
  async drain(): Promise<void> {
    while (this.pending.length > 0) await this.flush();
  }

  /**
   * Past this many stimuli in one flush, the stimuli of agents already in it wait for the next
   * transaction, and agents not yet in it still go: a flood (thousands of QoS 1 messages in flight
   * for one agent) does not hold back another agent's acknowledgement behind a transaction of all
   * of them. Each agent's stimuli keep their order.
   *
   * At 100 (`bun scripts/bench-onset.ts`, 15 bursts of 5,000 QoS 1 messages to a paused agent, quiet
   * agents pinged throughout, two alternating pairs): the quiet pings sent during a burst took 60 and
   * 47 ms at p50 (171 and 139 at p90) against 93 and 90 (233 and 197) at 1,000, but the bursts were
   * acknowledged in 507 and 444 ms against 322 and 286: each transaction waits for the WAL sync of
   * the one before, so ten times as many cost devices ~40% of the intake rate. At 300: 72 and 91 ms
   * against 87 and 101, acknowledged in 354 and 417 ms against 282 and 296. 1,000 stays. (Flushing the
   * next transaction while the WAL syncs instead of after, GroupCommitter.schedule: 67 and 93 ms against
   * 82 and 101, within the spread.)
   */
  static readonly ROWS_PER_FLUSH = 1000;

  private async flush(): Promise<void> {
    const calls: PendingIntake[] = [];
    const deferred: PendingIntake[] = [];
    const taken = new Set<string>();
    const waiting = new Set<string>();
    let rows = 0;
    for (const c of this.pending) {
      const full = rows + c.items.length > IntakeBatches.ROWS_PER_FLUSH && calls.length > 0;
      if (c.items.some((s) => waiting.has(s.agent) || (full && taken.has(s.agent)))) {
        deferred.push(c);
        for (const s of c.items) waiting.add(s.agent);
      } else {
        calls.push(c);
        rows += c.items.length;
        for (const s of c.items) taken.add(s.agent);
      }
    }
    this.pending = deferred;
    if (calls.length === 0) return;
    const all = calls.flatMap((c) => c.items);
    const fresh = new Map<string, NewStimulus>();
    for (const s of all) if (!this.knownAgents.has(s.agent) && !fresh.has(s.agent)) fresh.set(s.agent, s);
    const stmts: RawStatement[] = [];
    for (const part of chunks([...fresh.values()])) {
      stmts.push({
        sql:
          `INSERT INTO agents (id, type, key, gateway, created_at, updated_at) ` +
          `VALUES ${part.map(() => "(?,?,?,?,?,?)").join(",")} ON CONFLICT DO NOTHING`,
        args: part.flatMap((s) => [s.agent, s.type, s.key, this.gatewayId, s.receivedAt, s.receivedAt]),
      });
    }
    // The highest seq before this transaction: a row above it is one this transaction inserted.
    const before = stmts.length;
    stmts.push({ sql: "SELECT coalesce(max(seq), 0) FROM stimuli", args: [] });
    const runs = stimulusRuns(all);
    for (const run of runs) {
      const args: InValue[] = [];
      for (const s of run)
        args.push(s.agent, s.sid, s.kind, s.topic, s.payload, s.receivedAt, s.expiresAt ?? null, s.traceparent ?? null);
      stmts.push(
        { sql: insertStimuli.get(run.length as (typeof STIMULUS_ROWS)[number])!, args },
        { sql: INSERTED_STIMULI, args: [run.length], when: (insert) => insert.rowsAffected < run.length },
      );
    }
    // Forwarded sends' hop counts: few, so a statement of their own instead of a column in every insert.
    const hops = all.filter((s) => typeof s.hops === "number");
    if (hops.length > 0)
      stmts.push({
        sql: `UPDATE stimuli SET hops = h.value ->> 2 FROM json_each(?) AS h
          WHERE stimuli.sid = h.value ->> 0 AND stimuli.agent = h.value ->> 1 AND stimuli.hops IS NULL`,
        args: [JSON.stringify(hops.map((s) => [s.sid, s.agent, s.hops]))],
      });
    // Each call's outcomes, from the results of the transaction they shared: a stimulus has the
    // seq its row was given; one whose (agent, sid) was there before, or earlier in the same
    // transaction, is a duplicate (the first of two equal stimuli got the row).
    let outcomes: IntakeOutcome[][] | null = null;
    const outcomesOf = (results: ResultSet[]): IntakeOutcome[][] => {
      if (outcomes) return outcomes;
      const seqs = insertedSeqs(runs, results.slice(before));
      let i = 0;
      outcomes = calls.map((c) =>
        c.items.map((s) => ({ agent: s.agent, sid: s.sid, seq: seqs[i++]!, receivedAt: s.receivedAt })),
      );
      for (const a of fresh.keys()) this.knownAgents.add(a);
      return outcomes;
    };
    try {
      const results = await this.writer.write(stmts, (results) => {
        const outcomes = outcomesOf(results);
        for (let i = 0; i < calls.length; i++) calls[i]!.committed?.(outcomes[i]!);
      });
      const outcomes = outcomesOf(results);
      for (let i = 0; i < calls.length; i++) calls[i]!.resolve(outcomes[i]!);
    } catch (err) {
      for (const c of calls) c.reject(err);
    } finally {
      // What waited goes in the next transaction, after this one (in the same one it would wait all the same).
      if (deferred.length > 0) setImmediate(() => void this.flush());
    }
  }
}
