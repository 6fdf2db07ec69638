/**
 * `fleet deploy --check [FILE]` (docs/cli.md, docs/upgrading.md): the replay gate before a
 * fleet.toml is applied. It compiles the candidate (the fleet's own fleet.toml by default),
 * compares it with the spec version the fleet runs (the running gateway's, else the newest
 * stored) and replays recorded history against every type whose module or config changes.
 * It reads the data dir only, so it works with the gateway running or stopped.
 */
import { resolve } from "node:path";
import { intArg, UsageError, type Cli } from "./context.ts";
import { liveRead, type LiveEndpoint } from "./live.ts";
import { OperatorError } from "../errors.ts";
import { commandSpawnOptions } from "../episode/index.ts";
import { deployCheck, describeDeployCheck, storedSpec } from "../ops/index.ts";
import { loadSpec } from "../spec/index.ts";
import { BundleFiles, buildBundle, bundleDir, specScope } from "../code/index.ts";
import { HOST_MODULES } from "../../agents/host/index.ts";

/** Most episodes or agents a check may be asked to replay per agent or type. */
const MAX_SAMPLE = 10_000;

/**
 * The spec version the running gateway runs. Without it the check would compare against the newest stored
 * version, which may not be the running one (a refused or pending deploy): refused instead.
 */
async function runningSpecVersion(live: LiveEndpoint): Promise<string> {
  const { spec_version } = await liveRead<{ spec_version?: unknown }>(live, "/api/fleet", "deploy --check");
  if (typeof spec_version !== "string" || spec_version === "")
    throw new OperatorError("deploy --check: the running gateway's /api/fleet names no spec_version");
  return spec_version;
}

/** `fleet deploy --check [FILE] [--episodes N] [--agents M] [--type T,…]`: 0 when nothing DIVERGED or FAILED. */
export async function cmdDeploy(cli: Cli, file: string | undefined): Promise<number> {
  const { flags } = cli;
  if (!flags.check)
    throw new UsageError(
      "deploy needs --check: the running gateway applies fleet.toml itself when the file changes " +
        "(hot reload); `fleet deploy --check [FILE]` replays history against it first",
    );
  const episodes = intArg("--episodes", flags.episodes, 20, { min: 1, max: MAX_SAMPLE });
  const agents = intArg("--agents", flags.agents, 5, { min: 1, max: MAX_SAMPLE });
  const force = flags.type
    ?.split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  const candidate = await loadSpec(resolve(file ?? cli.configPath));
  for (const t of force ?? [])
    if (!candidate.spec.agents[t]) throw new UsageError(`--type ${t}: no such agent type in ${candidate.path}`);
  // Its sample is found by outcome, and each episode by id: an older schema would sample none and say OK.
  const store = await cli.openReadonly("`fleet deploy --check`");
  try {
    const live = await cli.running();
    const hash = live ? await runningSpecVersion(live) : undefined;
    const running = await storedSpec(store, hash);
    // Each module is bundled as the gateway would pin it (an edited file is a code change) and the
    // replays run that bundle, written where the sandbox can read it.
    const spawn = commandSpawnOptions("auto", {}, "fleet deploy --check");
    const dataDir = await cli.dataDir();
    const files = new BundleFiles(bundleDir(dataDir, spawn), (h) => store.bundleCode(h));
    const scope = specScope(candidate, dataDir);
    const build = async (path: string) => {
      const r = await buildBundle(path, HOST_MODULES, scope);
      if (!r.ok) return { error: r.error };
      files.remember(r.hash, r.code);
      return { hash: r.hash, file: () => files.file(r.hash) };
    };
    const report = await deployCheck(store, running, candidate, spawn, {
      episodes,
      agents,
      force,
      build,
      live: live !== null && live !== undefined,
    });
    cli.print(report, () => describeDeployCheck(report));
    return report.ok ? 0 : 1;
  } finally {
    await store.close();
  }
}
