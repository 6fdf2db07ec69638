/**
 * Agent code pinned by content (docs/upgrading.md): a type's module and every local file it
 * imports, and the npm packages it uses, bundled by `Bun.build` into one ES module. The SDK
 * and the IPC protocol stay outside, imported by their absolute paths: they are the host
 * runtime's own (the sandbox always shows them), so `instanceof ToolDenied` in the agent
 * meets the very class the host throws.
 */
import { readFileSync } from "node:fs";
import { dirname, resolve, sep } from "node:path";
import { legacyHostSpecifier } from "../../agents/host/index.ts";
import { macroRisk } from "../episode/index.ts";
import { blake3Hex } from "../hash.ts";
import type { Blake3Hex } from "../types.ts";
import { type BundleScope, ScopeCheck } from "./scope.ts";

/**
 * What bundling one module gave: its code, that code's BLAKE3 and its source map (JSON, version 3,
 * `sources` absolute, no `sourcesContent`; null when Bun made none that fits), or why it failed.
 * The map is not part of the hash: it only says where in the sources each line of the code came from.
 */
export type BuiltBundle =
  | { readonly ok: true; readonly hash: Blake3Hex; readonly code: string; readonly map: string | null }
  | { readonly ok: false; readonly error: string };

/**
 * Bundle `modulePath` for the episode host. `hostModules` maps each module the host runtime
 * answers (agents/host HOST_MODULES: the SDK, the protocol) from its file to its specifier: an
 * import that resolves to one of those files (by package name, relative path or absolute path)
 * is left as an import of that specifier; everything else is bundled in, if `scope` lets the
 * gateway read it (./scope.ts): a file outside it fails the build, naming the import and the rule.
 */
export async function buildBundle(
  modulePath: string,
  hostModules: Readonly<Record<string, string>>,
  scope: BundleScope,
): Promise<BuiltBundle> {
  const specifiers = new Set(Object.values(hostModules));
  // The install's SDK and protocol folders (agents/sdk, agents/: the example agents too) are code anyone may read.
  const check = new ScopeCheck(modulePath, scope, Object.keys(hostModules).map(dirname));
  let result: Awaited<ReturnType<typeof Bun.build>>;
  try {
    result = await Bun.build({
      entrypoints: [modulePath],
      target: "bun",
      format: "esm",
      // The hash is to depend on nothing but the code: the comments Bun writes name files
      // relative to the working directory, so they are left out (keptLines).
      minify: { whitespace: false, identifiers: false, syntax: false },
      // For errors only: a failed episode's stack names the source's lines (./source-map.ts).
      sourcemap: "external",
      plugins: [
        {
          name: "fleet-host-runtime",
          setup(b) {
            b.onResolve({ filter: /.*/ }, (args) => {
              if (!args.importer) return undefined;
              // `agent-fleets` from a module outside the project (no node_modules to resolve it in).
              if (specifiers.has(args.path)) return { path: args.path, external: true };
              let resolved: string;
              try {
                resolved = Bun.resolveSync(args.path, dirname(args.importer));
              } catch {
                return undefined;
              }
              const specifier = hostModules[resolved];
              if (specifier !== undefined) return { path: specifier, external: true };
              // Checked here, where the import is known, so that the error names it and its file.
              check.addPackage(args.path, args.importer);
              if (resolved.startsWith("/")) check.allow(resolved, { specifier: args.path, importer: args.importer });
              return undefined;
            });
            // Every file Bun reads (the entry point, and any import resolved otherwise) is checked again as it loads.
            // Each JS/TS file is read and checked before Bun parses it: parsing would run a macro here, in the gateway.
            // (Bun runs no macro imported from node_modules.)
            b.onLoad({ filter: /.*/ }, (args) => {
              check.allow(args.path);
              if (!CODE_FILE.test(args.path) || args.path.includes(`${sep}node_modules${sep}`)) return undefined;
              const contents = readFileSync(args.path, "utf8");
              const risk = macroRisk(contents);
              if (risk) throw new Error(`${args.path}: ${risk}`);
              return { contents, loader: loaderOf(args.path) };
            });
          },
        },
      ],
    });
  } catch (err) {
    return { ok: false, error: describeBuildError(err) };
  }
  if (!result.success) return { ok: false, error: result.logs.map(placed).join("\n") || "bundling failed" };
  const code = result.outputs.filter((o) => o.kind !== "sourcemap");
  const out = code[0];
  if (!out || code.length !== 1)
    return { ok: false, error: "bundling produced more than one file (a dynamic import of a local file?)" };
  const sourceMap = result.outputs.find((o) => o.kind === "sourcemap");
  const kept = keptLines(await out.text());
  return {
    ok: true,
    hash: await blake3Hex(kept.code),
    code: kept.code,
    map: sourceMap ? mapOfKeptLines(await sourceMap.text(), kept.dropped) : null,
  };
}

/**
 * The bundle's text without the lines that are not code: Bun's comments naming each source file
 * (relative to the cwd) and the debug id it adds with a source map, so the hash is the code's
 * alone (the same as a build without a map), and which lines (0-based) were dropped.
 */
function keptLines(text: string): { code: string; dropped: ReadonlySet<number> } {
  // The debug id comes last, after an empty line of its own.
  const lines = text.replace(/\n\/\/# debugId=[0-9A-Fa-f]+\n?$/, "").split("\n");
  const dropped = new Set<number>();
  const kept: string[] = [];
  lines.forEach((line, i) => {
    if (/^\/\/ (?!@bun).*\.[cm]?[jt]sx?$/.test(line)) dropped.add(i);
    else kept.push(line);
  });
  return { code: kept.join("\n"), dropped };
}

/**
 * Bun's source map for the bundle's full text, made to fit the kept lines: a version 3 map's
 * `mappings` has one `;`-separated group per generated line, so a dropped line's group goes too;
 * that is exact only when the group is empty (a comment maps to nothing), else there is no map.
 * Sources are made absolute (Bun writes them relative to the cwd) and their contents left out.
 */
function mapOfKeptLines(json: string, dropped: ReadonlySet<number>): string | null {
  let map: { version?: unknown; sources?: unknown; mappings?: unknown; names?: unknown };
  try {
    map = JSON.parse(json) as typeof map;
  } catch {
    return null;
  }
  if (map.version !== 3 || typeof map.mappings !== "string" || !Array.isArray(map.sources)) return null;
  const groups = map.mappings.split(";");
  if ([...dropped].some((i) => (groups[i] ?? "") !== "")) return null;
  return JSON.stringify({
    version: 3,
    sources: map.sources.map((s) => (typeof s === "string" ? resolve(s) : null)),
    names: Array.isArray(map.names) ? map.names : [],
    mappings: groups.filter((_, i) => !dropped.has(i)).join(";"),
  });
}

/**
 * `code` with every import of the SDK or the protocol by an install's absolute path (as releases
 * before 2026-12-04 bundled them) naming its fixed specifier instead: such a stored bundle and one
 * built by this release from the same source are then the same text (gateway/code/pin.ts).
 */
export function withHostSpecifiers(code: string): string {
  return code.replace(/(\bfrom ?|\bimport\(|\brequire\()"(\/[^"\n]*)"/g, (whole, before: string, path: string) => {
    const specifier = legacyHostSpecifier(path);
    return specifier === null ? whole : `${before}${JSON.stringify(specifier)}`;
  });
}

/** A JS or TS source file, by its extension. */
const CODE_FILE = /\.[cm]?[jt]sx?$/;

/** The loader for a JS/TS file by its extension. */
function loaderOf(path: string): "ts" | "tsx" | "js" | "jsx" {
  const ext = /\.[cm]?([jt]sx?)$/.exec(path)?.[1];
  return ext === "tsx" || ext === "js" || ext === "jsx" ? ext : "ts";
}

function describeBuildError(err: unknown): string {
  const agg = err as { errors?: unknown[]; message?: string };
  if (Array.isArray(agg.errors) && agg.errors.length > 0) return agg.errors.map(placed).join("\n");
  return err instanceof Error ? err.message : String(err);
}

/** One of Bun's build messages as `file:line:column: message` where it says where (a file the module imports, say). */
function placed(m: unknown): string {
  const msg = m as { message?: string; position?: { file?: string; line?: number; column?: number } | null };
  const p = msg.position;
  const text = msg.message ?? String(m);
  return p?.file ? `${p.file}:${p.line ?? 0}:${p.column ?? 0}: ${text}` : String(m);
}
