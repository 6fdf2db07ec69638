/**
 * The folder rule (README "Layout"): a module imports another folder only through that
 * folder's `index.ts`. Folders are `broker/`, `gateway/<part>/` and `agents/<part>/`; the
 * files at the root of `gateway/` and `agents/` are shared (types, wire constants) and
 * `agents/examples/*` are agent modules, each its own door. A few modules are light doors beside
 * their folder's index (LIGHT_DOORS): rules and types another folder's command-line paths use without
 * loading the whole folder; a light door imports nothing at runtime (type imports only), which this
 * checks too. Import cycles are Biome's job (`noImportCycles`); this checks what Biome cannot express.
 * Exit 1 on any violation.
 *
 * Usage: bun scripts/lint-imports.ts [ROOT]
 */
import { readFileSync } from "node:fs";
import { dirname, join, normalize, relative } from "node:path";

const root = process.argv[2] ?? join(import.meta.dir, "..");
const SPECIFIER = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)(["'])(\.{1,2}\/[^"']+)\1/g;

/**
 * An `import ... from` or `export ... from` that is not `import type`. The clause between the keyword and
 * `from` stays on its line but for a braced list: a class declaration above an `import type` is not taken
 * for one statement.
 */
const RUNTIME_FROM = /^(?:import|export)[ \t]+(?!type\b)(?:[\w$*, \t]|\{[^}]*\})+?[ \t]*from[ \t]*(["'])([^"']+)\1/gm;

/**
 * Doors besides `index.ts`. `broker/index.ts` loads aedes and the persistence (~0.2 s of CPU); the devices
 * registry needs only the topic rules and BrokerBusy, and `fleet device` should not pay for the broker.
 */
export const LIGHT_DOORS: ReadonlySet<string> = new Set([
  "broker/topics.ts", // the pure topic rules (matching, validation)
  "broker/types.ts", // the broker's interface types and its two error classes
]);

/** Runtime imports in a light door's source (it may import types only): each is a violation. */
export function heavyDoorImports(file: string, source: string): string[] {
  const found: string[] = [];
  for (const m of source.matchAll(RUNTIME_FROM)) {
    found.push(`${file}: a light door imports "${m[2]}" at runtime; it may import types only`);
  }
  for (const m of source.matchAll(/^import\s*(["'])([^"']+)\1/gm)) {
    found.push(`${file}: a light door imports "${m[2]}" at runtime; it may import types only`);
  }
  return found;
}

/** The folder a repository path belongs to, or null for shared or consumer code. */
export function folderOf(path: string): string | null {
  const parts = path.split("/");
  if (parts[0] === "broker") return "broker";
  if ((parts[0] === "gateway" || parts[0] === "agents") && parts.length >= 3) {
    return parts[1] === "examples" ? null : `${parts[0]}/${parts[1]}`;
  }
  return null;
}

/** Violations in one file's source: imports that reach past another folder's index. */
export function deepImports(file: string, source: string): string[] {
  const from = folderOf(file);
  const found: string[] = [];
  for (const m of source.matchAll(SPECIFIER)) {
    const spec = m[2] as string;
    const target = normalize(join(dirname(file), spec));
    const folder = folderOf(target);
    if (folder === null || folder === from || target === `${folder}/index.ts` || LIGHT_DOORS.has(target)) continue;
    found.push(`${file}: imports "${spec}"; import ${folder}/index.ts instead`);
  }
  return found;
}

if (import.meta.main) {
  const glob = new Bun.Glob("{broker,gateway,agents,test,scripts}/**/*.ts");
  const problems: string[] = [];
  for (const abs of glob.scanSync({ cwd: root, absolute: true })) {
    const file = relative(root, abs);
    const source = readFileSync(abs, "utf8");
    problems.push(...deepImports(file, source));
    if (LIGHT_DOORS.has(file)) problems.push(...heavyDoorImports(file, source));
  }
  for (const p of problems) console.error(p);
  if (problems.length > 0) {
    console.error(`${problems.length} deep import(s) across folders`);
    process.exit(1);
  }
  console.log("imports: every cross-folder import goes through an index.ts or a light door");
}
