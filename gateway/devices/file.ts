/**
 * Editing the devices file for `fleet device add|list|remove`. Edits are textual (comments
 * and layout survive), checked by compiling the result before it is written, and written
 * atomically (temp file + rename) so a running gateway never reads half a file. Each
 * read-edit-write holds `<file>.lock`, so concurrent commands never lose each other's edits.
 */
import { closeSync, existsSync, openSync, readFileSync, rmSync, statSync, unlinkSync, writeSync } from "node:fs";
import { writeFileDurably } from "../durable.ts";
import { aclPatternProblem } from "./acl.ts";
import { hashSecret, mosquittoHash, newSecret } from "./secret.ts";
import { compileDevices, DEVICE_ID_RE, DevicesError, loadDevices } from "./registry.ts";

/** What `addDevice` may set besides the secret. */
export interface AddDeviceOptions {
  readonly publish?: readonly string[];
  readonly subscribe?: readonly string[];
  /** Default: the device id. */
  readonly clientId?: string;
  readonly now?: () => Date;
}

/** A device as listed: never its secret or hash. */
export interface DeviceSummary {
  readonly id: string;
  readonly client_id: string;
  readonly publish: readonly string[];
  readonly subscribe: readonly string[];
  readonly created: string | null;
}

const HEADER = `# Device credentials and topic ACLs for the fleet's MQTT broker (docs/devices.md).
# Secrets are stored only as argon2id hashes; add devices with \`fleet device add <id>\`.
`;

/**
 * A TOML basic string. JSON's escapes are TOML's but for DEL (U+007F), which TOML wants escaped and JSON
 * leaves raw: a pattern holding one was written into a file that no longer parsed.
 */
const tomlString = (x: string) => JSON.stringify(x).replaceAll("\u007f", "\\u007F");
const tomlKey = (k: string) => (/^[A-Za-z0-9_-]+$/.test(k) ? k : tomlString(k));
const tomlStrings = (xs: readonly string[]) => `[${xs.map(tomlString).join(", ")}]`;

function readText(file: string): string | null {
  try {
    return readFileSync(file, "utf8");
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return null;
    throw new DevicesError(file, `cannot read file: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/**
 * Write `text` to `file` atomically and durably (a power cut leaves the old file or the new one, never an empty
 * one: every device would be refused); a new file is 0600 (it holds hashes), an existing one keeps its mode.
 */
function writeAtomic(file: string, text: string): void {
  writeFileDurably(file, text, existsSync(file) ? statSync(file).mode & 0o777 : 0o600);
}

/**
 * After how long a lock is taken as left by a command that died (an edit holds it for
 * milliseconds), and how long an edit waits for one: longer, so a dead command's lock is cleared.
 */
const LOCK_STALE_MS = 10_000;
const LOCK_WAIT_MS = 15_000;

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * Run `edit` (read, change, write: synchronous, so it takes milliseconds) holding `<file>.lock`,
 * created with O_EXCL. A lock older than LOCK_STALE_MS is left by a command that died: removed.
 */
function withLock<T>(file: string, edit: () => T): T {
  const lock = `${file}.lock`;
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      const fd = openSync(lock, "wx", 0o600);
      writeSync(fd, `${process.pid}\n`);
      closeSync(fd);
      break;
    } catch (err) {
      if ((err as { code?: string }).code !== "EEXIST")
        throw new DevicesError(file, `cannot create ${lock}: ${err instanceof Error ? err.message : String(err)}`);
    }
    try {
      if (Date.now() - statSync(lock).mtimeMs > LOCK_STALE_MS) {
        unlinkSync(lock);
        continue;
      }
    } catch {
      continue; // released in the meantime
    }
    if (Date.now() > deadline)
      throw new DevicesError(file, `${lock} is held by another \`fleet device\` command (remove it if none runs)`);
    sleepSync(10 + Math.random() * 20);
  }
  try {
    return edit();
  } finally {
    rmSync(lock, { force: true });
  }
}

/**
 * Register a device: generate a random secret, store only its argon2id hash, and return the
 * secret (the only time it is ever shown). Creates the file when missing.
 */
export async function addDevice(
  file: string,
  id: string,
  opts: AddDeviceOptions = {},
): Promise<{ id: string; secret: string; file: string }> {
  if (!DEVICE_ID_RE.test(id))
    throw new DevicesError(file, `device id ${JSON.stringify(id)} must be A-Z a-z 0-9 _ . : @ - (no /, + or #)`);
  if (opts.clientId !== undefined && !DEVICE_ID_RE.test(opts.clientId)) {
    throw new DevicesError(
      file,
      `client id ${JSON.stringify(opts.clientId)} must be A-Z a-z 0-9 _ . : @ - (no /, + or #)`,
    );
  }
  for (const use of ["publish", "subscribe"] as const)
    for (const p of opts[use] ?? []) {
      const problem = aclPatternProblem(p, use);
      if (problem !== null) throw new DevicesError(file, `ACL pattern ${JSON.stringify(p)}: ${problem}`);
    }
  const exists = () =>
    new DevicesError(file, `device "${id}" already exists ("fleet device rekey ${id}" issues it a new secret)`);
  if (compileDevices(readText(file) ?? HEADER, file).devices.has(id)) throw exists(); // before the slow hashing
  const secret = newSecret();
  const hashes = [
    `secret = ${JSON.stringify(await hashSecret(secret))}`,
    `mosquitto_secret = ${JSON.stringify(mosquittoHash(secret))}`,
  ];
  withLock(file, () => {
    const text = readText(file) ?? HEADER;
    if (compileDevices(text, file).devices.has(id)) throw exists(); // added while the secret was hashed
    const lines = [
      "",
      `[devices.${tomlKey(id)}]`,
      ...hashes,
      ...(opts.clientId !== undefined && opts.clientId !== id ? [`client_id = ${JSON.stringify(opts.clientId)}`] : []),
      `publish = ${tomlStrings(opts.publish ?? [])}`,
      `subscribe = ${tomlStrings(opts.subscribe ?? [])}`,
      `created = ${JSON.stringify((opts.now?.() ?? new Date()).toISOString())}`,
      "",
    ];
    const next = text.replace(/\n*$/, "\n") + lines.join("\n");
    const after = compileDevices(next, file); // e.g. a clashing client id, or `devices = {…}` written inline
    if (!after.devices.has(id))
      throw new DevicesError(file, `could not add device "${id}" to this file; add it by hand`);
    writeAtomic(file, next);
  });
  return { id, secret, file };
}

/** The lines `[start, end)` of a device's `[devices.<id>]` table (comments above the next table excluded). */
function deviceTable(file: string, lines: readonly string[], id: string, what: string): [number, number] {
  const esc = id.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const header = new RegExp(`^\\s*\\[\\s*devices\\s*\\.\\s*(?:${esc}|"${esc}"|'${esc}')\\s*\\]\\s*(?:#.*)?$`);
  const start = lines.findIndex((l) => header.test(l));
  if (start < 0)
    throw new DevicesError(
      file,
      `device "${id}" is not written as a [devices.${tomlKey(id)}] table; ${what} it by hand`,
    );
  let end = start + 1;
  while (end < lines.length && !/^\s*\[/.test(lines[end]!)) end++;
  // Comment lines right above the next table belong to it.
  while (end > start + 1 && /^\s*#/.test(lines[end - 1]!) && end < lines.length) end--;
  return [start, end];
}

/**
 * Issue a device a new secret (returned, shown once): both stored hashes are replaced, its
 * patterns and client id stay. Its sessions must log in again with the new secret.
 */
export async function rekeyDevice(file: string, id: string): Promise<{ id: string; secret: string; file: string }> {
  const missing = () => new DevicesError(file, `no device "${id}" (add it with \`fleet device add ${id}\`)`);
  const known = (text: string | null): text is string => text !== null && compileDevices(text, file).devices.has(id);
  if (!known(readText(file))) throw missing();
  const secret = newSecret();
  const hashes = [
    `secret = ${JSON.stringify(await hashSecret(secret))}`,
    `mosquitto_secret = ${JSON.stringify(mosquittoHash(secret))}`,
  ];
  withLock(file, () => {
    const text = readText(file);
    if (!known(text)) throw missing(); // removed while the secret was hashed
    const lines = text.split("\n");
    const [start, end] = deviceTable(file, lines, id, "rekey");
    const body = lines.slice(start + 1, end).filter((l) => !/^\s*(?:secret|mosquitto_secret)\s*=/.test(l));
    const next = [...lines.slice(0, start + 1), ...hashes, ...body, ...lines.slice(end)].join("\n");
    const after = compileDevices(next, file).devices.get(id);
    if (!after || after.mosquittoHash === null)
      throw new DevicesError(file, `could not rekey device "${id}"; edit it by hand`);
    writeAtomic(file, next);
  });
  return { id, secret, file };
}

/** Remove a device; false when there is none with that id. */
export function removeDevice(file: string, id: string): boolean {
  return withLock(file, () => {
    const text = readText(file);
    if (text === null || !compileDevices(text, file).devices.has(id)) return false;
    const lines = text.split("\n");
    const [start, end] = deviceTable(file, lines, id, "remove");
    const next = [...lines.slice(0, start), ...lines.slice(end)].join("\n").replace(/\n{3,}/g, "\n\n");
    if (compileDevices(next, file).devices.has(id))
      throw new DevicesError(file, `could not remove device "${id}"; remove it by hand`);
    writeAtomic(file, next);
    return true;
  });
}

/** The registered devices, without secrets. */
export function listDevices(file: string): DeviceSummary[] {
  return [...loadDevices(file).devices.values()].map((d) => ({
    id: d.id,
    client_id: d.clientId,
    publish: d.publish,
    subscribe: d.subscribe,
    created: d.created,
  }));
}
