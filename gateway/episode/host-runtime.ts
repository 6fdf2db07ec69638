/**
 * The episode host runtime as one built script. Started from its TypeScript sources, every
 * episode subprocess would transpile agents/host/main.ts, the protocol and the SDK again (Bun's
 * transpiler cache is off in the sandbox: it would be state shared between agents); built once
 * into plain JavaScript, a child starts ~15 ms sooner (measured: 45 vs 30 ms to "ready").
 *
 * It is built with its JavaScriptCore bytecode beside it (`<script>.jsc`, `bun build --bytecode`):
 * a child then skips parsing and compiling the script, ~1.3 ms of CPU per episode (measured: 12.7
 * vs 14.1 ms for a wrapped child running one episode; without the .jsc, Bun parses the script as
 * before, and it does the same with a .jsc that is not the script's: damaged, or another script's,
 * as test/host-runtime.test.ts checks). Where Bun cannot build bytecode, the script is built alone.
 *
 * The files are named by the SHA-256 of their bytes (the bytecode depends on the Bun that built
 * it, so another Bun gets files of its own) and live in a directory of this uid's own under
 * /var/tmp (else /tmp) (checked: a real directory, ours, writable by nobody else), readable by
 * the episodes' uid. Gateways of one install share it (one small pair of files per version of the code).
 */
import {
  chmodSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
} from "node:fs";
import { join } from "node:path";
import { HOST_ENTRY, PROTOCOL_ENTRY, SDK_ENTRY } from "../../agents/host/index.ts";

/** Where a built script's bytecode is: Bun looks for it there when the script says `@bytecode`. */
export const bytecodeOf = (script: string): string => `${script}.jsc`;

/**
 * Where built runtimes go: world-enterable system temp dirs, not $TMPDIR (which may be a private
 * 0700 folder the episodes' uid cannot pass through, or one a test suite removes).
 */
const BASES = ["/var/tmp", "/tmp"];

/**
 * The script episode subprocesses run, built into the first of `bases` that takes it: the built host
 * runtime, or its TypeScript entry when building failed (`problem()` says why). Built on first use;
 * built again if a file went away (a temp dir cleaner), never left dangling: the sandbox binds the
 * bytecode too, and a bind of a missing file fails the episode.
 */
export class HostRuntime {
  private built: string | null | undefined;
  /** Whether `built` has its bytecode beside it. */
  private withBytecode = false;
  private why: string | null = null;

  constructor(private readonly bases: readonly string[]) {}

  script(bun: string): string {
    const built = this.built;
    if (built === undefined || (built !== null && !this.whole(built))) {
      this.why = null;
      this.built = null;
      for (const base of this.bases) {
        try {
          this.built = buildHostRuntime(bun, runtimeDir(base));
          this.withBytecode = existsSync(bytecodeOf(this.built));
          this.why = null;
          break;
        } catch (err) {
          this.why = err instanceof Error ? err.message : String(err);
        }
      }
    }
    return this.built ?? HOST_ENTRY;
  }

  /** Why the host runtime runs from its sources (slower), or null. */
  problem(): string | null {
    return this.why;
  }

  private whole(script: string): boolean {
    return existsSync(script) && (!this.withBytecode || existsSync(bytecodeOf(script)));
  }
}

/** This process's host runtime, in the system temp dirs every gateway and CLI of this uid shares. */
const shared = new HostRuntime(BASES);

/** The script episode subprocesses run (`HostRuntime.script`), built once per process. */
export function hostScript(bun: string): string {
  return shared.script(bun);
}

/** Why the host runtime runs from its sources (slower), or null. */
export function hostBuildProblem(): string | null {
  return shared.problem();
}

/** This uid's directory for built runtimes under `base`, refused unless it is a real directory only we can write. */
export function runtimeDir(base: string): string {
  const uid = process.getuid?.() ?? 0;
  const dir = join(base, `fleet-host-${uid}`);
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0)
    throw new Error(`${dir} is not a directory of uid ${uid} that only it can write`);
  // Episodes run as uids of their own and must reach the runtime: mkdir's mode is cut by the umask
  // (0077 in the unit `fleet install-service` writes), so it is set here.
  if ((st.mode & 0o055) !== 0o055) chmodSync(dir, 0o755);
  return dir;
}

/** Build the host runtime into `dir` (with its bytecode where Bun can); returns the script's path. */
export function buildHostRuntime(bun: string, dir: string): string {
  const tmp = join(dir, `.build-${process.pid}-${crypto.randomUUID()}`);
  mkdirSync(tmp, { mode: 0o755 });
  try {
    if (!runBuild(bun, tmp, true).ok) {
      rmSync(tmp, { recursive: true, force: true });
      mkdirSync(tmp, { mode: 0o755 });
      const plain = runBuild(bun, tmp, false);
      if (!plain.ok) throw new Error(`bun build of the host runtime failed: ${plain.error}`);
    }
    const js = join(tmp, "main.js");
    const jsc = bytecodeOf(js);
    const code = readFileSync(js);
    const hash = new Bun.CryptoHasher("sha256").update(code);
    const hasBytecode = existsSync(jsc);
    if (hasBytecode) hash.update(readFileSync(jsc));
    const out = join(dir, `host-${hash.digest("hex").slice(0, 32)}.js`);
    // Same bytes, same name: files already there (another gateway's, or a CLI's) stay as they are.
    // The bytecode goes first, so a script that is there has its bytecode there too.
    for (const [from, to] of hasBytecode
      ? [[jsc, bytecodeOf(out)] as const, [js, out] as const]
      : [[js, out] as const]) {
      place(from, to);
      if ((statSync(to).mode & 0o022) !== 0) throw new Error(`${to} is writable by others`);
    }
    return out;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Put a built file in its place, never over the same bytes: a rename over them would unlink the
 * file that sandboxes starting now have bound, and Bun in there would find its script "(deleted)"
 * and fail the episode (it did whenever another gateway or `fleet replay` started). A hard link
 * makes the name only where there is none, at once; bytes that differ (damaged) are replaced.
 */
function place(from: string, to: string): void {
  chmodSync(from, 0o644);
  try {
    linkSync(from, to);
    return;
  } catch (err) {
    if ((err as { code?: string }).code !== "EEXIST") throw err;
  }
  if (!readFileSync(to).equals(readFileSync(from))) renameSync(from, to);
}

/** `bun build` of the host entry into `outdir` (main.js, and main.js.jsc with `bytecode`). */
function runBuild(bun: string, outdir: string, bytecode: boolean): { ok: true } | { ok: false; error: string } {
  // The SDK and the protocol are inlined; the built host answers imports of them with its own copy
  // (one ToolDenied class for both): by their fixed names (agent bundles), and by these paths (a
  // module run from its file, which imports them by a relative path).
  const modules = JSON.stringify({ sdk: SDK_ENTRY, protocol: PROTOCOL_ENTRY });
  const r = Bun.spawnSync(
    [
      bun,
      "build",
      HOST_ENTRY,
      "--target=bun",
      // Bun writes bytecode for CommonJS output only; the script has no top-level await or import.meta.
      ...(bytecode ? ["--bytecode", "--format=cjs"] : []),
      `--outdir=${outdir}`,
      "--entry-naming=main.[ext]",
      "--define",
      `FLEET_HOST_MODULES=${modules}`,
    ],
    { stdout: "ignore", stderr: "pipe", env: { PATH: process.env.PATH ?? "/usr/bin:/bin", NO_COLOR: "1" } },
  );
  if (r.exitCode !== 0) return { ok: false, error: r.stderr.toString().trim().slice(0, 500) };
  if (!existsSync(join(outdir, "main.js"))) return { ok: false, error: "bun build wrote no main.js" };
  return { ok: true };
}
