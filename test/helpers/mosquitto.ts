/**
 * A real Mosquitto (Debian's /usr/sbin/mosquitto) on a free loopback port, with persistence in
 * a temp dir: the external broker of external-mode tests. Optional password and ACL files.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { waitFor } from "./gateway.ts";
import { freePort } from "./sqld.ts";

/** Where Debian installs the broker. */
export const MOSQUITTO = process.env.MOSQUITTO_BIN ?? "/usr/sbin/mosquitto";

/** Extra configuration of a test broker. */
export interface MosquittoOptions {
  /** Password file (mosquitto_passwd format); without it anonymous clients are allowed. */
  readonly passwordFile?: string;
  readonly aclFile?: string;
  /** More lines for mosquitto.conf. */
  readonly extra?: readonly string[];
}

/** One mosquitto under test: start, kill -9, restart on the same port and persistence dir. */
export class Mosquitto {
  readonly dir: string;
  readonly logPath: string;
  private proc: ReturnType<typeof Bun.spawn> | null = null;

  private constructor(
    readonly port: number,
    private readonly opts: MosquittoOptions,
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "fleet-mosquitto-"));
    this.logPath = join(this.dir, "mosquitto.log");
  }

  static async start(opts: MosquittoOptions = {}): Promise<Mosquitto> {
    const m = new Mosquitto(await freePort(), opts);
    await m.restart();
    return m;
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  /** Start (again) and wait until the port accepts connections. */
  async restart(): Promise<void> {
    const conf = join(this.dir, "mosquitto.conf");
    const lines = [
      `listener ${this.port} 127.0.0.1`,
      // Started as root, mosquitto would switch to the "mosquitto" user, which cannot write this dir.
      ...(process.getuid?.() === 0 ? ["user root"] : []),
      "persistence true",
      `persistence_location ${this.dir}/`,
      "autosave_interval 1",
      `log_dest file ${this.logPath}`,
      "log_type all",
      "max_queued_messages 100000",
      ...(this.opts.passwordFile ? [`password_file ${this.opts.passwordFile}`] : ["allow_anonymous true"]),
      ...(this.opts.aclFile ? [`acl_file ${this.opts.aclFile}`] : []),
      ...(this.opts.extra ?? []),
    ];
    writeFileSync(conf, `${lines.join("\n")}\n`);
    const fd = openSync(join(this.dir, "stderr.log"), "a");
    this.proc = Bun.spawn([MOSQUITTO, "-c", conf], { stdin: "ignore", stdout: fd, stderr: fd });
    closeSync(fd);
    const proc = this.proc;
    await waitFor(
      () => {
        if (proc.exitCode !== null) throw new Error(`mosquitto exited ${proc.exitCode}: ${this.logTail()}`);
        return new Promise<boolean>((resolve) => {
          const s = connect(this.port, "127.0.0.1");
          s.once("connect", () => {
            s.destroy();
            resolve(true);
          });
          s.once("error", () => resolve(false));
        });
      },
      10_000,
      "mosquitto listening",
      50,
    );
  }

  /** The broker's log and stderr, for failure messages. */
  logTail(lines = 30): string {
    const read = (f: string) => {
      try {
        return readFileSync(join(this.dir, f), "utf8");
      } catch {
        return "";
      }
    };
    return `${read("stderr.log")}${read("mosquitto.log")}`.trimEnd().split("\n").slice(-lines).join("\n");
  }

  /** SIGTERM (mosquitto saves its persistence file) and wait. */
  async stop(): Promise<void> {
    const p = this.proc;
    this.proc = null;
    if (!p || p.exitCode !== null) return;
    p.kill("SIGTERM");
    await p.exited;
  }

  /** Stop and remove the temp dir. */
  async dispose(): Promise<void> {
    await this.stop();
    if (!process.env.FLEET_E2E_KEEP) rmSync(this.dir, { recursive: true, force: true });
  }
}
