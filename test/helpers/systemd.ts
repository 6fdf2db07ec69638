/**
 * A systemd of a test's own on a box systemd did not boot: a user manager (`systemd --user`, as root, so units'
 * `User=` and confinement apply) with its runtime and config dirs in a folder of the test. It leaves the box as it
 * found it: it runs in cgroups of its own under the test's (a manager at a hierarchy's root takes that root as its
 * own and moves PID 1 into an init.scope there: found, the box's whole process tree left the root cpu cgroup), and
 * what it needs in /run/systemd (the marker of a booted systemd, the inaccessible nodes) is removed after if the
 * test made it.
 */
import {
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmdirSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { dlopen, FFIType, ptr } from "bun:ffi";
import { waitFor } from "./gateway.ts";

const MANAGER = "/lib/systemd/systemd";
/** Whether this process can run a manager: root, with systemd installed. */
export const systemdRunnable = process.getuid?.() === 0 && existsSync(MANAGER) && Bun.which("systemctl") !== null;

/** The marker of a booted systemd, without which `systemd --user` refuses to run. */
const MARKER = "/run/systemd/system";
/**
 * The nodes a booted systemd makes at start for its units' namespaces (ProtectHome= mounts them over what it
 * hides): a manager as root that is not PID 1 looks for them there too, and without them every start of a
 * confined unit fails with 226/NAMESPACE.
 */
const INACCESSIBLE = "/run/systemd/inaccessible";
/** What a manager of ours makes or needs in /run/systemd. */
const BOOT_FILES = [MARKER, INACCESSIBLE, "/run/systemd/unit-root", "/run/systemd/systemd-units-load"];

/** A running user manager; `stop()` ends it and undoes what it changed on the box. */
export class UserManager {
  /** The environment `systemctl --user` needs to reach it. */
  readonly env: Record<string, string>;
  readonly log: string;
  private proc: ReturnType<typeof Bun.spawn> | null = null;
  private groups: string[] = [];
  private made: string[] = [];

  /** A manager whose runtime and config dirs are under `base`. */
  constructor(readonly base: string) {
    this.env = {
      PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      HOME: base,
      XDG_RUNTIME_DIR: join(base, "run"),
      XDG_CONFIG_HOME: join(base, "config"),
    };
    this.log = join(base, "manager.log");
  }

  /** Where unit files go. */
  get unitDir(): string {
    return join(this.env.XDG_CONFIG_HOME ?? "", "systemd/user");
  }

  async start(): Promise<void> {
    mkdirSync(this.unitDir, { recursive: true });
    // Reachable by a unit's service user, as /run/systemd of a system manager is.
    mkdirSync(this.env.XDG_RUNTIME_DIR ?? "", { mode: 0o755 });
    chmodSync(this.env.XDG_RUNTIME_DIR ?? "", 0o755);
    this.made = BOOT_FILES.filter((f) => !existsSync(f));
    mkdirSync(MARKER, { recursive: true });
    makeInaccessibleNodes();
    this.groups = testCgroups();
    const out = openSync(this.log, "a");
    const join_ = 'for d in "$@"; do echo $$ > "$d/cgroup.procs" 2>/dev/null || true; done; exec "$0" --user';
    this.proc = Bun.spawn(["sh", "-c", join_, MANAGER, ...this.groups], {
      env: { ...this.env, SYSTEMD_LOG_TARGET: "console", SYSTEMD_LOG_LEVEL: "info" },
      stdin: "ignore",
      stdout: out,
      stderr: out,
    });
    closeSync(out);
    await waitFor(() => /^(running|degraded)$/.test(this.systemctl("is-system-running").out), 20_000, "the manager");
    // Writable by a unit's service user other than root, as /run/systemd/notify of a system manager is.
    chmodSync(join(this.env.XDG_RUNTIME_DIR ?? "", "systemd/notify"), 0o777);
  }

  /** `systemctl --user <args>`: its exit code and output. */
  systemctl(...args: string[]): { code: number; out: string } {
    const r = Bun.spawnSync(["systemctl", "--user", "--no-pager", ...args], {
      env: this.env,
      stdout: "pipe",
      stderr: "pipe",
    });
    return { code: r.exitCode, out: (r.stdout.toString() + r.stderr.toString()).trim() };
  }

  /** `systemctl show` properties of a unit. */
  show(unit: string, ...props: string[]): Record<string, string> {
    const out = this.systemctl("show", unit, ...props.flatMap((p) => ["-p", p])).out;
    return Object.fromEntries(out.split("\n").map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
  }

  /** Write a unit file and its drop-in (`[Service]` lines of the test's own). */
  install(name: string, unit: string, dropIn: string): void {
    mkdirSync(join(this.unitDir, `${name}.d`), { recursive: true });
    writeFileSync(join(this.unitDir, name), unit);
    writeFileSync(join(this.unitDir, `${name}.d`, "test.conf"), `[Service]\n${dropIn}`);
  }

  /** Stop `units`, end the manager, and remove its cgroups and what the test made in /run/systemd. */
  async stop(units: readonly string[]): Promise<void> {
    if (this.proc) {
      for (const unit of units) this.systemctl("stop", unit);
      this.proc.kill("SIGTERM");
      await Promise.race([this.proc.exited, Bun.sleep(10_000)]);
      if (this.proc.exitCode === null) this.proc.kill("SIGKILL");
    }
    for (const dir of this.groups) removeCgroup(dir);
    for (const f of this.made) rmSync(f, { recursive: true, force: true });
  }
}

/** The inaccessible nodes, as systemd's `make_inaccessible_nodes` makes them (mode 0000), where missing. */
function makeInaccessibleNodes(): void {
  if (existsSync(INACCESSIBLE)) return;
  mkdirSync(INACCESSIBLE, { recursive: true, mode: 0o755 });
  mkdirSync(join(INACCESSIBLE, "dir"), { mode: 0 });
  writeFileSync(join(INACCESSIBLE, "reg"), "", { mode: 0 });
  const { symbols } = dlopen("libc.so.6", {
    mknod: { args: [FFIType.cstring, FFIType.u32, FFIType.u64], returns: FFIType.i32 },
  });
  const types = { fifo: 0o010000, sock: 0o140000, chr: 0o020000, blk: 0o060000 } as const;
  for (const [name, type] of Object.entries(types))
    if (symbols.mknod(ptr(Buffer.from(`${join(INACCESSIBLE, name)}\0`)), type, 0) !== 0)
      throw new Error(`cannot make ${join(INACCESSIBLE, name)}`);
  for (const name of ["dir", "reg"]) chmodSync(join(INACCESSIBLE, name), 0);
}

/**
 * A cgroup of this test in each mounted hierarchy, under this process's own (so nothing leaves a limit it is
 * under), where one can be made; cpuset's needs cpus and mems, so the manager stays out of it.
 */
function testCgroups(): string[] {
  const mounts = readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .map((l) => l.split(" "))
    .filter((f) => f[2] === "cgroup" || f[2] === "cgroup2");
  const made: string[] = [];
  for (const line of readFileSync("/proc/self/cgroup", "utf8").trim().split("\n")) {
    const [, controllers = "", path = "/"] = line.split(":");
    const wanted = controllers === "" ? [] : controllers.split(",");
    if (wanted.includes("cpuset")) continue;
    const mount = mounts.find((f) =>
      wanted.length === 0
        ? f[2] === "cgroup2"
        : f[2] === "cgroup" && wanted.every((c) => (f[3] ?? "").split(",").includes(c)),
    );
    if (!mount?.[1]) continue;
    const dir = join(mount[1], path, `fleet-sd-${process.pid}`);
    try {
      mkdirSync(dir);
      made.push(dir);
    } catch {
      // not ours to make (a read-only hierarchy): the manager stays where it is in this one
    }
  }
  return made;
}

/** Kill what is left in a test cgroup and its children, then remove them, deepest first. */
function removeCgroup(dir: string): void {
  if (!existsSync(dir)) return;
  for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) removeCgroup(join(dir, e.name));
  for (let tries = 0; tries < 50; tries++) {
    const pids = readFileSync(join(dir, "cgroup.procs"), "utf8").trim().split("\n").filter(Boolean).map(Number);
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    try {
      rmdirSync(dir);
      return;
    } catch {
      Bun.sleepSync(100);
    }
  }
}
