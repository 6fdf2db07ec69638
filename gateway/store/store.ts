/**
 * The store: every durable fact of the fleet, in one libSQL file. Writes go through the
 * group committer; each method here is one atomic unit (an intake, an episode commit, a
 * failure), which is what the guarantees of docs/guarantees.md rest on. The per-episode paths (intake,
 * commit, failure, the per-turn reads) are raw SQL derived from the schema (./sql.ts,
 * ./episodes.ts); the rest goes through drizzle.
 */
import { and, asc, desc, eq, gt, inArray, isNull, lt, count, min, sql } from "drizzle-orm";
import type { Client, ResultSet } from "@libsql/client";
import { openDb, GroupCommitter, type Db, type OpenDbOptions, type SchemaUpgrade } from "./db.ts";
import * as t from "./schema.ts";
import {
  commitStatements,
  failureStatements,
  abortedStatements,
  sentStimuli,
  droppedWakeRuns,
  type EpisodeCommit,
  type EpisodeFailure,
  type EpisodeUsage,
  type SentStimulus,
} from "./episodes.ts";
import { chunks, codecs, decodeRow, selectAll, selectOne } from "./sql.ts";
import { IntakeBatches, type IntakeOutcome } from "./intake-batch.ts";
import { checkpointHashIs, hashFromDriver, hashToDriver, idFromDriver, knowBundle, knowSpecVersion } from "./hashes.ts";
import { type AgentId, type NewStimulus, sentBy, setBy } from "../types.ts";

export * as tables from "./schema.ts";
export type { Db, RawStatement, WriteItem, CommitFailureKind, CommitHealth } from "./db.ts";
export {
  commitFailureKind,
  commitFaultFromEnv,
  GroupCommitter,
  openDb,
  type SchemaUpgrade,
  WAL_SIZE_LIMIT,
  WalFile,
} from "./db.ts";
export type {
  AgentRow,
  StimulusRow,
  EpisodeRow,
  EventRow,
  CheckpointRow,
  OutboxRow,
  SpecVersionRow,
  AuditRow,
  StoredAgentStatus,
  RejectedMessageRow,
  RolloutRow,
  RolloutState,
} from "./schema.ts";
export type { EpisodeCommit, EpisodeFailure, EpisodeUsage } from "./episodes.ts";
export type { IntakeOutcome } from "./intake-batch.ts";

/** One agent's use of a budget window. */
export type UsageRow = typeof t.budgetUsage.$inferSelect;

/** Everything one scheduler turn reads about an agent, read at once. */
export interface TurnInputs {
  readonly agent: t.AgentRow | undefined;
  /** The oldest queued stimulus (the FIFO head). */
  readonly head: t.StimulusRow | undefined;
  /** Usage in the windows asked for. */
  readonly usage: readonly UsageRow[];
  /**
   * Until when an operator's resume overrides a budget pause (0: no override), and which budget
   * it lifts (null: any, as an override stored by an older release did).
   */
  readonly budgetOverride: { readonly budget: string | null; readonly until: number };
  /** The agent's head checkpoint, undefined when it has none or its row is missing. */
  readonly checkpoint: t.CheckpointRow | undefined;
  /** Ids of the agent's pending wake-ups, soonest first. */
  readonly pendingWakes: readonly string[];
  /**
   * The head is a `wake` stimulus whose wake-up was cancelled: the episode that cancelled it (null:
   * it was not). The clock may have read the wake-up as due just before that episode's commit and
   * recorded its stimulus just after; the turn drops it, so `cancelWake`'s true holds.
   */
  readonly headCancelledBy: string | null;
}

/** A wake-up as stored. */
export type WakeRow = typeof t.wakeups.$inferSelect;

/** Which agents' wake-ups a look at the table reads: one agent's, or all but some. */
export interface WakeFilter {
  readonly agent?: AgentId;
  readonly except?: readonly AgentId[];
}

const wakeFilterSql = (f: WakeFilter): string =>
  f.agent !== undefined ? "agent = ?" : f.except?.length ? "agent NOT IN (SELECT value FROM json_each(?))" : "true";
const wakeFilterArgs = (f: WakeFilter): string[] =>
  f.agent !== undefined ? [f.agent] : f.except?.length ? [JSON.stringify(f.except)] : [];

/** A message that could not become a stimulus, to be recorded with its reason. */
export interface NewRejected {
  readonly kind: t.RejectedMessageRow["kind"];
  readonly topic: string | null;
  readonly payload: Uint8Array;
  readonly client: string | null;
  readonly reason: string;
  readonly receivedAt: number;
}

/** A `wake` stimulus's cancelled wake-up: who cancelled it (`wake:<id>`; the column after the stimulus's own). */
const CANCELLED_BY = `CASE WHEN kind = 'wake' THEN (SELECT coalesce(w.done_by, '') FROM wakeups w
  WHERE w.id = substr(stimuli.sid, 6) AND w.agent = stimuli.agent AND w.state = 'cancelled') END`;

/** The CANCELLED_BY column of a head row, or null. */
function cancelledBy(row: Record<number, unknown> | undefined): string | null {
  const v = row?.[codecs.stimuli.cols.length];
  return v === null || v === undefined ? null : String(v);
}

/**
 * Agent `?2`'s queued timer fires among the seqs of `?1` (a JSON array), each looked up by its rowid:
 * through the index of `state` the planner chose before, it walked every queued stimulus of the
 * fleet, twice, inside the write transaction (~13 ms with 200,000 queued, when a backlog piles up fires).
 */
export const QUEUED_TIMERS_AMONG = `SELECT s.seq FROM json_each(?1) AS j CROSS JOIN stimuli AS s ON s.seq = j.value
  WHERE s.state = 'queued' AND s.agent = ?2 AND s.kind = 'timer'`;

/** The fleet's durable state. */
export class Store {
  private constructor(
    readonly client: Client,
    readonly db: Db,
    readonly writer: GroupCommitter,
    /** This gateway's id; stamped on every record for replication (docs/replication.md). */
    readonly gatewayId: string,
    readonly path: string,
    /**
     * False only on a read-only handle of a data dir an older release wrote (before migration 15):
     * counts are then read from the agents table itself.
     */
    private readonly hasCounts: boolean,
    /** The schema upgrade this open applied (`upgrade`: a gateway's start), else null. */
    readonly upgraded: SchemaUpgrade | null,
  ) {
    this.intakes = new IntakeBatches(writer, gatewayId);
  }

  /** Intake's shared transactions. */
  private readonly intakes: IntakeBatches;

  /**
   * Open the database file and load (or mint) the gateway id. A writable open creates a new database;
   * one an older release wrote is upgraded only with `upgrade`, else refused (`SchemaVersionError`).
   */
  static async open(path: string, opts: OpenDbOptions): Promise<Store> {
    const { client, db, native, upgraded } = await openDb(path, opts);
    let gatewayId = (await db.select().from(t.meta).where(eq(t.meta.key, "gateway_id")).get())?.value;
    if (!gatewayId && !opts.readonly) {
      gatewayId = Bun.randomUUIDv7();
      await db.insert(t.meta).values({ key: "gateway_id", value: gatewayId }).onConflictDoNothing();
      gatewayId = (await db.select().from(t.meta).where(eq(t.meta.key, "gateway_id")).get())!.value;
    }
    const counts = await client.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'agent_counts'");
    // Rows name a spec version by its hash's prefix (./hashes.ts `specColumn`): learn this dir's, oldest first.
    const specs = await client.execute("SELECT hash FROM spec_versions ORDER BY created_at, rowid");
    for (const r of specs.rows) knowSpecVersion(String(r[0]));
    // Episodes name their code bundle the same way (`bundleColumn`); a read-only handle of a data dir
    // an older release wrote may have no bundles table yet (its episodes name none).
    const hasBundles = await client.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bundles'");
    if (hasBundles.rows.length > 0) {
      const bundles = await client.execute("SELECT hash FROM bundles ORDER BY created_at, rowid");
      for (const r of bundles.rows) knowBundle(String(r[0]));
    }
    const committer = new GroupCommitter(
      native,
      opts.commitFault ?? null,
      Date.now,
      opts.synchronous === "full" && !opts.readonly ? { path: `${path}-wal`, sync: opts.walSync } : null,
    );
    return new Store(client, db, committer, gatewayId ?? "unknown", path, counts.rows.length > 0, upgraded);
  }

  /**
   * Run `read` on one state of the database: every statement it runs on this store sees what was
   * committed when its first one ran, whatever another process commits meanwhile (a read
   * transaction; in WAL mode it holds no lock a writer waits on). Only for a store that does not
   * write while `read` runs (a read-only handle, a copy being checked): this store's own commits
   * would land inside the transaction, or fail to begin. Not nested.
   */
  async readSnapshot<T>(read: () => Promise<T>): Promise<T> {
    await this.client.execute("BEGIN DEFERRED");
    let failed = false;
    try {
      return await read();
    } catch (err) {
      failed = true;
      throw err;
    } finally {
      // After a failed read the transaction may be gone already (SQLite ends it on some errors): the
      // read's error is the one to report, not that there was nothing to roll back.
      await this.client.execute("ROLLBACK").catch((err: unknown) => {
        if (!failed) throw err;
      });
    }
  }

  /** Flush pending writes and close the file. */
  async close(): Promise<void> {
    await this.intakes.drain();
    await this.writer.close();
    this.client.close();
  }

  // ---- meta ----------------------------------------------------------------------

  /** A durable fact of this data dir (e.g. a timer's last fire). */
  async getMeta(key: string): Promise<string | null> {
    return (await this.db.select().from(t.meta).where(eq(t.meta.key, key)).get())?.value ?? null;
  }

  async setMeta(key: string, value: string): Promise<void> {
    await this.writer.write([
      this.db.insert(t.meta).values({ key, value }).onConflictDoUpdate({ target: t.meta.key, set: { value } }),
    ]);
  }

  /**
   * Bytes of the database's free pages: what retention deleted, reused by the next writes before the file
   * grows (SQLite gives them back to the filesystem only on a VACUUM). The data disk's reserve counts them.
   */
  async freePageBytes(): Promise<number> {
    const [count, size] = await Promise.all([
      this.client.execute("PRAGMA freelist_count"),
      this.client.execute("PRAGMA page_size"),
    ]);
    return Number(count.rows[0]?.[0] ?? 0) * Number(size.rows[0]?.[0] ?? 0);
  }

  // ---- spec versions -------------------------------------------------------------

  /** Record an accepted spec version (idempotent by hash). */
  async saveSpecVersion(v: {
    hash: string;
    path: string;
    text: string;
    summary: string;
    at: number;
    /** Agent type -> bundle hash (gateway/code). */
    bundles?: Readonly<Record<string, string>>;
  }): Promise<void> {
    knowSpecVersion(v.hash);
    await this.writer.write([
      this.db
        .insert(t.specVersions)
        .values({
          hash: v.hash,
          gateway: this.gatewayId,
          path: v.path,
          text: v.text,
          summary: v.summary,
          createdAt: v.at,
          bundles: v.bundles && Object.keys(v.bundles).length > 0 ? JSON.stringify(v.bundles) : null,
        })
        .onConflictDoNothing(),
    ]);
  }

  // ---- code bundles ----------------------------------------------------------------

  /**
   * Store a bundle by its hash (idempotent), with the source map it was built with: a bundle stored
   * without one (by a release before migration 36) gets it now.
   */
  async saveBundle(b: { hash: string; module: string; code: string; at: number; map?: string | null }): Promise<void> {
    knowBundle(b.hash);
    await this.writer.write([
      this.db
        .insert(t.bundles)
        .values({
          hash: b.hash,
          gateway: this.gatewayId,
          module: b.module,
          code: b.code,
          bytes: Buffer.byteLength(b.code),
          createdAt: b.at,
          map: b.map ?? null,
        })
        .onConflictDoNothing(),
      ...(b.map ? [this.bundleMapStatement(b.hash, b.map)] : []),
    ]);
  }

  /** Keep `map` as the source map of stored bundle `hash` where it has none (a no-op for a bundle not stored). */
  async saveBundleMap(hash: string, map: string): Promise<void> {
    await this.writer.write([this.bundleMapStatement(hash, map)]);
  }

  private bundleMapStatement(hash: string, map: string) {
    return this.db
      .update(t.bundles)
      .set({ map })
      .where(and(eq(t.bundles.hash, hash), isNull(t.bundles.map)));
  }

  /** A stored bundle's source map (JSON), or null when it has none or is not stored. */
  async bundleMap(hash: string): Promise<string | null> {
    const row = await this.db.select({ map: t.bundles.map }).from(t.bundles).where(eq(t.bundles.hash, hash)).get();
    return row?.map ?? null;
  }

  /** The highest state version (`defineAgent({ version })`) of a head checkpoint of a `type` agent (1 at least). */
  async maxStateVersion(type: string): Promise<number> {
    const rs = await this.client.execute({
      sql: `SELECT max(c.state_version) AS v FROM agents a
        JOIN checkpoints c ON ${checkpointHashIs("c.hash", "a.head_hash")}
        WHERE a.type = ?`,
      args: [type],
    });
    return Number(rs.rows[0]?.v ?? 1) || 1;
  }

  /** A stored bundle's code, or null. */
  async bundleCode(hash: string): Promise<string | null> {
    const row = await this.db.select({ code: t.bundles.code }).from(t.bundles).where(eq(t.bundles.hash, hash)).get();
    return row?.code ?? null;
  }

  /** A stored bundle's description (no code), or undefined. */
  bundleInfo(hash: string) {
    return this.db
      .select({
        hash: t.bundles.hash,
        module: t.bundles.module,
        bytes: t.bundles.bytes,
        createdAt: t.bundles.createdAt,
      })
      .from(t.bundles)
      .where(eq(t.bundles.hash, hash))
      .get();
  }

  /** Spec versions, newest first. */
  listSpecVersions(limit = 50) {
    return this.db.select().from(t.specVersions).orderBy(desc(t.specVersions.createdAt)).limit(limit).all();
  }

  // ---- agents --------------------------------------------------------------------

  /**
   * Create agents that do not exist yet. One statement whatever the count (the rows travel as
   * one JSON text): a start with 100,000 instances re-checks them all in well under a second.
   */
  async ensureAgents(list: readonly { id: AgentId; type: string; key: string }[], at = Date.now()): Promise<void> {
    if (list.length === 0) return;
    await this.writer.write([
      {
        sql: `INSERT INTO agents (id, type, key, gateway, created_at, updated_at)
          SELECT value ->> 0, value ->> 1, value ->> 2, ?, ?, ? FROM json_each(?) WHERE true ON CONFLICT DO NOTHING`,
        args: [this.gatewayId, at, at, JSON.stringify(list.map((a) => [a.id, a.type, a.key]))],
      },
    ]);
  }

  /**
   * Every agent's id, status, reason and chain head, `limit` at a time after `after` (id order):
   * a keyset page, so walking 100,000 agents costs one index range per page, not an OFFSET scan.
   */
  async agentStatusPage(after: string, limit: number) {
    const rs = await this.client.execute({
      sql: "SELECT id, status, reason, head_hash FROM agents WHERE id > ? ORDER BY id LIMIT ?",
      args: [after, limit],
    });
    return rs.rows.map((r) => ({
      id: String(r[0]) as AgentId,
      status: String(r[1]) as t.StoredAgentStatus,
      reason: r[2] === null ? null : String(r[2]),
      headHash: r[3] === null ? null : hashFromDriver(r[3]),
    }));
  }

  /** Every agent's id and status, in one read (the queue book's load at start: 100,000 in about 0.1 s). */
  async agentStatuses(): Promise<{ id: AgentId; status: t.StoredAgentStatus }[]> {
    const rs = await this.client.execute("SELECT id, status FROM agents");
    return rs.rows.map((r) => ({ id: String(r[0]) as AgentId, status: String(r[1]) as t.StoredAgentStatus }));
  }

  /** One agent's row, or undefined. */
  getAgent(id: AgentId): Promise<t.AgentRow | undefined> {
    return selectOne(this.client, codecs.agents, "FROM agents WHERE id = ?", [id]);
  }

  /**
   * Agents, filtered and paged (server-side, for 10,000+ agents), in id order: `after` (the
   * last id of the previous page) reads from there on, else `offset` entries are skipped.
   */
  async listAgents(
    f: { type?: string; status?: string; q?: string; limit?: number; offset?: number; after?: string } = {},
  ) {
    // Raw SQL through the agents codec: drizzle's query building and row mapping cost more than
    // the query itself (~2 ms vs ~0.4 ms for a page of 50 of 100,000 agents).
    const conds: string[] = [];
    const args: (string | number)[] = [];
    const cond = (sql: string, arg: string) => {
      conds.push(sql);
      args.push(arg);
    };
    if (f.type) cond("type = ?", f.type);
    if (f.status) cond("status = ?", f.status);
    // Search is a substring match: escape LIKE's own wildcards so "_" and "%" mean themselves.
    if (f.q) cond("id LIKE ? ESCAPE '\\'", `%${f.q.replace(/[\\%_]/g, (c) => `\\${c}`)}%`);
    const where = conds.length ? `WHERE ${conds.join(" AND ")}` : "";
    // The page's ids first, skipping `offset` entries of an index (the primary key's, or the
    // filter's) rather than of whole rows: page 500 of 100,000 agents then costs ~1 ms, not ~10.
    // A keyset page (`after`) starts inside the primary key's index and skips nothing.
    const keyset = f.after === undefined ? "" : `${where ? " AND" : "WHERE"} id > ?`;
    const page = `SELECT id FROM agents ${where}${keyset} ORDER BY id LIMIT ? OFFSET ?`;
    const pageArgs = [...args, ...(f.after === undefined ? [] : [f.after])];
    pageArgs.push(f.limit ?? 100, f.after === undefined ? (f.offset ?? 0) : 0);
    const rows = await selectAll(this.client, codecs.agents, `FROM agents WHERE id IN (${page}) ORDER BY id`, pageArgs);
    // Without a search the total is a sum over agent_counts (a few rows), not a count of agents.
    const total = f.q
      ? Number((await this.client.execute({ sql: `SELECT count(*) FROM agents ${where}`, args })).rows[0]?.[0] ?? 0)
      : await this.countAgents(f.type, f.status as t.StoredAgentStatus | undefined);
    return { rows, total };
  }

  /** How many agents there are (of `type`, in `status`), from `agent_counts`. */
  async countAgents(type?: string, status?: t.StoredAgentStatus): Promise<number> {
    const conds = [this.hasCounts ? "n > 0" : "true"];
    const args: string[] = [];
    if (type) {
      conds.push("type = ?");
      args.push(type);
    }
    if (status) {
      conds.push("status = ?");
      args.push(status);
    }
    const rs = await this.client.execute({
      sql: this.hasCounts
        ? `SELECT coalesce(sum(n), 0) FROM agent_counts WHERE ${conds.join(" AND ")}`
        : `SELECT count(*) FROM agents WHERE ${conds.join(" AND ")}`,
      args,
    });
    return Number(rs.rows[0]?.[0] ?? 0);
  }

  /** Deployed (not retired or failed) agents of a type: the targets of its timer. */
  deployedOfType(type: string) {
    return this.db
      .select({ id: t.agents.id, key: t.agents.key })
      .from(t.agents)
      .where(and(eq(t.agents.type, type), inArray(t.agents.status, ["active", "paused"])))
      .all();
  }

  /** Agent counts by type and stored status (from `agent_counts`: a few rows per type, not one per agent). */
  agentCounts() {
    if (!this.hasCounts)
      return this.db
        .select({ type: t.agents.type, status: t.agents.status, n: count() })
        .from(t.agents)
        .groupBy(t.agents.type, t.agents.status)
        .all();
    const c = t.agentCounts;
    return this.db
      .select({ type: c.type, status: c.status, n: sql<number>`sum(${c.n})`.mapWith(Number) })
      .from(c)
      .where(gt(c.n, 0))
      .groupBy(c.type, c.status)
      .all();
  }

  /** Set an agent's durable status. */
  async setAgentStatus(
    id: AgentId,
    status: t.StoredAgentStatus,
    reason: string | null,
    pausedUntil: number | null = null,
  ): Promise<void> {
    await this.writer.write([
      this.db.update(t.agents).set({ status, reason, pausedUntil, updatedAt: Date.now() }).where(eq(t.agents.id, id)),
    ]);
  }

  // ---- intake --------------------------------------------------------------------

  /**
   * Record stimuli durably (creating their agents on first sight). Calls made in the same
   * turn of the event loop share one transaction (one job of the committer, ./intake-batch.ts):
   * the hot path skips drizzle's query building and runs multi-row INSERTs of cached statements.
   * Resolves once the commit is durable; `committed` hears the same outcomes as soon as the
   * transaction commits, before the WAL sync (the rows are readable from then on). A duplicate
   * `(agent, sid)` comes back with `seq: null`.
   */
  intake(items: readonly NewStimulus[], committed?: (outcomes: IntakeOutcome[]) => void): Promise<IntakeOutcome[]> {
    return this.intakes.add(items, committed);
  }

  /** Stimuli past this many in one intake transaction wait for the next (IntakeBatches.ROWS_PER_FLUSH). */
  static readonly INTAKE_ROWS_PER_FLUSH = IntakeBatches.ROWS_PER_FLUSH;

  /** Record messages that could not become stimuli (one transaction; resolves after commit). */
  async recordRejected(rows: readonly NewRejected[]): Promise<void> {
    if (rows.length === 0) return;
    await this.writer.write(
      [...chunks(rows)].map((part) => ({
        sql:
          `INSERT INTO rejected_messages (gateway, kind, topic, payload, client, ` +
          `reason, received_at) VALUES ${part.map(() => "(?,?,?,?,?,?,?)").join(",")}`,
        args: part.flatMap((r) => [this.gatewayId, r.kind, r.topic, r.payload, r.client, r.reason, r.receivedAt]),
      })),
    );
  }

  /** Rejected messages, newest first (`before`: a seq to page from). */
  listRejected(limit = 100, before?: number) {
    return this.db
      .select()
      .from(t.rejectedMessages)
      .where(before === undefined ? undefined : lt(t.rejectedMessages.seq, before))
      .orderBy(desc(t.rejectedMessages.seq))
      .limit(limit)
      .all();
  }

  /** How many rejected messages are on record. */
  async countRejected(): Promise<number> {
    const row = await this.db.select({ n: count() }).from(t.rejectedMessages).get();
    return row?.n ?? 0;
  }

  /** Stimuli in quarantine now, waiting for an operator's retry or drop (a range of the state index). */
  /**
   * The newest time this store recorded, a stimulus received or an episode ended (0: none): a clock that
   * reads earlier than it is behind (gateway.ts `clockBehindMs`). Two index seeks, not scans.
   */
  async newestRecordedAt(): Promise<number> {
    const rs = await this.client.execute(
      "SELECT max(coalesce((SELECT received_at FROM stimuli ORDER BY seq DESC LIMIT 1), 0), " +
        "coalesce((SELECT ended_at FROM episodes ORDER BY id DESC LIMIT 1), 0))",
    );
    return Number(rs.rows[0]?.[0] ?? 0);
  }

  async countQuarantined(): Promise<number> {
    const rs = await this.client.execute("SELECT count(*) FROM stimuli WHERE state = 'quarantined'");
    return Number(rs.rows[0]?.[0] ?? 0);
  }

  /** Queued stimuli per agent with the oldest receive time (scheduler bootstrap, lag). */
  queuedSummary() {
    return this.db
      .select({ agent: t.stimuli.agent, n: count(), oldest: min(t.stimuli.receivedAt) })
      .from(t.stimuli)
      .where(eq(t.stimuli.state, "queued"))
      .groupBy(t.stimuli.agent)
      .all();
  }

  /** Every queued stimulus, oldest first, with its agent (the queue book's load at start). */
  async queuedSeqs(): Promise<{ agent: AgentId; seq: number; receivedAt: number }[]> {
    const rs = await this.client.execute(
      "SELECT agent, seq, received_at FROM stimuli WHERE state = 'queued' ORDER BY seq",
    );
    return rs.rows.map((r) => ({ agent: r[0] as AgentId, seq: Number(r[1]), receivedAt: Number(r[2]) }));
  }

  /**
   * An agent's queued stimuli, oldest first. No index serves this (the queue book knows each
   * agent's seqs): it reads every queued stimulus, for a check or a book that disagreed.
   */
  async queuedOf(agent: AgentId): Promise<{ seq: number; receivedAt: number }[]> {
    const rs = await this.client.execute({
      sql: "SELECT seq, received_at FROM stimuli WHERE state = 'queued' AND agent = ? ORDER BY seq",
      args: [agent],
    });
    return rs.rows.map((r) => ({ seq: Number(r[0]), receivedAt: Number(r[1]) }));
  }

  /** The oldest queued stimulus of an agent (its FIFO head; read as `queuedOf` is). */
  headOfQueue(agent: AgentId): Promise<t.StimulusRow | undefined> {
    return selectOne(
      this.client,
      codecs.stimuli,
      "FROM stimuli WHERE state = 'queued' AND agent = ? ORDER BY seq LIMIT 1",
      [agent],
    );
  }

  /**
   * What a turn needs about `agent` (its row, queue head, usage in `windows`, budget
   * override, head checkpoint) in one read transaction: one consistent snapshot, one call.
   * `headSeq` is the seq the queue book has at the head (null: nothing queued); the row comes
   * back only if it is still queued for the agent. Left out, the head is looked for as
   * `headOfQueue` does.
   */
  async turnInputs(agent: AgentId, windows: readonly string[], headSeq?: number | null): Promise<TurnInputs> {
    const inWindows = windows.map(() => "?").join(",") || "NULL";
    const columns = codecs.stimuli.columns;
    const [a, head, usage, override, checkpoint, wakes] = await this.client.batch(
      [
        { sql: `SELECT ${codecs.agents.columns} FROM agents WHERE id = ?`, args: [agent] },
        headSeq === undefined
          ? {
              sql: `SELECT ${columns}, ${CANCELLED_BY} FROM stimuli WHERE state = 'queued' AND agent = ?
                ORDER BY seq LIMIT 1`,
              args: [agent],
            }
          : {
              sql: `SELECT ${columns}, ${CANCELLED_BY} FROM stimuli WHERE seq = ? AND state = 'queued' AND agent = ?`,
              args: [headSeq, agent],
            },
        {
          sql: `SELECT ${codecs.budgetUsage.columns} FROM budget_usage WHERE agent = ? AND "window" IN (${inWindows})`,
          args: [agent, ...windows],
        },
        { sql: "SELECT value FROM meta WHERE key = ?", args: [`budget_override:${agent}`] },
        {
          sql: `SELECT ${codecs.checkpoints.columns} FROM checkpoints
            WHERE ${checkpointHashIs("hash", "(SELECT head_hash FROM agents WHERE id = ?1)")}`,
          args: [agent],
        },
        {
          sql: "SELECT id FROM wakeups WHERE agent = ? AND state = 'pending' ORDER BY due_at LIMIT 100000",
          args: [agent],
        },
      ],
      "read",
    );
    const first = <S, I>(codec: Parameters<typeof decodeRow<S, I>>[0], rows: typeof a): S | undefined =>
      rows?.rows[0] ? decodeRow(codec, rows.rows[0]) : undefined;
    return {
      agent: first(codecs.agents, a),
      head: first(codecs.stimuli, head),
      usage: usage?.rows.map((r) => decodeRow(codecs.budgetUsage, r)) ?? [],
      budgetOverride: parseBudgetOverride(String(override?.rows[0]?.value ?? "")),
      checkpoint: first(codecs.checkpoints, checkpoint),
      pendingWakes: wakes?.rows.map((r) => String(r.id)) ?? [],
      headCancelledBy: cancelledBy(head?.rows[0]),
    };
  }

  // ---- wake-ups ------------------------------------------------------------------

  /**
   * Pending wake-ups due at or before `now`, soonest first: of `f.agent` only, or of every agent
   * but those in `f.except` (agents whose queue refused one: their rows are not read again).
   */
  async dueWakes(now: number, limit: number, f: WakeFilter = {}): Promise<WakeRow[]> {
    const rs = await this.client.execute({
      sql: `SELECT ${codecs.wakeups.columns} FROM wakeups WHERE ${wakeFilterSql(f)} AND state = 'pending'
        AND due_at <= ? ORDER BY due_at, id LIMIT ?`,
      args: [...wakeFilterArgs(f), now, limit],
    });
    return rs.rows.map((r) => decodeRow(codecs.wakeups, r));
  }

  /** When the soonest pending wake-up is due (of the agents `f` selects), or null when none is pending. */
  async nextWakeDue(f: WakeFilter = {}): Promise<number | null> {
    const rs = await this.client.execute({
      sql: `SELECT MIN(due_at) AS due FROM wakeups WHERE ${wakeFilterSql(f)} AND state = 'pending'`,
      args: wakeFilterArgs(f),
    });
    const v = rs.rows[0]?.due;
    return v === null || v === undefined ? null : Number(v);
  }

  /** Settle pending wake-ups: fired (their stimulus is recorded) or dropped (with why). */
  async settleWakes(ids: readonly string[], state: "fired" | "dropped", at: number, why: string | null = null) {
    if (ids.length === 0) return;
    await this.writer.write(
      chunks(ids).map((part) => ({
        sql: `UPDATE wakeups SET state = ?, done_at = ?, done_by = ?
          WHERE state = 'pending' AND id IN (${part.map(() => "?").join(",")})`,
        args: [state, at, why, ...part],
      })),
    );
  }

  /**
   * An agent's wake-ups, latest due first (`state`: only those). A fired one is settled by the episode
   * that ran its `wake` stimulus: `doneBy` names it once that episode committed (the stimulus row
   * records it; one lookup by the stimulus's unique id), and is null while it is queued or failing.
   */
  async listWakes(agent: AgentId, f: { state?: t.WakeState; limit?: number } = {}): Promise<WakeRow[]> {
    const rs = await this.client.execute({
      sql: `SELECT ${codecs.wakeups.columns}, CASE WHEN state = 'fired' THEN (SELECT s.episode FROM stimuli s
          WHERE s.sid = 'wake:' || wakeups.id AND s.agent = wakeups.agent) END AS ran_by
        FROM wakeups WHERE agent = ?${f.state ? " AND state = ?" : ""}
        ORDER BY due_at DESC, id LIMIT ?`,
      args: [agent, ...(f.state ? [f.state] : []), f.limit ?? 100],
    });
    return rs.rows.map((r) => {
      const w = decodeRow(codecs.wakeups, r);
      return r.ran_by === null || r.ran_by === undefined ? w : { ...w, doneBy: idFromDriver(r.ran_by) };
    });
  }

  /** One wake-up by id. */
  async getWake(id: string): Promise<WakeRow | undefined> {
    const rs = await this.client.execute({
      sql: `SELECT ${codecs.wakeups.columns} FROM wakeups WHERE id = ?`,
      args: [id],
    });
    return rs.rows[0] ? decodeRow(codecs.wakeups, rs.rows[0]) : undefined;
  }

  /** Wake-ups an episode set. */
  async wakesSetBy(episode: string): Promise<WakeRow[]> {
    const rs = await this.client.execute({
      sql: `SELECT ${codecs.wakeups.columns} FROM wakeups WHERE set_by = ? ORDER BY id`,
      args: [episode],
    });
    return rs.rows.map((r) => decodeRow(codecs.wakeups, r));
  }

  /** Look a stimulus up by agent and dedup id. */
  findStimulus(agent: AgentId, sid: string) {
    return this.db
      .select()
      .from(t.stimuli)
      .where(and(eq(t.stimuli.agent, agent), eq(t.stimuli.sid, sid)))
      .get();
  }

  getStimulus(seq: number) {
    return this.db.select().from(t.stimuli).where(eq(t.stimuli.seq, seq)).get();
  }

  /** Stimuli in a given state (e.g. quarantined), newest first. */
  listStimuli(state: t.StimulusState, limit = 100) {
    return this.db
      .select()
      .from(t.stimuli)
      .where(eq(t.stimuli.state, state))
      .orderBy(desc(t.stimuli.seq))
      .limit(limit)
      .all();
  }

  /** Refuse everything still queued for an agent (it was retired); returns their seqs. */
  async rejectQueued(agent: AgentId, reason: string, at: number): Promise<number[]> {
    const [rs] = await this.writer.write([
      {
        sql:
          "UPDATE stimuli SET state = 'rejected', last_error = ?, done_at = ? " +
          "WHERE state = 'queued' AND agent = ? RETURNING seq",
        args: [reason, at, agent],
      },
    ]);
    return seqsOf(rs);
  }

  /**
   * Skip a queued stimulus whose message expired before its episode ran (state `expired`, with why), or
   * (`dropped`) a wake-up's that was cancelled after it was recorded; false when it was not queued.
   */
  async expireStimulus(
    seq: number,
    reason: string,
    at: number,
    state: "expired" | "dropped" = "expired",
  ): Promise<boolean> {
    const [rs] = await this.writer.write([
      {
        sql: "UPDATE stimuli SET state = ?, last_error = ?, done_at = ? WHERE seq = ? AND state = 'queued'",
        args: [state, reason, at, seq],
      },
    ]);
    return (rs?.rowsAffected ?? 0) > 0;
  }

  /**
   * Drop an agent's queued timer fires that a newer queued fire supersedes (catch_up "one" /
   * "none"), among its `queued` stimuli (the queue book's); returns the seqs dropped. Only the
   * agent's own turn calls this, so none of them is running.
   */
  async supersedeTimers(agent: AgentId, queued: readonly number[], reason: string, at: number): Promise<number[]> {
    if (queued.length < 2) return [];
    const [rs] = await this.writer.write([
      {
        sql: `UPDATE stimuli SET state = 'dropped', last_error = ?3, done_at = ?4
          WHERE seq IN (${QUEUED_TIMERS_AMONG})
            AND seq < (SELECT max(seq) FROM (${QUEUED_TIMERS_AMONG})) RETURNING seq`,
        args: [JSON.stringify(queued), agent, reason, at],
      },
    ]);
    return seqsOf(rs);
  }

  /**
   * Put a quarantined stimulus back in its queue, or drop it; false when it was not quarantined (any
   * more). A drop is done `at`: its id stays remembered `dedup_days` from then, not from the quarantine
   * (retention collects ended stimuli by `done_at`, and a resent poison message would run again).
   */
  async resolveQuarantine(seq: number, state: "queued" | "dropped", at: number): Promise<boolean> {
    const [rs] = await this.writer.write([
      this.db
        .update(t.stimuli)
        .set({ state, attempts: 0, notBefore: 0, ...(state === "dropped" ? { doneAt: at } : {}) })
        .where(and(eq(t.stimuli.seq, seq), eq(t.stimuli.state, "quarantined"))),
    ]);
    return (rs?.rowsAffected ?? 0) > 0;
  }

  // ---- episodes ------------------------------------------------------------------

  /**
   * Commit an episode whole: log, decisions, checkpoint, outbox, inbox sends, budget use, dedup
   * mark. Resolves with the inbox stimuli written (a duplicate send writes none) and the queued
   * `wake` stimuli dropped with the wake-ups it cancelled. `gatherMs`: how
   * long the commit may wait for others to share its transaction (GroupCommitter.write).
   */
  async commitEpisode(c: EpisodeCommit, gatherMs = 0): Promise<{ sent: SentStimulus[]; droppedWakes: number[] }> {
    const stmts = commitStatements(this.gatewayId, c);
    const results = await this.writer.write(stmts, undefined, gatherMs);
    return { sent: sentStimuli(stmts, results), droppedWakes: droppedWakeRuns(stmts, results) };
  }

  /** Record a failed attempt; the stimulus is retried later or quarantined. State is untouched. */
  async recordFailure(f: EpisodeFailure): Promise<void> {
    await this.writer.write(failureStatements(f));
  }

  /**
   * Book the budget use of an attempt a shutdown aborted (its tool calls were made); its stimulus
   * stays queued with its attempts untouched.
   */
  async bookAborted(agent: AgentId, usage: EpisodeUsage): Promise<void> {
    await this.writer.write(abortedStatements(agent, usage));
  }

  getEpisode(id: string) {
    return this.db.select().from(t.episodes).where(eq(t.episodes.id, id)).get();
  }

  /**
   * How many `ctx.send`s in a row led to the stimulus `sid`: its causes are walked back through the
   * episode that sent it (`inbox:<episode>:<n>`, one send each) or set it (`wake:<episode>.w<n>`, a
   * wake-up: no send), up to a stimulus from outside the fleet, a cause the history no longer holds
   * (retention, or another shard's episode: then the count a forwarded send carried, when it carried
   * one), or `maxSteps` episodes. One lookup by id per step.
   */
  async sendHops(sid: string, maxSteps: number): Promise<number> {
    let hops = 0;
    for (let step = 0; step < maxSteps; step++) {
      const sender = sentBy(sid);
      const episode = sender ?? setBy(sid);
      if (episode === undefined) break;
      if (sender) hops++;
      const by = await this.db
        .select({ sid: t.episodes.stimulusId })
        .from(t.episodes)
        .where(eq(t.episodes.id, episode))
        .get();
      if (!by) {
        // Sent from another shard: the count it carried (this send included) stands for the history there.
        if (sender) hops += Math.max(0, ((await this.forwardedHops(sid)) ?? 1) - 1);
        break;
      }
      sid = by.sid;
    }
    return hops;
  }

  /** The hop count a forwarded send `sid` carried (`stimuli.hops`), or null when it carried none. */
  private async forwardedHops(sid: string): Promise<number | null> {
    const rs = await this.client.execute({
      sql: "SELECT hops FROM stimuli WHERE sid = ? AND hops IS NOT NULL LIMIT 1",
      args: [sid],
    });
    const v = rs.rows[0]?.[0];
    return v === undefined || v === null ? null : Number(v);
  }

  /**
   * What a send of `episode` forwarded to another shard carries (docs/shards.md): the sends that led to
   * the episode's stimulus, plus this one. Null when the episode is not in this store.
   */
  async forwardHops(episode: string, maxSteps: number): Promise<number | null> {
    const by = await this.db
      .select({ sid: t.episodes.stimulusId })
      .from(t.episodes)
      .where(eq(t.episodes.id, episode))
      .get();
    return by ? (await this.sendHops(by.sid, maxSteps)) + 1 : null;
  }

  /** An agent's episodes, newest first. */
  listEpisodes(agent: AgentId, limit = 50, beforeStartedAt?: number) {
    const where =
      beforeStartedAt === undefined
        ? eq(t.episodes.agent, agent)
        : and(eq(t.episodes.agent, agent), lt(t.episodes.startedAt, beforeStartedAt));
    return this.db
      .select()
      .from(t.episodes)
      .where(where)
      .orderBy(desc(t.episodes.startedAt), desc(t.episodes.id))
      .limit(limit)
      .all();
  }

  /** An agent's episodes in id (time) order after `afterId`: for full scans. */
  scanEpisodes(agent: AgentId, afterId: string, limit = 500) {
    return this.db
      .select()
      .from(t.episodes)
      .where(and(eq(t.episodes.agent, agent), gt(t.episodes.id, afterId)))
      .orderBy(asc(t.episodes.id))
      .limit(limit)
      .all();
  }

  /** An episode's event log in order. */
  listEvents(episode: string) {
    return this.db.select().from(t.events).where(eq(t.events.episode, episode)).orderBy(asc(t.events.seq)).all();
  }

  /** Usage of an agent in the given windows. */
  async usage(agent: AgentId, windows: readonly string[]): Promise<(typeof t.budgetUsage.$inferSelect)[]> {
    if (windows.length === 0) return [];
    return selectAll(
      this.client,
      codecs.budgetUsage,
      `FROM budget_usage WHERE agent = ? AND "window" IN (${windows.map(() => "?").join(",")})`,
      [agent, ...windows],
    );
  }

  // ---- checkpoints ---------------------------------------------------------------

  /** A checkpoint by hash, or undefined. */
  getCheckpoint(hash: string): Promise<t.CheckpointRow | undefined> {
    return selectOne(this.client, codecs.checkpoints, `FROM checkpoints WHERE ${checkpointHashIs("hash", "?1")}`, [
      hashToDriver(hash),
    ]);
  }

  /** An agent's checkpoint number `seq`, or undefined (never written, or deleted by retention). */
  checkpointAt(agent: AgentId, seq: number): Promise<t.CheckpointRow | undefined> {
    return selectOne(this.client, codecs.checkpoints, "FROM checkpoints WHERE agent = ? AND seq = ?", [agent, seq]);
  }

  /** An agent's checkpoint chain, oldest first. */
  listCheckpoints(agent: AgentId, limit = 1_000_000) {
    return this.db
      .select()
      .from(t.checkpoints)
      .where(eq(t.checkpoints.agent, agent))
      .orderBy(asc(t.checkpoints.seq))
      .limit(limit)
      .all();
  }

  /** Every agent that has at least one checkpoint. */
  async agentsWithCheckpoints(): Promise<AgentId[]> {
    const rows = await this.db.selectDistinct({ agent: t.checkpoints.agent }).from(t.checkpoints).all();
    return rows.map((r) => r.agent);
  }

  // ---- outbox --------------------------------------------------------------------

  /**
   * Unsent effects after row `afterId`, oldest first, with their episode's agent (null once it
   * is collected). Only rows on the disk: a commit is visible before its WAL sync ends.
   */
  async pendingOutbox(limit = 500, afterId = 0) {
    await this.writer.durable();
    const rows = await this.db
      .select()
      .from(t.outbox)
      .where(gt(t.outbox.id, afterId))
      .orderBy(asc(t.outbox.id))
      .limit(limit)
      .all();
    // Not a join: episodes.id is stored as 16 bytes (migration 26), outbox.episode as text, and SQL
    // compares them as unequal; `inArray` turns each id into its stored form.
    const ids = [...new Set(rows.map((r) => r.episode))];
    const agents = new Map<string, AgentId>();
    for (const part of chunks(ids))
      for (const e of await this.db
        .select({ id: t.episodes.id, agent: t.episodes.agent })
        .from(t.episodes)
        .where(inArray(t.episodes.id, part))
        .all())
        agents.set(e.id, e.agent);
    return rows.map((r) => ({ ...r, agent: agents.get(r.episode) ?? null }));
  }

  /** Forget the effects of episodes whose outbox was published. */
  async deleteOutboxOf(episodes: readonly string[]): Promise<void> {
    if (episodes.length > 0)
      await this.writer.write(
        chunks(episodes).map((part) => ({
          sql: `DELETE FROM outbox WHERE episode IN (${part.map(() => "?").join(",")})`,
          args: [...part],
        })),
      );
  }

  /** Forget effects that were published. */
  async deleteOutbox(ids: readonly number[]): Promise<void> {
    if (ids.length > 0)
      await this.writer.write(chunks(ids).map((part) => this.db.delete(t.outbox).where(inArray(t.outbox.id, part))));
  }
}

/** The `seq` column of a statement's RETURNING rows. */
function seqsOf(rs: ResultSet | undefined): number[] {
  return rs?.rows.map((r) => Number(r[0])) ?? [];
}

/** A `budget_override:<agent>` meta value: `<budget>:<until ms>`, or `<until ms>` (older releases: any budget). */
export function parseBudgetOverride(value: string): { budget: string | null; until: number } {
  const colon = value.lastIndexOf(":");
  const budget = colon < 0 ? null : value.slice(0, colon);
  return { budget, until: Number(colon < 0 ? value : value.slice(colon + 1)) || 0 };
}
