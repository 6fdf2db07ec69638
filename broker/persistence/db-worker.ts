/**
 * The worker side of `DbThread` (thread.ts): owns the libSQL connection to broker.db and
 * runs each request to completion, in arrival order.
 */
import { createClient, type Client, type ResultSet } from "@libsql/client";
import { BROKER_DDL, BROKER_SCHEMA_VERSION } from "./schema.ts";
import type { PlainResult, ThreadReply, ThreadRequest } from "./thread.ts";

declare const self: Worker;

let client: Client | null = null;

function plain(rs: ResultSet): PlainResult {
  const { columns } = rs;
  return {
    rows: rs.rows.map((row) => {
      const o: Record<string, unknown> = {};
      for (let i = 0; i < columns.length; i++) o[columns[i]!] = row[i];
      return o;
    }),
    rowsAffected: rs.rowsAffected,
  };
}

async function open(path: string, synchronous: "full" | "normal"): Promise<void> {
  const c = createClient({ url: path === ":memory:" ? ":memory:" : `file:${path}` });
  try {
    await c.execute("PRAGMA busy_timeout = 5000");
    // Checked before anything is written (journal mode included): a newer file stays as it was.
    const version = Number((await c.execute("PRAGMA user_version")).rows[0]?.[0] ?? 0);
    if (version > BROKER_SCHEMA_VERSION) throw Object.assign(new Error("too new"), { version });
    await c.execute("PRAGMA journal_mode = WAL");
    await c.execute(`PRAGMA synchronous = ${synchronous.toUpperCase()}`);
    await c.batch([...BROKER_DDL, `PRAGMA user_version = ${BROKER_SCHEMA_VERSION}`], "write");
  } catch (err) {
    c.close();
    throw err;
  }
  client = c;
}

async function handle(req: ThreadRequest): Promise<PlainResult[]> {
  switch (req.type) {
    case "open":
      await open(req.path, req.synchronous);
      return [];
    case "batch":
      if (!client) throw new Error("broker database is not open");
      return (await client.batch(req.statements, "write")).map(plain);
    case "close":
      client?.close();
      client = null;
      return [];
    default: {
      const never: never = req;
      throw new Error(`unknown request ${JSON.stringify(never)}`);
    }
  }
}

// Requests run one at a time, in order (a batch is one transaction).
let chain: Promise<void> = Promise.resolve();
self.onmessage = (e: MessageEvent<ThreadRequest>) => {
  const req = e.data;
  chain = chain.then(async () => {
    let reply: ThreadReply;
    try {
      reply = { id: req.id, ok: true, results: await handle(req) };
    } catch (err) {
      const version = (err as { version?: number }).version;
      reply = {
        id: req.id,
        ok: false,
        error: err instanceof Error ? err.message : String(err),
        ...(typeof version === "number" ? { version } : {}),
      };
    }
    self.postMessage(reply);
  });
};
