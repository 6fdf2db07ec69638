/**
 * Pinning a spec version's code (docs/upgrading.md): at start and at every redeploy each
 * agent type's module is bundled, stored by its BLAKE3, and named in the spec version, whose
 * hash then covers the fleet.toml text and the bundles together (a code change alone is a new
 * version). Episodes run from the stored bundle, not from the file that may be edited meanwhile.
 */
import { readFileSync } from "node:fs";
import type { Logger } from "pino";
import { hashValue } from "../hash.ts";
import type { SpecVersion } from "../spec/index.ts";
import type { Blake3Hex } from "../types.ts";
import { buildBundle, withHostSpecifiers } from "./bundle.ts";
import type { BundleFiles } from "./files.ts";
import { specScope } from "./scope.ts";

/** Where built bundles are kept (a `Store` satisfies it). */
export interface BundleSink {
  saveBundle(b: { hash: string; module: string; code: string; at: number; map?: string | null }): Promise<void>;
  /** Keep `map` for a stored bundle that has none. */
  saveBundleMap(hash: string, map: string): Promise<void>;
}

/** What pinning needs. */
export interface PinDeps {
  readonly sink: BundleSink;
  readonly files: BundleFiles;
  /** The modules the host runtime answers (agents/host HOST_MODULES). */
  readonly hostModules: Readonly<Record<string, string>>;
  readonly now: () => number;
  readonly log: Logger;
  /** The gateway's data dir: no module may bundle a file of it (./scope.ts). */
  readonly dataDir?: string;
}

/** The pinned version, or the problems that refuse it (one line each, naming the key path). */
export type Pinned =
  | { readonly ok: true; readonly sv: SpecVersion }
  | { readonly ok: false; readonly problems: string[] };

/**
 * Bundle every type of `sv`. A type whose module cannot be bundled refuses the version when
 * `previous` ran that type from a bundle (a broken edit must not replace working code) or did not
 * have it (a type added with a missing or broken module is an invalid deploy). Otherwise (at start,
 * or a type that already ran from its file) it runs from its file and fails there as it always did.
 */
export async function pinCode(sv: SpecVersion, previous: SpecVersion | null, d: PinDeps): Promise<Pinned> {
  const bundles: Record<string, Blake3Hex> = {};
  const problems: string[] = [];
  const scope = specScope(sv, d.dataDir);
  const built = await Promise.all(
    Object.values(sv.spec.agents).map(async (t) => ({
      t,
      r: await buildBundle(t.module_path, d.hostModules, scope),
    })),
  );
  for (const { t, r } of built) {
    if (r.ok) {
      const kept = await olderBuildOf(previous?.bundles[t.name], r, d.files);
      if (kept === null) {
        await d.sink.saveBundle({ hash: r.hash, module: t.module_path, code: r.code, at: d.now(), map: r.map });
        d.files.remember(r.hash, r.code);
      }
      bundles[t.name] = kept ?? r.hash;
      // An older release's build of the same code differs in its import lines' text only: same lines.
      if (r.map !== null) {
        d.files.rememberMap(kept ?? r.hash, r.map);
        if (kept !== null) await d.sink.saveBundleMap(kept, r.map);
      }
      continue;
    }
    const first = r.error.split("\n")[0] ?? r.error;
    if (previous && (previous.bundles[t.name] || !previous.spec.agents[t.name]))
      problems.push(`agents.${t.name}.module cannot be bundled: ${first}`);
    else d.log.warn({ type: t.name, module: t.module_path }, `module cannot be bundled, runs from its file: ${first}`);
  }
  if (problems.length > 0) return { ok: false, problems };
  return { ok: true, sv: await withBundles(sv, bundles) };
}

/**
 * `stored` (the bundle the type ran) when it is `built` as an older release bundled it: the same
 * code but for importing the SDK and the protocol by its install's absolute path, which the host
 * runtime answers as it does the fixed specifiers (docs/upgrading.md). Keeping it keeps the spec
 * version: a product upgrade is no code change (and restarts no rollout). Null otherwise.
 */
async function olderBuildOf(
  stored: Blake3Hex | undefined,
  built: { readonly hash: Blake3Hex; readonly code: string },
  files: BundleFiles,
): Promise<Blake3Hex | null> {
  if (stored === undefined || stored === built.hash) return null;
  try {
    return withHostSpecifiers(readFileSync(await files.file(stored), "utf8")) === built.code ? stored : null;
  } catch {
    return null; // not stored any more (or damaged): the build is new code
  }
}

/**
 * The spec version `sv` would be if the gateway pinned it now (nothing stored), and the types whose
 * module cannot be bundled (they would run from their file), each with its first error line.
 * `dataDir`: the gateway's, when it is not the spec's own `data_dir`.
 */
export async function versionOf(
  sv: SpecVersion,
  hostModules: Readonly<Record<string, string>>,
  dataDir?: string,
): Promise<{ sv: SpecVersion; unbundled: { type: string; error: string }[] }> {
  const bundles: Record<string, Blake3Hex> = {};
  const unbundled: { type: string; error: string }[] = [];
  const scope = specScope(sv, dataDir);
  for (const t of Object.values(sv.spec.agents)) {
    const r = await buildBundle(t.module_path, hostModules, scope);
    if (r.ok) bundles[t.name] = r.hash;
    else unbundled.push({ type: t.name, error: r.error.split("\n")[0] ?? r.error });
  }
  return { sv: await withBundles(sv, bundles), unbundled };
}

/** `sv` naming `bundles`; its hash covers the text's hash and the bundles. */
export async function withBundles(sv: SpecVersion, bundles: Readonly<Record<string, Blake3Hex>>): Promise<SpecVersion> {
  const hash = Object.keys(bundles).length === 0 ? sv.textHash : await hashValue({ spec: sv.textHash, bundles });
  return Object.freeze({ ...sv, hash, bundles: Object.freeze({ ...bundles }) });
}

/** Types whose bundle differs between two versions, e.g. `door-watcher 1a2b3c4d5e6f -> 7a8b9c0d1e2f`. */
export function codeChanges(
  before: SpecVersion,
  after: SpecVersion,
): { type: string; from: string | null; to: string | null }[] {
  const out = [];
  for (const type of Object.keys(after.bundles)) {
    const from = before.bundles[type] ?? null;
    const to = after.bundles[type] ?? null;
    if (from !== to && before.spec.agents[type]) out.push({ type, from, to });
  }
  return out;
}
