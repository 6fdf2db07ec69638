/**
 * The unit `fleet install-service` writes, run by a real systemd: a user manager of this test's own
 * (`systemd --user`, as root: the unit's `User=` and confinement apply), since the box's init is not
 * systemd. `systemctl start` returns once the gateway says READY=1; a gateway that stops pinging the
 * watchdog is killed and restarted with its data; `systemctl stop` drains it to exit 0.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { serviceUnit } from "../gateway/cli/index.ts";
import { bundlesBeside } from "../gateway/code/index.ts";
import { cleanupAll, connectMqtt, NOBODY, nobodyCanRun, publishQos1, ROOT, waitFor } from "./helpers/gateway.ts";
import { systemdRunnable as runnable, UserManager } from "./helpers/systemd.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

// Under /var/lib, as a data dir of a real install: the unit's PrivateTmp hides the host's /tmp.
const base = runnable ? mkdtempSync("/var/lib/fleet-sd-") : "";
const manager = new UserManager(base);
const app = join(base, "app");
const systemctl = (...args: string[]) => manager.systemctl(...args);

/** One installed unit: `fleet-test-<user>.service`, its data dir and its log. */
class Installed {
  readonly unit: string;
  readonly data: string;
  readonly log: string;

  constructor(
    readonly user: "root" | "nobody",
    name: string = user,
    appDir = app,
  ) {
    this.unit = `fleet-test-${name}.service`;
    this.data = join(base, `data-${name}`);
    this.log = join(base, `gateway-${name}.log`);
    // As install-service makes it: owned by the service user, and there (the unit's ReadWritePaths).
    mkdirSync(this.data, { mode: 0o750 });
    if (user === "nobody") chownSync(this.data, NOBODY.uid, NOBODY.gid);
    else mkdirSync(bundlesBeside(this.data), { mode: 0o755 });
    let unit = serviceUnit({ user, dir: appDir, dataDir: this.data, bun: process.execPath, watchdogSec: 3 });
    // install-service makes a user and its group of one name; Debian's nobody's group is nogroup.
    if (user === "nobody") unit = unit.replace("Group=nobody", "Group=nogroup");
    // The test's own: logs to a file (no journald here), a short restart, SIGKILL soon after the
    // watchdog's SIGABRT (the test hangs the gateway with SIGSTOP, which holds SIGABRT pending), and
    // the code read-only inside the private /tmp when the repository is there (CI clones it under /tmp).
    manager.install(
      this.unit,
      unit,
      `StandardOutput=append:${this.log}\nStandardError=append:${this.log}\nRestartSec=1\nTimeoutAbortSec=2\n` +
        (/^\/(var\/)?tmp\//.test(ROOT) ? `BindReadOnlyPaths=${ROOT}\n` : ""),
    );
  }

  /** `systemctl show` properties of the unit. */
  show(...props: string[]): Record<string, string> {
    return manager.show(this.unit, ...props);
  }

  /** The running gateway's ports, from its `gateway.json`, once it names `pid`. */
  info(pid: number): { http_port: number; mqtt_port: number } | undefined {
    try {
      const g = JSON.parse(readFileSync(join(this.data, "gateway.json"), "utf8"));
      return g.pid === pid ? g : undefined;
    } catch {
      return undefined;
    }
  }

  /** The local operator's token of the running gateway. */
  token(): string {
    return readFileSync(join(this.data, "local-admin.token"), "utf8").trim();
  }

  /** What to show when a step fails: the unit's status, the manager's and the gateway's last lines. */
  logs(): string {
    const tail = (f: string) => (existsSync(f) ? readFileSync(f, "utf8").slice(-3000) : "");
    const status = systemctl("status", this.unit).out;
    return `\n${status}\n--- manager ---\n${tail(manager.log)}\n--- gateway ---\n${tail(this.log)}`;
  }

  /** How the gateway's start-up log line describes the episodes' sandbox. */
  sandbox(): string {
    for (const line of readFileSync(this.log, "utf8").split("\n"))
      if (line.includes('"sandbox":')) return (JSON.parse(line) as { sandbox: string }).sandbox;
    throw new Error(`no sandbox line${this.logs()}`);
  }
}

beforeAll(async () => {
  if (!runnable) return;
  // The installed app, as docs/deploy.md lays it out: the code (linked), its fleet.toml; readable by a service user.
  chmodSync(base, 0o755);
  mkdirSync(app);
  for (const part of ["gateway", "agents", "broker", "node_modules", "package.json"])
    symlinkSync(join(ROOT, part), join(app, part));
  writeFileSync(
    join(app, "fleet.toml"),
    fleetHeader("systemd", { broker: "mqtt_port = 0" }).replace(
      '[http]\nhost = "127.0.0.1"',
      '[http]\nhost = "127.0.0.1"\nport = 0',
    ) + counterType("counter", "c/+/in"),
  );
  await manager.start();
}, 30_000);

afterAll(async () => {
  if (runnable) await manager.stop(["root", "nobody", "broken"].map((n) => `fleet-test-${n}.service`));
  if (base && !process.env.FLEET_E2E_KEEP) rmSync(base, { recursive: true, force: true });
  await cleanupAll();
});

/** A service user other than root, when it can run the code here (the repository readable by all). */
const asNobody = runnable && nobodyCanRun(ROOT);

describe.skipIf(!runnable)("the unit of fleet install-service under systemd", () => {
  for (const user of ["root", "nobody"] as const)
    test.skipIf(user === "nobody" && !asNobody)(
      `as ${user}: ready on start, restarted with its data when hung, stopped cleanly${
        user === "root" ? "; a typo in fleet.toml survives a restart" : ""
      }`,
      async () => {
        const u = new Installed(user);
        expect(systemctl("daemon-reload").code).toBe(0);

        // Type=notify: `systemctl start` returns when the gateway says READY=1, and it listens by then.
        const started = systemctl("start", u.unit);
        expect({ ...started, logs: started.code === 0 ? "" : u.logs() }).toMatchObject({ code: 0 });
        const first = u.show("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts");
        expect(first).toMatchObject({ ActiveState: "active", SubState: "running", NRestarts: "0" });
        expect(first.StatusText).toStartWith("ready: ");
        const pid = Number(first.MainPID);
        const info = u.info(pid);
        if (!info) throw new Error(`no gateway.json of pid ${pid}${u.logs()}`);
        expect((await fetch(`http://127.0.0.1:${info.http_port}/readyz`)).status).toBe(200);
        // Confined as the unit says, episodes keep their sandbox: as root a uid and a memory cgroup of their own.
        if (user === "root") {
          expect(u.sandbox()).toContain("a uid of its own");
          expect(u.sandbox()).toContain("a memory cgroup of memory_mb");
          // The machine's uid claims (/run/fleet) are writable: the range is checked against other gateways'.
          expect(readFileSync(u.log, "utf8")).not.toContain("could not check which sandbox uids");
        } else expect(u.sandbox()).toContain("bubblewrap (pid/net/ipc namespaces");

        // A stimulus acknowledged by the first run.
        const client = await connectMqtt(info.mqtt_port);
        await publishQos1(client, "c/a/in", JSON.stringify({ id: "before" }));
        client.end(true);

        // `systemctl reload`: SIGHUP, RELOADING=1, READY=1: active again, the same process.
        expect(systemctl("reload", u.unit).code).toBe(0);
        await waitFor(() => u.show("ActiveState").ActiveState === "active", 15_000, "active after the reload");
        expect(Number(u.show("MainPID").MainPID)).toBe(pid);

        // Hung: no pings. systemd's watchdog (3 s) aborts it, kills it, and starts it again.
        process.kill(pid, "SIGSTOP");
        const again = await waitFor(
          () => {
            const s = u.show("ActiveState", "MainPID", "NRestarts");
            return s.ActiveState === "active" && s.NRestarts === "1" && Number(s.MainPID) !== pid ? s : undefined;
          },
          60_000,
          "a restart after the watchdog",
        ).catch((err) => {
          throw new Error(`${(err as Error).message}${u.logs()}`);
        });
        // Nothing but the watchdog ends a stopped process: it stays stopped until killed.
        expect(existsSync(`/proc/${pid}`)).toBe(false);
        const info2 = await waitFor(() => u.info(Number(again.MainPID)), 15_000, "the new gateway.json");

        // The stimulus the first run acknowledged ran its episode, in that run or in this one.
        const episodes = await waitFor(
          async () => {
            const r = await fetch(`http://127.0.0.1:${info2.http_port}/api/agents/counter/a/episodes`, {
              headers: { authorization: `Bearer ${u.token()}` },
            });
            const body = r.status === 200 ? ((await r.json()) as { episodes: { status: string }[] }) : undefined;
            return body && body.episodes.length > 0 ? body.episodes : undefined;
          },
          30_000,
          "counter/a's episode after the restart",
        ).catch((err) => {
          throw new Error(`${(err as Error).message}${u.logs()}`);
        });
        expect(episodes.map((e) => e.status)).toEqual(["committed"]);

        // A typo in fleet.toml, then a restart (a power cut): the version that ran before runs, and says why.
        if (user === "root") {
          const toml = join(app, "fleet.toml");
          const good = readFileSync(toml, "utf8");
          writeFileSync(toml, `${good}\n[fleet\n`);
          try {
            expect(systemctl("restart", u.unit).code).toBe(0);
            const s = u.show("ActiveState", "StatusText");
            expect(s.ActiveState).toBe("active");
            expect(s.StatusText).toContain("; fleet.toml: not applied at start: ");
          } finally {
            writeFileSync(toml, good);
          }
        }

        // SIGTERM drains, then exits 0: systemd records a clean stop.
        expect(systemctl("stop", u.unit).code).toBe(0);
        expect(u.show("ActiveState", "Result", "ExecMainStatus")).toMatchObject({
          ActiveState: "inactive",
          Result: "success",
          ExecMainStatus: "0",
        });
      },
      150_000,
    );
  test("a start that keeps failing is tried again for as long as it fails, never given up", async () => {
    // A fresh data dir and a fleet.toml that does not compile: every start exits 1 within a second.
    const broken = join(base, "app-broken");
    mkdirSync(broken);
    for (const part of ["gateway", "agents", "broker", "node_modules", "package.json"])
      symlinkSync(join(ROOT, part), join(broken, part));
    writeFileSync(join(broken, "fleet.toml"), "[fleet\n");
    const u = new Installed("root", "broken", broken);
    expect(systemctl("daemon-reload").code).toBe(0);
    expect(systemctl("start", "--no-block", u.unit).code).toBe(0);
    // systemd's default gives up after 5 starts in 10 s (the unit failed); with RestartSec=1 that is ~6 s.
    const s = await waitFor(
      () => {
        const v = u.show("ActiveState", "Result", "NRestarts");
        if (v.ActiveState === "failed") throw new Error(`systemd gave up: ${JSON.stringify(v)}`);
        return Number(v.NRestarts) >= 8 ? v : undefined;
      },
      60_000,
      "eight restarts",
    ).catch((err) => {
      throw new Error(`${(err as Error).message}${u.logs()}`);
    });
    expect(s.ActiveState).not.toBe("failed");
    expect(readFileSync(u.log, "utf8")).toContain(`${join(broken, "fleet.toml")}:1:`);
    expect(systemctl("stop", u.unit).code).toBe(0);
  }, 90_000);
});
