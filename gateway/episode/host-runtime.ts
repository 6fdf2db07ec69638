/**
 * The episode host runtime as one built script. Started from its TypeScript sources, every
 * episode subprocess would transpile agents/host/main.ts, the protocol and the SDK again (Bun's
 * transpiler cache is off in the sandbox: it would be state shared between agents); built once
 * into plain JavaScript, a child starts ~15 ms sooner (measured: 45 vs 30 ms to "ready").
 *
 * The file is named by the SHA-256 of its bytes and lives in a directory of this uid's own under
 * /var/tmp (else /tmp) (checked: a real directory, ours, writable by nobody else), readable by
 * the episodes' uid. Gateways of one install share it (one small file per version of the code).
 */
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, renameSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { HOST_ENTRY, PROTOCOL_ENTRY, SDK_ENTRY } from "../../agents/host/index.ts";

let built: string | null | undefined;
let why: string | null = null;

/**
 * The script episode subprocesses run: the built host runtime, or its TypeScript entry when
 * building failed (`hostBuildProblem()` says why). Built on first use, once per process.
 */
export function hostScript(bun: string): string {
  // Built once; built again if the file went away (a temp dir cleaner), never left dangling.
  if (built === undefined || (built !== null && !existsSync(built))) {
    why = null;
    built = null;
    for (const base of BASES) {
      try {
        built = buildHostRuntime(bun, runtimeDir(base));
        why = null;
        break;
      } catch (err) {
        why = err instanceof Error ? err.message : String(err);
      }
    }
  }
  return built ?? HOST_ENTRY;
}

/**
 * Where built runtimes go: world-enterable system temp dirs, not $TMPDIR (which may be a private
 * 0700 folder the episodes' uid cannot pass through, or one a test suite removes).
 */
const BASES = ["/var/tmp", "/tmp"];

/** Why the host runtime runs from its sources (slower), or null. */
export function hostBuildProblem(): string | null {
  return why;
}

/** This uid's directory for built runtimes under `base`, refused unless it is a real directory only we can write. */
export function runtimeDir(base: string): string {
  const uid = process.getuid?.() ?? 0;
  const dir = join(base, `fleet-host-${uid}`);
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0)
    throw new Error(`${dir} is not a directory of uid ${uid} that only it can write`);
  return dir;
}

/** Build the host runtime into `dir`; returns the script's path. */
export function buildHostRuntime(bun: string, dir: string): string {
  const tmp = join(dir, `.build-${process.pid}-${crypto.randomUUID()}.js`);
  // The SDK and the protocol are inlined; agent bundles import them by these paths, and the
  // built host answers those imports with its own copy (one ToolDenied class for both).
  const modules = JSON.stringify({ sdk: SDK_ENTRY, protocol: PROTOCOL_ENTRY });
  const r = Bun.spawnSync(
    [bun, "build", HOST_ENTRY, "--target=bun", `--outfile=${tmp}`, "--define", `FLEET_HOST_MODULES=${modules}`],
    { stdout: "ignore", stderr: "pipe", env: { PATH: process.env.PATH ?? "/usr/bin:/bin", NO_COLOR: "1" } },
  );
  if (r.exitCode !== 0) {
    rmSync(tmp, { force: true });
    throw new Error(`bun build of the host runtime failed: ${r.stderr.toString().trim().slice(0, 500)}`);
  }
  const code = readFileSync(tmp);
  const out = join(dir, `host-${new Bun.CryptoHasher("sha256").update(code).digest("hex").slice(0, 32)}.js`);
  chmodSync(tmp, 0o644);
  // Same bytes, same name: another gateway's rename of an identical file changes nothing.
  renameSync(tmp, out);
  if ((statSync(out).mode & 0o022) !== 0) throw new Error(`${out} is writable by others`);
  return out;
}
