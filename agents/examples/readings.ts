/** Helpers the example agents share. */

/**
 * The reading in a payload: a number, a numeric string, or a numeric `field` of an object;
 * null otherwise.
 */
export function readingOf(payload: unknown, field: string): number | null {
  const raw =
    typeof payload === "object" && payload !== null && !Array.isArray(payload)
      ? (payload as Record<string, unknown>)[field]
      : payload;
  if (typeof raw === "number") return Number.isFinite(raw) ? raw : null;
  // Number("") and Number("  ") are 0, which would read as a real measurement.
  if (typeof raw === "string" && raw.trim() !== "") {
    const n = Number(raw);
    return Number.isFinite(n) ? n : null;
  }
  return null;
}
