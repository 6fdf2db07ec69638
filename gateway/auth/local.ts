/**
 * The per-run local token: at start the gateway writes a fresh admin token to
 * `<data-dir>/local-admin.token` (0600, removed at stop) and accepts it as `cli@local`.
 * The `fleet` command on the same machine reads it to call the running gateway's API, so
 * whoever can read the data dir (the gateway's own user) can operate the fleet, as they
 * could by editing its files anyway. It is never written anywhere else and dies with the run.
 */
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { newToken } from "./tokens.ts";

/** The file in the data dir. */
export const LOCAL_TOKEN_FILE = "local-admin.token";
/** The name the audit log shows for calls made with it. */
export const LOCAL_TOKEN_NAME = "cli@local";

/** Mint this run's local token and write it to the data dir (0600). */
export function writeLocalToken(dataDir: string): string {
  const token = newToken();
  const file = join(dataDir, LOCAL_TOKEN_FILE);
  rmSync(file, { force: true }); // a stale file may have another mode; start from none
  writeFileSync(file, `${token}\n`, { mode: 0o600 });
  return token;
}

/** The running gateway's local token, or null when there is none (or it is unreadable). */
export function readLocalToken(dataDir: string): string | null {
  try {
    return readFileSync(join(dataDir, LOCAL_TOKEN_FILE), "utf8").trim() || null;
  } catch {
    return null;
  }
}

/** Remove the local token at stop. */
export function removeLocalToken(dataDir: string): void {
  rmSync(join(dataDir, LOCAL_TOKEN_FILE), { force: true });
}
