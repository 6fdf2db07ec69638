/**
 * Staging roots (bubblewrap mode): a warm spare starts before anyone knows which agent it will
 * serve, so its root file system is a directory of its own (`StagingRoot`, read-only inside)
 * holding the mount points of the runtime. An agent's files are moved in (`stage`) and appear
 * inside at their real paths: when an episode takes the spare, or before the spare starts when
 * the pool expects that agent (the one whose episode took the last spare). A spare that serves
 * another agent gets its root emptied first, before the episode's start is sent.
 *
 * The agent's files are laid out once per agent in an `AgentTree` outside every root, and moved
 * in and out by one rename per graft point (the shallowest folder of their paths the root does
 * not have); a root kept for the same agent's next spare keeps them in. No folders made or
 * removed and no links per episode (measured on ext4: mkdir + rmdir of the agent's folders
 * blocked the event loop ~2 ms per episode; two renames ~0.08 ms).
 */
import {
  chmodSync,
  copyFileSync,
  existsSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readlinkSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import type { AgentFiles, Bind } from "./sandbox-view.ts";
import { mkdirReadable, processTempDir } from "./leftovers.ts";

let rootsDir: string | null = null;

/** Where staging roots live: a directory only its owner can list (0711), made once per gateway process. */
function stagingBase(): string {
  if (rootsDir === null || !existsSync(rootsDir)) {
    const made = processTempDir(tmpdir(), "fleet-roots-");
    chmodSync(made, 0o711);
    rootsDir = made;
    // Gone with this process (a kill -9 leaves it to the next start's sweep of the data dir's
    // ledger, or to the next process's `processTempDir`).
    process.once("exit", () => rmSync(made, { recursive: true, force: true }));
  }
  return rootsDir;
}

/** Staging roots whose spare is gone, emptied of its agent's files, by the runtime they were made for. */
const freeRoots = new Map<string, StagingRoot[]>();
/** Free roots kept for reuse per runtime (a pool of spares needs a handful). */
const MAX_FREE_ROOTS = 8;

/** Agent trees not in any root, by root runtime and agent files; the key used last comes last. */
const freeTrees = new Map<string, AgentTree[]>();
/** Free trees kept across all agents (each agent needs about as many as its episodes running at once). */
const MAX_FREE_TREES = 8;
let freeTreeCount = 0;
/** One id per `AgentFiles` value: `agentFiles` hands out a new one when a file changed. */
const filesIds = new WeakMap<AgentFiles, number>();
let nextFilesId = 0;

/**
 * The root file system of one warm spare: a directory with the mount points of the runtime
 * binds, shown read-only as `/` inside. `stage` moves an agent's files into it. Once its spare
 * is gone the root serves the next spare (`StagingRoot.for`): the skeleton costs ~60 file
 * system calls to make and remove. It keeps its agent's files for a next spare of the same
 * agent (no moves at all); a spare of another agent, or of none yet, gets it emptied first.
 */
export class StagingRoot {
  readonly dir: string;
  /** The runtime it was made for (the free list's key). */
  readonly key: string;
  /** The agent tree moved in by `stage`, if any. */
  private tree: AgentTree | null = null;
  /** How many of the tree's grafts are in the root now. */
  private moved = 0;

  /**
   * A free root made for the same runtime (one holding `files` first, else an emptied one), or a
   * new one.
   */
  static for(runtime: readonly Bind[], files: AgentFiles | null = null): StagingRoot {
    const free = freeRoots.get(runtimeKey(runtime)) ?? [];
    const holding = files === null ? -1 : free.findLastIndex((r) => r.holds(files));
    if (holding >= 0) {
      const root = free.splice(holding, 1)[0]!;
      if (existsSync(root.dir)) return root;
    }
    while (free.length > 0) {
      const root = free.pop()!;
      if (!existsSync(root.dir)) continue;
      if (root.unstage()) return root;
      root.remove();
    }
    return new StagingRoot(runtime);
  }

  constructor(runtime: readonly Bind[]) {
    this.key = runtimeKey(runtime);
    this.dir = join(stagingBase(), crypto.randomUUID());
    // 0755 whatever the umask (mkdirReadable): the sandbox reads its root as the episode's uid.
    mkdirReadable(this.dir);
    for (const d of ["proc", "dev", "tmp"]) mkdirReadable(join(this.dir, d));
    for (const b of runtime) {
      const at = join(this.dir, b.path);
      if (b.kind === "symlink") {
        mkdirReadable(dirname(at));
        symlinkQuiet(b.target, at);
      } else if (b.kind === "dir") mkdirReadable(at);
      else {
        mkdirReadable(dirname(at));
        writeFileSync(at, "", { mode: 0o644 });
        chmodSync(at, 0o644);
      }
    }
  }

  /** bubblewrap arguments that make this directory the read-only root. */
  args(): string[] {
    return ["--ro-bind", this.dir, "/"];
  }

  /** Whether `a`'s files are in this root now. */
  holds(a: AgentFiles): boolean {
    return this.tree !== null && this.tree.key === treeKey(this, a);
  }

  /**
   * Make an agent's files appear inside at their real paths (its tree moved in); another
   * agent's files in it are moved out first.
   */
  stage(a: AgentFiles): void {
    if (this.holds(a)) return;
    if (!this.unstage()) throw new Error("a staging root could not be emptied of the files of its last agent");
    const tree = AgentTree.take(this, a);
    this.tree = tree;
    try {
      for (const g of tree.grafts) {
        renameSync(join(tree.dir, g), join(this.dir, g));
        this.moved++;
      }
    } catch (err) {
      this.unstage();
      throw err;
    }
  }

  /** Move the staged tree back out (false: something of it could not be moved; it is gone). */
  unstage(): boolean {
    const tree = this.tree;
    if (!tree) return true;
    this.tree = null;
    const moved = tree.grafts.slice(0, this.moved);
    this.moved = 0;
    try {
      for (const g of moved) renameSync(join(this.dir, g), join(tree.dir, g));
    } catch {
      tree.remove();
      return false;
    }
    tree.release();
    return true;
  }

  /** The spare is gone: keep the root (with its agent's files) for a next spare. */
  recycle(): void {
    const free = freeRoots.get(this.key) ?? [];
    if (free.length >= MAX_FREE_ROOTS) {
      this.remove();
      return;
    }
    free.push(this);
    freeRoots.set(this.key, free);
  }

  /** Remove the directory (the host process has exited); a tree still in it goes with it. */
  remove(): void {
    this.tree?.remove();
    this.tree = null;
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * One agent's files at their real paths under a folder of its own (hard links, else copies;
 * npm packages whole, file by file), made for the skeleton of one runtime: `grafts` are the folders
 * (or files) a root lacks, each moved into the root whole. A path the skeleton already has is
 * one of the runtime's own mount points: the sandbox shows it through its bind.
 */
class AgentTree {
  readonly dir: string;
  readonly grafts: readonly string[];

  private constructor(
    root: StagingRoot,
    a: AgentFiles,
    /** Which files for which runtime (`treeKey`). */
    readonly key: string,
  ) {
    const trees = join(stagingBase(), "trees");
    mkdirSync(trees, { recursive: true, mode: 0o700 });
    this.dir = mkdtempSync(join(trees, "t-"));
    chmodSync(this.dir, 0o755);
    const grafts = new Set<string>();
    const graftOf = (path: string): string | null => {
      for (let at = path.indexOf("/", 1); ; at = path.indexOf("/", at + 1)) {
        const prefix = at < 0 ? path : path.slice(0, at);
        if (!existsSync(join(root.dir, prefix))) return prefix;
        if (at < 0) return null;
      }
    };
    try {
      for (const [path, pkg] of [
        ...a.files.map((f) => [f, false] as const),
        ...a.packages.map((p) => [p, true] as const),
      ]) {
        const graft = graftOf(path);
        if (graft === null) continue;
        grafts.add(graft);
        const at = join(this.dir, path);
        mkdirReadable(dirname(at));
        if (pkg) linkTree(path, at, 0);
        else linkOrCopy(path, at);
      }
    } catch (err) {
      this.remove();
      throw err;
    }
    // A graft under another one moves with it.
    this.grafts = [...grafts].filter((g) => ![...grafts].some((o) => g.startsWith(`${o}/`)));
  }

  /** A free tree of these files for this root's runtime, or a new one. */
  static take(root: StagingRoot, a: AgentFiles): AgentTree {
    const key = treeKey(root, a);
    const free = freeTrees.get(key);
    const found = free?.pop();
    if (found) {
      freeTreeCount--;
      if (free!.length === 0) freeTrees.delete(key);
      return found;
    }
    return new AgentTree(root, a, key);
  }

  /** Out of its root again: kept for the next episode of the same files, the least recently used go first. */
  release(): void {
    const free = freeTrees.get(this.key) ?? [];
    freeTrees.delete(this.key);
    free.push(this);
    freeTrees.set(this.key, free);
    freeTreeCount++;
    for (const [key, list] of freeTrees) {
      if (freeTreeCount <= MAX_FREE_TREES) break;
      while (list.length > 0 && freeTreeCount > MAX_FREE_TREES) {
        list.shift()!.remove();
        freeTreeCount--;
      }
      if (list.length === 0) freeTrees.delete(key);
    }
  }

  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The key of an agent's tree for a root's runtime: equal keys, same files laid out the same way. */
function treeKey(root: StagingRoot, a: AgentFiles): string {
  let id = filesIds.get(a);
  if (id === undefined) filesIds.set(a, (id = nextFilesId++));
  return `${root.key}\n${id}`;
}

/** A hard link (no bytes copied: a tree costs its folders only), else a copy (another file system). */
function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch {
    copyFileSync(from, to);
  }
}

/** Deepest folder nesting laid out in a package. */
const MAX_PACKAGE_DEPTH = 64;

/**
 * A package folder laid out at `to`: its folders made, its files linked, its symlinks made again as
 * they are. Never followed here: the gateway's uid resolving one would stage what it points at (a
 * link to the data dir, a token file) for the agent, and a link to `/` would walk the machine. In
 * the sandbox a link resolves as in a cold start, against the same binds (packages at their real
 * paths, ./sandbox-view.ts): a link out of them points at nothing.
 */
function linkTree(from: string, to: string, depth: number): void {
  mkdirReadable(to);
  if (depth >= MAX_PACKAGE_DEPTH) return;
  for (const e of readdirSync(from, { withFileTypes: true })) {
    const src = join(from, e.name);
    const dst = join(to, e.name);
    if (e.isDirectory()) linkTree(src, dst, depth + 1);
    else if (e.isFile()) linkOrCopy(src, dst);
    else if (e.isSymbolicLink()) symlinkSync(readlinkSync(src), dst);
  }
}

const runtimeKeys = new WeakMap<readonly Bind[], string>();
/** The free lists' key of a runtime (its binds come from a cache: the same array each time). */
function runtimeKey(runtime: readonly Bind[]): string {
  let key = runtimeKeys.get(runtime);
  if (key === undefined) runtimeKeys.set(runtime, (key = JSON.stringify(runtime)));
  return key;
}

function symlinkQuiet(target: string, at: string): void {
  try {
    symlinkSync(target, at);
  } catch {
    // already there
  }
}
