/**
 * Errors in the author's terms: an episode runs its type's bundle (./bundle.ts), so a failure's
 * message and stack name `<bundle dir>/<hash>.js:8:40`, a file nobody wrote. The gateway keeps the
 * source map of each bundle it built and rewrites those positions to the source's before the failure
 * is recorded: `agents/lab.ts:7:40`. `@jridgewell/trace-mapping` decodes the maps (the decoder
 * bundlers and test runners use); Bun writes them.
 */
import { relative, sep } from "node:path";
import { TraceMap, originalPositionFor } from "@jridgewell/trace-mapping";

export type { TraceMap };

/** How to name what a failure's text points at. */
export interface SourceNames {
  /** The folder of fleet.toml: sources under it are named relative to it. */
  readonly fleetDir: string;
  /** The type's module as fleet.toml writes it: names the bundle where no line is given or known. */
  readonly module: string;
  /**
   * The bundle's hash when its map came from the store, not from a build of the sources as they are
   * now: a position then says which code it is in (`agents/lib.ts:4:19 in bundle 1a2b3c4d5e6f`).
   */
  readonly storedBundle?: string;
}

/** A parsed map, or null when the JSON is not one. */
export function parseSourceMap(json: string): TraceMap | null {
  try {
    return new TraceMap(json);
  } catch {
    return null;
  }
}

/**
 * `text` with every mention of the bundle `file` in the sources' terms: `file:line:column` (a stack
 * frame) as the source file, line and column the map gives, and `file` alone, or a position the map
 * does not cover, as the module (with the bundle's position, so nothing is lost). Columns in Bun's
 * stacks count from 1, the map's from 0.
 */
export function inSourceTerms(text: string, file: string, map: TraceMap | null, names: SourceNames): string {
  if (!text.includes(file)) return text;
  const at = new RegExp(`${escapeRegExp(file)}(?::(\\d+):(\\d+))?`, "g");
  return text.replace(at, (_whole, line?: string, column?: string) => {
    if (line === undefined || column === undefined) return names.module;
    const found = map
      ? originalPositionFor(map, { line: Number(line), column: Math.max(0, Number(column) - 1) })
      : null;
    if (!found || found.source === null) return `${names.module} (bundle line ${line}:${column})`;
    const where = `${shown(found.source, names.fleetDir)}:${found.line}:${found.column + 1}`;
    return names.storedBundle ? `${where} in bundle ${names.storedBundle.slice(0, 12)}` : where;
  });
}

function shown(source: string, fleetDir: string): string {
  const rel = relative(fleetDir, source);
  return rel === "" || rel.startsWith(`..${sep}`) || rel === ".." ? source : rel;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
