/**
 * Retention (docs/fleet-toml.md): keeps what accumulates bounded without breaking verifiability.
 *  - checkpoints past a type's `checkpoint.keep` lose their state (tombstone: hash, parent
 *    and seq stay, so the chain still verifies);
 *  - tombstones and episodes (with their event logs) older than `retention.episodes_days` are deleted; the
 *    newest deleted checkpoint of each agent becomes its chain anchor;
 *  - finished stimuli older than `retention.dedup_days` are forgotten (dedup memory), and
 *    so are settled wake-ups (pending ones are kept however old); quarantined stimuli are kept
 *    until an operator retries or drops them, or for `retention.quarantine_days` (then dropped);
 *  - code bundles no episode names any more (and no running or recent spec version) are deleted;
 *  - SQLite reuses the freed pages, so the file stops growing at its working-set size.
 *  - with `keepUnconfirmed` (`[replication] required`), nothing still in the replication
 *    queue is touched: the central server has not confirmed it yet.
 * Each pass does bounded work through the group committer; it never blocks episodes for long.
 */
import { sql } from "drizzle-orm";
import type { FleetSpec } from "../spec/index.ts";
import { bundleStoredSql, idBytesSql, idOfSql, type Store, type WriteItem } from "../store/index.ts";

const DAY = 86_400_000;

/** What one pass did (or, dry, would do). */
export interface GcReport {
  tombstoned: number;
  checkpointsDeleted: number;
  episodesDeleted: number;
  eventsDeleted: number;
  stimuliForgotten: number;
  /** Stimuli quarantined longer than `retention.quarantine_days`, dropped. */
  quarantineExpired: number;
  usageRowsDeleted: number;
  bundlesDeleted: number;
  ms: number;
}

/**
 * What `fleet gc` and POST /api/gc answer: the report, and after a collection (not a dry run) the bytes of
 * fleet.db's free pages: the room retention made, which the next writes reuse before the file grows (the data
 * disk's reserve counts it).
 */
export type GcOutcome = GcReport & { dbFreeBytes?: number };

/** Options of a pass. */
export interface GcOptions {
  readonly now: number;
  /** Most rows touched per category per pass. */
  readonly batch?: number;
  readonly dryRun?: boolean;
  /** Keep every row still waiting in the replication queue (`[replication] required`). */
  readonly keepUnconfirmed?: boolean;
  /** Code bundles in use now (the running spec version's, a rollout's): never deleted. */
  readonly keepBundles?: readonly string[];
}

/** `AND` clauses that spare rows the central server has not confirmed (see replication/). */
function unconfirmedGuards(on: boolean) {
  const pending = (tbl: string, key: ReturnType<typeof sql>) =>
    on ? sql`AND NOT EXISTS (SELECT 1 FROM repl_pending p WHERE p.tbl = ${tbl} AND p.key = ${key})` : sql``;
  return {
    // The queue names an episode by its id's text; the tables store its bytes (store/hashes.ts).
    checkpoint: pending("episode", sql.raw(idOfSql("c.episode"))),
    tombstone: pending("episode", sql.raw(idOfSql("checkpoints.episode"))),
    episode: pending("episode", sql.raw(idOfSql("episodes.id"))),
    stimulus: pending("stimulus", sql`CAST(stimuli.seq AS TEXT)`),
    // An episode's queue entry carries its agent's usage rows (store/migrate.ts, migration 11): an
    // agent with an episode still queued keeps them all. One pass over the queue, not one per row.
    usage: on
      ? sql`${pending("usage", sql`budget_usage.agent || char(10) || budget_usage."window"`)}
        AND budget_usage.agent NOT IN (SELECT e.agent FROM repl_pending p JOIN episodes e
          ON e.id = ${sql.raw(idBytesSql("p.key"))} WHERE p.tbl = 'episode')`
      : sql``,
  };
}

async function scalar(store: Store, query: ReturnType<typeof sql>): Promise<number> {
  const row = (await store.db.get(query)) as Record<string, number> | [number] | undefined;
  if (!row) return 0;
  return Number(Array.isArray(row) ? row[0] : Object.values(row)[0]) || 0;
}

/** Run one bounded pass. Call repeatedly until it reports nothing to do. */
export async function gcPass(store: Store, spec: FleetSpec, opts: GcOptions): Promise<GcReport> {
  const started = performance.now();
  const batch = opts.batch ?? 5000;
  const report = emptyReport();
  const episodeCutoff = opts.now - spec.retention.episodes_days * DAY;
  const dedupCutoff = opts.now - spec.retention.dedup_days * DAY;
  const unconfirmed = unconfirmedGuards(opts.keepUnconfirmed ?? false);

  // Every query below starts from an index and reads only what it may collect, plus one seek per
  // agent: a pass costs what it does, not what the store holds (scripts/soak.ts; test/gc.test.ts reads
  // every statement's query plan).

  // 1. Tombstone checkpoints beyond `keep`, per type; `batch` rows in all per pass. Each agent's
  //    `tombstoned_seq` says how far its chain is tombstoned already (migration 29): only the range
  //    from there to `keep` before the head is read.
  for (const type of Object.values(spec.agents)) {
    const keep = type.checkpoint.keep;
    const budget = batch - report.tombstoned;
    if (keep === 0 || budget <= 0) continue;
    // Where an agent's chain still has states to tombstone from (`t`: the agents table's name in the query).
    const from = (t: string) => sql.raw(`max(${t}.anchor_seq, ${t}.tombstoned_seq)`);
    const pick = sql`SELECT c.rowid FROM agents a JOIN checkpoints c ON c.agent = a.id
        AND c.seq > ${from("a")} AND c.seq <= a.head_seq - ${keep}
      WHERE a.type = ${type.name} AND a.head_seq - ${from("a")} > ${keep} AND c.state IS NOT NULL
      ${unconfirmed.checkpoint} LIMIT ${budget}`;
    if (opts.dryRun) report.tombstoned += await scalar(store, sql`SELECT count(*) FROM (${pick})`);
    else {
      const [r] = await store.writer.write([
        store.db.run(sql`UPDATE checkpoints SET state = NULL WHERE rowid IN (${pick})`),
        // The frontier moves to just before the first checkpoint in range still holding a state (one
        // the batch did not reach, or the center has not confirmed), never backwards.
        store.db.run(sql`UPDATE agents SET tombstoned_seq = max(tombstoned_seq, coalesce(
            (SELECT min(c.seq) - 1 FROM checkpoints c WHERE c.agent = agents.id
              AND c.seq > ${from("agents")} AND c.seq <= agents.head_seq - ${keep} AND c.state IS NOT NULL),
            agents.head_seq - ${keep}))
          WHERE type = ${type.name} AND head_seq - ${from("agents")} > ${keep}`),
      ]);
      report.tombstoned += (r as { rowsAffected: number }).rowsAffected;
    }
  }

  // 2. Delete old tombstones and move each agent's anchor forward. Only the run of old
  //    tombstones at the very start of a chain goes (step 1 may have tombstoned rows out of
  //    order), so whatever remains still links to the anchor; `batch` rows in all per pass.
  //    An agent is a candidate when the first checkpoint of its chain is an old tombstone; only a
  //    chain longer than its type's `keep` has tombstones (the head never is one), which spares the
  //    seek for agents that have run little (most of a big, quiet fleet). After `keep` is raised, a
  //    shorter chain's tombstones from before wait until the chain is longer than the new keep.
  const old = (c: string) =>
    sql`${sql.raw(c)}.state IS NULL AND ${sql.raw(c)}.created_at < ${episodeCutoff} ${unconfirmed.tombstone}`;
  const types = Object.values(spec.agents);
  const longer = sql`a.head_seq - a.anchor_seq > ${
    types.length === 0
      ? sql`1`
      : sql`CASE a.type ${sql.join(
          types.map((t) => sql`WHEN ${t.name} THEN ${Math.max(t.checkpoint.keep, 1)}`),
          sql` `,
        )} ELSE 1 END`
  }`;
  const candidates = (await store.db.all(sql`SELECT a.id AS agent FROM agents a
    WHERE ${longer} AND EXISTS (SELECT 1 FROM checkpoints WHERE checkpoints.agent = a.id
      AND checkpoints.seq = (SELECT min(seq) FROM checkpoints f WHERE f.agent = a.id) AND ${old("checkpoints")})
    LIMIT ${batch}`)) as { agent: string }[];
  const moves: WriteItem[] = [];
  for (const { agent } of candidates) {
    const budget = batch - report.checkpointsDeleted;
    if (budget <= 0) break;
    // The run: every checkpoint before the chain's first one that is not an old tombstone.
    const run = (await store.db.all(sql`SELECT seq, hash FROM checkpoints WHERE agent = ${agent}
      AND seq < coalesce((SELECT seq FROM checkpoints WHERE agent = ${agent} AND NOT (${old("checkpoints")})
        ORDER BY seq LIMIT 1), 9223372036854775807)
      ORDER BY seq LIMIT ${budget}`)) as { seq: number; hash: string }[];
    // `hash` is read and written back as stored (its bytes, store/hashes.ts): anchor_hash is stored the same way.
    const anchor = run.at(-1);
    if (!anchor) continue;
    report.checkpointsDeleted += run.length;
    if (opts.dryRun) continue;
    moves.push(
      // Never move an anchor backwards (a concurrent `fleet gc` may have gone further).
      store.db.run(
        sql`UPDATE agents SET anchor_seq = ${anchor.seq}, anchor_hash =
          ${anchor.hash} WHERE id = ${agent} AND anchor_seq < ${anchor.seq}`,
      ),
      store.db.run(sql`DELETE FROM checkpoints WHERE agent = ${agent} AND seq <= ${anchor.seq} AND state IS NULL`),
    );
  }
  if (moves.length > 0) await store.writer.write(moves);

  // 3. Episodes older than the retention window, and with each its event log (the row's `log`). Found
  //    by start (episodes_time); an episode ends seconds after it starts, and one that ended later
  //    waits for a later pass.
  const oldEpisodes = sql`SELECT id FROM episodes
    WHERE started_at < ${episodeCutoff} AND ended_at < ${episodeCutoff} ${unconfirmed.episode} LIMIT ${batch}`;
  const eventsOf = sql`SELECT coalesce(sum(event_count), 0) FROM episodes WHERE id IN (${oldEpisodes})`;
  if (opts.dryRun) {
    report.episodesDeleted = await scalar(store, sql`SELECT count(*) FROM (${oldEpisodes})`);
    report.eventsDeleted = await scalar(store, eventsOf);
  } else {
    // Counted just before: the next statement deletes the same rows (the same query, nothing newer is old).
    report.eventsDeleted = await scalar(store, eventsOf);
    const [eps] = await store.writer.write([store.db.run(sql`DELETE FROM episodes WHERE id IN (${oldEpisodes})`)]);
    report.episodesDeleted = (eps as { rowsAffected: number }).rowsAffected;
  }

  // 4a. The quarantine: a stimulus quarantined longer than quarantine_days (since its last attempt, done_at)
  //     is dropped as `fleet quarantine drop` drops it, and finished now (done_at): its id is remembered
  //     dedup_days more (4), so a device that sends the same poison again is not run again at once.
  if (spec.retention.quarantine_days > 0) {
    const quarantineCutoff = opts.now - spec.retention.quarantine_days * DAY;
    const expired = sql`SELECT seq FROM stimuli WHERE state = 'quarantined' AND done_at < ${quarantineCutoff}
      LIMIT ${batch}`;
    if (opts.dryRun) report.quarantineExpired = await scalar(store, sql`SELECT count(*) FROM (${expired})`);
    else {
      const [q] = await store.writer.write([
        store.db.run(sql`UPDATE stimuli SET state = 'dropped', done_at = ${opts.now} WHERE seq IN (${expired})`),
      ]);
      report.quarantineExpired = (q as { rowsAffected: number }).rowsAffected;
    }
  }

  // 4. Dedup memory: finished stimuli past dedup_days. Queued ones are never touched, nor quarantined
  // ones: the quarantine is the operator's to-do list, kept until each is retried or dropped (4a). An
  // MQTT redelivery id (r:) only has to outlive a retransmission, and a unique id (u:) can
  // never be repeated: both are forgotten after redelivery_minutes.
  const redeliveryCutoff = opts.now - spec.retention.redelivery_minutes * 60_000;
  const oldStimuli = sql`SELECT seq FROM stimuli WHERE state IN ('done','dropped','rejected','expired')
    AND (done_at < ${dedupCutoff} OR ((sid LIKE 'r:%' OR sid LIKE 'u:%') AND done_at < ${redeliveryCutoff}))
    ${unconfirmed.stimulus} LIMIT ${batch}`;
  // 5. Budget windows no budget looks at any more (older than two days). A window is "h:<hour>" or
  //    "d:<day>" since the epoch. usage_totals has a row per window and type while any usage row of
  //    that window is left (migration 17), so the old windows come from it, and each agent's row of
  //    one through the usage table's key (agent, window). CROSS JOIN keeps that order: without
  //    statistics SQLite would rather read every usage row.
  const hourLimit = Math.floor(opts.now / 3_600_000) - 48;
  const dayLimit = Math.floor(opts.now / DAY) - 2;
  const oldUsage = sql`SELECT budget_usage.rowid FROM usage_totals u CROSS JOIN agents a ON a.type = u.type
    CROSS JOIN budget_usage ON budget_usage.agent = a.id AND budget_usage."window" = u."window"
    WHERE ((u."window" LIKE 'h:%' AND CAST(substr(u."window", 3) AS INTEGER) < ${hourLimit})
    OR (u."window" LIKE 'd:%' AND CAST(substr(u."window", 3) AS INTEGER) < ${dayLimit}))
    ${unconfirmed.usage} LIMIT ${batch}`;
  if (opts.dryRun) {
    report.stimuliForgotten = await scalar(store, sql`SELECT count(*) FROM (${oldStimuli})`);
    report.usageRowsDeleted = await scalar(store, sql`SELECT count(*) FROM (${oldUsage})`);
  } else {
    const items: WriteItem[] = [
      store.db.run(sql`DELETE FROM stimuli WHERE seq IN (${oldStimuli})`),
      store.db.run(sql`DELETE FROM budget_usage WHERE rowid IN (${oldUsage})`),
      // Rejected messages (GET /api/rejected) are kept as long as the dedup memory.
      store.db.run(
        sql`DELETE FROM rejected_messages WHERE seq IN (SELECT seq FROM
          rejected_messages WHERE received_at < ${dedupCutoff} LIMIT ${batch})`,
      ),
      // Wake-ups that fired, were cancelled or dropped: kept as long as the dedup memory.
      store.db.run(
        sql`DELETE FROM wakeups WHERE id IN (SELECT id FROM wakeups
          WHERE state != 'pending' AND done_at < ${dedupCutoff} LIMIT ${batch})`,
      ),
    ];
    const [st, us] = await store.writer.write(items);
    report.stimuliForgotten = (st as { rowsAffected: number }).rowsAffected;
    report.usageRowsDeleted = (us as { rowsAffected: number }).rowsAffected;
  }
  // 6. Code bundles: kept while any episode names one (`bundle_uses`, counted by triggers), while the
  //    running gateway uses it, while a spec version from within the retention window names it, and
  //    while the newest spec version does, however old (an offline gc has no running gateway to ask,
  //    and a gateway may start on that version again: gateway.ts `startingVersion`).
  const keep = opts.keepBundles ?? [];
  const oldBundles = sql`SELECT hash FROM bundles b WHERE created_at < ${episodeCutoff}
    AND NOT EXISTS (SELECT 1 FROM bundle_uses u WHERE u.bundle = ${sql.raw(bundleStoredSql("b.hash"))})
    AND NOT EXISTS (SELECT 1 FROM spec_versions s, json_each(s.bundles) j
      WHERE s.bundles IS NOT NULL AND s.created_at >= ${episodeCutoff} AND j.value = b.hash)
    AND NOT EXISTS (SELECT 1 FROM json_each((SELECT bundles FROM spec_versions
      ORDER BY created_at DESC, rowid DESC LIMIT 1)) j WHERE j.value = b.hash)
    ${
      keep.length > 0
        ? sql`AND hash NOT IN (${sql.join(
            keep.map((h) => sql`${h}`),
            sql`, `,
          )})`
        : sql``
    }
    LIMIT ${batch}`;
  if (opts.dryRun) report.bundlesDeleted = await scalar(store, sql`SELECT count(*) FROM (${oldBundles})`);
  else {
    const [b] = await store.writer.write([store.db.run(sql`DELETE FROM bundles WHERE hash IN (${oldBundles})`)]);
    report.bundlesDeleted = (b as { rowsAffected: number }).rowsAffected;
  }
  report.ms = performance.now() - started;
  return report;
}

/** Total rows a report touched. */
export function gcTotal(r: GcReport): number {
  return (
    r.tombstoned +
    r.checkpointsDeleted +
    r.episodesDeleted +
    r.eventsDeleted +
    r.stimuliForgotten +
    r.quarantineExpired +
    r.usageRowsDeleted +
    r.bundlesDeleted
  );
}

/** A report of nothing done yet. */
function emptyReport(): GcReport {
  return {
    tombstoned: 0,
    checkpointsDeleted: 0,
    episodesDeleted: 0,
    eventsDeleted: 0,
    stimuliForgotten: 0,
    quarantineExpired: 0,
    usageRowsDeleted: 0,
    bundlesDeleted: 0,
    ms: 0,
  };
}

/** How the gateway collects in the background (gateway/fleet/background.ts), once a minute. */
export const BACKGROUND_GC = {
  /** Rows per category per pass: one pass holds the gateway's thread for tens of milliseconds. */
  batch: 500,
  /** Passes per minute at most: 20,000 episodes a minute (333/s) kept up with. */
  maxPasses: 40,
} as const;

/**
 * One background round: passes of `batch` until one collects nothing or `maxPasses` ran, with a
 * turn of the event loop between passes so intake and episodes go on. A fleet that ends more
 * episodes a minute than one pass collects still has its history held at the retention window.
 * A dry run is one pass: passes that change nothing would only repeat it.
 */
export async function gcTick(
  store: Store,
  spec: FleetSpec,
  opts: GcOptions & { readonly maxPasses: number },
): Promise<{ report: GcReport; passes: number; behind: boolean }> {
  const report = emptyReport();
  let passes = 0;
  let behind = false;
  while (passes < opts.maxPasses) {
    const r = await gcPass(store, spec, opts);
    passes++;
    for (const k of Object.keys(report) as (keyof GcReport)[]) report[k] += r[k];
    if (opts.dryRun || gcTotal(r) === 0) break;
    // The last pass allowed still collected: more may be due than a round collects.
    behind = passes === opts.maxPasses;
    await new Promise((resolve) => setImmediate(resolve));
  }
  return { report, passes, behind };
}

/** Run passes until nothing is left (CLI `fleet gc`, POST /api/gc), summing the reports. */
export async function gcAll(store: Store, spec: FleetSpec, opts: GcOptions): Promise<GcReport> {
  return (await gcTick(store, spec, { ...opts, maxPasses: 10_000 })).report;
}
