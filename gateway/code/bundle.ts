/**
 * Agent code pinned by content (docs/upgrading.md): a type's module and every local file it
 * imports, and the npm packages it uses, bundled by `Bun.build` into one ES module. The SDK
 * and the IPC protocol stay outside, imported by their absolute paths: they are the host
 * runtime's own (the sandbox always shows them), so `instanceof ToolDenied` in the agent
 * meets the very class the host throws.
 */
import { readFileSync } from "node:fs";
import { dirname, sep } from "node:path";
import { macroRisk } from "../episode/index.ts";
import { blake3Hex } from "../hash.ts";
import type { Blake3Hex } from "../types.ts";

/** What bundling one module gave: its code and that code's BLAKE3, or why it failed. */
export type BuiltBundle =
  | { readonly ok: true; readonly hash: Blake3Hex; readonly code: string }
  | { readonly ok: false; readonly error: string };

/** The package name an agent imports the SDK by (package.json `exports`). */
const SDK_PACKAGE = "agent-fleets";

/**
 * Bundle `modulePath` for the episode host. `hostPaths` are the runtime's files and folders
 * (agents/host HOST_PATHS); imports that resolve into them, and `agent-fleets` itself, are
 * left as imports of the host's copy at `sdkEntry`.
 */
export async function buildBundle(
  modulePath: string,
  hostPaths: readonly string[],
  sdkEntry: string,
): Promise<BuiltBundle> {
  const inHost = (p: string) => hostPaths.some((h) => p === h || p.startsWith(h + sep));
  let result: Awaited<ReturnType<typeof Bun.build>>;
  try {
    result = await Bun.build({
      entrypoints: [modulePath],
      target: "bun",
      format: "esm",
      // Absolute paths in the output would make the hash depend on nothing but the code; the
      // comments Bun writes name files relative to the working directory, so leave them out.
      minify: { whitespace: false, identifiers: false, syntax: false },
      plugins: [
        {
          name: "fleet-host-runtime",
          setup(b) {
            b.onResolve({ filter: /.*/ }, (args) => {
              if (!args.importer) return undefined;
              if (args.path === SDK_PACKAGE) return { path: sdkEntry, external: true };
              let resolved: string;
              try {
                resolved = Bun.resolveSync(args.path, dirname(args.importer));
              } catch {
                return undefined;
              }
              return resolved.startsWith("/") && inHost(resolved) ? { path: resolved, external: true } : undefined;
            });
            // Each file is read and checked before Bun parses it: parsing would run a macro here, in the gateway.
            // (Bun runs no macro imported from node_modules.)
            b.onLoad({ filter: /\.[cm]?[jt]sx?$/ }, (args) => {
              if (args.path.includes(`${sep}node_modules${sep}`)) return undefined;
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
  const out = result.outputs.find((o) => o.kind === "entry-point") ?? result.outputs[0];
  if (!out || result.outputs.length !== 1)
    return { ok: false, error: "bundling produced more than one file (a dynamic import of a local file?)" };
  const code = stripPathComments(await out.text());
  return { ok: true, hash: await blake3Hex(code), code };
}

/** The loader for a JS/TS file by its extension. */
function loaderOf(path: string): "ts" | "tsx" | "js" | "jsx" {
  const ext = /\.[cm]?([jt]sx?)$/.exec(path)?.[1];
  return ext === "tsx" || ext === "js" || ext === "jsx" ? ext : "ts";
}

/** Bun's comments naming each source file (relative to the cwd): dropped, so the hash is the code's alone. */
function stripPathComments(code: string): string {
  return code.replace(/^\/\/ (?!@bun).*\.[cm]?[jt]sx?\n/gm, "");
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
