/**
 * Reading episodes' event logs for the operator commands (verify, show, replay, trace) so that one
 * damaged log is named rather than taking the command down. A log is the JSONB `log` column of its
 * episode, read through the `events` view (store/schema.ts): a flipped byte either makes the JSONB
 * malformed (SQLite refuses the whole query) or leaves text that is not UTF-8, which the libSQL
 * client cannot turn into a string (it aborts the process). So the text columns are read as bytes
 * and decoded here, and a query that fails is retried one episode at a time to find the broken one.
 */
import { asc, inArray, sql } from "drizzle-orm";
import { type EventRow, type Store, tables } from "../store/index.ts";
import { errorReason, OperatorError } from "../errors.ts";

/** An episode's event log cannot be read (damaged storage): names the episode and the cause. */
export class EventLogError extends OperatorError {
  override readonly name = "EventLogError";
  constructor(
    readonly episode: string,
    readonly reason: string,
  ) {
    super(`episode ${episode}: event log unreadable: ${reason}`);
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Bytes the driver returned for a `CAST(… AS BLOB)` column, as text; throws when they are not UTF-8. */
function text(v: unknown, column: string): string {
  if (typeof v === "string") return v;
  if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) {
    try {
      return utf8.decode(v);
    } catch {
      throw new Error(`its ${column} is not valid UTF-8`);
    }
  }
  throw new Error(`its ${column} is ${v === null ? "null" : typeof v}`);
}

/** The events of these episodes, ordered by episode and seq; throws when any log cannot be read. */
export async function readEvents(store: Store, episodes: readonly string[]): Promise<EventRow[]> {
  if (episodes.length === 0) return [];
  const e = tables.events;
  const rows = await store.db
    .select({
      episode: e.episode,
      seq: e.seq,
      kind: sql<unknown>`CAST(${e.kind} AS BLOB)`,
      data: sql<unknown>`CAST(${e.data} AS BLOB)`,
    })
    .from(e)
    .where(inArray(e.episode, [...episodes]))
    .orderBy(asc(e.episode), asc(e.seq))
    .all();
  return rows.map((r) => ({ episode: r.episode, seq: r.seq, kind: text(r.kind, "kind"), data: text(r.data, "data") }));
}

/** One episode's event log, oldest event first; an EventLogError naming it when it cannot be read. */
export async function readEventLog(store: Store, episode: string): Promise<EventRow[]> {
  try {
    return await readEvents(store, [episode]);
  } catch (err) {
    throw new EventLogError(episode, errorReason(err));
  }
}
