/**
 * aedes' persistence interface (aedes-persistence 11, async form, as aedes 1.2.0 calls it)
 * on a libSQL file of the broker's own: clean = false sessions (subscriptions and their
 * offline queues), retained messages, wills and QoS 2 packets survive `kill -9` and
 * restarts. Every write goes through one `SerialWriter` (group commit, WAL); aedes' callback
 * for a publish runs after the queue rows and retained row it wrote are committed.
 * Subscriptions are also held in memory (a trie read on every QoS > 0 publish), and so is
 * each queue's index (broker id, counter, messageId per row, no payloads), so a messageId
 * update answers at once and its write, like a PUBACK's delete, is lazy: losing either in a
 * crash only redelivers the message (at least once). Retained messages and queued packets
 * live only on disk.
 */
import type { InStatement } from "@libsql/client";
import { chmodSync, closeSync, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import { Readable } from "node:stream";
import type { Logger } from "pino";
import { matchTopic } from "../topics.ts";
import {
  decodePacket,
  encodePacket,
  type QueuedFor,
  queuedCopy,
  queuedPerClient,
  queuedRetained,
  type StoredPacket,
} from "./codec.ts";
import { type ClientRef, num, OutgoingQueues, payloadBytes, type QueueEntry } from "./outgoing.ts";
import { RetainedOrder } from "./retained-order.ts";
import { BROKER_SCHEMA_VERSION } from "./schema.ts";
import { restoredSubscriptions, SessionAges, type SessionExpiry } from "./sessions.ts";
import { DbThread, type PlainResult, TooNewOnThread } from "./thread.ts";
import { SubscriptionTrie, type TopicSubscription } from "./trie.ts";
import { SerialWriter } from "./writer.ts";

/** How to open the broker's persistence. */
export interface LibsqlPersistenceOptions {
  /** The database file (created 0600 when missing); `:memory:` for a throwaway one. */
  readonly path: string;
  /** "full" survives power loss; "normal" survives process crashes (WAL). Default "full". */
  readonly synchronous?: "full" | "normal";
  /** Most messages kept per client (queued + in flight); past it new ones are dropped. Default 1000. */
  readonly maxOfflineMessages?: number;
  /** Most payload bytes kept per client (queued + in flight); past it new ones are dropped. 0 (default): no bound. */
  readonly maxOfflineBytes?: number;
  /** Most payload bytes in all clients' queues together; past it new ones are dropped. 0 (default): no bound. */
  readonly maxOfflineBytesTotal?: number;
  readonly logger?: Logger;
  /** Clock of the drop log's rate limit and of the sessions' ages (ms since the epoch). */
  readonly now?: () => number;
}

/** A subscription as aedes stores it (SUBSCRIBE packet entry; MQTT 5 options kept as given). */
export interface StoredSubscription {
  readonly topic: string;
  readonly qos: number;
  readonly [option: string]: unknown;
}

/** The broker's identity as the persistence needs it. */
interface BrokerRef {
  readonly id: string;
}

/** Drop counters. */
export interface PersistenceStats {
  /** Messages not queued because the client's queue was full (`max_offline_messages` or `max_offline_bytes`). */
  readonly offlineDropped: number;
  /** Messages held in all queues now. */
  readonly queued: number;
  /** Their payload bytes. */
  readonly queuedBytes: number;
}

const PAGE = 500;

/** The statement that marks the broker running at `now` (./sessions.ts: downtime is not absence). */
const ALIVE = (now: number): InStatement => ({
  sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('alive_at', ?)",
  args: [now],
});

/** Refused: the broker file was written by newer code. */
export class BrokerStoreTooNew extends Error {
  constructor(
    readonly path: string,
    readonly version: number,
  ) {
    super(`${path} has broker schema version ${version}; this gateway knows up to ${BROKER_SCHEMA_VERSION}`);
    this.name = "BrokerStoreTooNew";
  }
}

/** aedes persistence on libSQL. */
export class LibsqlPersistence implements SessionExpiry {
  private db: DbThread | null = null;
  private writer: SerialWriter | null = null;
  private brokerRef: BrokerRef | null = null;
  private destroyed = false;
  private readonly trie = new SubscriptionTrie();
  /** clientId -> filter -> subscription, every persistent subscription (qos 0 too). */
  private readonly subs = new Map<string, Map<string, StoredSubscription>>();
  /** The subscriptions in `subs`, all clients together. */
  private subsCount = 0;
  /** Clients whose clean = false session exists, subscriptions or not (./sessions.ts); mirrors `sessions`. */
  private readonly sessions = new Set<string>();
  /** When each session was last in use; mirrors `sessions.seen_at`. */
  private readonly ages = new SessionAges();
  /** Each client's queue: broker id, counter and messageId per row (same order as `outgoing.seq`). */
  private readonly outgoing: OutgoingQueues;
  /**
   * Clients that may have a will or QoS 2 packets stored: a CONNECT of any other client (the
   * common case) asks the file nothing, so it never waits behind a large commit.
   */
  private readonly willClients = new Set<string>();
  private readonly incomingClients = new Set<string>();
  /** Retained writes of QoS > 0 packets, awaited by the same packet's `outgoingEnqueueCombi`. */
  private readonly retainedWrites = new WeakMap<object, Promise<unknown>>();
  /** Which retained copies sent to a new subscription are older than a message of their topic sent live. */
  readonly retained = new RetainedOrder();
  /**
   * Retained `$SYS/...` messages (the broker's `$SYS/broker/` tree, ../sys.ts), kept in memory as Mosquitto keeps
   * them: refreshed every few seconds and rebuilt at each start, they would be a write to broker.db (on an edge
   * box, its flash) every refresh for nothing a restart needs.
   */
  private readonly sysRetained = new Map<string, StoredPacket>();
  /** broker.db's retained rows: counted at setup, then kept by each store and delete. */
  private retainedRows = 0;

  constructor(private readonly opts: LibsqlPersistenceOptions) {
    this.outgoing = new OutgoingQueues({
      max: opts.maxOfflineMessages ?? 1000,
      maxBytes: opts.maxOfflineBytes ?? 0,
      maxTotalBytes: opts.maxOfflineBytesTotal ?? 0,
      logger: opts.logger,
      now: opts.now,
    });
  }

  /** The broker this persistence serves (set by `setup`). */
  get broker(): BrokerRef {
    return this.brokerRef!;
  }

  /** Counters since open. */
  stats(): PersistenceStats {
    return { offlineDropped: this.outgoing.dropped, queued: this.outgoing.size, queuedBytes: this.outgoing.bytes };
  }

  /** Open the file, create the tables, load subscriptions and queue sizes. Called by aedes' `listen`. */
  async setup(broker: BrokerRef): Promise<void> {
    this.brokerRef = broker;
    if (this.db) return;
    const { path } = this.opts;
    if (path !== ":memory:") {
      mkdirSync(dirname(path), { recursive: true });
      // Created 0600, or made so, never opened when it exists: closing a descriptor of the file drops every
      // POSIX lock this process holds on it, SQLite's too (a connection still open, on any thread), and
      // another process's last close could then delete the WAL still in use (gateway/store/files.ts).
      try {
        closeSync(openSync(path, "wx", 0o600));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
      chmodSync(path, 0o600);
    }
    let db: DbThread;
    try {
      db = await DbThread.open(path, this.opts.synchronous ?? "full");
    } catch (err) {
      throw err instanceof TooNewOnThread ? new BrokerStoreTooNew(path, err.version) : err;
    }
    try {
      const now = this.now();
      const [, , , , subs, queued, wills, incoming, sessions, retained] = await db.batch([
        // Time the broker was not running is not absence: no client could come back to it.
        {
          sql: `UPDATE sessions SET seen_at = seen_at + max(0, ? - (SELECT value FROM meta WHERE key = 'alive_at'))
                WHERE EXISTS (SELECT 1 FROM meta WHERE key = 'alive_at')`,
          args: [now],
        },
        ALIVE(now),
        // Sessions kept by older code have subscriptions or a queue without a row, or a row without a time:
        // their clients' absence counts from now.
        {
          sql: `INSERT OR IGNORE INTO sessions (client_id, seen_at)
                SELECT client_id, ? FROM subscriptions UNION SELECT client_id, ? FROM outgoing`,
          args: [now, now],
        },
        { sql: "UPDATE sessions SET seen_at = ? WHERE seen_at IS NULL", args: [now] },
        "SELECT client_id, topic, qos, options FROM subscriptions",
        // Rows older code wrote have no size: their stored text, less base64's third, stands for it.
        `SELECT client_id, broker_id, broker_counter, message_id, coalesce(bytes, length(packet) * 3 / 4) AS bytes
         FROM outgoing ORDER BY seq`,
        "SELECT client_id FROM wills",
        "SELECT DISTINCT client_id FROM incoming",
        "SELECT client_id, seen_at FROM sessions",
        // Counted once here; each store and delete then says whether it added or removed a row.
        "SELECT COUNT(*) AS n FROM retained",
      ]);
      this.retainedRows = Number(retained!.rows[0]!.n);
      for (const row of sessions!.rows) {
        this.sessions.add(String(row.client_id));
        this.ages.touch(String(row.client_id), Number(row.seen_at));
      }
      for (const row of wills!.rows) this.willClients.add(String(row.client_id));
      for (const row of incoming!.rows) this.incomingClients.add(String(row.client_id));
      for (const row of subs!.rows) {
        this.remember(String(row.client_id), {
          ...(JSON.parse(String(row.options)) as object),
          topic: String(row.topic),
          qos: Number(row.qos),
        });
      }
      for (const row of queued!.rows) {
        this.outgoing.restore(String(row.client_id), {
          brokerId: row.broker_id === null ? null : String(row.broker_id),
          brokerCounter: num(row.broker_counter),
          messageId: num(row.message_id),
          bytes: Number(row.bytes),
        });
      }
    } catch (err) {
      await db.close().catch(() => undefined);
      throw err;
    }
    this.db = db;
    this.writer = new SerialWriter(db);
  }

  private now(): number {
    return (this.opts.now ?? Date.now)();
  }

  private run(statements: InStatement[], lazy: boolean | "background" = false) {
    if (!this.writer) return Promise.reject(new Error("broker persistence is not set up"));
    return this.writer.run(statements, { lazy });
  }

  // ---- retained ------------------------------------------------------------------------

  /** Store (or, with an empty payload, delete) the retained message of `packet.topic`. */
  async storeRetained(packet: StoredPacket): Promise<void> {
    const topic = String(packet.topic);
    this.retained.stored(topic);
    const payload = packet.payload as { length: number } | undefined;
    if (topic.startsWith("$SYS/")) {
      if (!payload || payload.length === 0) this.sysRetained.delete(topic);
      else this.sysRetained.set(topic, { ...packet });
      return;
    }
    const cleared = !payload || payload.length === 0;
    const args = cleared ? [topic] : [topic, encodePacket({ ...packet })];
    // The insert says whether the topic is new, so the count needs no read; the update runs only when it was
    // not (`changes()` is still the insert's). One row written either way, as INSERT OR REPLACE wrote it.
    const statements: InStatement[] = cleared
      ? [{ sql: "DELETE FROM retained WHERE topic = ?", args }]
      : [
          { sql: "INSERT OR IGNORE INTO retained (topic, packet) VALUES (?1, ?2)", args },
          { sql: "UPDATE retained SET packet = ?2 WHERE topic = ?1 AND changes() = 0", args },
        ];
    const counted = (results: PlainResult[]) => {
      this.retainedRows += (cleared ? -1 : 1) * results[0]!.rowsAffected;
    };
    if (Number(packet.qos) > 0) {
      // aedes' next step for this packet is outgoingEnqueueCombi, which waits for this write
      // too: the retained row and the queue rows share one commit, and aedes' callback still
      // comes only after both.
      const write = this.run(statements, true).then(counted);
      write.catch(() => undefined); // the error reaches aedes through outgoingEnqueueCombi
      this.retainedWrites.set(packet, write);
      return;
    }
    counted(await this.run(statements));
  }

  /**
   * Retained messages matching any of `patterns` (a pattern's matches in topic order), stamped by
   * `retained` (./retained-order.ts): one whose topic is stored again before it goes out is dropped then.
   */
  createRetainedStreamCombi(patterns: readonly string[]): Readable {
    const self = this;
    return this.retained.stream(
      (async function* () {
        for (const p of patterns) yield* self.retainedMatching(p);
      })(),
    );
  }

  /** Retained messages matching `pattern`. Deprecated by aedes-persistence; kept for the interface. */
  createRetainedStream(pattern: string): Readable {
    return this.createRetainedStreamCombi([pattern]);
  }

  private async *retainedMatching(pattern: string): AsyncGenerator<StoredPacket> {
    if (pattern.startsWith("$SYS/")) {
      for (const [topic, packet] of [...this.sysRetained].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
        if (matchTopic(pattern, topic)) yield packet;
      return;
    }
    // Scan only the topics sharing the pattern's literal prefix, in pages.
    const levels = pattern.split("/");
    const wild = levels.findIndex((l) => l === "+" || l === "#");
    const exact = wild < 0;
    const prefix = exact ? pattern : levels.slice(0, wild).join("/") + (wild > 0 ? "/" : "");
    if (exact) {
      const [r] = await this.run([{ sql: "SELECT packet FROM retained WHERE topic = ?", args: [pattern] }]);
      for (const row of r!.rows) yield decodePacket(String(row.packet));
      return;
    }
    // '#' also matches the parent level: "a/#" matches "a" itself, which sorts before "a/".
    if (levels[wild] === "#" && wild > 0) {
      const parent = levels.slice(0, wild).join("/");
      const [r] = await this.run([{ sql: "SELECT packet FROM retained WHERE topic = ?", args: [parent] }]);
      for (const row of r!.rows) yield decodePacket(String(row.packet));
    }
    // U+10FFFF sorts after every character a topic can hold (BINARY collation compares UTF-8 bytes).
    const upper = `${prefix}\u{10FFFF}`;
    let after = prefix;
    let first = true;
    for (;;) {
      const [r] = await this.run([
        {
          sql: `SELECT topic, packet FROM retained WHERE topic ${first ? ">=" : ">"} ? AND topic < ?
                ORDER BY topic LIMIT ${PAGE}`,
          args: [after, upper],
        },
      ]);
      first = false;
      const rows = r!.rows;
      for (const row of rows) {
        const topic = String(row.topic);
        if (matchTopic(pattern, topic)) yield decodePacket(String(row.packet));
      }
      if (rows.length < PAGE) return;
      after = String(rows[rows.length - 1]!.topic);
    }
  }

  // ---- subscriptions -------------------------------------------------------------------

  private remember(clientId: string, sub: StoredSubscription): void {
    let stored = this.subs.get(clientId);
    if (!stored) {
      stored = new Map();
      this.subs.set(clientId, stored);
    }
    const before = stored.get(sub.topic);
    if (!before) this.subsCount++;
    if (before && before.qos > 0) this.trie.remove(clientId, sub.topic);
    stored.set(sub.topic, sub);
    if (sub.qos > 0) {
      this.trie.add({ clientId, topic: sub.topic, qos: sub.qos, rh: sub.rh, rap: sub.rap, nl: sub.nl });
    }
  }

  private forget(clientId: string, topic: string): void {
    const stored = this.subs.get(clientId);
    const sub = stored?.get(topic);
    if (!stored || !sub) return;
    if (sub.qos > 0) this.trie.remove(clientId, topic);
    stored.delete(topic);
    this.subsCount--;
    if (stored.size === 0) this.subs.delete(clientId);
  }

  /** Add (or replace) a clean = false client's subscriptions. */
  async addSubscriptions(client: ClientRef, subs: readonly StoredSubscription[]): Promise<void> {
    const statements: InStatement[] = [];
    for (const sub of subs) {
      const { topic, qos, ...options } = sub;
      statements.push({
        sql: "INSERT OR REPLACE INTO subscriptions (client_id, topic, qos, options) VALUES (?, ?, ?, ?)",
        args: [client.id, topic, qos, JSON.stringify(options)],
      });
    }
    await this.run(statements);
    for (const sub of subs) this.remember(client.id, { ...sub });
  }

  /** Remove subscriptions by filter. */
  async removeSubscriptions(client: ClientRef, topics: readonly string[]): Promise<void> {
    await this.run(
      topics.map((t) => ({ sql: "DELETE FROM subscriptions WHERE client_id = ? AND topic = ?", args: [client.id, t] })),
    );
    for (const t of topics) this.forget(client.id, t);
  }

  /**
   * A client's stored subscriptions, restored on a clean = false CONNECT: aedes' lookup of the session, which
   * opens it when new (durably, before the CONNACK), and answers for one with none (./sessions.ts).
   */
  async subscriptionsByClient(client: ClientRef): Promise<StoredSubscription[]> {
    const existed = this.sessions.has(client.id);
    const now = this.now();
    this.ages.touch(client.id, now);
    if (!existed) {
      this.sessions.add(client.id);
      try {
        await this.run([
          { sql: "INSERT OR IGNORE INTO sessions (client_id, seen_at) VALUES (?, ?)", args: [client.id, now] },
        ]);
      } catch (err) {
        this.sessions.delete(client.id);
        this.ages.forget(client.id);
        throw err;
      }
    } else this.recordSeen(client.id, now);
    const subs = [...(this.subs.get(client.id)?.values() ?? [])].map((s) => ({ ...s }));
    return restoredSubscriptions(subs, existed);
  }

  /** The subscriptions clean = false sessions hold, their clients connected or not. */
  subscriptionCount(): number {
    return this.subsCount;
  }

  /** The retained messages held, `$SYS` ones included. */
  retainedCount(): number {
    return this.retainedRows + this.sysRetained.size;
  }

  /** Number of QoS > 0 subscriptions and of clients with any subscription. */
  async countOffline(): Promise<{ subsCount: number; clientsCount: number }> {
    return { subsCount: this.trie.size, clientsCount: this.subs.size };
  }

  /** The QoS > 0 subscriptions matching a topic. */
  async subscriptionsByTopic(topic: string): Promise<TopicSubscription[]> {
    return this.trie.match(topic);
  }

  /** Drop a client's subscriptions and end its session (a clean = true CONNECT). */
  async cleanSubscriptions(client: ClientRef): Promise<void> {
    if (!this.subs.has(client.id) && !this.sessions.has(client.id)) return; // the in-memory copies mirror the tables
    await this.run([
      { sql: "DELETE FROM subscriptions WHERE client_id = ?", args: [client.id] },
      { sql: "DELETE FROM sessions WHERE client_id = ?", args: [client.id] },
    ]);
    for (const topic of [...(this.subs.get(client.id)?.keys() ?? [])]) this.forget(client.id, topic);
    this.sessions.delete(client.id);
    this.ages.forget(client.id);
  }

  // ---- session expiry (./sessions.ts) ---------------------------------------------------

  /** The client of a clean = false session went away. */
  left(clientId: string, at: number): void {
    if (!this.sessions.has(clientId)) return;
    this.ages.touch(clientId, at);
    this.recordSeen(clientId, at);
  }

  /**
   * A session's time, written with the next commit (within 100 ms): a crash before it leaves the time before,
   * as if this connection or disconnection had not been.
   */
  private recordSeen(clientId: string, at: number): void {
    void this.run(
      [{ sql: "UPDATE sessions SET seen_at = ? WHERE client_id = ?", args: [at, clientId] }],
      "background",
    ).catch((err: unknown) => this.opts.logger?.warn({ err, client: clientId }, "session time not recorded"));
  }

  /** End the sessions whose client has been away longer than `maxAgeMs`: one transaction. */
  async expire(now: number, maxAgeMs: number, connected: (clientId: string) => boolean): Promise<string[]> {
    // Every session has its row (`setup` gave one to those older code kept without).
    const { due, touched } = this.ages.sweep(this.sessions, connected, now, now - maxAgeMs);
    const statements: InStatement[] = touched.map((id) => ({
      sql: "UPDATE sessions SET seen_at = ? WHERE client_id = ?",
      args: [now, id],
    }));
    statements.push(ALIVE(now));
    for (const id of due)
      for (const table of ["subscriptions", "outgoing", "incoming", "sessions"])
        statements.push({ sql: `DELETE FROM ${table} WHERE client_id = ?`, args: [id] });
    // Gone from memory first: a client that comes back before the commit opens a new session, whose row
    // the writer commits after these deletes. Should the commit fail, the next start reads them again.
    for (const id of due) {
      for (const topic of [...(this.subs.get(id)?.keys() ?? [])]) this.forget(id, topic);
      this.sessions.delete(id);
      this.ages.forget(id);
      this.outgoing.dropClient(id);
      this.incomingClients.delete(id);
    }
    await this.run(statements);
    return due;
  }

  /** Clean = false sessions held. */
  count(): number {
    return this.sessions.size;
  }

  /** Client ids subscribed to exactly `topic`. */
  getClientList(topic: string): Readable {
    const ids: string[] = [];
    for (const [id, stored] of this.subs) if (stored.has(topic)) ids.push(id);
    return Readable.from(ids);
  }

  // ---- outgoing queues -----------------------------------------------------------------

  /** Queue `packet` for one subscription's client. */
  outgoingEnqueue(sub: QueuedFor, packet: StoredPacket): Promise<void> {
    return this.outgoingEnqueueCombi([sub], packet);
  }

  /** Queue `packet` for each subscription's client; a full queue drops it for that client (counted, logged). */
  async outgoingEnqueueCombi(subs: readonly QueuedFor[], packet: StoredPacket): Promise<void> {
    const retained = this.retainedWrites.get(packet);
    if (retained) {
      this.retainedWrites.delete(packet);
      await Promise.all([this.enqueue(subs, packet), retained]);
    } else {
      await this.enqueue(subs, packet);
    }
  }

  private async enqueue(subs: readonly QueuedFor[], packet: StoredPacket): Promise<void> {
    if (subs.length === 0) return;
    const brokerId = (packet.brokerId as string | undefined) ?? null;
    const brokerCounter = num(packet.brokerCounter);
    const rows: InStatement[] = [];
    for (const { copy, clientIds } of queuedPerClient(subs, packet)) {
      const text = encodePacket(copy);
      const bytes = payloadBytes(copy);
      const entry = { brokerId, brokerCounter, messageId: null, bytes };
      for (const clientId of this.outgoing.enqueue(clientIds, String(packet.topic), entry))
        rows.push({
          sql: `INSERT INTO outgoing (client_id, broker_id, broker_counter, message_id, packet, bytes)
                VALUES (?, ?, ?, NULL, ?, ?)`,
          args: [clientId, brokerId, brokerCounter, text, bytes],
        });
    }
    await this.run(rows);
  }

  /**
   * deliveries.ts `RetainedQueue`: queued at once, so it is sent now, in the order aedes hands it over, and
   * its row written with the next commit (its messageId and its PUBACK's delete are queued after it).
   */
  queueRetained(clientId: string, packet: StoredPacket, qos: number): boolean {
    const brokerId = String(packet.brokerId);
    const brokerCounter = num(packet.brokerCounter);
    const bytes = payloadBytes(packet);
    const entry = { brokerId, brokerCounter, messageId: null, bytes };
    if (!this.outgoing.queueRetained(clientId, String(packet.topic), entry)) return false;
    void this.run(
      [
        {
          sql: `INSERT INTO outgoing (client_id, broker_id, broker_counter, message_id, packet, bytes)
                VALUES (?, ?, ?, NULL, ?, ?)`,
          args: [clientId, brokerId, brokerCounter, encodePacket(queuedRetained(packet, qos)), bytes],
        },
      ],
      true,
    ).catch((err: unknown) =>
      this.opts.logger?.warn({ err, client: clientId }, "queued retained message not recorded"),
    );
    return true;
  }

  /**
   * Record the messageId given to a queued packet (same broker id and counter), or replace
   * the queued packet holding that messageId (a PUBREL after PUBREC): see `OutgoingQueues.number`.
   */
  async outgoingUpdate(client: ClientRef, packet: StoredPacket): Promise<void> {
    const numbered = this.outgoing.number(client, packet);
    if (!numbered) return;
    const { brokerId: bid, brokerCounter: bc, messageId: mid } = numbered.entry;
    if (numbered.added) return this.insertPubrel(client, mid, packet);
    if (numbered.joined) return this.insertJoined(client, numbered.entry, packet);
    if (numbered.delivered) return this.deleteDelivered(client, numbered.entry);
    // Not awaited (aedes writes the packet once this resolves); it commits with the next transaction.
    // The statement finds the row the index found: the first in queue order.
    void this.run(
      [
        {
          sql: `UPDATE outgoing SET
                  packet = CASE WHEN broker_id IS ?2 AND broker_counter IS ?3 THEN packet ELSE ?5 END,
                  message_id = ?4, broker_id = ?2, broker_counter = ?3
                WHERE seq = (SELECT seq FROM outgoing WHERE client_id = ?1
                               AND (CASE WHEN ?2 IS NULL THEN message_id = ?4
                                    ELSE (broker_id IS ?2 AND broker_counter IS ?3)
                                      OR (broker_id IS NOT ?2 AND message_id = ?4) END)
                             ORDER BY seq LIMIT 1)`,
          args: [client.id, bid, bc, mid, encodePacket(packet)],
        },
      ],
      "background",
    ).catch((err: unknown) => this.opts.logger?.warn({ err, client: client.id }, "queued messageId not recorded"));
  }

  /** A PUBREL the queue keeps though its PUBLISH never was queued (`OutgoingQueues.keepPubrel`): a row of its own. */
  private insertPubrel(client: ClientRef, messageId: number | null, pubrel: StoredPacket): void {
    // Not awaited, as an update: a PUBREL lost in a crash only leaves that one flow unfinished.
    void this.run(
      [
        {
          sql: `INSERT INTO outgoing (client_id, broker_id, broker_counter, message_id, packet, bytes)
                VALUES (?, NULL, NULL, ?, ?, 0)`,
          args: [client.id, messageId, encodePacket(pubrel)],
        },
      ],
      "background",
    ).catch((err: unknown) => this.opts.logger?.warn({ err, client: client.id }, "PUBREL not recorded"));
  }

  /** A live PUBLISH that joined the session's queue at its send (`OutgoingQueues.joinLate`): a row of its own. */
  private insertJoined(client: ClientRef, entry: QueueEntry, packet: StoredPacket): void {
    // Not awaited, as an update; its PUBACK's delete is queued after it.
    void this.run(
      [
        {
          sql: `INSERT INTO outgoing (client_id, broker_id, broker_counter, message_id, packet, bytes)
                VALUES (?, ?, ?, ?, ?, ?)`,
          args: [
            client.id,
            entry.brokerId,
            entry.brokerCounter,
            entry.messageId,
            encodePacket(packet),
            entry.bytes ?? 0,
          ],
        },
      ],
      "background",
    ).catch((err: unknown) => this.opts.logger?.warn({ err, client: client.id }, "queued message not recorded"));
  }

  /** The row of a queued message that went out at QoS 0 (`OutgoingQueues.sentAtQos0`): nothing acknowledges it. */
  private deleteDelivered(client: ClientRef, entry: QueueEntry): void {
    // Not awaited, as a PUBACK's delete: one lost in a crash only means the message is delivered again.
    void this.run(
      [
        {
          sql: `DELETE FROM outgoing WHERE seq = (SELECT seq FROM outgoing WHERE client_id = ?
                  AND broker_id IS ? AND broker_counter IS ? ORDER BY seq LIMIT 1)`,
          args: [client.id, entry.brokerId, entry.brokerCounter],
        },
      ],
      "background",
    ).catch((err: unknown) => this.opts.logger?.warn({ err, client: client.id }, "delivered message not removed"));
  }

  /** Remove the queued packet with `packet.messageId` (a PUBACK or PUBCOMP); resolves with it. */
  async outgoingClearMessageId(client: ClientRef, packet: { messageId?: number }): Promise<StoredPacket | undefined> {
    const mid = num(packet?.messageId);
    const entry = this.outgoing.clear(client.id, mid);
    if (!entry) return undefined;
    const where = "WHERE seq = (SELECT seq FROM outgoing WHERE client_id = ? AND message_id = ? ORDER BY seq LIMIT 1)";
    // Lazy: a PUBACK lost in a crash only means the message is delivered again.
    if (entry.inFlight) {
      void this.run([{ sql: `DELETE FROM outgoing ${where}`, args: [client.id, mid] }], "background").catch(
        (err: unknown) => this.opts.logger?.warn({ err, client: client.id }, "acknowledged message not removed"),
      );
      return entry.inFlight;
    }
    const [r] = await this.run(
      [{ sql: `DELETE FROM outgoing ${where} RETURNING packet, message_id`, args: [client.id, mid] }],
      true,
    );
    const row = r!.rows[0];
    return row ? decodePacket(String(row.packet), num(row.message_id)) : undefined;
  }

  /** deliveries.ts `LiveClaims`. */
  claimLive(client: ClientRef, brokerId: string, brokerCounter: number): boolean {
    return this.outgoing.claimLive(client, brokerId, brokerCounter);
  }

  /**
   * A client's queue as it stood when the client came back, oldest first, read in pages: what aedes
   * sends it on CONNECT (see `OutgoingQueues.snapshot`).
   */
  outgoingStream(client: ClientRef): Readable {
    const self = this;
    const snapshot = this.outgoing.snapshot(client);
    return Readable.from(
      (async function* () {
        let after = 0;
        while (snapshot.entries.length > 0) {
          const [r] = await self.run([
            {
              sql: `SELECT seq, packet, message_id, broker_id, broker_counter FROM outgoing
                    WHERE client_id = ? AND seq > ? ORDER BY seq LIMIT ${PAGE}`,
              args: [client.id, after],
            },
          ]);
          const rows = r!.rows;
          for (const row of rows) {
            const bid = row.broker_id === null ? null : String(row.broker_id);
            const entry = self.outgoing.find(client.id, bid, num(row.broker_counter), num(row.message_id));
            if (entry === undefined || !snapshot.hands(entry)) continue;
            const packet = decodePacket(String(row.packet), num(row.message_id));
            self.outgoing.handedOver(packet);
            yield packet;
          }
          if (rows.length < PAGE) return;
          after = Number(rows[rows.length - 1]!.seq);
        }
      })(),
    );
  }

  // ---- incoming QoS 2 ------------------------------------------------------------------

  /** Keep a QoS 2 PUBLISH until its PUBREL. */
  async incomingStorePacket(client: ClientRef, packet: StoredPacket): Promise<void> {
    this.incomingClients.add(client.id);
    const copy = { ...queuedCopy(packet), messageId: packet.messageId };
    await this.run([
      {
        sql: "INSERT OR REPLACE INTO incoming (client_id, message_id, packet) VALUES (?, ?, ?)",
        args: [client.id, num(packet.messageId), encodePacket(copy)],
      },
    ]);
  }

  /** The stored QoS 2 PUBLISH with `packet.messageId`; throws when there is none. */
  async incomingGetPacket(client: ClientRef, packet: { messageId?: number }): Promise<StoredPacket> {
    const [r] = await this.run([
      {
        sql: "SELECT packet, message_id FROM incoming WHERE client_id = ? AND message_id = ?",
        args: [client.id, num(packet.messageId)],
      },
    ]);
    const row = r!.rows[0];
    if (!row) throw new Error("no such packet");
    return decodePacket(String(row.packet), num(row.message_id));
  }

  /** Forget a released QoS 2 PUBLISH; throws when there is none. */
  async incomingDelPacket(client: ClientRef, packet: { messageId?: number }): Promise<void> {
    const [r] = await this.run([
      { sql: "DELETE FROM incoming WHERE client_id = ? AND message_id = ?", args: [client.id, num(packet.messageId)] },
    ]);
    if (r!.rowsAffected === 0) throw new Error("no such packet");
  }

  /** Forget all of a client's QoS 2 packets (MQTT-3.1.2-6: a clean session ends with it). */
  async cleanIncoming(client: ClientRef): Promise<void> {
    if (!this.incomingClients.has(client.id)) return;
    await this.run([{ sql: "DELETE FROM incoming WHERE client_id = ?", args: [client.id] }]);
    this.incomingClients.delete(client.id);
  }

  // ---- wills ---------------------------------------------------------------------------

  /** Store a client's will, stamped with this broker's id and the client id. */
  async putWill(client: ClientRef, packet: StoredPacket): Promise<void> {
    packet.brokerId = this.broker.id;
    packet.clientId = client.id;
    this.willClients.add(client.id);
    await this.run([
      {
        sql: "INSERT OR REPLACE INTO wills (client_id, broker_id, packet) VALUES (?, ?, ?)",
        args: [client.id, this.broker.id, encodePacket(packet)],
      },
    ]);
  }

  /** A client's will, if stored. */
  async getWill(client: ClientRef): Promise<StoredPacket | undefined> {
    if (!this.willClients.has(client.id)) return undefined;
    const [r] = await this.run([{ sql: "SELECT packet FROM wills WHERE client_id = ?", args: [client.id] }]);
    const row = r!.rows[0];
    return row ? decodePacket(String(row.packet)) : undefined;
  }

  /** Remove and return a client's will. */
  async delWill(client: ClientRef): Promise<StoredPacket | undefined> {
    if (!this.willClients.has(client.id)) return undefined;
    this.willClients.delete(client.id);
    const [r] = await this.run([{ sql: "DELETE FROM wills WHERE client_id = ? RETURNING packet", args: [client.id] }]);
    const row = r!.rows[0];
    return row ? decodePacket(String(row.packet)) : undefined;
  }

  /** Wills of brokers not in `brokers` (dead ones, e.g. this process before a crash). */
  streamWill(brokers: Readonly<Record<string, unknown>> = {}): Readable {
    const self = this;
    return Readable.from(
      (async function* () {
        const [r] = await self.run([{ sql: "SELECT broker_id, packet FROM wills ORDER BY client_id", args: [] }]);
        for (const row of r!.rows) {
          const id = row.broker_id === null ? "" : String(row.broker_id);
          if (!Object.hasOwn(brokers, id)) yield decodePacket(String(row.packet));
        }
      })(),
    );
  }

  // ---- lifecycle -----------------------------------------------------------------------

  /** Wait for every queued write, then close the file. Throws when called twice. */
  async destroy(): Promise<void> {
    if (this.destroyed) throw new Error("destroyed called twice!");
    this.destroyed = true;
    // Marked running until now: the time until the next start is downtime, not the clients' absence.
    await this.writer
      ?.run([ALIVE(this.now())], { lazy: "background" })
      .catch((err: unknown) => this.opts.logger?.warn({ err }, "broker stop time not recorded"));
    await this.writer?.drain();
    await this.db?.close();
    this.db = null;
    this.writer = null;
  }
}
