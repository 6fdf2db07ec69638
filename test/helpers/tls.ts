/**
 * Test certificates made at test time with Debian's `openssl` in a temp dir: a CA, a server
 * certificate for 127.0.0.1/localhost signed by it, and client certificates (for `tls_ca`).
 */
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Paths of the PEM files, and the CA's text for clients. */
export interface TestCerts {
  readonly dir: string;
  readonly ca: string;
  readonly caPem: string;
  readonly cert: string;
  readonly key: string;
  readonly clientCert: string;
  readonly clientKey: string;
}

function openssl(dir: string, args: string[]): void {
  const r = Bun.spawnSync(["openssl", ...args], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${r.stderr.toString()}`);
}

/** A new EC P-256 key, unencrypted. */
const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/** A key and a certificate for `subject`, signed by the CA in `dir` (EC P-256, valid one day): `<name>.pem`/`.key`. */
function issue(dir: string, name: string, subject: string, extra: readonly string[] = []): void {
  openssl(dir, ["req", ...EC, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", subject]);
  const ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
  openssl(dir, ["x509", "-req", "-in", `${name}.csr`, ...ca, "-out", `${name}.pem`, "-days", "1", ...extra]);
}

/** Make a CA and a server and client certificate signed by it (EC P-256, valid one day). */
export function makeCerts(): TestCerts {
  const dir = mkdtempSync(join(tmpdir(), "fleet-tls-"));
  openssl(dir, [
    "req",
    "-x509",
    ...EC,
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
    "-days",
    "1",
    "-subj",
    "/CN=fleet test CA",
  ]);
  writeFileSync(join(dir, "server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  issue(dir, "server", "/CN=localhost", ["-extfile", "server.ext"]);
  issue(dir, "client", "/CN=boiler-1");
  return {
    dir,
    ca: join(dir, "ca.pem"),
    caPem: readFileSync(join(dir, "ca.pem"), "utf8"),
    cert: join(dir, "server.pem"),
    key: join(dir, "server.key"),
    clientCert: join(dir, "client.pem"),
    clientKey: join(dir, "client.key"),
  };
}

/**
 * Another client certificate signed by `certs`' CA, with subject `subject` (e.g. "/CN=boiler-2", or
 * "/O=fleet test" for one without a CN): its PEM certificate and key.
 */
export function clientCertFor(certs: TestCerts, name: string, subject: string): { cert: string; key: string } {
  const dir = certs.dir;
  issue(dir, name, subject);
  return { cert: readFileSync(join(dir, `${name}.pem`), "utf8"), key: readFileSync(join(dir, `${name}.key`), "utf8") };
}

/**
 * A CRL file signed by `certs`' CA revoking the certificates at `revoked` (PEM paths; none: an empty list),
 * valid a day: its path (`<name>.crl.pem` in the certificates' dir).
 */
export function crlFor(certs: TestCerts, name: string, revoked: readonly string[]): string {
  const db = join(certs.dir, `${name}-db`);
  mkdirSync(db, { recursive: true });
  writeFileSync(join(db, "index.txt"), "");
  writeFileSync(join(db, "crlnumber"), "01\n");
  const config = join(db, "ca.cnf");
  writeFileSync(
    config,
    `[ca]\ndefault_ca = d\n[d]\ndatabase = ${db}/index.txt\ncrlnumber = ${db}/crlnumber\n` +
      "default_md = sha256\ndefault_crl_days = 1\n",
  );
  const ca = ["-config", config, "-keyfile", "ca.key", "-cert", "ca.pem"];
  for (const cert of revoked) openssl(certs.dir, ["ca", ...ca, "-revoke", cert]);
  const out = join(certs.dir, `${name}.crl.pem`);
  openssl(certs.dir, ["ca", ...ca, "-gencrl", "-out", out]);
  return out;
}
