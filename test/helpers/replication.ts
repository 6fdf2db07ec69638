/**
 * Replication fixtures: the `[replication]` table, waiting for a gateway to catch up, and
 * the row-for-row comparison of a gateway's local database with the central one.
 */
import type { Client, InValue } from "@libsql/client";
import { expect } from "bun:test";
import { REPLICATED, type ReplicatedTable } from "../../gateway/replication/index.ts";
import { wireSql } from "../../gateway/store/index.ts";
import { type TestFleet, waitFor } from "./gateway.ts";

/** A `[replication]` table pointing at `url`. */
export function replicationToml(
  url: string,
  o: { interval?: string; batchRows?: number; tokenEnv?: string; required?: boolean; maxBacklogMb?: number } = {},
): string {
  return [
    "",
    "[replication]",
    `url = ${JSON.stringify(url)}`,
    `interval = ${JSON.stringify(o.interval ?? "100ms")}`,
    o.batchRows === undefined ? null : `batch_rows = ${o.batchRows}`,
    o.tokenEnv === undefined ? null : `auth_token_env = ${JSON.stringify(o.tokenEnv)}`,
    o.required === undefined ? null : `required = ${o.required}`,
    o.maxBacklogMb === undefined ? null : `max_backlog_mb = ${o.maxBacklogMb}`,
    "",
  ]
    .filter((l) => l !== null)
    .join("\n");
}

/** `replication` of `fleet status --json` on a running gateway. */
export interface ReplicationJson {
  state: string;
  backlog: { rows: number; bytes: number; lag_s: number };
  cursor?: { confirmed_seq: number; queued_seq: number };
  pushed_rows: number;
  lost_rows: number;
  over_backlog: boolean;
  consecutive_failures: number;
  errors: Record<string, number>;
  last_error: { kind: string; message: string; at: number } | null;
  last_push_at: number | null;
}

/** The running gateway's replication status (`replication` of /api/fleet, what `fleet status` prints). */
export async function replicationOf(f: TestFleet): Promise<ReplicationJson> {
  const res = await f.fetch("/api/fleet");
  if (!res.ok) throw new Error(`/api/fleet answered ${res.status}`);
  return ((await res.json()) as { replication: ReplicationJson }).replication;
}

/**
 * Wait until the gateway's backlog is empty after a successful push, and the local queue too:
 * the status's backlog is as of the replicator's last look, which may predate a write just made.
 */
export async function caughtUp(f: TestFleet, timeoutMs = 60_000): Promise<ReplicationJson> {
  let last: ReplicationJson | undefined;
  try {
    return await waitFor(
      async () => {
        last = await replicationOf(f);
        if (last.backlog.rows !== 0 || last.state !== "streaming" || last.consecutive_failures !== 0) return undefined;
        const [queue] = await f.query<{ n: number }>("SELECT count(*) AS n FROM repl_pending");
        return Number(queue?.n) === 0 ? last : undefined;
      },
      timeoutMs,
      "replication backlog 0",
      100,
    );
  } catch (err) {
    throw new Error(`${(err as Error).message}; last status ${JSON.stringify(last)}\n${f.logTail(15)}`);
  }
}

/** The gateway id a fleet's data dir was minted with. */
export async function gatewayIdOf(f: TestFleet): Promise<string> {
  const rows = await f.query<{ value: string }>("SELECT value FROM meta WHERE key = 'gateway_id'");
  return rows[0]!.value;
}

const norm = (v: InValue | unknown): unknown =>
  v instanceof ArrayBuffer
    ? Buffer.from(v).toString("hex")
    : ArrayBuffer.isView(v)
      ? Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("hex")
      : typeof v === "bigint"
        ? Number(v)
        : v;

function rowsOf(rs: { rows: ArrayLike<unknown>[] }, width: number): unknown[][] {
  return rs.rows.map((r) => Array.from({ length: width }, (_, i) => norm(r[i])));
}

/** Rows of one replicated table, local side. */
async function localRows(f: TestFleet, t: ReplicatedTable, where = "true"): Promise<unknown[][]> {
  // Episode ids stored as bytes are read as the text the center holds (hashes: `norm` makes them hex).
  const cols = t.columns.map((c) => `${wireSql(t.name, c)} AS ${c}`);
  const rows = await f.query(`SELECT ${cols.join(", ")} FROM ${t.name} WHERE ${where} ORDER BY ${t.key.join(", ")}`);
  return rows.map((r) => t.columns.map((c) => norm(r[c.replaceAll('"', "")])));
}

/** Rows of one replicated table for one gateway, central side. */
async function centralRows(central: Client, t: ReplicatedTable, gateway: string, where = "true"): Promise<unknown[][]> {
  const rs = await central.execute({
    sql: `SELECT ${t.columns.join(", ")} FROM ${t.name} WHERE gateway = ? AND (${where}) ORDER BY ${t.key.join(", ")}`,
    args: [gateway],
  });
  return rowsOf(rs as unknown as { rows: ArrayLike<unknown>[] }, t.columns.length);
}

/**
 * Central equals local, row for row: every replicated table of the gateway, every column,
 * and each row exactly once (primary keys make a second copy impossible; counts say so too).
 * Returns the row counts compared.
 */
export async function expectCentralEqualsLocal(
  f: TestFleet,
  central: Client,
  fleet: string,
): Promise<Record<string, number>> {
  const gateway = await gatewayIdOf(f);
  const counts: Record<string, number> = {};
  for (const t of Object.values(REPLICATED)) {
    // Stimuli replicate when they had trouble (quarantined, dropped, failed once): compare those.
    const where =
      t.name === "stimuli"
        ? "state IN ('quarantined', 'dropped') OR (state != 'queued' AND last_error IS NOT NULL)"
        : "true";
    const local = await localRows(f, t, where);
    const center = await centralRows(central, t, gateway, where);
    expect({ table: t.name, rows: center }).toEqual({ table: t.name, rows: local });
    counts[t.name] = local.length;
  }
  const fleets = await central.execute({
    sql: "SELECT DISTINCT fleet FROM episodes WHERE gateway = ?",
    args: [gateway],
  });
  expect(fleets.rows.map((r) => r[0])).toEqual(counts.episodes! > 0 ? [fleet] : []);
  return counts;
}

/** An HTTP proxy in front of a central server whose delay can be changed: see `slowProxy`. */
export interface SlowProxy {
  readonly url: string;
  /** Milliseconds each request is held before it is forwarded (0: none). */
  delayMs: number;
  stop(): void;
}

/**
 * A proxy to `target` (a sqld URL) that holds each request `delayMs` before forwarding it: a push through
 * it lasts as long as a test needs to interrupt it, however fast or busy the machine.
 */
export function slowProxy(target: string, delayMs: number): SlowProxy {
  const proxy: SlowProxy = {
    url: "",
    delayMs,
    stop: () => server.stop(true),
  };
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      if (proxy.delayMs > 0) await Bun.sleep(proxy.delayMs);
      const url = new URL(req.url);
      const body = req.method === "GET" || req.method === "HEAD" ? undefined : await req.arrayBuffer();
      // Asked for plain bytes: fetch would unpack a compressed answer and leave its content-encoding.
      const headers = new Headers(req.headers);
      for (const h of ["host", "accept-encoding"]) headers.delete(h);
      const answer = await fetch(`${target}${url.pathname}${url.search}`, { method: req.method, headers, body });
      const out = new Headers(answer.headers);
      for (const h of ["content-encoding", "content-length", "transfer-encoding"]) out.delete(h);
      return new Response(await answer.arrayBuffer(), { status: answer.status, headers: out });
    },
  });
  return Object.assign(proxy, { url: `http://127.0.0.1:${server.port}` });
}
