/**
 * Which files bundling an agent module may read (docs/sandbox.md "The agent's code"). Bundling runs
 * in the gateway's process, as its user (root, often), and inlines whatever the module imports: an
 * `import env from "/proc/self/environ" with { type: "text" }` put the gateway's environment into the
 * bundle, and a relative import of the data dir's `local-admin.token` the admin token. So every file
 * the bundle would read must lie inside an allowed root (the fleet.toml folder tree, the module's
 * own folder tree, the install's agents/ folder with the SDK, the npm packages the code imports),
 * and never inside a refused path (the data dir, the devices file, /proc, /sys, /dev), both compared
 * after realpath, so a symlink inside the tree that points outside is judged by where it points.
 */
import { existsSync, realpathSync } from "node:fs";
import { dirname, join, resolve, sep } from "node:path";
import type { SpecVersion } from "../spec/index.ts";

/** Where a bundle may read: plain values, so that a caller without a spec (a test) can state them. */
export interface BundleScope {
  /** Folders whose files may be bundled (the fleet.toml folder; the module's own folder is always one). */
  readonly roots: readonly string[];
  /** Files and folders never bundled, even inside a root (the data dir, the devices file). */
  readonly refused: readonly { readonly path: string; readonly what: string }[];
}

/** Parts of the file system that are the gateway's process or machine, not code: never bundled. */
const SYSTEM_REFUSED = [
  { path: "/proc", what: "/proc" },
  { path: "/sys", what: "/sys" },
  { path: "/dev", what: "/dev" },
] as const;

/**
 * The scope of a spec version's modules: its fleet.toml folder tree, minus the gateway's data dir
 * (`dataDir` when the caller knows it, and `[fleet] data_dir` taken against the working directory, as the
 * gateway takes it, and against the fleet.toml folder) and the devices file. The tokens file and the
 * local admin token live in the data dir.
 */
export function specScope(sv: Pick<SpecVersion, "path" | "spec">, dataDir?: string): BundleScope {
  const folder = dirname(sv.path);
  const dataDirs = new Set([resolve(sv.spec.fleet.data_dir), resolve(folder, sv.spec.fleet.data_dir)]);
  if (dataDir !== undefined) dataDirs.add(resolve(dataDir));
  const refused = [...dataDirs].map((path) => ({ path, what: "the gateway's data dir" }));
  const devices = sv.spec.broker.devices_file;
  if (devices !== null) refused.push({ path: devices, what: "the devices file" });
  return { roots: [folder], refused };
}

/** A file the bundle may not read, and why (one sentence naming the rule). */
export class OutOfScope extends Error {
  override readonly name = "OutOfScope";
}

/**
 * The checks of one build: `allow(file)` throws OutOfScope for a file outside the roots or inside a
 * refused path. `modulePath`'s folder and `sdkDirs` are roots too; `addPackage(specifier, importer)`
 * makes the npm package a bare import names (as node finds it from the importer) one more.
 */
export class ScopeCheck {
  private readonly roots: string[];
  private readonly refused: { readonly path: string; readonly what: string }[];

  constructor(modulePath: string, scope: BundleScope, sdkDirs: readonly string[]) {
    this.roots = [...scope.roots, dirname(resolve(modulePath)), ...sdkDirs].map(real);
    // Both the path as named and its real path: a data dir reached through a symlink is the same data dir.
    this.refused = [...SYSTEM_REFUSED, ...scope.refused].flatMap((r) => [r, { path: real(r.path), what: r.what }]);
  }

  /** The package `specifier` imports from `importer` (a bare import) is a root from now on. */
  addPackage(specifier: string, importer: string): void {
    const name = packageName(specifier);
    if (name === null) return;
    for (let dir = dirname(importer); ; dir = dirname(dir)) {
      const candidate = join(dir, "node_modules", name);
      if (existsSync(join(candidate, "package.json"))) {
        this.roots.push(real(candidate));
        return;
      }
      if (dirname(dir) === dir) return;
    }
  }

  /** Throws OutOfScope unless the bundle may read `file` (its real path is what counts). */
  allow(file: string, imported?: { readonly specifier: string; readonly importer: string }): void {
    const at = real(file);
    const named = imported ? `import ${JSON.stringify(imported.specifier)} (${at})` : at;
    for (const r of this.refused)
      if (inside(at, r.path))
        throw new OutOfScope(
          `${named} is inside ${r.what} (${r.path}): agent code may not import the gateway's files, ` +
            "/proc, /sys or /dev, wherever they are",
        );
    if (!this.roots.some((root) => inside(at, root)))
      throw new OutOfScope(
        `${named} is outside the folders agent code may import from (the fleet.toml folder, the module's ` +
          "folder, the fleet's agents/ folder with the SDK, and the npm packages it imports), after resolving symlinks",
      );
  }
}

/** Whether `path` is `dir` or inside it. */
function inside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

/** `path` with its symlinks resolved (as it is when missing: nothing there to read). */
function real(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return resolve(path);
  }
}

/** The package name of a bare import (`zod`, `@scope/pkg`, from `zod/mini` or `@scope/pkg/sub`), or null. */
function packageName(specifier: string): string | null {
  if (specifier.startsWith(".") || specifier.startsWith("/") || specifier.includes(":")) return null;
  const parts = specifier.split("/");
  return (parts[0]?.startsWith("@") ? parts.slice(0, 2) : parts.slice(0, 1)).join("/");
}
