/**
 * What an episode's sandbox can see of the host's files (bubblewrap mode): the system
 * libraries and binaries, the Bun executable, the host runtime (agents/host, agents/sdk,
 * agents/protocol.ts), and the agent module with the files it imports. Nothing else: not the
 * data dir, not fleet.toml, not the other agents' modules.
 *
 * A cold host process gets its agent's files as bind mounts. A warm spare starts before
 * anyone knows which agent it will serve, so its root is a staging directory of its own
 * (`StagingRoot`, read-only inside); the agent's files are linked into it when an episode
 * takes the spare, and appear inside at their real paths.
 */
import {
  chmodSync,
  copyFileSync,
  cpSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  realpathSync,
  rmdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, sep } from "node:path";

/** One read-only thing the sandbox shows at the same path as on the host. */
export type Bind =
  | { readonly kind: "dir" | "file"; readonly path: string }
  | { readonly kind: "symlink"; readonly path: string; readonly target: string };

/** The files of one agent module: its own import closure, and the node_modules packages it uses (whole folders). */
export interface AgentFiles {
  readonly files: readonly string[];
  readonly packages: readonly string[];
}

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

/** The package folder `name` resolves to from `from` (node's lookup through parent node_modules). */
function findPackage(name: string, from: string): string | null {
  for (let dir = from; ; dir = dirname(dir)) {
    const candidate = join(dir, "node_modules", name);
    if (existsSync(join(candidate, "package.json"))) return realpathSync(candidate);
    if (dirname(dir) === dir) return null;
  }
}

function addPackage(root: string, packages: Set<string>): void {
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
    const found = findPackage(d, root);
    if (found) addPackage(found, packages);
  }
}

/**
 * The files `modulePath` loads: itself, every file it imports statically (transitively,
 * resolved as Bun resolves them), and whole npm packages for bare imports (with their
 * dependencies). Missing or unparsable files are left out: the episode then fails with
 * Bun's own error. Cached until one of the files changes.
 */
export function agentFiles(modulePath: string, skip: readonly string[] = []): AgentFiles {
  const hit = cache.get(modulePath);
  if (hit && hit.stamp === stampOf(hit.files.files)) return hit.files;
  const files = new Set<string>();
  const packages = new Set<string>();
  const inSkip = (f: string) => skip.some((s) => f === s || f.startsWith(s + sep));
  const visit = (file: string): void => {
    let real: string;
    try {
      real = realpathSync(file);
    } catch {
      return;
    }
    if (files.has(real) || inSkip(real)) return;
    const pkg = packageRoot(real);
    if (pkg) {
      addPackage(pkg, packages);
      return;
    }
    files.add(real);
    if (!/\.[cm]?[jt]sx?$/.test(real)) return;
    let imports: { path: string }[] = [];
    try {
      imports = transpiler.scanImports(readFileSync(real, "utf8"));
    } catch {
      return;
    }
    for (const imp of imports) {
      let resolved: string;
      try {
        resolved = Bun.resolveSync(imp.path, dirname(real));
      } catch {
        continue;
      }
      if (resolved.startsWith("/")) visit(resolved);
    }
  };
  visit(modulePath);
  const out: AgentFiles = { files: [...files], packages: [...packages] };
  cache.set(modulePath, { stamp: stampOf(out.files), files: out });
  return out;
}

/** A stamp of a module's import closure (its files' mtimes): equal stamps, same code. */
export function moduleStamp(modulePath: string): string {
  return `${modulePath}\n${stampOf(agentFiles(modulePath).files)}`;
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
  const looked = new Set<string>();
  for (const p of hostPaths)
    for (let dir = dirname(p); ; dir = dirname(dir)) {
      looked.add(join(dir, "node_modules") + sep);
      if (dirname(dir) === dir) break;
    }
  return a.packages.every((pkg) => ![...looked].some((nm) => pkg.startsWith(nm)));
}

/** Agent files as binds (a cold start mounts them directly). */
export function agentBinds(a: AgentFiles): Bind[] {
  return [
    ...a.files.map((path) => ({ kind: "file" as const, path })),
    ...a.packages.map((path) => ({ kind: "dir" as const, path })),
  ];
}

/** Under the sandbox's private /tmp, a staged file would be hidden: such an agent starts cold. */
export function stageable(a: AgentFiles): boolean {
  return [...a.files, ...a.packages].every((p) => p !== "/tmp" && !p.startsWith("/tmp/"));
}

let rootsDir: string | null = null;

/** Where staging roots live: a directory only its owner can list (0711), made once per gateway process. */
function stagingBase(): string {
  if (rootsDir === null || !existsSync(rootsDir)) {
    const made = mkdtempSync(join(tmpdir(), "fleet-roots-"));
    chmodSync(made, 0o711);
    rootsDir = made;
    // Gone with this process (a kill -9 leaves it to the next start's sweep of the data dir's ledger).
    process.once("exit", () => rmSync(made, { recursive: true, force: true }));
  }
  return rootsDir;
}

/** Staging roots whose spare is gone, emptied of its agent's files, by the runtime they were made for. */
const freeRoots = new Map<string, StagingRoot[]>();
/** Free roots kept for reuse per runtime (a pool of spares needs a handful). */
const MAX_FREE_ROOTS = 8;

/**
 * The root file system of one warm spare: a directory with the mount points of the runtime
 * binds, shown read-only as `/` inside. `stage` links an agent's files into it later.
 * Once its spare is gone the root is emptied of what `stage` added and serves the next spare
 * (`StagingRoot.for`): the skeleton costs ~60 file system calls to make and remove, per episode.
 */
export class StagingRoot {
  readonly dir: string;
  /** The runtime it was made for (the free list's key). */
  private readonly key: string;
  /** What `stage` linked or copied in, and the directories it made for them (outermost first). */
  private staged: string[] = [];
  private dirs: string[] = [];

  /** A free root made for the same runtime, or a new one. */
  static for(runtime: readonly Bind[]): StagingRoot {
    const free = freeRoots.get(runtimeKey(runtime));
    while (free && free.length > 0) {
      const root = free.pop()!;
      if (existsSync(root.dir)) return root;
    }
    return new StagingRoot(runtime);
  }

  constructor(runtime: readonly Bind[]) {
    this.key = runtimeKey(runtime);
    this.dir = join(stagingBase(), crypto.randomUUID());
    mkdirSync(this.dir, { mode: 0o755 });
    chmodSync(this.dir, 0o755);
    for (const d of ["proc", "dev", "tmp"]) mkdirSync(join(this.dir, d), { mode: 0o755 });
    for (const b of runtime) {
      const at = join(this.dir, b.path);
      if (b.kind === "symlink") {
        mkdirSync(dirname(at), { recursive: true, mode: 0o755 });
        symlinkQuiet(b.target, at);
      } else if (b.kind === "dir") mkdirSync(at, { recursive: true, mode: 0o755 });
      else {
        mkdirSync(dirname(at), { recursive: true, mode: 0o755 });
        writeFileSync(at, "", { mode: 0o644 });
      }
    }
  }

  /** bubblewrap arguments that make this directory the read-only root. */
  args(): string[] {
    return ["--ro-bind", this.dir, "/"];
  }

  /** Make an agent's files appear inside at their real paths (hard links, else copies). */
  stage(a: AgentFiles): void {
    for (const f of a.files) {
      const at = join(this.dir, f);
      this.makeParent(at);
      try {
        linkSync(f, at);
      } catch {
        copyFileSync(f, at);
      }
      this.staged.push(at);
    }
    for (const p of a.packages) {
      const at = join(this.dir, p);
      this.makeParent(at);
      cpSync(p, at, { recursive: true, dereference: true });
      this.staged.push(at);
    }
  }

  private makeParent(at: string): void {
    // The first directory it had to make (undefined: all there), then each one below it.
    const parent = dirname(at);
    const made = mkdirSync(parent, { recursive: true, mode: 0o755 });
    if (!made) return;
    this.dirs.push(made);
    if (!parent.startsWith(`${made}${sep}`)) return;
    let d = made;
    for (const part of parent.slice(made.length + 1).split(sep)) this.dirs.push((d = join(d, part)));
  }

  /**
   * The spare is gone: take out what `stage` added (files unlinked, then the directories it made,
   * deepest first: no directory walks) and keep the skeleton for the next spare.
   */
  recycle(): void {
    try {
      for (const p of this.staged) rmSync(p, { recursive: true, force: true });
      for (const d of this.dirs.reverse()) rmdirSync(d);
    } catch {
      this.remove();
      return;
    }
    this.dirs = [];
    this.staged = [];
    const free = freeRoots.get(this.key) ?? [];
    if (free.length >= MAX_FREE_ROOTS) {
      this.remove();
      return;
    }
    free.push(this);
    freeRoots.set(this.key, free);
  }

  /** Remove the directory (the host process has exited). */
  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function runtimeKey(runtime: readonly Bind[]): string {
  return JSON.stringify(runtime);
}

function symlinkQuiet(target: string, at: string): void {
  try {
    symlinkSync(target, at);
  } catch {
    // already there
  }
}
