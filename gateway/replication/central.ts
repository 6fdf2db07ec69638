/**
 * Reading the central database: every fleet's agents, episodes and event logs side by side,
 * and one gateway's hash chains for `fleet verify --central`. Rows come back in the local
 * row shapes (camelCase, as drizzle returns them) plus `fleet` and `gateway`.
 */
import { createClient, type Client, type InArgs, type Row } from "@libsql/client";
import type { ChainSource } from "../ops/index.ts";
import type { AgentRow, AuditRow, CheckpointRow, EpisodeRow, EventRow } from "../store/index.ts";
import { checkNotNewer, schemaVersion } from "../store/index.ts";
import { classifyError, redactUrl } from "./replicator.ts";
import { CENTRAL_SCHEMA_VERSION, REPLICATED } from "./tables.ts";

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
}

/** The central database cannot be read (unreachable, refused, empty, or newer). */
export class CentralError extends Error {
  override readonly name = "CentralError";
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

/** Read access to a central libSQL server. */
export class CentralReader {
  private constructor(
    private readonly client: Client,
    readonly url: string,
    /** The center's schema version (a v1 center has no operator actions yet). */
    readonly version: number,
  ) {}

  /** Connect and check the central schema (present, not newer than this code). */
  static async open(url: string, authToken?: string): Promise<CentralReader> {
    if (!URL.canParse(url) || !/^(https?|libsql|wss?):$/.test(new URL(url).protocol))
      throw new CentralError(`--central ${url} is not an http(s)://, libsql:// or ws(s):// URL`);
    const client = createClient({ url, ...(authToken ? { authToken } : {}) });
    let found: number;
    try {
      found = await schemaVersion(client);
      if (found === 0)
        throw new CentralError(`${redactUrl(url)} has no fleet data yet (no gateway has replicated to it)`);
      checkNotNewer(found, `central database ${redactUrl(url)}`, CENTRAL_SCHEMA_VERSION);
    } catch (err) {
      client.close();
      if (err instanceof CentralError) throw err;
      throw new CentralError(classifyError(err, url).message);
    }
    return new CentralReader(client, url, found);
  }

  close(): void {
    this.client.close();
  }

  private async all(sql: string, args: InArgs = []): Promise<Row[]> {
    return (await this.client.execute({ sql, args })).rows;
  }

  /** Gateways, by fleet name then id; `fleet` matches a fleet name or a gateway id. */
  async gateways(fleet?: string): Promise<CentralGateway[]> {
    const rows = await this.all(
      `SELECT ${GATEWAY_COLS.join(", ")} FROM gateways ${fleet ? "WHERE fleet = ? OR gateway = ?" : ""}
        ORDER BY fleet, gateway`,
      fleet ? [fleet, fleet] : [],
    );
    return rows.map((r) => shape<CentralGateway>(r, GATEWAY_COLS));
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
    if (f.fleet) where_("(fleet = ? OR gateway = ?)", f.fleet, f.fleet);
    if (f.type) where_("type = ?", f.type);
    if (f.status) where_("status = ?", f.status);
    const where = conds.length ? `WHERE ${conds.join(" AND ")}` : "";
    const rows = await this.all(
      `SELECT ${AGENT_COLS.join(", ")} FROM agents ${where} ORDER BY fleet, id, gateway LIMIT ? OFFSET ?`,
      [...args, f.limit ?? 100, f.offset ?? 0],
    );
    const total = Number((await this.all(`SELECT count(*) AS n FROM agents ${where}`, args))[0]?.n ?? 0);
    return { rows: rows.map((r) => shape<AgentRow & Origin>(r, AGENT_COLS)), total };
  }

  /** One agent's episodes (in every fleet that has that agent id, or one), newest first. */
  async episodes(agent: string, f: { fleet?: string; limit?: number } = {}): Promise<(EpisodeRow & Origin)[]> {
    const rows = await this.all(
      `SELECT ${EPISODE_COLS.join(", ")} FROM episodes
        WHERE agent = ? ${f.fleet ? "AND (fleet = ? OR gateway = ?)" : ""}
       ORDER BY started_at DESC, id DESC LIMIT ?`,
      f.fleet ? [agent, f.fleet, f.fleet, f.limit ?? 50] : [agent, f.limit ?? 50],
    );
    return rows.map((r) => shape<EpisodeRow & Origin>(r, EPISODE_COLS));
  }

  /** One episode with its event log, or undefined. */
  async episode(id: string): Promise<{ episode: EpisodeRow & Origin; events: EventRow[] } | undefined> {
    const [row] = await this.all(`SELECT ${EPISODE_COLS.join(", ")} FROM episodes WHERE id = ? LIMIT 1`, [id]);
    if (!row) return undefined;
    const episode = shape<EpisodeRow & Origin>(row, EPISODE_COLS);
    const events = await this.all(
      `SELECT ${EVENT_COLS.join(", ")} FROM events WHERE gateway = ? AND episode = ? ORDER BY seq`,
      [episode.gateway, id],
    );
    return { episode, events: events.map((r) => shape<EventRow>(r, EVENT_COLS)) };
  }

  /**
   * Operator actions (the gateways' audit logs), newest first: of one fleet or gateway, or of
   * all. `before` (an audit seq) pages on within one gateway, so it needs `fleet` to name one.
   */
  async audit(f: { fleet?: string; limit?: number; before?: number } = {}): Promise<(AuditRow & Origin)[]> {
    if (this.version < 2) return []; // written before operator actions replicated
    const conds: string[] = [];
    const args: (string | number)[] = [];
    if (f.fleet) {
      conds.push("(fleet = ? OR gateway = ?)");
      args.push(f.fleet, f.fleet);
    }
    if (f.before !== undefined) {
      conds.push("seq < ?");
      args.push(f.before);
    }
    const rows = await this.all(
      `SELECT ${AUDIT_COLS.join(", ")} FROM audit ${conds.length ? `WHERE ${conds.join(" AND ")}` : ""}
        ORDER BY at DESC, gateway, seq DESC LIMIT ?`,
      [...args, f.limit ?? 50],
    );
    return rows.map((r) => shape<AuditRow & Origin>(r, AUDIT_COLS));
  }

  /** Per gateway: agents by status, episodes and failures in the last hour, today's budget burn. */
  async summary(now: number): Promise<
    (CentralGateway & {
      agents: Record<string, number>;
      episodesLastHour: number;
      failuresLastHour: number;
      tokensToday: number;
      costToday: number;
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
      `SELECT gateway, sum(tokens) AS tokens, sum(cost) AS cost FROM budget_usage WHERE "window" = ? GROUP BY gateway`,
      [`d:${Math.floor(now / 86_400_000)}`],
    );
    return gws.map((g) => {
      const byStatus: Record<string, number> = {};
      for (const r of agents) if (r.gateway === g.gateway) byStatus[String(r.status)] = Number(r.n);
      const e = eps.find((r) => r.gateway === g.gateway);
      const u = usage.find((r) => r.gateway === g.gateway);
      return {
        ...g,
        agents: byStatus,
        episodesLastHour: Number(e?.n ?? 0),
        failuresLastHour: Number(e?.failed ?? 0),
        tokensToday: Number(u?.tokens ?? 0),
        costToday: Number(u?.cost ?? 0),
      };
    });
  }

  /** One gateway's hash chains, for `verifyChains`. */
  chains(gateway: string): ChainSource {
    const cps = `SELECT ${CHECKPOINT_COLS.join(", ")} FROM checkpoints WHERE gateway = ?`;
    return {
      agents: async () =>
        (await this.all("SELECT DISTINCT agent FROM checkpoints WHERE gateway = ? ORDER BY agent", [gateway])).map(
          (r) => String(r.agent),
        ),
      // In pages: sqld refuses an HTTP response past its size limit (RESPONSE_TOO_LARGE).
      checkpoints: async (agent) => {
        const out: CheckpointRow[] = [];
        for (let after = -1; ; ) {
          const page = await this.all(`${cps} AND agent = ? AND seq > ? ORDER BY seq LIMIT 2000`, [
            gateway,
            agent,
            after,
          ]);
          for (const r of page) out.push(shape<CheckpointRow>(r, CHECKPOINT_COLS));
          if (page.length < 2000) return out;
          after = Number(page.at(-1)!.seq);
        }
      },
      agent: async (agent) => {
        const [r] = await this.all(`SELECT ${AGENT_COLS.join(", ")} FROM agents WHERE gateway = ? AND id = ?`, [
          gateway,
          agent,
        ]);
        return r ? shape<AgentRow>(r, AGENT_COLS) : undefined;
      },
      episodes: async (agent, after, limit) =>
        (
          await this.all(
            `SELECT ${EPISODE_COLS.join(", ")} FROM episodes WHERE gateway = ? AND agent = ? AND id > ?
              ORDER BY id LIMIT ?`,
            [gateway, agent, after, limit],
          )
        ).map((r) => shape<EpisodeRow>(r, EPISODE_COLS)),
      events: async (ids) =>
        (
          await this.all(
            `SELECT ${EVENT_COLS.join(", ")} FROM events
              WHERE gateway = ? AND episode IN (SELECT value FROM json_each(?)) ORDER BY episode, seq`,
            [gateway, JSON.stringify(ids)],
          )
        ).map((r) => shape<EventRow>(r, EVENT_COLS)),
    };
  }
}
