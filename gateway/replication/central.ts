/**
 * Reading the central database: every fleet's agents, episodes and event logs side by side,
 * and one gateway's hash chains for `fleet verify --central`. Rows come back in the local
 * row shapes (camelCase, as drizzle returns them) plus `fleet` and `gateway`.
 */
import { createClient, type Client, type InArgs, type InValue, type Row } from "@libsql/client";
import type { ChainSource } from "../ops/index.ts";
import type { AgentRow, AuditRow, CheckpointRow, EpisodeRow, EventRow } from "../store/index.ts";
import { checkNotNewer, schemaVersion } from "../store/index.ts";
import { type AuditKey, auditCursor, type EpisodeKey, episodeCursor } from "./cursor.ts";
import { supersededKey } from "./identity.ts";
import { classifyError, PUSH_TIMEOUT_MS, redactUrl, settlesWithin } from "./replicator.ts";
import { CENTRAL_SCHEMA_VERSION, REPLICATED } from "./tables.ts";
import { parseShardFleetName, shardLabel } from "../shard.ts";
import { shownStatus } from "../types.ts";
import { OperatorError } from "../errors.ts";

/** Where a central row came from. */
export interface Origin {
  readonly fleet: string;
  readonly gateway: string;
}

/** One gateway as the center knows it. */
export interface CentralGateway extends Origin {
  readonly firstPushAt: number;
  readonly lastPushAt: number;
  readonly pushedRows: number;
  readonly backlogRows: number;
  readonly backlogBytes: number;
  readonly lagS: number;
  readonly lostRows: number;
  readonly schemaVersion: number;
  /** The fleet's name: `fleet` without a shard's `-shard-<i>-of-<N>` (docs/shards.md). */
  readonly base: string;
  /** `"i/N"` for a shard of a sharded fleet, else null. */
  readonly shard: string | null;
  /**
   * True for a gateway of an older layout of its fleet (before a `fleet reshard`): its agents
   * now live, with their whole chains, on the gateways of the newest layout; or for a gateway
   * whose data dir was restored from a backup under a new id (identity.ts). Reads leave it
   * out unless it is named.
   */
  readonly superseded: boolean;
}

/** A `gateways` row as the center stores it. */
type GatewayRow = Omit<CentralGateway, "base" | "shard" | "superseded">;

/**
 * Which gateways make up each fleet now. A fleet is its unsharded gateways (`fleet` = its name)
 * or a set of shards (`<name>-shard-<i>-of-<N>`); after a reshard the layout whose gateways
 * first pushed last is the fleet, the others are superseded. A layout is a generation, not a
 * count: shards of the newest count that first pushed before a gateway of another layout did
 * (3 shards, then 2, then 3 again), or before a newer gateway of the same shard, are older ones.
 */
export function fleetLayout(rows: readonly GatewayRow[], restoredOver = new Set<string>()): CentralGateway[] {
  const layoutOf = (g: GatewayRow) => {
    const s = parseShardFleetName(g.fleet);
    return s ? { base: s.fleet, shard: shardLabel(s.shard), layout: `${s.shard.count}` } : null;
  };
  const newest = new Map<string, { layout: string; at: number }>();
  // Per sharded fleet id (one shard of one count), its gateway that first pushed last.
  const latest = new Map<string, number>();
  for (const g of rows) {
    const l = layoutOf(g);
    const base = l?.base ?? g.fleet;
    const layout = l?.layout ?? "unsharded";
    const seen = newest.get(base);
    const at = Number(g.firstPushAt);
    if (!seen || at > seen.at) newest.set(base, { layout, at });
    if (l) latest.set(g.fleet, Math.max(latest.get(g.fleet) ?? at, at));
  }
  // The newest layout's generation began after every gateway of another layout first pushed.
  const since = new Map<string, number>();
  for (const g of rows) {
    const l = layoutOf(g);
    const base = l?.base ?? g.fleet;
    if ((l?.layout ?? "unsharded") === newest.get(base)!.layout) continue;
    since.set(base, Math.max(since.get(base) ?? -Infinity, Number(g.firstPushAt)));
  }
  return rows.map((g) => {
    const l = layoutOf(g);
    const base = l?.base ?? g.fleet;
    const at = Number(g.firstPushAt);
    const older = l !== null && (at <= (since.get(base) ?? -Infinity) || at < latest.get(g.fleet)!);
    return {
      ...g,
      base,
      shard: l?.shard ?? null,
      superseded: newest.get(base)!.layout !== (l?.layout ?? "unsharded") || older || restoredOver.has(g.gateway),
    };
  });
}

/**
 * The gateways a read covers: with `fleet`, those it names (a fleet id or gateway id), or every
 * current gateway of the fleet of that name (all its shards); without, every current gateway.
 */
export function gatewaysFor(all: readonly CentralGateway[], fleet?: string): CentralGateway[] {
  if (!fleet) return all.filter((g) => !g.superseded);
  const byId = all.filter((g) => g.gateway === fleet);
  if (byId.length > 0) return byId;
  const whole = all.filter((g) => g.base === fleet && !g.superseded);
  return whole.length > 0 ? whole : all.filter((g) => g.fleet === fleet);
}

/**
 * A sharded fleet whose newest layout is not whole at the center: shards of it that have never
 * pushed. Their agents are in none of the reads (the older layout that had them is superseded).
 */
export interface LayoutGap {
  /** The fleet's name. */
  readonly fleet: string;
  /** The newest layout's shard count. */
  readonly shards: number;
  /** The shards (`"i/N"`) of that layout the center has never heard from. */
  readonly missing: readonly string[];
}

/**
 * The gaps in what a read of `fleet` (a fleet id, a gateway id or a fleet's name; every fleet
 * without it) covers: for each fleet it reads as a whole, the shards of its newest layout that have
 * not reported yet. A read of one shard or one gateway has none.
 */
export function layoutGaps(all: readonly CentralGateway[], fleet?: string): LayoutGap[] {
  const read = gatewaysFor(all, fleet);
  const whole = fleet === undefined || read.some((g) => g.base === fleet && g.fleet !== fleet);
  if (!whole) return [];
  const gaps: LayoutGap[] = [];
  for (const base of [...new Set(read.map((g) => g.base))].sort()) {
    const shards = read.filter((g) => g.base === base && g.shard !== null);
    const count = shards[0] ? Number(shards[0].shard!.split("/")[1]) : 0;
    if (count === 0) continue;
    const have = new Set(shards.map((g) => g.shard));
    const missing = Array.from({ length: count }, (_, i) => `${i + 1}/${count}`).filter((s) => !have.has(s));
    if (missing.length > 0) gaps.push({ fleet: base, shards: count, missing });
  }
  return gaps;
}

/** One line per gap, as the CLI and the dashboard say it. */
export function describeGap(g: LayoutGap): string {
  const one = g.missing.length === 1;
  return (
    `fleet ${g.fleet}: layout of ${g.shards} shards: shard${one ? "" : "s"} ${g.missing.join(", ")} ` +
    `${one ? "has" : "have"} not reported yet; ${one ? "its" : "their"} agents are missing from this view`
  );
}

/**
 * Why an operator action's SEQ cannot page a read of `fleet` (of every fleet without it), or null
 * when it can: a SEQ is a place in one gateway's log, and each gateway numbers its actions from 1.
 */
export function seqBeforeRefusal(all: readonly CentralGateway[], fleet?: string): string | null {
  const n = gatewaysFor(all, fleet).length;
  if (n <= 1) return null;
  const read = fleet === undefined ? "every fleet" : `"${fleet.slice(0, 200)}"`;
  return `a SEQ pages within one gateway, and ${read} covers ${n} gateways, each numbering its operator actions from 1`;
}

/** Why an episode could not be found by id or prefix (the local `fleet show`'s outcomes). */
export type EpisodeMiss = { readonly code: "not_found" | "ambiguous"; readonly message: string };

/** The beginning of an episode id that a prefix lookup takes: at least 4 characters, hex digits and dashes. */
const ID_PREFIX = /^[0-9a-f-]{4,}$/;

/** The central database cannot be read (unreachable, refused, empty, or newer). */
export class CentralError extends OperatorError {
  override readonly name = "CentralError";
  constructor(
    message: string,
    /** `auth` when the server refused the credentials (or wanted some); retry decisions read this. */
    readonly kind: "auth" | "other" = "other",
  ) {
    super(message);
  }
}

const camel = (k: string) => k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());

function shape<T>(row: Row, columns: readonly string[]): T {
  const out: Record<string, unknown> = {};
  for (const c of columns) out[camel(c)] = row[c] ?? null;
  return out as T;
}

const AGENT_COLS = ["fleet", "gateway", ...REPLICATED.agents.columns];
const EPISODE_COLS = ["fleet", "gateway", ...REPLICATED.episodes.columns];
const CHECKPOINT_COLS = ["gateway", ...REPLICATED.checkpoints.columns];
const EVENT_COLS = REPLICATED.events.columns;
const AUDIT_COLS = ["fleet", "gateway", ...REPLICATED.audit.columns];
const GATEWAY_COLS = [
  "gateway",
  "fleet",
  "first_push_at",
  "last_push_at",
  "pushed_rows",
  "backlog_rows",
  "backlog_bytes",
  "lag_s",
  "lost_rows",
  "schema_version",
];

/** The operator actions after a place in a read across gateways, newest first (cursor.ts's AuditKey). */
const AUDIT_KEY_BEFORE = "(at, gateway, seq) < (?, ?, ?)";

/** Most rows one page asks for; a page sqld refuses as too large is asked again with half as many. */
export const PAGE_ROWS = 1000;

/** sqld refuses a response past its size limit (`--max-response-size`, 10 MB by default). */
const tooLarge = (err: unknown): boolean =>
  /RESPONSE_TOO_LARGE/.test(`${(err as { code?: string }).code ?? ""} ${(err as Error)?.message ?? ""}`);

/** One page of a keyset walk: the rows after `after` (null: from the start), at most `limit`. */
type PageQuery<C> = (after: C | null, limit: number) => { sql: string; args: InValue[] };

/**
 * The gateways a read covers: how many, and the condition on `gateway` that keeps to them (with its
 * arguments), null when the read covers every gateway the center has.
 */
interface Scope {
  readonly gateways: number;
  readonly cond: string | null;
  readonly args: readonly string[];
}

/** How long a central read waits for the server before it fails, as a push does: a frozen sqld must not hang a read. */
export const CENTRAL_READ_TIMEOUT_MS = PUSH_TIMEOUT_MS;

/** `request`, or a CentralError once the center took longer than `ms` to answer. */
async function answered<T>(request: Promise<T>, url: string, ms: number): Promise<T> {
  if (await settlesWithin(request, ms)) return request;
  request.catch(() => {}); // given up: its outcome, whenever it comes, is not waited for
  throw new CentralError(`central server ${redactUrl(url)} did not answer within ${ms / 1000} s`);
}

/** Read access to a central libSQL server. */
export class CentralReader {
  private constructor(
    private readonly client: Client,
    /** The server's URL as shown: without userinfo or query (redactUrl). */
    readonly url: string,
    /** The center's schema version (a v1 center has no operator actions yet). */
    readonly version: number,
    /** How long one read waits for the server (ms). */
    private readonly timeoutMs: number,
  ) {}

  /** Connect and check the central schema (present, not newer than this code). */
  static async open(url: string, authToken?: string, opts: { timeoutMs?: number } = {}): Promise<CentralReader> {
    const timeoutMs = opts.timeoutMs ?? CENTRAL_READ_TIMEOUT_MS;
    if (!URL.canParse(url) || !/^(https?|libsql|wss?):$/.test(new URL(url).protocol))
      throw new CentralError(`--central ${redactUrl(url)} is not an http(s)://, libsql:// or ws(s):// URL`);
    let client: Client;
    try {
      client = createClient({ url, ...(authToken ? { authToken } : {}) });
    } catch (err) {
      throw new CentralError(classifyError(err, url).message);
    }
    let found: number;
    try {
      found = await answered(schemaVersion(client), url, timeoutMs);
      if (found === 0)
        throw new CentralError(`${redactUrl(url)} has no fleet data yet (no gateway has replicated to it)`);
      checkNotNewer(found, `central database ${redactUrl(url)}`, CENTRAL_SCHEMA_VERSION);
    } catch (err) {
      client.close();
      if (err instanceof CentralError) throw err;
      const e = classifyError(err, url, authToken !== undefined);
      throw new CentralError(e.message, e.kind === "auth" ? "auth" : "other");
    }
    return new CentralReader(client, redactUrl(url), found, timeoutMs);
  }

  close(): void {
    this.client.close();
  }

  private async all(sql: string, args: InArgs = []): Promise<Row[]> {
    return (await answered(this.client.execute({ sql, args }), this.url, this.timeoutMs)).rows;
  }

  /**
   * Every row of a query, read in bounded pages (a 100,000-episode fleet does not fit in one
   * sqld response): `page` builds the statement for the rows after a cursor, `cursor` takes a
   * row's. A page refused as RESPONSE_TOO_LARGE is asked again with half as many rows (down
   * to one), so rows of any size come through. Stops after `max` rows. Starts after `from` (a
   * cursor a caller handed back), or at the start.
   */
  async *walk<C>(
    page: PageQuery<C>,
    cursor: (r: Row) => C,
    max = Number.POSITIVE_INFINITY,
    from: C | null = null,
  ): AsyncGenerator<Row> {
    let after = from;
    let limit = PAGE_ROWS;
    for (let left = max; left > 0; ) {
      const want = Math.min(limit, left);
      let rows: Row[];
      try {
        rows = (await answered(this.client.execute(page(after, want)), this.url, this.timeoutMs)).rows;
      } catch (err) {
        if (tooLarge(err) && want > 1) {
          limit = Math.max(1, Math.floor(want / 2));
          continue;
        }
        throw err;
      }
      yield* rows;
      left -= rows.length;
      if (rows.length < want) return;
      after = cursor(rows.at(-1)!);
    }
  }

  /** `walk`, collected. */
  private async collect<C>(page: PageQuery<C>, cursor: (r: Row) => C, max?: number, from?: C | null): Promise<Row[]> {
    const out: Row[] = [];
    for await (const r of this.walk(page, cursor, max, from)) out.push(r);
    return out;
  }

  /**
   * Gateways, by fleet name then id: every one (superseded ones marked), or with `fleet` those it
   * names: a fleet id, a gateway id, or a fleet's name (all its current shards).
   */
  async gateways(fleet?: string): Promise<CentralGateway[]> {
    const rows = await this.all(`SELECT ${GATEWAY_COLS.join(", ")} FROM gateways ORDER BY fleet, gateway`);
    // Gateways a restored data dir took over from (identity.ts): `superseded:<gateway>` in the center's meta.
    const marks = await this.all("SELECT key FROM meta WHERE key LIKE 'superseded:%'");
    const restoredOver = new Set(marks.map((r) => String(r[0]).slice(supersededKey("").length)));
    const all = fleetLayout(
      rows.map((r) => shape<GatewayRow>(r, GATEWAY_COLS)),
      restoredOver,
    );
    return fleet ? gatewaysFor(all, fleet) : all;
  }

  /** What a gateway has pushed so far (rows, summed over its pushes) and the backlog its last push left. */
  async pushState(gateway: string): Promise<{ pushedRows: number; backlogRows: number } | null> {
    const [r] = await this.all("SELECT pushed_rows, backlog_rows FROM gateways WHERE gateway = ?", [gateway]);
    return r ? { pushedRows: Number(r.pushed_rows), backlogRows: Number(r.backlog_rows) } : null;
  }

  /**
   * For `verifyChains` (its `settle`) over `gateway`'s chains while the gateway may be pushing: call
   * once before the first pass. After a pass, true at once when a push landed during it (the pass read
   * across it), or once the next push lands while the last one left a backlog (a batch is cut by count,
   * so it may hold part of a commit; the next one brings the rest), for up to `waitMs`. False when
   * nothing moved and nothing is left to come: the center is at a commit of the gateway's, and what the
   * pass found is what is there.
   */
  settling(gateway: string, waitMs = 15_000, pollMs = 250): () => Promise<boolean> {
    // A failed read only means no settling. The first is made now, before the first pass.
    const read = () => this.pushState(gateway).catch(() => null);
    let seen = read();
    return async () => {
      const before = await seen;
      let now = await read();
      if (before === null || now === null) return false;
      const limit = performance.now() + waitMs;
      while (now.pushedRows === before.pushedRows && now.backlogRows > 0 && performance.now() < limit) {
        await Bun.sleep(pollMs);
        now = (await read()) ?? now;
      }
      seen = Promise.resolve(now);
      return now.pushedRows !== before.pushedRows;
    };
  }

  /** What a read of `fleet` (or of everything) covers: see `Scope`. */
  private async scope(fleet?: string): Promise<Scope> {
    const all = await this.gateways();
    const ids = gatewaysFor(all, fleet).map((g) => g.gateway);
    if (!fleet && ids.length === all.length) return { gateways: ids.length, cond: null, args: [] };
    return { gateways: ids.length, cond: "gateway IN (SELECT value FROM json_each(?))", args: [JSON.stringify(ids)] };
  }

  /** Agents of every fleet (or one), paged. */
  async agents(
    f: { fleet?: string; type?: string; status?: string; limit?: number; offset?: number } = {},
  ): Promise<{ rows: (AgentRow & Origin)[]; total: number }> {
    const conds: string[] = [];
    const args: (string | number)[] = [];
    const where_ = (cond: string, ...values: string[]) => {
      conds.push(cond);
      args.push(...values);
    };
    const scope = await this.scope(f.fleet);
    if (scope.cond) where_(scope.cond, ...scope.args);
    if (f.type) where_("type = ?", f.type);
    if (f.status) where_("status = ?", f.status);
    const where = conds.length ? `WHERE ${conds.join(" AND ")}` : "";
    // The first page is found by OFFSET; the rest follow the (fleet, id, gateway) key.
    const rows = await this.collect<InValue[]>(
      (after, limit) => ({
        sql: `SELECT ${AGENT_COLS.join(", ")} FROM agents ${where}
          ${after ? `${where ? "AND" : "WHERE"} (fleet, id, gateway) > (?, ?, ?)` : ""}
          ORDER BY fleet, id, gateway LIMIT ? OFFSET ?`,
        args: [...args, ...(after ?? []), limit, after ? 0 : (f.offset ?? 0)],
      }),
      (r) => [r.fleet, r.id, r.gateway] as InValue[],
      f.limit ?? 100,
    );
    const total = Number((await this.all(`SELECT count(*) AS n FROM agents ${where}`, args))[0]?.n ?? 0);
    return { rows: rows.map((r) => shape<AgentRow & Origin>(r, AGENT_COLS)), total };
  }

  /** Whether any gateway a read of `fleet` (or of everything) covers has the agent `agent`. */
  async hasAgent(agent: string, fleet?: string): Promise<boolean> {
    const scope = await this.scope(fleet);
    // By the (gateway, id) key of each gateway: the center has no index on id alone.
    const rows = await this.all(
      `SELECT 1 FROM agents WHERE ${scope.cond ?? "gateway IN (SELECT gateway FROM gateways)"} AND id = ?
        LIMIT 1`,
      [...scope.args, agent],
    );
    return rows.length > 0;
  }

  /** One agent's episodes (in every fleet that has that agent id, or one), newest first: `episodesPage`'s rows. */
  async episodes(
    agent: string,
    f: { fleet?: string; limit?: number; before?: number | EpisodeKey } = {},
  ): Promise<(EpisodeRow & Origin)[]> {
    return (await this.episodesPage(agent, f)).episodes;
  }

  /**
   * One agent's episodes (in every fleet that has that agent id, or one), newest first, and where the
   * next page starts (null after a page that is not full). A plain `before` (ms) keeps to episodes that
   * started earlier, on any read. A read of one gateway pages on by start time, as the local `episodes`
   * does; a read across gateways by the last episode's whole key (cursor.ts), since episodes of two
   * gateways may start in the same millisecond and a start time would skip the one not yet shown.
   */
  async episodesPage(
    agent: string,
    f: { fleet?: string; limit?: number; before?: number | EpisodeKey } = {},
  ): Promise<{ episodes: (EpisodeRow & Origin)[]; nextBefore: number | string | null }> {
    // A resharded agent's episodes are at its old and its new gateway: only the current ones are read.
    const scope = await this.scope(f.fleet);
    const limit = f.limit ?? 50;
    const before = typeof f.before === "number" ? [f.before] : [];
    const from = typeof f.before === "object" ? [f.before.startedAt, f.before.id, f.before.gateway] : null;
    const rows = await this.collect<InValue[]>(
      (after, limit) => ({
        sql: `SELECT ${EPISODE_COLS.join(", ")} FROM episodes
          WHERE agent = ? ${scope.cond ? `AND ${scope.cond}` : ""} ${before.length ? "AND started_at < ?" : ""}
            ${after ? "AND (started_at, id, gateway) < (?, ?, ?)" : ""}
          ORDER BY started_at DESC, id DESC, gateway DESC LIMIT ?`,
        args: [agent, ...scope.args, ...before, ...(after ?? []), limit],
      }),
      (r) => [r.started_at, r.id, r.gateway] as InValue[],
      limit,
      from,
    );
    const episodes = rows.map((r) => shape<EpisodeRow & Origin>(r, EPISODE_COLS));
    const last = episodes.at(-1);
    if (episodes.length < limit || !last) return { episodes, nextBefore: null };
    const keyed = scope.gateways > 1 || from !== null;
    return { episodes, nextBefore: keyed ? episodeCursor(last) : last.startedAt };
  }

  /**
   * One episode with its event log, by its id or a unique prefix of it (at least 4 characters), as
   * the local `fleet show` finds it; a miss says why (none, or more than one). A resharded episode
   * is at its old and its new gateway: the current one's row is shown.
   */
  async findEpisode(idOrPrefix: string): Promise<{ episode: EpisodeRow & Origin; events: EventRow[] } | EpisodeMiss> {
    // By the (gateway, id) key of each gateway: the center has no index on id alone.
    const every = "gateway IN (SELECT gateway FROM gateways)";
    let id = idOrPrefix;
    if ((await this.all(`SELECT 1 FROM episodes WHERE ${every} AND id = ? LIMIT 1`, [id])).length === 0) {
      if (!ID_PREFIX.test(idOrPrefix)) {
        // A common slip: an agent's id where an episode's is wanted.
        const agent = idOrPrefix.includes("/")
          ? ` (${idOrPrefix} is an agent's id: \`fleet episodes ${idOrPrefix} --central URL\` lists its episodes)`
          : "";
        return { code: "not_found", message: `no episode ${idOrPrefix}${agent}` };
      }
      const ids = await this.all(
        `SELECT DISTINCT id FROM episodes WHERE ${every} AND id >= ? AND id < ? ORDER BY id LIMIT 2`,
        [idOrPrefix, `${idOrPrefix}\uffff`],
      );
      if (ids.length === 0) return { code: "not_found", message: `no episode starts with ${idOrPrefix}` };
      if (ids.length > 1) return { code: "ambiguous", message: `more than one episode starts with ${idOrPrefix}` };
      id = String(ids[0]!.id);
    }
    const current = new Set((await this.gateways()).filter((g) => !g.superseded).map((g) => g.gateway));
    const rows = await this.all(`SELECT ${EPISODE_COLS.join(", ")} FROM episodes WHERE ${every} AND id = ?`, [id]);
    const row = rows.find((r) => current.has(String(r.gateway))) ?? rows[0]!;
    return this.withEvents(shape<EpisodeRow & Origin>(row, EPISODE_COLS));
  }

  /** One episode with its event log, by its whole id, or undefined. */
  async episode(id: string): Promise<{ episode: EpisodeRow & Origin; events: EventRow[] } | undefined> {
    const found = await this.findEpisode(id);
    return "code" in found || found.episode.id !== id ? undefined : found;
  }

  private async withEvents(
    episode: EpisodeRow & Origin,
  ): Promise<{ episode: EpisodeRow & Origin; events: EventRow[] }> {
    const id = episode.id;
    const events = await this.collect<number>(
      (after, limit) => ({
        sql: `SELECT ${EVENT_COLS.join(", ")} FROM events WHERE gateway = ? AND episode = ? AND seq > ?
          ORDER BY seq LIMIT ?`,
        args: [episode.gateway, id, after ?? -1, limit],
      }),
      (r) => Number(r.seq),
    );
    return { episode, events: events.map((r) => shape<EventRow>(r, EVENT_COLS)) };
  }

  /** Operator actions (the gateways' audit logs), newest first: `auditPage`'s records. */
  async audit(f: { fleet?: string; limit?: number; before?: number | AuditKey } = {}): Promise<(AuditRow & Origin)[]> {
    return (await this.auditPage(f)).records;
  }

  /**
   * Operator actions (the gateways' audit logs) of one fleet or gateway, or of all, newest first, and
   * where the next page starts (null after a page that is not full). A read of one gateway is its log
   * in seq order, paged on by seq (`before` a SEQ), as the gateway's own `fleet audit` is. A read across
   * gateways is in (at, gateway, seq) order, paged on by the last record's whole key (cursor.ts): each
   * gateway numbers its actions from 1, so a SEQ is no place in it (`seqBeforeRefusal`).
   */
  async auditPage(
    f: { fleet?: string; limit?: number; before?: number | AuditKey } = {},
  ): Promise<{ records: (AuditRow & Origin)[]; nextBefore: number | string | null }> {
    if (this.version < 2) return { records: [], nextBefore: null }; // written before operator actions replicated
    const scope = await this.scope(f.fleet);
    const limit = f.limit ?? 50;
    const where = (...conds: string[]) => {
      const all = [...(scope.cond ? [scope.cond] : []), ...conds];
      return all.length ? `WHERE ${all.join(" AND ")}` : "";
    };
    const bySeq = scope.gateways <= 1 && typeof f.before !== "object";
    let rows: Row[];
    if (bySeq) {
      rows = await this.collect<number>(
        (after, limit) => ({
          sql: `SELECT ${AUDIT_COLS.join(", ")} FROM audit ${where(...(after === null ? [] : ["seq < ?"]))}
            ORDER BY seq DESC LIMIT ?`,
          args: [...scope.args, ...(after === null ? [] : [after]), limit],
        }),
        (r) => Number(r.seq),
        limit,
        typeof f.before === "number" ? f.before : null,
      );
    } else {
      if (typeof f.before === "number")
        throw new CentralError("an audit SEQ pages within one gateway; this read covers several (seqBeforeRefusal)");
      const from = f.before ? [f.before.at, f.before.gateway, f.before.seq] : null;
      rows = await this.collect<InValue[]>(
        (after, limit) => ({
          sql: `SELECT ${AUDIT_COLS.join(", ")} FROM audit ${where(...(after ? [AUDIT_KEY_BEFORE] : []))}
            ORDER BY at DESC, gateway DESC, seq DESC LIMIT ?`,
          args: [...scope.args, ...(after ?? []), limit],
        }),
        (r) => [r.at, r.gateway, r.seq] as InValue[],
        limit,
        from,
      );
    }
    const records = rows.map((r) => shape<AuditRow & Origin>(r, AUDIT_COLS));
    const last = records.at(-1);
    if (records.length < limit || !last) return { records, nextBefore: null };
    return { records, nextBefore: bySeq ? last.seq : auditCursor(last) };
  }

  /** Per gateway: agents by status, episodes and failures in the last hour, today's budget burn. */
  async summary(now: number): Promise<
    (CentralGateway & {
      agents: Record<string, number>;
      episodesLastHour: number;
      failuresLastHour: number;
      tokensToday: number;
      costToday: number;
      bytesToday: number;
    })[]
  > {
    const gws = await this.gateways();
    const agents = await this.all("SELECT gateway, status, count(*) AS n FROM agents GROUP BY gateway, status");
    const eps = await this.all(
      `SELECT gateway, count(*) AS n, sum(status = 'failed') AS failed FROM episodes
        WHERE started_at >= ? GROUP BY gateway`,
      [now - 3_600_000],
    );
    const usage = await this.all(
      `SELECT gateway, sum(tokens) AS tokens, sum(cost) AS cost, sum(bytes) AS bytes FROM budget_usage
        WHERE "window" = ? GROUP BY gateway`,
      [`d:${Math.floor(now / 86_400_000)}`],
    );
    return gws.map((g) => {
      const byStatus: Record<string, number> = {};
      // Counted by status as operators see it: the stored `active` is `idle` (the gateway's API and CLI say so).
      for (const r of agents) if (r.gateway === g.gateway) byStatus[shownStatus(String(r.status))] = Number(r.n);
      const e = eps.find((r) => r.gateway === g.gateway);
      const u = usage.find((r) => r.gateway === g.gateway);
      return {
        ...g,
        agents: byStatus,
        episodesLastHour: Number(e?.n ?? 0),
        failuresLastHour: Number(e?.failed ?? 0),
        tokensToday: Number(u?.tokens ?? 0),
        costToday: Number(u?.cost ?? 0),
        bytesToday: Number(u?.bytes ?? 0),
      };
    });
  }

  /** One agent's checkpoints at one gateway, oldest first, streamed page by page. */
  async *checkpointsOf(gateway: string, agent: string): AsyncGenerator<CheckpointRow> {
    const rows = this.walk<number>(
      (after, limit) => ({
        sql: `SELECT ${CHECKPOINT_COLS.join(", ")} FROM checkpoints WHERE gateway = ? AND agent = ? AND seq > ?
          ORDER BY seq LIMIT ?`,
        args: [gateway, agent, after ?? -1, limit],
      }),
      (r) => Number(r.seq),
    );
    for await (const r of rows) yield shape<CheckpointRow>(r, CHECKPOINT_COLS);
  }

  /**
   * One gateway's hash chains, for `verifyChains`. Every read is paged (`walk`): checkpoints
   * stream oldest first, so verify holds one page of a 100,000-link chain at a time.
   */
  chains(gateway: string): ChainSource {
    return {
      agents: async () =>
        (
          await this.collect<string>(
            // Agents with a chain, and those with episodes but none (every stimulus so far failed).
            (after, limit) => ({
              sql: `SELECT agent FROM checkpoints WHERE gateway = ? AND agent > ?
                UNION SELECT agent FROM episodes WHERE gateway = ? AND agent > ? ORDER BY agent LIMIT ?`,
              args: [gateway, after ?? "", gateway, after ?? "", limit],
            }),
            (r) => String(r.agent),
          )
        ).map((r) => String(r.agent)),
      checkpoints: (agent) => this.checkpointsOf(gateway, agent),
      agent: async (agent) => {
        const [r] = await this.all(`SELECT ${AGENT_COLS.join(", ")} FROM agents WHERE gateway = ? AND id = ?`, [
          gateway,
          agent,
        ]);
        return r ? shape<AgentRow>(r, AGENT_COLS) : undefined;
      },
      episodes: async (agent, afterId, max) =>
        (
          await this.collect<string>(
            (after, limit) => ({
              sql: `SELECT ${EPISODE_COLS.join(", ")} FROM episodes WHERE gateway = ? AND agent = ? AND id > ?
                ORDER BY id LIMIT ?`,
              args: [gateway, agent, after ?? afterId, limit],
            }),
            (r) => String(r.id),
            max,
          )
        ).map((r) => shape<EpisodeRow>(r, EPISODE_COLS)),
      events: async (ids) =>
        (
          await this.collect<InValue[]>(
            (after, limit) => ({
              sql: `SELECT ${EVENT_COLS.join(", ")} FROM events
                WHERE gateway = ? AND episode IN (SELECT value FROM json_each(?))
                  ${after ? "AND (episode, seq) > (?, ?)" : ""}
                ORDER BY episode, seq LIMIT ?`,
              args: [gateway, JSON.stringify(ids), ...(after ?? []), limit],
            }),
            (r) => [r.episode, r.seq] as InValue[],
          )
        ).map((r) => shape<EventRow>(r, EVENT_COLS)),
    };
  }
}
