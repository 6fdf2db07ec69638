/**
 * A strict reader of the Prometheus text exposition format (0.0.4), for tests: every line
 * must be a HELP, a TYPE, a sample or blank, and every sample's family must be declared.
 */

/** One sample line. */
export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

/** A parsed exposition. */
export interface Exposition {
  readonly samples: readonly Sample[];
  /** Metric family -> type (counter, gauge, histogram, summary, untyped). */
  readonly types: ReadonlyMap<string, string>;
  readonly help: ReadonlyMap<string, string>;
  /** Sample lines (series) in the text. */
  readonly seriesCount: number;
}

const NAME = "[a-zA-Z_:][a-zA-Z0-9_:]*";
const SAMPLE = new RegExp(`^(${NAME})(?:\\{(.*)\\})? (\\S+)(?: (-?\\d+))?$`);
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)/y;

function parseValue(raw: string, line: string): number {
  const v = raw.toLowerCase();
  if (v === "nan") return NaN;
  if (v === "+inf" || v === "inf") return Infinity;
  if (v === "-inf") return -Infinity;
  const n = Number(raw);
  if (Number.isNaN(n)) throw new Error(`bad sample value in: ${line}`);
  return n;
}

function parseLabels(raw: string, line: string): Record<string, string> {
  const out: Record<string, string> = {};
  LABEL.lastIndex = 0;
  while (LABEL.lastIndex < raw.length) {
    const m = LABEL.exec(raw);
    if (!m) throw new Error(`bad labels in: ${line}`);
    out[m[1]!] = m[2]!.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
  }
  return out;
}

/** The family a sample belongs to (histogram/summary samples carry suffixes). */
function familyOf(name: string, types: ReadonlyMap<string, string>): string | undefined {
  if (types.has(name)) return name;
  for (const suffix of ["_bucket", "_sum", "_count"]) {
    if (name.endsWith(suffix)) {
      const base = name.slice(0, -suffix.length);
      if (types.has(base)) return base;
    }
  }
  return undefined;
}

/** Parse (and validate) an exposition; throws naming the first bad line. */
export function parseExposition(text: string): Exposition {
  const samples: Sample[] = [];
  const types = new Map<string, string>();
  const help = new Map<string, string>();
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    if (line.startsWith("# HELP ")) {
      const m = new RegExp(`^# HELP (${NAME}) (.*)$`).exec(line);
      if (!m) throw new Error(`bad HELP line: ${line}`);
      help.set(m[1]!, m[2]!);
      continue;
    }
    if (line.startsWith("# TYPE ")) {
      const m = new RegExp(`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`).exec(line);
      if (!m) throw new Error(`bad TYPE line: ${line}`);
      types.set(m[1]!, m[2]!);
      continue;
    }
    if (line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) throw new Error(`bad sample line: ${line}`);
    const name = m[1]!;
    if (!familyOf(name, types)) throw new Error(`sample of undeclared family: ${line}`);
    samples.push({ name, labels: m[2] ? parseLabels(m[2], line) : {}, value: parseValue(m[3]!, line) });
  }
  return { samples, types, help, seriesCount: samples.length };
}

/** The value of the sample `name` whose labels include `labels`; undefined when absent. */
export function sampleValue(x: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  const s = x.samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  return s?.value;
}

/** Samples of one name. */
export function samplesOf(x: Exposition, name: string): Sample[] {
  return x.samples.filter((s) => s.name === name);
}

/** GET `<base>/metrics` and parse it. */
export async function scrape(base: string): Promise<Exposition & { text: string }> {
  const res = await fetch(`${base}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  const text = await res.text();
  return { ...parseExposition(text), text };
}
