/**
 * The replicator (docs/replication.md): runs beside episodes, never on their commit path. Triggers put
 * every replicated row in the local `repl_pending` queue in the transaction that wrote it;
 * the replicator reads the oldest entries in bounded batches, writes them to the central
 * libSQL server in one transaction (idempotent: `ON CONFLICT DO NOTHING` for immutable rows,
 * whole-row upserts for mutable ones) and deletes the entries only after the center
 * confirmed the commit. The queue is the durable cursor: a crash on either side re-sends a
 * batch, which changes nothing. A dead or slow center only grows the queue; failures back
 * off exponentially with jitter.
 */
import { existsSync } from "node:fs";
import { createClient, type Client } from "@libsql/client";
import type { Logger } from "pino";
import { displayUrl, type ReplicationSpec } from "../spec/index.ts";
import {
  checkNotNewer,
  idOfSql,
  migrate,
  SCHEMA_VERSION,
  SchemaVersionError,
  SUPERSEDES_META,
  schemaVersion,
  supersededIds,
} from "../store/index.ts";
import type { Store } from "../store/index.ts";
import { centralStatements, durableHead, readBatch, readEntries, type Batch } from "./batch.ts";
import { supersededKey } from "./identity.ts";
import { BatchReader } from "./reader.ts";
import { CENTRAL_MIGRATIONS, CENTRAL_SCHEMA_VERSION } from "./tables.ts";

/** Lifecycle: `connecting` until the central schema is checked, `retrying` after a failure. */
export type ReplicatorState = "created" | "connecting" | "streaming" | "retrying" | "stopped";

/**
 * Why a push failed; retry decisions and metrics read this, not the message. `config`: the gateway's own
 * `[replication]` is wrong (a URL the libSQL client refuses): the center was never contacted.
 */
export type ReplicationErrorKind = "unreachable" | "auth" | "schema" | "rejected" | "config" | "local";

/** A failure talking to the central server. */
export class ReplicationError extends Error {
  override readonly name = "ReplicationError";
  constructor(
    readonly kind: ReplicationErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** What `fleet status`, `/api/fleet`, `fleet/health` and the dashboard show. */
export interface ReplicationStatus {
  readonly url: string;
  readonly state: ReplicatorState;
  readonly required: boolean;
  /** Rows the center has not confirmed: queue entries, their approximate bytes, the oldest one's age. */
  readonly backlog: { readonly rows: number; readonly bytes: number; readonly lag_s: number };
  /**
   * The durable cursor: the newest queue entry the center has confirmed (`meta`
   * `replication.confirmed_seq`, kept across restarts) and the newest entry queued. An entry
   * changed again while in flight stays queued below the confirmed seq and goes again.
   */
  readonly cursor: { readonly confirmed_seq: number; readonly queued_seq: number };
  readonly max_backlog_mb: number;
  /** The backlog passed max_backlog_mb: retention no longer waits for the center. */
  readonly over_backlog: boolean;
  readonly pushed_rows: number;
  readonly pushed_batches: number;
  readonly last_push_at: number | null;
  /** Rows collected locally before they were pushed (only when retention did not wait). */
  readonly lost_rows: number;
  readonly consecutive_failures: number;
  readonly errors: Readonly<Record<ReplicationErrorKind, number>>;
  readonly last_error: { readonly kind: ReplicationErrorKind; readonly message: string; readonly at: number } | null;
}

/** How a replicator is built; tests inject the clock, the random source and the backoff cap. */
export interface ReplicatorOptions {
  readonly store: Store;
  readonly spec: ReplicationSpec;
  /** `[fleet] name`. */
  readonly fleet: string;
  /** Where `auth_token_env` is read (default: the gateway's environment). */
  readonly env?: Readonly<Record<string, string | undefined>>;
  readonly log: Logger;
  readonly now?: () => number;
  readonly random?: () => number;
  /** First retry delay, ms (default 250); doubles per failure up to `maxBackoffMs` (default 30 s). */
  readonly minBackoffMs?: number;
  readonly maxBackoffMs?: number;
  /**
   * The wait between two steps of the push loop (default: a timer). Tests inject one that waits
   * for them, with `now`, to step the loop on a fake clock; `stop()` does not wait for it.
   */
  readonly sleep?: (ms: number) => Promise<void>;
  /**
   * Read each batch on a thread of its own (reader.ts; default), off the thread that commits
   * episodes. False, or a store that is not a file: on the store's own connection.
   */
  readonly readOnThread?: boolean;
  /** How long the center may take to answer one request before the push fails as `unreachable` (ms). */
  readonly pushTimeoutMs?: number;
}

const MB = 1024 * 1024;

/**
 * While episodes commit, a backlog of this many full batches is pushed without waiting for the
 * next round (docs/replication.md, "Pushing beside episodes"): it bounds the lag of a gateway
 * that commits faster than one round per `interval` clears.
 */
export const HOT_BACKLOG_BATCHES = 10;

/**
 * A request the center has not answered in this long fails as `unreachable` and backs off like any
 * other (docs/replication.md): a hung center (a frozen VM, a dead TCP peer) otherwise holds the push
 * loop, and the status with it, for good. Generous: a full batch on a slow link is well within it.
 */
export const PUSH_TIMEOUT_MS = 30_000;

/** Whether `p` settles within `ms` (its outcome is the caller's to read); the timer does not outlive it. */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([
      p.then(
        () => true,
        () => true,
      ),
      late,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Network failures: the server is down, unknown, or dropped the connection. */
const UNREACHABLE =
  /ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ECONNRESET|ETIMEDOUT|EHOSTUNREACH|Unable to connect|fetch failed|socket|closed/i;

/**
 * How the central server's URL is shown in logs, status, `fleet/health` and errors: without userinfo,
 * query or fragment, so a credential that got into it (`?authToken=`, `user:pass@`) is never displayed.
 */
export const redactUrl = displayUrl;

/** `text` (a client library's error message) without the parts of `url` that may hold a credential. */
function scrubUrl(text: string, url: string): string {
  if (!URL.canParse(url)) return text;
  const u = new URL(url);
  // The whole URL first, then its query alone (a message may quote either); userinfo is refused at spec time.
  const shown = text.replaceAll(url, displayUrl(url));
  return u.search.length > 1 ? shown.replaceAll(u.search, "") : shown;
}

/**
 * Sort a failure into a kind, with a sentence that says what to check. `sentToken` false: no token
 * went with the request, so a refusal means the server wants one (not that one was wrong).
 */
export function classifyError(err: unknown, url: string, sentToken = true): ReplicationError {
  if (err instanceof ReplicationError) return err;
  if (err instanceof SchemaVersionError) return new ReplicationError("schema", err.message, { cause: err });
  const raw = err as { message?: string; code?: string; cause?: { code?: string; message?: string } };
  const e = { ...raw, message: scrubUrl(raw.message ?? String(err), url) };
  const text = `${e.code ?? ""} ${e.message} ${e.cause?.code ?? ""} ${scrubUrl(e.cause?.message ?? "", url)}`;
  const where = redactUrl(url);
  // The client refused the URL itself (URL_PARAM_NOT_SUPPORTED, URL_INVALID, URL_SCHEME_NOT_SUPPORTED) before
  // sending anything: a configuration error of this side, which no retry mends.
  if (/^URL_/.test(e.code ?? ""))
    return new ReplicationError("config", `${where} is not a URL the libSQL client takes: ${e.message}`, {
      cause: err,
    });
  if (/\b401\b|\b403\b|unauthori[sz]ed|forbidden|auth/i.test(text))
    return new ReplicationError(
      "auth",
      sentToken
        ? `central server ${where} refused the credentials: ${e.message}`
        : `central server ${where} wants a token and none was sent (${e.message})`,
      { cause: err },
    );
  if (UNREACHABLE.test(text))
    return new ReplicationError("unreachable", `central server ${where} is unreachable: ${e.message}`, { cause: err });
  if (/\b404\b|\b405\b|not found|unexpected|json|protocol/i.test(text))
    return new ReplicationError("unreachable", `${where} does not answer like a libSQL server (sqld): ${e.message}`, {
      cause: err,
    });
  return new ReplicationError("rejected", `central server ${where} rejected a batch: ${e.message}`, { cause: err });
}

/** Bring the central schema up to date (or refuse a newer one) on an open client. */
export async function prepareCentral(client: Client, url: string): Promise<void> {
  const where = `central database ${redactUrl(url)}`;
  const found = await schemaVersion(client);
  checkNotNewer(found, where, CENTRAL_SCHEMA_VERSION);
  if (found < CENTRAL_SCHEMA_VERSION) await migrate(client, where, CENTRAL_MIGRATIONS);
}

/** The later of `m` and an entry's `at` (entries without one do not count). */
const newestAt = (m: number | null, e: { readonly at: number | null }): number | null =>
  e.at === null ? m : m === null ? e.at : Math.max(m, e.at);

/**
 * A step of a push on this side (the store, the reader thread): its failure is the gateway's own
 * database (a full disk, a failed WAL sync), not the center's, and is reported as kind `local`.
 */
async function local<T>(what: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new ReplicationError("local", `the gateway's own database failed ${what}: ${message}`, { cause: err });
  }
}

/** Pushes the local replication queue to the central server, beside the episodes. */
export class Replicator {
  state: ReplicatorState = "created";
  private client: Client | null = null;
  /** `batchReader()`'s thread, once asked for. */
  private reader: Promise<BatchReader | null> | null = null;
  private prepared = false;
  private loop: Promise<void> | null = null;
  /** The push in flight (resolved when none): pushes run one at a time. */
  private pushing: Promise<void> = Promise.resolve();
  private wake: (() => void) | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly log: Logger;
  private backlogRows = 0;
  private oldestAt: number | null = null;
  /** Mean bytes per queue entry, from the batches read so far (null until one was). */
  private bytesPerEntry: number | null = null;
  private pushedRows = 0;
  private pushedBatches = 0;
  private lastPushAt: number | null = null;
  private lostRows = 0;
  private confirmedSeq = 0;
  private queuedSeq = 0;
  private failures = 0;
  private overBacklog = false;
  /** The gateway ids this data dir took over from at restores (identity.ts), marked superseded at the center. */
  private supersedes: string[] = [];
  /** Writer jobs seen at the last step, and this replicator's own (its confirms) since. */
  private jobsSeen = 0;
  private ownJobs = 0;
  /** While episodes commit: when the current push round began (clock), and whether it is still open. */
  private roundAt: number | null = null;
  private roundOpen = false;
  /** Batches the open round may still push: the full ones waiting when it opened (at least one). */
  private roundLeft = 0;
  private stopped: (() => void) | null = null;
  private readonly stoppedP = new Promise<void>((r) => (this.stopped = r));
  private readonly errors: Record<ReplicationErrorKind, number> = {
    unreachable: 0,
    auth: 0,
    schema: 0,
    rejected: 0,
    config: 0,
    local: 0,
  };
  private lastError: ReplicationStatus["last_error"] = null;

  constructor(private readonly opts: ReplicatorOptions) {
    this.now = opts.now ?? Date.now;
    this.random = opts.random ?? Math.random;
    this.log = opts.log.child({ mod: "replication" });
  }

  get spec(): ReplicationSpec {
    return this.opts.spec;
  }

  /**
   * Turn replication on in the local database (the triggers start recording; rows written
   * before, or while it was off or pointed elsewhere, are queued once), then push in the
   * background. Resolves once the queue is set up, not when the center answers.
   */
  async start(): Promise<void> {
    if (this.state !== "created") return;
    this.state = "connecting";
    const { store, spec } = this.opts;
    const queued = await enableReplication(store, spec.url);
    this.lostRows = Number((await store.getMeta("replication.lost_rows")) ?? 0);
    this.confirmedSeq = Number((await store.getMeta("replication.confirmed_seq")) ?? 0);
    this.lastPushAt = Number((await store.getMeta("replication.last_push_at")) ?? 0) || null;
    this.supersedes = supersededIds(await store.getMeta(SUPERSEDES_META));
    await this.refresh();
    this.jobsSeen = store.writer.stats.jobs;
    this.log.info(
      { url: redactUrl(spec.url), backlog_rows: this.backlogRows, ...(queued > 0 ? { queued_history: queued } : {}) },
      "replicating to the central server",
    );
    this.loop = this.run();
  }

  /**
   * Stop after the batch in flight, waiting for it at most `graceMs` (the gateway's drain_timeout_ms):
   * a center that does not answer does not hold up a stopping gateway. The batch either committed at
   * the center or is re-sent at the next start (its entries leave the queue only once confirmed).
   */
  async stop(graceMs = 10_000): Promise<void> {
    if (this.state === "stopped" || this.state === "created") {
      this.state = "stopped";
      await this.closeReader();
      return;
    }
    this.state = "stopped";
    this.stopped?.();
    this.wake?.();
    if (this.loop && !(await settlesWithin(this.loop, graceMs)))
      this.log.warn(
        { waited_ms: graceMs },
        "stopping without the central server's answer to the request in flight: a batch it carried stays queued " +
          "and goes again at the next start",
      );
    this.client?.close();
    this.client = null;
    await this.closeReader();
  }

  /** The thread batches are read on, started at the first push; null: the store's own connection. */
  private batchReader(): Promise<BatchReader | null> {
    const { store, readOnThread } = this.opts;
    // A push the stop gave up waiting for goes on: it must not start a thread nothing will close.
    if (this.state === "stopped") return Promise.reject(new Error("the replicator is stopped"));
    this.reader ??=
      readOnThread === false || !existsSync(store.path)
        ? Promise.resolve(null)
        : BatchReader.open(store.path).catch((err: unknown) => {
            this.log.warn(
              { err: err instanceof Error ? err.message : String(err) },
              "replication reads stay on the gateway's thread: the reader thread did not start",
            );
            return null;
          });
    return this.reader;
  }

  private async closeReader(): Promise<void> {
    const reader = await this.reader;
    this.reader = null;
    await reader?.close();
  }

  /** Retention may collect unconfirmed rows only when not required or past max_backlog_mb. */
  keepUnconfirmed(): boolean {
    return this.opts.spec.required && !this.overBacklog;
  }

  /** The current status (backlog as of the last push attempt or `refresh`). */
  status(): ReplicationStatus {
    const { spec } = this.opts;
    return {
      url: redactUrl(spec.url),
      state: this.state,
      required: spec.required,
      backlog: {
        rows: this.backlogRows,
        bytes: Math.round(this.backlogRows * (this.bytesPerEntry ?? 0)),
        lag_s: this.oldestAt === null ? 0 : Math.max(0, (this.now() - this.oldestAt) / 1000),
      },
      cursor: { confirmed_seq: this.confirmedSeq, queued_seq: Math.max(this.queuedSeq, this.confirmedSeq) },
      max_backlog_mb: spec.max_backlog_mb,
      over_backlog: this.overBacklog,
      pushed_rows: this.pushedRows,
      pushed_batches: this.pushedBatches,
      last_push_at: this.lastPushAt,
      lost_rows: this.lostRows,
      consecutive_failures: this.failures,
      errors: { ...this.errors },
      last_error: this.lastError,
    };
  }

  /** Re-read the backlog size (a count over the queue) and apply the max_backlog_mb rule. */
  async refresh(): Promise<void> {
    const rs = await this.opts.store.client.execute("SELECT count(*) AS n, min(at) AS oldest FROM repl_pending");
    this.backlogRows = Number(rs.rows[0]?.n ?? 0);
    const oldest = rs.rows[0]?.oldest;
    this.oldestAt = this.backlogRows === 0 || oldest === null || oldest === undefined ? null : Number(oldest);
    // Not sqlite_sequence: an upsert that bumps a pending entry's `ver` burns a seq there.
    const head = await this.opts.store.client.execute("SELECT max(seq) AS seq FROM repl_pending");
    this.queuedSeq = Number(head.rows[0]?.seq ?? 0);
    if (this.bytesPerEntry === null && this.backlogRows > 0) {
      const sample = await readBatch(this.opts.store, Math.min(200, this.opts.spec.batch_rows));
      this.noteSize(sample);
    }
    const bytes = this.backlogRows * (this.bytesPerEntry ?? 0);
    const over = bytes > this.opts.spec.max_backlog_mb * MB;
    if (over !== this.overBacklog) {
      this.overBacklog = over;
      if (over) {
        this.log.warn(
          { backlog_bytes: Math.round(bytes), max_backlog_mb: this.opts.spec.max_backlog_mb },
          "replication backlog passed max_backlog_mb: retention no longer waits for the central server; " +
            "rows it collects before they are pushed are counted as lost",
        );
        await this.opts.store.setMeta("replication.over_backlog_at", String(this.now()));
      } else {
        this.log.info("replication backlog back under max_backlog_mb: retention waits for the central server again");
      }
    }
  }

  /**
   * Push one batch now; resolves with the queue entries confirmed (0 when the queue is empty).
   * Pushes never overlap: a `drain()` beside the background loop waits for the batch in flight
   * (two at once would read and send the same entries, and count their lost rows twice).
   */
  pushOnce(): Promise<number> {
    const next = this.pushing.then(() => this.pushNow());
    this.pushing = next.then(
      () => undefined,
      () => undefined,
    );
    return next;
  }

  private async pushNow(): Promise<number> {
    const client = await this.central();
    const { store, spec, fleet } = this.opts;
    const batch = await local("reading the queue", async () => {
      const upTo = await durableHead(store);
      const reader = await this.batchReader();
      return reader ? reader.read(spec.batch_rows, upTo) : readEntries(store.client, spec.batch_rows, upTo);
    });
    if (batch.entries.length === 0) return 0;
    this.noteSize(batch);
    const at = this.now();
    const lost = this.lostRows + batch.lost.length;
    // What is left once the batch is confirmed: nothing when no entry follows it (lag 0, however old
    // the batch was). Else the backlog counted at the last look less the batch (at least the entry that
    // follows), and the age of that first entry left: the oldest in queue order, read with the batch by
    // one rowid seek (a min(at) over the rest would scan the backlog on every push). Queue order is
    // `at` order except for history queued when replication was turned on (kind by kind) and an entry
    // changed again while its batch was in flight (it stays, below the batch); for those the next
    // push tells the center the truth. A next entry without `at` (a budget window queued on its own)
    // is bounded by the batch's newest entry's time: everything after it was queued later.
    const backlogAfter = batch.rest === null ? 0 : Math.max(1, this.backlogRows - batch.entries.length);
    const restAt =
      batch.rest === null ? null : (batch.rest.at ?? batch.entries.reduce<number | null>(newestAt, null) ?? at);
    const lagS = restAt === null ? 0 : Math.max(0, (at - restAt) / 1000);
    const stmts = centralStatements(fleet, store.gatewayId, batch.rows);
    stmts.push({
      sql: `INSERT INTO gateways (gateway, fleet, first_push_at, last_push_at, pushed_rows, backlog_rows,
        backlog_bytes, lag_s, lost_rows, schema_version)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gateway) DO UPDATE SET fleet = excluded.fleet,
        last_push_at = excluded.last_push_at, pushed_rows = gateways.pushed_rows + excluded.pushed_rows,
        backlog_rows = excluded.backlog_rows, backlog_bytes = excluded.backlog_bytes, lag_s = excluded.lag_s,
        lost_rows = excluded.lost_rows, schema_version = excluded.schema_version`,
      args: [
        store.gatewayId,
        fleet,
        at,
        at,
        batch.rowCount,
        backlogAfter,
        Math.round(backlogAfter * (this.bytesPerEntry ?? 0)),
        lagS,
        lost,
        SCHEMA_VERSION,
      ],
    });
    // Restored from a backup under a new id: the old ids' rows at the center are the lost copies'.
    for (const old of this.supersedes)
      stmts.push({
        sql: "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        args: [supersededKey(old), store.gatewayId],
      });
    try {
      await this.answered(client.batch(stmts, "write"));
    } catch (err) {
      this.reconnect();
      throw this.classify(err);
    }
    // Confirmed: only now do the entries leave the queue. An entry changed since it was read
    // (ver moved on) stays and goes again with its newer row.
    // The batch is one range of the queue, nearly all of it read at ver 1: one range delete that
    // names only the entries read at a later ver.
    const first = batch.entries[0]!.seq;
    const cursor = batch.entries.reduce((m, e) => Math.max(m, e.seq), this.confirmedSeq);
    const bumped = JSON.stringify(batch.entries.filter((e) => e.ver !== 1).map((e) => [e.seq, e.ver]));
    const confirm = [
      {
        sql: `DELETE FROM repl_pending WHERE seq BETWEEN ? AND ? AND ver =
          coalesce((SELECT value ->> 1 FROM json_each(?) WHERE value ->> 0 = repl_pending.seq), 1)`,
        args: [first, batch.entries.at(-1)!.seq, bumped],
      },
      {
        // The cursor and the time of the push that moved it, together: `last push` survives a restart.
        sql: `INSERT INTO meta (key, value) VALUES ('replication.confirmed_seq', ?), ('replication.last_push_at', ?)
          ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
        args: [String(cursor), String(at)],
      },
    ];
    if (batch.lost.length > 0) {
      confirm.push({
        sql: `INSERT INTO meta (key, value) VALUES ('replication.lost_rows', ?)
          ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
        args: [String(lost)],
      });
    }
    try {
      await local("confirming a batch the center committed (it goes again)", () => store.writer.write(confirm));
    } catch (err) {
      // A commit whose WAL sync failed may be in the file all the same: the lost-rows total is read
      // back, not kept from before it, so the next confirm does not write a smaller one over it.
      this.lostRows = Number((await store.getMeta("replication.lost_rows").catch(() => null)) ?? this.lostRows);
      throw err;
    }
    this.ownJobs += 1;
    this.backlogRows = backlogAfter;
    this.oldestAt = restAt;
    if (batch.lost.length > 0) {
      this.log.warn(
        { lost: batch.lost.length, lost_total: lost },
        "rows were collected locally before the central server confirmed them (counted as lost)",
      );
    }
    this.lostRows = lost;
    this.confirmedSeq = cursor;
    this.pushedRows += batch.rowCount;
    this.pushedBatches += 1;
    this.lastPushAt = at;
    return batch.entries.length;
  }

  /** Push until the queue is empty (bench, tests, and a stopping gateway's last chance). */
  async drain(): Promise<number> {
    let n = 0;
    for (let k = await this.pushOnce(); k > 0; k = await this.pushOnce()) n += k;
    await this.refresh();
    return n;
  }

  private async central(): Promise<Client> {
    const { spec } = this.opts;
    if (this.state === "stopped" && !this.client) throw new Error("the replicator is stopped");
    if (!this.client) {
      let authToken: string | undefined;
      if (spec.auth_token_env) {
        authToken = (this.opts.env ?? process.env)[spec.auth_token_env];
        if (!authToken)
          throw new ReplicationError(
            "auth",
            `[replication] auth_token_env names ${spec.auth_token_env}, which is not set in the gateway's environment`,
          );
      }
      try {
        this.client = createClient({ url: spec.url, ...(authToken ? { authToken } : {}) });
      } catch (err) {
        throw this.classify(err);
      }
    }
    if (!this.prepared) {
      try {
        await this.answered(prepareCentral(this.client, spec.url));
      } catch (err) {
        this.reconnect();
        throw this.classify(err);
      }
      this.prepared = true;
    }
    return this.client;
  }

  /**
   * A failure as `classifyError` words it. Without `auth_token_env` no token is sent, so a server
   * that wants one is told apart from one that refused it, and the message says where one goes.
   */
  private classify(err: unknown): ReplicationError {
    const { spec } = this.opts;
    const e = classifyError(err, spec.url, spec.auth_token_env !== null);
    if (e.kind !== "auth" || spec.auth_token_env !== null) return e;
    return new ReplicationError(
      "auth",
      `${e.message}: set [replication] auth_token_env to the name of an env var holding its JWT, and export it`,
      { cause: err },
    );
  }

  /**
   * `request`, or an `unreachable` failure once the center took longer than the push timeout to answer
   * (the caller starts the client over, which gives up the request in flight).
   */
  private async answered<T>(request: Promise<T>): Promise<T> {
    const ms = this.opts.pushTimeoutMs ?? PUSH_TIMEOUT_MS;
    if (await settlesWithin(request, ms)) return request;
    request.catch(() => {}); // given up: its outcome, whenever it comes, is not waited for
    throw new ReplicationError(
      "unreachable",
      `central server ${redactUrl(this.opts.spec.url)} did not answer within ${ms / 1000} s`,
    );
  }

  /** After a failure the client and the schema check start over: the server may have been replaced. */
  private reconnect(): void {
    this.prepared = false;
    this.client?.close();
    this.client = null;
  }

  private noteSize(batch: Batch): void {
    if (batch.entries.length === 0) return;
    const per = batch.bytes / batch.entries.length;
    this.bytesPerEntry = this.bytesPerEntry === null ? per : this.bytesPerEntry * 0.8 + per * 0.2;
  }

  /** A method, not a field read, so TypeScript does not narrow it across awaits. */
  private stopping(): boolean {
    return this.state === "stopped";
  }

  private async run(): Promise<void> {
    while (!this.stopping()) {
      let delay: number;
      try {
        delay = await this.step();
      } catch (err) {
        // Stopped under a push it gave up waiting for: its end is no failure of the center's.
        if (this.stopping()) break;
        delay = this.failed(err);
      }
      if (this.stopping()) break;
      if (delay > 0) await this.sleep(delay);
      else await new Promise((r) => setImmediate(r)); // let episodes' work in between batches
    }
  }

  /**
   * One step of the push loop: push a batch or not, and how long to wait before the next step
   * (docs/replication.md, "Pushing beside episodes"). An idle gateway pushes at once, batch
   * after batch. While episodes commit (writes other than this replicator's own since the last
   * step), it pushes in rounds at most one `interval` apart: a round sends the full batches
   * waiting when it opened, and rows queued meanwhile wait for the next round (it sends a
   * partial batch only when no full one waits, so lag stays within about one interval); between
   * a round's batches episodes get as long as the last push took. A backlog of
   * HOT_BACKLOG_BATCHES full batches is pushed without waiting for a round, so it never grows
   * without bound while the center keeps up.
   */
  private async step(): Promise<number> {
    const { interval_ms: interval, batch_rows: batchRows } = this.opts.spec;
    const jobs = this.opts.store.writer.stats.jobs;
    const hot = jobs - this.jobsSeen > this.ownJobs;
    this.jobsSeen = jobs;
    this.ownJobs = 0;
    await this.recount();
    const pending = this.backlogRows;
    if (pending === 0) {
      // Nothing to send; connect anyway, so a wrong URL or token shows before the first row does.
      this.roundOpen = false;
      await this.central();
      this.pushed();
      return interval;
    }
    const now = this.now();
    if (hot) {
      if (this.roundAt === null || now - this.roundAt >= interval) {
        this.roundAt = now;
        this.roundOpen = true;
        this.roundLeft = Math.max(1, Math.floor(pending / batchRows));
      }
      const urgent = pending >= HOT_BACKLOG_BATCHES * batchRows;
      const inRound = this.roundOpen && this.roundLeft > 0;
      if (!urgent && !inRound) {
        this.roundOpen = false;
        // Episodes first; look again before the round is due, in case the gateway went idle.
        return Math.max(1, Math.min(this.roundAt + interval - now, Math.ceil(interval / 4)));
      }
    } else {
      // Idle: push now. Rounds while episodes commit are counted from this push on.
      this.roundOpen = false;
      this.roundAt = now;
    }
    const started = performance.now();
    await this.countingWhile(this.pushOnce());
    this.pushed();
    if (hot) this.roundLeft -= 1;
    return hot ? Math.max(1, Math.round(performance.now() - started)) : 0;
  }

  /**
   * Wait for `push`; while it is slower than an interval, count the queue again each interval, and
   * once more after it, so the status shows the queue as it is, not as it was before the push.
   */
  private async countingWhile(push: Promise<number>): Promise<void> {
    let slow = false;
    while (!(await settlesWithin(push, this.opts.spec.interval_ms))) {
      slow = true;
      await this.recount();
    }
    await push;
    if (slow) await this.recount();
  }

  /** `refresh`, a failure of which is logged (the status keeps its last figures). */
  private async recount(): Promise<void> {
    try {
      await this.refresh();
    } catch (err) {
      this.log.error({ err }, "reading the replication backlog failed");
    }
  }

  /** A push succeeded: the center is reachable (again). */
  private pushed(): void {
    if (this.failures > 0) this.log.info({ after_failures: this.failures }, "central server reachable again");
    this.failures = 0;
    this.lastError = null;
    if (!this.stopping()) this.state = "streaming";
  }

  /** Record a failure; returns the backoff delay (exponential, capped, with jitter). */
  private failed(err: unknown): number {
    const e = classifyError(err, this.opts.spec.url);
    this.failures += 1;
    this.errors[e.kind] += 1;
    if (this.state !== "stopped") this.state = "retrying";
    const repeated = this.lastError?.kind === e.kind && this.lastError.message === e.message;
    this.lastError = { kind: e.kind, message: e.message, at: this.now() };
    const ctx = { kind: e.kind, failures: this.failures, backlog_rows: this.backlogRows };
    // The first failure of a kind is an error in the log; repeats are quieter (one per 10).
    if (!repeated) this.log.error(ctx, `replication: ${e.message}`);
    else if (this.failures % 10 === 0) this.log.warn(ctx, `replication still failing: ${e.message}`);
    const min = this.opts.minBackoffMs ?? 250;
    const max = this.opts.maxBackoffMs ?? 30_000;
    const base = Math.min(max, min * 2 ** Math.min(20, this.failures - 1));
    return Math.round(base * (0.5 + this.random() / 2));
  }

  private sleep(ms: number): Promise<void> {
    if (this.opts.sleep) return Promise.race([this.opts.sleep(ms), this.stoppedP]);
    return new Promise((resolve) => {
      this.wake = () => {
        if (this.timer) clearTimeout(this.timer);
        this.timer = null;
        this.wake = null;
        resolve();
      };
      this.timer = setTimeout(() => this.wake?.(), ms);
      this.timer.unref?.();
    });
  }
}

/**
 * Switch the local triggers on for `url`. When replication was off, or pointed at another
 * server, every replicated row already in the database is queued once (oldest first), in
 * the same transaction that turns the triggers on, so nothing falls between. Returns how
 * many entries that queued (0 when it was already on for `url`).
 */
export async function enableReplication(store: Store, url: string): Promise<number> {
  const on = await store.getMeta("replication");
  const was = await store.getMeta("replication.url");
  if (on === "on" && was === url) return 0;
  const upsert = "ON CONFLICT (tbl, key) DO UPDATE SET ver = ver + 1";
  const results = await store.writer.write([
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'spec', hash, created_at FROM spec_versions
        ORDER BY created_at, hash ${upsert}`,
      args: [],
    },
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'agent', id, updated_at FROM agents
        ORDER BY created_at, id ${upsert}`,
      args: [],
    },
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'episode', ${idOfSql("id")}, ended_at FROM episodes
        ORDER BY ended_at, id ${upsert}`,
      args: [],
    },
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'usage', agent || char(10) || "window", NULL
        FROM budget_usage WHERE true ${upsert}`,
      args: [],
    },
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'stimulus', CAST(seq AS TEXT), done_at FROM stimuli
        WHERE state IN ('quarantined', 'dropped') OR (state != 'queued' AND last_error IS NOT NULL)
        ORDER BY seq ${upsert}`,
      args: [],
    },
    {
      sql: `INSERT INTO repl_pending (tbl, key, at) SELECT 'audit', CAST(seq AS TEXT), at FROM audit
        ORDER BY seq ${upsert}`,
      args: [],
    },
    {
      sql: "INSERT INTO meta (key, value) VALUES ('replication', 'on') ON CONFLICT (key) DO UPDATE SET value = 'on'",
      args: [],
    },
    {
      sql: `INSERT INTO meta (key, value) VALUES ('replication.url', ?)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
      args: [url],
    },
    // Another center (or the first): what the last one confirmed, when, and what it lost are not this one's.
    ...(was === url
      ? []
      : [
          {
            sql: `DELETE FROM meta WHERE key IN ('replication.confirmed_seq', 'replication.last_push_at',
              'replication.lost_rows')`,
            args: [],
          },
        ]),
  ]);
  return results.slice(0, 6).reduce((n, r) => n + r.rowsAffected, 0);
}

/**
 * Switch the local triggers off (replication removed from fleet.toml): the queue is
 * emptied, and retention no longer waits for a center. Turning it on again queues everything.
 */
export async function disableReplication(store: Store): Promise<boolean> {
  if ((await store.getMeta("replication")) !== "on") return false;
  await store.writer.write([
    { sql: "UPDATE meta SET value = 'off' WHERE key = 'replication'", args: [] },
    { sql: "DELETE FROM repl_pending", args: [] },
  ]);
  return true;
}
