/**
 * `fleet install-service [--user fleet] [--dir /opt/fleet] [--data-dir DIR] [--dry-run]`:
 * a systemd unit for an edge box (docs/deploy.md). It runs the gateway as a dedicated
 * user, restarts it always, and confines it (read-only system, private /tmp, writable data
 * dir only). Namespaces stay allowed: bubblewrap sandboxes episodes with user namespaces.
 */
import { execFileSync } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Cli } from "./context.ts";
import { bundlesBeside } from "../code/index.ts";
import { parseStrictInt } from "../parse.ts";
import { UsageError } from "./context.ts";

/** What the unit is made from. */
export interface ServiceOptions {
  /** The user the gateway runs as. */
  readonly user: string;
  /** The installed app: fleet.toml, agents, node_modules. */
  readonly dir: string;
  /** The data dir (libSQL file, gateway.json); the only path the service may write. */
  readonly dataDir: string;
  /** The bun binary. */
  readonly bun: string;
  /** systemd's `WatchdogSec` in seconds; 0: no watchdog. */
  readonly watchdogSec: number;
}

/** The watchdog's default: a gateway whose thread or commits stall this long is restarted. */
export const DEFAULT_WATCHDOG_SEC = 30;

const USER_RE = /^[a-z_][a-z0-9_-]{0,31}$/;
/** Unit file paths are written without quoting: no spaces or specials. */
const PATH_RE = /^\/[A-Za-z0-9._/@+-]*$/;
/** What the unit's ProtectHome hides (or makes read-only). */
const UNDER_HOME = /^\/(home|root)(\/|$)/;

/** The unit file text. */
export function serviceUnit(o: ServiceOptions): string {
  const underHome = UNDER_HOME.test(o.dir) || UNDER_HOME.test(o.dataDir);
  const root = o.user === "root";
  return `# Written by \`fleet install-service\`; see docs/deploy.md.
[Unit]
Description=Agent Fleets gateway (${o.dir}/fleet.toml)
After=network-online.target
Wants=network-online.target
# An unattended box keeps trying: a start that fails (a disk not mounted yet, or full) is tried
# again every RestartSec for as long as it fails, never given up after five.
StartLimitIntervalSec=0

[Service]
# The gateway says when it is ready, pings the watchdog while its thread and commits make
# progress, and shows its state in \`systemctl status\` (docs/deploy.md).
Type=notify
NotifyAccess=main
${o.watchdogSec > 0 ? `WatchdogSec=${o.watchdogSec}` : "# no watchdog (--watchdog-sec 0)"}
# A migration of a large store can hold the thread for minutes; past this, a start goes on
# for as long as its thread turns (it extends the timeout every 10 s).
TimeoutStartSec=15min
User=${o.user}
Group=${o.user}
WorkingDirectory=${o.dir}
Environment=FLEET_CONFIG=${o.dir}/fleet.toml
Environment=FLEET_DATA_DIR=${o.dataDir}
Environment=FLEET_LOG_FORMAT=json
ExecStart=${o.bun} ${o.dir}/gateway/cli/main.ts start --config ${o.dir}/fleet.toml --data-dir ${o.dataDir}
# SIGHUP reloads fleet.toml; SIGTERM drains in-flight episodes, then exits 0.
ExecReload=/bin/kill -HUP $MAINPID
KillMode=mixed
TimeoutStopSec=60
Restart=always
RestartSec=2
LimitNOFILE=65536
UMask=0077

# Confinement. Episode subprocesses are sandboxed by bubblewrap, which needs user
# namespaces: do not add RestrictNamespaces= or PrivateUsers= here.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=${underHome ? "read-only" : "yes"}
ReadWritePaths=${o.dataDir}${root ? ` ${bundlesBeside(o.dataDir)}` : ""}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
${
  root
    ? `# As root each episode runs as a uid of its own, in a memory cgroup of the gateway's (docs/sandbox.md):
# the code bundles live beside the data dir, /run/fleet holds this machine's uid claims (kept
# for other gateways when this one stops), and the gateway's cgroup is delegated to it.
RuntimeDirectory=fleet
RuntimeDirectoryPreserve=yes
Delegate=yes
ProtectControlGroups=no`
    : "ProtectControlGroups=yes"
}
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
`;
}

/**
 * The bun the unit runs: the one `npm install` put under the app dir (docs/deploy.md), which the service user can
 * reach. Without it, the bun running this command when it is outside /home and /root (ProtectHome hides those),
 * else the app dir's path all the same, with a warning saying what to install.
 */
export function serviceBun(dir: string, running = process.execPath): { path: string; warning?: string } {
  const local = join(dir, "node_modules/.bin/bun");
  if (existsSync(local)) return { path: local };
  if (!UNDER_HOME.test(running) && PATH_RE.test(running))
    return { path: running, warning: `no ${local} (npm install in ${dir}): the unit runs ${running}` };
  return { path: local, warning: `no ${local}: run npm install in ${dir} before starting the service` };
}

/** The command. */
export async function cmdInstallService(
  cli: Cli,
  flags: { user?: string; dir?: string; watchdogSec?: string },
): Promise<number> {
  const user = flags.user ?? "fleet";
  const dir = resolve(flags.dir ?? "/opt/fleet");
  const dataDir = resolve(cli.flags["data-dir"] ?? join("/var/lib", user));
  if (!USER_RE.test(user)) throw new UsageError(`--user "${user}" is not a valid user name`);
  for (const [flag, p] of [
    ["--dir", dir],
    ["--data-dir", dataDir],
  ] as const) {
    if (!PATH_RE.test(p)) throw new UsageError(`${flag} "${p}" must be an absolute path without spaces or specials`);
  }
  const watchdog = flags.watchdogSec ?? String(DEFAULT_WATCHDOG_SEC);
  const watchdogSec = parseStrictInt(watchdog, { name: "--watchdog-sec", min: 0, max: 3600 });
  if (!watchdogSec.ok) throw new UsageError(watchdogSec.message);
  const bun = serviceBun(dir);
  if (bun.warning) console.error(`fleet: warning: ${bun.warning}`);
  const unit = serviceUnit({ user, dir, dataDir, bun: bun.path, watchdogSec: watchdogSec.value });
  if (cli.flags["dry-run"]) {
    process.stdout.write(unit);
    return 0;
  }
  if (process.getuid?.() !== 0) throw new UsageError("install-service writes /etc/systemd/system: run it as root");
  if (!existsSync(join(dir, "fleet.toml"))) throw new UsageError(`no fleet.toml in ${dir}`);
  if (!existsSync(bun.path)) throw new UsageError(`no ${bun.path}: run npm install in ${dir} first`);
  let created = false;
  try {
    execFileSync("id", ["-u", user], { stdio: "ignore" });
  } catch {
    execFileSync("useradd", ["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], {
      stdio: "inherit",
    });
    created = true;
  }
  execFileSync("install", ["-d", "-m", "0750", "-o", user, "-g", user, dataDir], { stdio: "inherit" });
  // The unit's ReadWritePaths must exist.
  if (user === "root") execFileSync("install", ["-d", "-m", "0755", bundlesBeside(dataDir)], { stdio: "inherit" });
  const file = "/etc/systemd/system/fleet.service";
  writeFileSync(file, unit, { mode: 0o644 });
  console.log(
    `${created ? `created system user ${user}\n` : ""}wrote ${file} (data in ${dataDir})\n` +
      "next: systemctl daemon-reload && systemctl enable --now fleet && journalctl -u fleet -f",
  );
  return 0;
}
