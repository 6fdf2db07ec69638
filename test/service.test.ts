/**
 * `fleet install-service --dry-run` prints a systemd unit for an edge box: a dedicated user,
 * Restart=always, confinement with a writable data dir only, and nothing that would stop
 * bubblewrap's user namespaces. `systemd-analyze verify` checks it when it is installed.
 */
import { describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "./helpers/gateway.ts";
import { serviceBun } from "../gateway/cli/index.ts";

describe("fleet install-service", () => {
  test("--dry-run prints a hardened unit that systemd-analyze verify accepts", async () => {
    const r = await runCli(["install-service", "--dry-run", "--user", "edge", "--dir", "/opt/fleet"]);
    expect(r.code).toBe(0);
    const unit = r.stdout;
    for (const line of [
      "User=edge",
      "Group=edge",
      "WorkingDirectory=/opt/fleet",
      "Restart=always",
      "StartLimitIntervalSec=0",
      "NoNewPrivileges=yes",
      "ProtectSystem=strict",
      "PrivateTmp=yes",
      "ReadWritePaths=/var/lib/edge",
      "ExecReload=/bin/kill -HUP $MAINPID",
      "Type=notify",
      "NotifyAccess=main",
      "WatchdogSec=30",
      "TimeoutStartSec=15min",
      "WantedBy=multi-user.target",
    ]) {
      expect(unit.split("\n")).toContain(line);
    }
    const exec = unit.split("\n").find((l) => l.startsWith("ExecStart="));
    expect(exec).toMatch(/^ExecStart=\S+ \/opt\/fleet\/gateway\/cli\/main\.ts start /);
    expect(exec).toEndWith(" start --config /opt/fleet/fleet.toml --data-dir /var/lib/edge");
    // bwrap needs user namespaces.
    expect(unit).not.toMatch(/^(RestrictNamespaces|PrivateUsers)=/m);

    const analyze = Bun.which("systemd-analyze");
    if (!analyze) return;
    const dir = mkdtempSync(join(tmpdir(), "fleet-unit-"));
    // systemd-analyze leaves this stamp in /run/systemd, where a booted systemd keeps it: ours goes after.
    const stamp = "/run/systemd/systemd-units-load";
    const stampThere = existsSync(stamp);
    try {
      const file = join(dir, "fleet.service");
      writeFileSync(file, unit);
      const v = Bun.spawnSync([analyze, "verify", file], { stdout: "pipe", stderr: "pipe" });
      expect({ code: v.exitCode, stderr: v.stderr.toString() }).toEqual({ code: 0, stderr: "" });
    } finally {
      rmSync(dir, { recursive: true, force: true });
      if (!stampThere) rmSync(stamp, { force: true });
    }
  }, 30_000);

  test("--watchdog-sec sets WatchdogSec; 0 leaves the watchdog off; anything else is a usage error", async () => {
    const unitOf = async (sec: string) => {
      const r = await runCli(["install-service", "--dry-run", "--dir", "/opt/fleet", "--watchdog-sec", sec]);
      return { code: r.code, lines: r.stdout.split("\n"), stderr: r.stderr };
    };
    expect((await unitOf("90")).lines).toContain("WatchdogSec=90");
    const off = await unitOf("0");
    expect(off.lines.filter((l) => l.startsWith("WatchdogSec="))).toEqual([]);
    expect(off.lines).toContain("Type=notify");
    for (const bad of ["-1", "1.5", "ten", "3601"]) {
      const r = await unitOf(bad);
      expect(r.code).toBe(2);
      expect(r.stderr).toContain("--watchdog-sec");
    }
  }, 30_000);

  test("ExecStart runs the bun under --dir/node_modules, not the one that ran the command", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fleet-app-"));
    try {
      mkdirSync(join(dir, "node_modules/.bin"), { recursive: true });
      writeFileSync(join(dir, "node_modules/.bin/bun"), "");
      const r = await runCli(["install-service", "--dry-run", "--dir", dir]);
      expect(r.code).toBe(0);
      const exec = r.stdout.split("\n").find((l) => l.startsWith("ExecStart="));
      expect(exec).toStartWith(`ExecStart=${dir}/node_modules/.bin/bun ${dir}/gateway/cli/main.ts start `);
      expect(r.stderr).toBe("");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);

  test("without a bun under --dir: this bun when the unit can reach it, else --dir's, with a warning", () => {
    const dir = "/opt/fleet-none";
    expect(serviceBun(dir, "/usr/local/bin/bun")).toEqual({
      path: "/usr/local/bin/bun",
      warning: `no ${dir}/node_modules/.bin/bun (npm install in ${dir}): the unit runs /usr/local/bin/bun`,
    });
    expect(serviceBun(dir, "/root/.bun/bin/bun")).toEqual({
      path: `${dir}/node_modules/.bin/bun`,
      warning: `no ${dir}/node_modules/.bin/bun: run npm install in ${dir} before starting the service`,
    });
  });

  test("a bad user name or a relative path is a usage error, and nothing is written", async () => {
    const bad = await runCli(["install-service", "--dry-run", "--user", "Bad User"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--user "Bad User" is not a valid user name');
    const spaced = await runCli(["install-service", "--dry-run", "--dir", "/opt/my fleet"]);
    expect(spaced.code).toBe(2);
    expect(spaced.stderr).toContain("must be an absolute path without spaces");
  }, 30_000);
});
