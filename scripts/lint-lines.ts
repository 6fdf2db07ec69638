/**
 * Line length: no line of source, config, stylesheet or page is longer than 120 characters
 * (Biome formats code to 120 but leaves long strings, comments and regexes alone; this
 * catches those). Markdown is not checked: its tables cannot wrap. Exit 1 on any.
 *
 * Usage: bun scripts/lint-lines.ts [ROOT]
 */
import { readFileSync } from "node:fs";
import { join, relative } from "node:path";

/** The longest line allowed, in characters (UTF-16 code units count each emoji as two; none are used). */
export const MAX_LINE = 120;

const root = process.argv[2] ?? join(import.meta.dir, "..");
const FILES = "{broker,gateway,agents,test,scripts,docs}/**/*.{ts,js,mjs,json,sh,toml,css,html}";
const TOP = ["package.json", "tsconfig.json", "biome.json", "bunfig.toml", "fleet.toml"];
const SKIP = /(^|\/)node_modules\//;

/** `file:line: N characters` for every line of `source` longer than `max`. */
export function longLines(file: string, source: string, max = MAX_LINE): string[] {
  const found: string[] = [];
  for (const [i, line] of source.split("\n").entries()) {
    const n = [...line].length;
    if (n > max) found.push(`${file}:${i + 1}: ${n} characters (max ${max})`);
  }
  return found;
}

if (import.meta.main) {
  const files = [...new Bun.Glob(FILES).scanSync({ cwd: root, absolute: true })].map((f) => relative(root, f));
  const problems: string[] = [];
  for (const file of [...TOP, ...files.filter((f) => !SKIP.test(f))].sort()) {
    let text: string;
    try {
      text = readFileSync(join(root, file), "utf8");
    } catch {
      continue; // a top-level file this checkout does not have
    }
    problems.push(...longLines(file, text));
  }
  for (const p of problems) console.error(p);
  if (problems.length > 0) {
    console.error(`${problems.length} line(s) longer than ${MAX_LINE} characters: wrap them`);
    process.exit(1);
  }
  console.log(`lines: none longer than ${MAX_LINE} characters`);
}
