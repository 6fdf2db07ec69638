/**
 * What an episode's sandbox can see of the host's files (bubblewrap mode): the system
 * libraries and binaries, the Bun executable, the host runtime (its built script, or where it
 * could not be built agents/host, agents/sdk and agents/protocol.ts: ./sandbox.ts `hostShows`),
 * and the agent module with the files it imports. Nothing else: not the
 * data dir, not fleet.toml, not the other agents' modules.
 *
 * A cold host process gets its agent's files as bind mounts. A warm spare starts before
 * anyone knows which agent it will serve, so its root is a staging directory of its own
 * (./staging.ts, read-only inside); the agent's files are moved into it when an episode
 * takes the spare, and appear inside at their real paths.
 */
import { existsSync, lstatSync, readFileSync, readlinkSync, realpathSync, statSync } from "node:fs";
import { dirname, join, resolve, sep } from "node:path";
import { macroRisk } from "./macros.ts";

/** One read-only thing the sandbox shows at the same path as on the host. */
export type Bind =
  | { readonly kind: "dir" | "file"; readonly path: string }
  | { readonly kind: "symlink"; readonly path: string; readonly target: string };

/** The files of one agent module: its own import closure, and the node_modules packages it uses (whole folders). */
export interface AgentFiles {
  readonly files: readonly string[];
  readonly packages: readonly string[];
  /**
   * What to watch for a change of the closure: the files, where a missing module or relative import
   * would be (a file that appears there changes the closure as much as an edit does), and each
   * package's package.json (a new version installed; an edit inside a package is not watched).
   */
  readonly watched: readonly string[];
  /**
   * The symlinks the module resolves its packages through (`node_modules/zod -> .pnpm/…`, `npm link`,
   * workspaces): shown as they are, beside the packages at their real paths, or nothing resolves.
   */
  readonly links: readonly { readonly path: string; readonly target: string }[];
}

/** Where Bun looks for a relative import `./x` (no extension, or one it adds). */
const IMPORT_SUFFIXES = ["", ".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", "/index.ts", "/index.js"] as const;

/** The system parts a Bun process needs: its shared libraries (and /usr/bin for what an agent may spawn). */
const SYSTEM_PATHS = ["/usr/lib", "/usr/lib64", "/usr/bin", "/lib", "/lib64", "/bin"] as const;

/** The binds every sandboxed host process gets, whatever agent it serves. */
export function runtimeBinds(bun: string, hostPaths: readonly string[]): Bind[] {
  const out: Bind[] = [];
  for (const p of SYSTEM_PATHS) {
    let st: ReturnType<typeof lstatSync>;
    try {
      st = lstatSync(p);
    } catch {
      continue;
    }
    if (st.isSymbolicLink()) out.push({ kind: "symlink", path: p, target: readlinkSync(p) });
    else if (st.isDirectory()) out.push({ kind: "dir", path: p });
  }
  out.push({ kind: "file", path: realpathSync(bun) });
  for (const p of hostPaths) out.push({ kind: statSync(p).isDirectory() ? "dir" : "file", path: realpathSync(p) });
  return out;
}

/** bubblewrap arguments for these binds (after the root is set up). */
export function bindArgs(binds: readonly Bind[]): string[] {
  return binds.flatMap((b) => (b.kind === "symlink" ? ["--symlink", b.target, b.path] : ["--ro-bind", b.path, b.path]));
}

const transpiler = new Bun.Transpiler({ loader: "tsx" });
const cache = new Map<string, { stamp: string; files: AgentFiles }>();

/** The folder of the npm package a resolved file belongs to (…/node_modules/<name> or …/node_modules/@s/<name>). */
function packageRoot(file: string): string | null {
  const at = file.lastIndexOf(`${sep}node_modules${sep}`);
  if (at < 0) return null;
  const rest = file.slice(at + "/node_modules/".length).split(sep);
  const name = rest[0]?.startsWith("@") ? rest.slice(0, 2) : rest.slice(0, 1);
  return file.slice(0, at + "/node_modules/".length) + name.join(sep);
}

/** The links met on the way to packages, by path. */
type Links = Map<string, string>;

/**
 * The package folder `name` resolves to from `from` (node's lookup through parent node_modules);
 * the symlinks met on the way (`node_modules` itself, `@scope`, the package) are added to `links`.
 */
function findPackage(name: string, from: string, links: Links): string | null {
  for (let dir = from; ; dir = dirname(dir)) {
    const candidate = join(dir, "node_modules", name);
    if (existsSync(join(candidate, "package.json"))) {
      let path = dir;
      for (const part of ["node_modules", ...name.split("/")]) {
        path = join(path, part);
        if (lstatSync(path).isSymbolicLink()) links.set(path, readlinkSync(path));
      }
      return realpathSync(candidate);
    }
    if (dirname(dir) === dir) return null;
  }
}

/** The package name of a bare import (`zod`, `@scope/pkg`, from `zod/mini` or `@scope/pkg/sub`), or null. */
function packageName(specifier: string): string | null {
  if (specifier.startsWith(".") || specifier.startsWith("/") || specifier.includes(":")) return null;
  const parts = specifier.split("/");
  return (parts[0]?.startsWith("@") ? parts.slice(0, 2) : parts.slice(0, 1)).join("/");
}

function addPackage(root: string, packages: Set<string>, links: Links): void {
  if (packages.has(root)) return;
  packages.add(root);
  let deps: string[] = [];
  try {
    const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as Record<string, unknown>;
    for (const field of ["dependencies", "peerDependencies", "optionalDependencies"])
      deps = deps.concat(Object.keys((pkg[field] as Record<string, string> | undefined) ?? {}));
  } catch {
    return;
  }
  for (const d of deps) {
    const found = findPackage(d, root, links);
    if (found) addPackage(found, packages, links);
  }
}

/**
 * The files `modulePath` loads: itself, every file it imports statically (transitively,
 * resolved as Bun resolves them), and whole npm packages for bare imports (with their
 * dependencies). Missing or unparsable files are left out: the episode then fails with
 * Bun's own error. Cached until one of the watched paths changes (a missing file that appears too).
 * Files under `skip` are left out (the runtime shows them); `answered` ones are kept but not followed.
 */
export function agentFiles(
  modulePath: string,
  skip: readonly string[] = [],
  /** Files the host runtime answers itself (the SDK, the protocol): kept (the resolver needs them), not followed. */
  answered: readonly string[] = [],
): AgentFiles {
  const key = [modulePath, ...skip, "", ...answered].join("\0");
  const hit = cache.get(key);
  if (hit && hit.stamp === stampOf(hit.files.watched)) return hit.files;
  const files = new Set<string>();
  const packages = new Set<string>();
  const missing = new Set<string>();
  const links: Links = new Map();
  const inSkip = (f: string) => skip.some((s) => f === s || f.startsWith(s + sep));
  const visit = (file: string): void => {
    let real: string;
    try {
      real = realpathSync(file);
    } catch {
      missing.add(file);
      return;
    }
    if (files.has(real)) return;
    if (answered.includes(real)) {
      files.add(real);
      return;
    }
    if (inSkip(real)) return;
    const pkg = packageRoot(real);
    if (pkg) {
      addPackage(pkg, packages, links);
      return;
    }
    files.add(real);
    if (!/\.[cm]?[jt]sx?$/.test(real)) return;
    let imports: { path: string }[] = [];
    try {
      const source = readFileSync(real, "utf8");
      // Scanning parses, and parsing runs macros: such a file's imports are not followed (nor shown).
      if (macroRisk(source) !== null) return;
      imports = transpiler.scanImports(source);
    } catch {
      return;
    }
    for (const imp of imports) {
      let resolved: string;
      try {
        resolved = Bun.resolveSync(imp.path, dirname(real));
      } catch {
        if (imp.path.startsWith(".") || imp.path.startsWith("/"))
          for (const suffix of IMPORT_SUFFIXES) missing.add(resolve(dirname(real), imp.path) + suffix);
        continue;
      }
      // Bun resolves through symlinks: the link itself is found as node would find it.
      const name = packageName(imp.path);
      if (name !== null) findPackage(name, dirname(real), links);
      if (resolved.startsWith("/")) visit(resolved);
    }
  };
  visit(modulePath);
  const out: AgentFiles = {
    files: [...files],
    packages: [...packages],
    watched: [...files, ...missing, ...[...packages].map((pkg) => join(pkg, "package.json"))],
    // One inside a package folder is shown with it.
    links: [...links]
      .filter(([path]) => ![...packages].some((pkg) => path.startsWith(pkg + sep)))
      .map(([path, target]) => ({ path, target })),
  };
  cache.set(key, { stamp: stampOf(out.watched), files: out });
  return out;
}

/** A stamp of a module's import closure (its files' mtimes): equal stamps, same code. */
export function moduleStamp(modulePath: string): string {
  return `${modulePath}\n${stampOf(agentFiles(modulePath).watched)}`;
}

function stampOf(files: readonly string[]): string {
  return files
    .map((f) => {
      try {
        return String(statSync(f).mtimeMs);
      } catch {
        return "-";
      }
    })
    .join(",");
}

/**
 * Whether a warm spare can load these files. A spare's Bun started before the agent's files
 * were staged, and its resolver remembers the `node_modules` folders it looked for (and did
 * not find) on the way up from the host runtime. A package staged later under one of those
 * folders is then "not found": such agents start cold (e.g. one beside the fleet's own install
 * importing zod from its node_modules). Agents in their own app folder are not affected.
 */
export function spareCanLoad(a: AgentFiles, hostPaths: readonly string[]): boolean {
  // Asked for every episode: the answer is kept with the files (a new value when they change).
  const hit = canLoad.get(a);
  if (hit?.hostPaths === hostPaths) return hit.ok;
  const ok = computeCanLoad(a, hostPaths);
  canLoad.set(a, { hostPaths, ok });
  return ok;
}

const canLoad = new WeakMap<AgentFiles, { hostPaths: readonly string[]; ok: boolean }>();

function computeCanLoad(a: AgentFiles, hostPaths: readonly string[]): boolean {
  const looked = new Set<string>();
  for (const p of hostPaths)
    for (let dir = dirname(p); ; dir = dirname(dir)) {
      looked.add(join(dir, "node_modules") + sep);
      if (dirname(dir) === dir) break;
    }
  // A spare's staging moves files and folders only: an agent that needs links starts cold.
  return a.links.length === 0 && a.packages.every((pkg) => ![...looked].some((nm) => pkg.startsWith(nm)));
}

/** Agent files as binds (a cold start mounts them directly). */
export function agentBinds(a: AgentFiles): Bind[] {
  return [
    ...a.files.map((path) => ({ kind: "file" as const, path })),
    ...a.packages.map((path) => ({ kind: "dir" as const, path })),
    ...a.links.map((l) => ({ kind: "symlink" as const, ...l })),
  ];
}

/** Under the sandbox's private /tmp, a staged file would be hidden: such an agent starts cold. */
export function stageable(a: AgentFiles): boolean {
  return [...a.files, ...a.packages].every((p) => p !== "/tmp" && !p.startsWith("/tmp/"));
}
