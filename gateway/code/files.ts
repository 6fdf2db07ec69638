/**
 * Stored bundles as files the episode sandbox can bind: `<dir>/<hash>.js`, written once
 * (atomically, read-only) from the store's copy after its hash was checked, never from the
 * editable source. A file already there is checked against its name before its first use.
 * When agents run as another uid (the gateway is root; bubblewrap, too, reads the files it binds
 * as that uid) the data dir (0700) is out of their reach, so the files live beside it instead,
 * world-readable like the agent modules themselves.
 */
import {
  accessSync,
  chmodSync,
  constants,
  existsSync,
  linkSync,
  mkdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { mkdirReadable, processTempDir } from "../episode/index.ts";
import { blake3Hex } from "../hash.ts";
import type { Blake3Hex } from "../types.ts";
import { type TraceMap, parseSourceMap } from "./source-map.ts";

/**
 * Where a data dir's bundle files live for a sandbox: inside it, or beside it when agents run as
 * another uid. When they could not reach beside it either (a parent folder others cannot enter),
 * a folder of this process in the temp dir serves instead (0755: Bun lists a folder it imports from).
 * So does it for a data dir under /tmp, whoever runs the agents: the sandbox's private /tmp would
 * hide the bundle from a warm spare's root (every episode would start cold) and its mount point
 * would show the data dir's path inside.
 */
export function bundleDir(dataDir: string, sandbox: { readonly uids: object | null }): string {
  if (underTmp(dataDir)) return privateTmpDir();
  if (sandbox.uids === null) return join(dataDir, "bundles");
  const beside = bundlesBeside(dataDir);
  return enterableByOthers(dirname(beside)) && writable(beside) ? beside : privateTmpDir();
}

/** The folder beside the data dir where agents running as other uids read their bundles (made 0755). */
export function bundlesBeside(dataDir: string): string {
  return `${dataDir}.bundles`;
}

/**
 * Whether the folder beside the data dir is there to write, made (0755) if missing. A service confined to its
 * data dir (systemd's `ProtectSystem=strict`) may not write beside it: the bundles then go to the temp dir.
 * Asked once per folder and process.
 */
function writable(dir: string): boolean {
  let ok = besideWritable.get(dir);
  if (ok === undefined) {
    try {
      if (!existsSync(dir)) {
        // Not -p: beside a data dir that is not there (yet), nothing is made.
        mkdirSync(dir, { mode: 0o755 });
        chmodSync(dir, 0o755);
      }
      accessSync(dir, constants.W_OK);
      // access(2) says nothing of a read-only mount: a file made and removed does.
      const probe = join(dir, `.probe-${process.pid}`);
      writeFileSync(probe, "");
      rmSync(probe);
      ok = true;
    } catch {
      ok = false;
    }
    besideWritable.set(dir, ok);
  }
  return ok;
}

const besideWritable = new Map<string, boolean>();

function underTmp(dir: string): boolean {
  const at = resolve(dir);
  return at === "/tmp" || at.startsWith("/tmp/");
}

/** Every existing folder from `dir` up to / lets others pass through (o+x). */
function enterableByOthers(dir: string): boolean {
  for (let d = dir; ; d = dirname(d)) {
    try {
      if ((statSync(d).mode & 0o001) === 0) return false;
    } catch {
      // not there yet: it will be made 0755
    }
    if (dirname(d) === d) return true;
  }
}

let tmpBundles: string | null = null;

/**
 * /var/tmp before the temp dir: the episode sandbox mounts a private tmpfs on /tmp, which would
 * hide a bundle staged under /tmp in a warm spare's root, so every episode would start cold.
 */
function privateTmpDir(): string {
  if (tmpBundles === null || !existsSync(tmpBundles)) {
    const made = makeTempDir("fleet-bundles-");
    chmodSync(made, 0o755);
    tmpBundles = made;
    process.once("exit", () => rmSync(made, { recursive: true, force: true }));
  }
  return tmpBundles;
}

/** Named by this process, so a later one removes it if a kill -9 left it. */
function makeTempDir(prefix: string): string {
  for (const base of ["/var/tmp", tmpdir()]) {
    try {
      return processTempDir(base, prefix);
    } catch {
      // not there, or not ours to write: the next
    }
  }
  return processTempDir(tmpdir(), prefix);
}

/** A bundle the store does not have (or whose stored code does not hash to its name). */
export class BundleMissing extends Error {
  override readonly name = "BundleMissing";
  constructor(
    readonly hash: string,
    detail: string,
  ) {
    super(`bundle ${hash.slice(0, 12)}: ${detail}`);
  }
}

/** The stored code of a bundle, or null when there is none. */
export type BundleSource = (hash: string) => Promise<string | null>;

/** Source maps kept per process: the newest used (a reload with new code adds one each time). */
const MAX_SOURCE_MAPS = 64;

/** The source map of a bundle, and whether this process built the bundle from its sources as they are now. */
export interface BundleMap {
  readonly map: TraceMap;
  /** False: the map was stored with the bundle, whose sources may have changed since (a rollout's old code). */
  readonly built: boolean;
}

/** A map as kept: its JSON until first used, then parsed (null when it did not parse). */
interface KeptMap {
  json: string | null;
  parsed?: TraceMap | null;
  readonly built: boolean;
}

/** Materialises stored bundles on demand, once per hash and process; keeps the maps of those it built. */
export class BundleFiles {
  private readonly ready = new Map<string, Promise<string>>();
  private readonly known = new Map<string, string>();
  /** Hash -> source map, newest used last. */
  private readonly maps = new Map<string, KeptMap>();

  constructor(
    /** Folder of the `<hash>.js` files (see `bundleDir`). */
    readonly dir: string | (() => string),
    private readonly source: BundleSource,
    /** Told of a file found with other bytes than its name's (rewritten from the store). */
    private readonly log?: { warn(obj: object, msg: string): void },
    /** The source map stored with a bundle (store `bundleMap`), for bundles this process did not build. */
    private readonly storedMap?: (hash: string) => Promise<string | null>,
  ) {}

  /** Code already in hand (just built), so `file` need not read the store. */
  remember(hash: Blake3Hex, code: string): void {
    this.known.set(hash, code);
  }

  /** The source map of a bundle this process built (`buildBundle`), for its failures' stacks. */
  rememberMap(hash: Blake3Hex, map: string): void {
    this.keep(hash, { json: map, built: true });
  }

  /**
   * The source map of bundle `hash`, parsed once: the one this process built it with, else the one
   * stored with it; null when there is neither (a bundle stored before maps were) or it does not parse.
   */
  async sourceMap(hash: string): Promise<BundleMap | null> {
    let kept = this.maps.get(hash);
    if (!kept && this.storedMap) {
      const json = await this.storedMap(hash).catch(() => null);
      // Built meanwhile (a reload): that one wins.
      kept = this.maps.get(hash) ?? this.keep(hash, { json, built: false });
    }
    if (!kept) return null;
    if (kept.parsed === undefined) {
      kept.parsed = kept.json === null ? null : parseSourceMap(kept.json);
      kept.json = null;
    }
    return kept.parsed ? { map: kept.parsed, built: kept.built } : null;
  }

  /** Keep `map` for `hash` as the newest, dropping the least recently kept past MAX_SOURCE_MAPS. */
  private keep(hash: string, map: KeptMap): KeptMap {
    this.maps.delete(hash);
    this.maps.set(hash, map);
    for (const old of this.maps.keys()) {
      if (this.maps.size <= MAX_SOURCE_MAPS) break;
      this.maps.delete(old);
    }
    return map;
  }

  /** Path of the bundle's file, written from the store's copy if it is not there yet. */
  file(hash: string): Promise<string> {
    let p = this.ready.get(hash);
    if (!p) {
      p = this.materialise(hash);
      this.ready.set(hash, p);
      p.catch(() => this.ready.delete(hash));
    }
    return p;
  }

  private async materialise(hash: string): Promise<string> {
    if (!/^[0-9a-f]{64}$/.test(hash)) throw new BundleMissing(hash, "not a bundle hash");
    const dir = typeof this.dir === "string" ? this.dir : this.dir();
    const path = join(dir, `${hash}.js`);
    if (existsSync(path)) {
      // Named by content, so checked by content, once per process: a file edited or damaged on disk would
      // otherwise run (and replay) as the code its name pins.
      if ((await blake3Hex(readFileSync(path))) === hash) return path;
      this.log?.warn({ bundle: hash, path }, "bundle file does not match its hash; rewriting it from the store");
      rmSync(path, { force: true });
    }
    const code = this.known.get(hash) ?? (await this.source(hash));
    if (code === null) throw new BundleMissing(hash, "not in the store");
    if ((await blake3Hex(code)) !== hash) throw new BundleMissing(hash, "stored code does not match its hash");
    if (!existsSync(dir)) {
      if (dir.endsWith(".bundles")) mkdirReadable(dir);
      else mkdirSync(dir, { recursive: true, mode: 0o700 });
    }
    const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    writeFileSync(tmp, code, { mode: 0o444 });
    try {
      chmodSync(tmp, 0o444);
      // A link, not a rename: one made meanwhile by another process (a CLI on the same data dir) has the
      // same bytes and may be bound in a sandbox already; a rename over it would show it there "(deleted)".
      linkSync(tmp, path);
    } catch (err) {
      if ((err as { code?: string }).code !== "EEXIST") throw err;
    } finally {
      rmSync(tmp, { force: true });
    }
    this.known.delete(hash);
    return path;
  }
}
