/**
 * Where a newest-first page of a central read ends, for the `before` of the next one. A read of one
 * gateway pages as the gateway's own API does: operator actions by their seq, episodes by their
 * start time (ms). Across several gateways (a fleet's name covering its shards, two gateways sharing
 * a name, every fleet) neither marks a place: each gateway numbers its actions from 1, and episodes
 * of two gateways may start in the same millisecond. There the cursor is the last row's whole sort
 * key, `<ms>:<part>:<part>`, its text parts percent-encoded (so none holds a `:`). Clients pass it
 * back as they got it; what is inside may change.
 */
import { type IntBounds, type Parsed, parseStrictInt } from "../parse.ts";

/** An operator action's place in a central read across gateways: newest `at` first, then gateway, then seq. */
export interface AuditKey {
  readonly at: number;
  readonly gateway: string;
  readonly seq: number;
}

/** An episode's place in a central read across gateways: newest start first, then id, then gateway. */
export interface EpisodeKey {
  readonly startedAt: number;
  readonly id: string;
  readonly gateway: string;
}

/** The cursor that pages on after the operator action `k`. */
export const auditCursor = (k: AuditKey): string => `${k.at}:${encodeURIComponent(k.gateway)}:${k.seq}`;

/** The cursor that pages on after the episode `k`. */
export const episodeCursor = (k: EpisodeKey): string =>
  `${k.startedAt}:${encodeURIComponent(k.id)}:${encodeURIComponent(k.gateway)}`;

const CURSOR = /^(0|[1-9][0-9]{0,15}):([^:]+):([^:]+)$/;
const SEQ = /^[1-9][0-9]{0,15}$/;

/** A cursor's milliseconds and its two other parts (decoded), or null when `text` is not a cursor. */
function split(text: string): [number, string, string] | null {
  const m = CURSOR.exec(text);
  if (!m || !Number.isSafeInteger(Number(m[1]))) return null;
  try {
    return [Number(m[1]), decodeURIComponent(m[2]!), decodeURIComponent(m[3]!)];
  } catch {
    return null; // not valid percent-encoding
  }
}

/** An `auditCursor` read back, or null. */
export function parseAuditCursor(text: string): AuditKey | null {
  const p = split(text);
  if (!p || !SEQ.test(p[2]) || !Number.isSafeInteger(Number(p[2]))) return null;
  return { at: p[0], gateway: p[1], seq: Number(p[2]) };
}

/** An `episodeCursor` read back, or null. */
export function parseEpisodeCursor(text: string): EpisodeKey | null {
  const p = split(text);
  return p ? { startedAt: p[0], id: p[1], gateway: p[2] } : null;
}

/**
 * A `before` as the central reads take it: a plain integer in `bounds` (a SEQ or MS, as the read of
 * one gateway pages), or a cursor `parse` reads (one a full page handed out as `next_before`).
 */
export function parseBefore<K>(
  raw: string,
  bounds: IntBounds,
  parse: (text: string) => K | null,
): Parsed<number | K, "not_integer" | "out_of_range" | "missing" | "not_cursor"> {
  if (raw.includes(":")) {
    const key = parse(raw);
    if (key) return { ok: true, value: key };
    const shown = JSON.stringify(raw.slice(0, 200));
    return {
      ok: false,
      code: "not_cursor",
      message: `${bounds.name} ${shown} is not a cursor a page of this read handed out (pass next_before as it is)`,
    };
  }
  const n = parseStrictInt(raw, bounds);
  if (n.ok || n.code !== "not_integer") return n;
  return { ...n, message: `${n.message} (or the next_before cursor a full page ended with)` };
}
