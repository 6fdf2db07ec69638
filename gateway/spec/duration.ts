/** Human durations as written in fleet.toml (`every = "30s"`), e.g. "500ms", "5m", "1h30m". */

const UNIT_MS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;
type Unit = keyof typeof UNIT_MS;
/** Largest unit first; each unit may appear once, in this order ("1h30m", not "30m1h"). */
const ORDER: readonly Unit[] = ["d", "h", "m", "s", "ms"];
const PART = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;

/** Parses "500ms", "30s", "5m", "1h", "1d" and combinations ("1m30s") to milliseconds; null if malformed. */
export function parseDuration(s: string): number | null {
  if (s.length === 0) return null;
  let total = 0;
  let last = -1;
  PART.lastIndex = 0;
  while (PART.lastIndex < s.length) {
    const m = PART.exec(s);
    if (m === null) return null;
    const unit = m[2] as Unit;
    const rank = ORDER.indexOf(unit);
    if (rank <= last) return null;
    last = rank;
    total += Number(m[1]) * UNIT_MS[unit];
  }
  const ms = Math.round(total);
  return Number.isSafeInteger(ms) ? ms : null;
}
