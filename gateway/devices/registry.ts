/**
 * Device credentials and topic ACLs (docs/devices.md): the devices file named by
 * `[broker] devices = "devices.toml"`, compiled once into a frozen `DevicesConfig`, and a
 * `DeviceRegistry` that answers the broker's authenticate / ACL hooks and picks up edits
 * of the file (mtime check) without a restart. Format: docs/devices.md.
 */
import { readFileSync, statSync } from "node:fs";
import type { Logger } from "pino";
import { parse, TomlError } from "smol-toml";
import { z } from "zod";
import type { BrokerOptions, ClientInfo } from "../../broker/index.ts";
import { aclAllowsPublish, aclAllowsSubscribe, aclPatternProblem } from "./acl.ts";
import { LoginQueue } from "./login-queue.ts";
import {
  digestsEqual,
  hashSecret,
  mosquittoHashProblem,
  parseArgon2,
  secretDigest,
  verifySecretOffThread,
  type Argon2Hash,
} from "./secret.ts";
import { type Problem, reportProblems } from "../spec/index.ts";
import { ConfigFileError } from "../spec/index.ts";

/** Device ids (= MQTT usernames) and client ids: one plain topic level, so `%u`/`%c` never widen an ACL. */
export const DEVICE_ID_RE = /^[A-Za-z0-9_.:@-]+$/;

/** A problem in the devices file: syntax errors carry line:column, schema errors the key path. */
export class DevicesError extends ConfigFileError {
  override readonly name = "DevicesError";
  override readonly subject = "devices file";
}

/** One registered device. */
export interface Device {
  readonly id: string;
  /** The only client id this device may connect with (default: its id). */
  readonly clientId: string;
  /** The stored `$argon2id$...` string. */
  readonly secretHash: string;
  readonly secret: Argon2Hash;
  /** The same secret as a Mosquitto `$7$` hash, for `fleet device export --mosquitto`; null in older files. */
  readonly mosquittoHash: string | null;
  /** The device's own patterns, as written. */
  readonly publish: readonly string[];
  readonly subscribe: readonly string[];
  /** Own patterns plus `[defaults]`: what the ACL checks. */
  readonly acl: { readonly publish: readonly string[]; readonly subscribe: readonly string[] };
  readonly created: string | null;
}

/** A compiled devices file. */
export interface DevicesConfig {
  readonly file: string;
  readonly defaults: { readonly publish: readonly string[]; readonly subscribe: readonly string[] };
  readonly devices: ReadonlyMap<string, Device>;
  readonly byClientId: ReadonlyMap<string, Device>;
}

// ---- schema ---------------------------------------------------------------------------

type Issue = { input?: unknown };
const says = (m: string) => ({ error: (iss: Issue) => (iss.input === undefined ? "is required" : m) });
const pattern = (use: "publish" | "subscribe") =>
  z.string(says("must be a string")).superRefine((p, ctx) => {
    const problem = aclPatternProblem(p, use);
    if (problem !== null)
      ctx.addIssue({ code: "custom", message: `is not a valid ACL pattern (${JSON.stringify(p)}): ${problem}` });
  });
const patterns = (use: "publish" | "subscribe") =>
  z.array(pattern(use), says("must be an array of topic patterns")).default([]);
const idString = (what: string) =>
  z.string(says("must be a string")).regex(DEVICE_ID_RE, `must be a ${what} of A-Z a-z 0-9 _ . : @ - (no /, + or #)`);
const deviceSchema = z.strictObject(
  {
    secret: z.string(says("must be a string")).superRefine((s, ctx) => {
      const r = parseArgon2(s);
      if (!r.ok) ctx.addIssue({ code: "custom", message: r.problem });
    }),
    mosquitto_secret: z
      .string(says("must be a string"))
      .superRefine((s, ctx) => {
        const problem = mosquittoHashProblem(s);
        if (problem !== null) ctx.addIssue({ code: "custom", message: problem });
      })
      .optional(),
    client_id: idString("client id").optional(),
    publish: patterns("publish"),
    subscribe: patterns("subscribe"),
    created: z.union([z.string(), z.date()], says("must be a string or a date")).optional(),
  },
  says("must be a table"),
);
const fileSchema = z.strictObject({
  defaults: z
    .strictObject({ publish: patterns("publish"), subscribe: patterns("subscribe") }, says("must be a table"))
    .prefault({}),
  devices: z.record(idString("device id"), deviceSchema, says("must be a table")).default({}),
});

function schemaMessage(iss: z.core.$ZodRawIssue): string {
  if (iss.code === "invalid_type")
    return iss.input === undefined
      ? "is required"
      : `must be ${iss.expected === "object" ? "a table" : `a ${iss.expected}`}`;
  return "is invalid";
}

/** Compile devices-file text; throws DevicesError naming the file and the line:column or key path. */
export function compileDevices(text: string, file: string): DevicesConfig {
  let doc: unknown;
  try {
    doc = parse(text);
  } catch (err) {
    if (err instanceof TomlError) {
      throw new DevicesError(
        file,
        `invalid TOML: ${err.message.split("\n")[0]?.replace(/^Invalid TOML document: /, "")}`,
        err.line,
        err.column,
      );
    }
    throw new DevicesError(file, `invalid TOML: ${String(err)}`);
  }
  const parsed = fileSchema.safeParse(doc, { error: schemaMessage });
  const problems: Problem[] = [];
  if (!parsed.success) {
    for (const iss of parsed.error.issues) {
      if (iss.code === "unrecognized_keys")
        problems.push(...iss.keys.map((k) => ({ path: [...iss.path, k], message: "is not a known key" })));
      else if (iss.code === "invalid_key")
        problems.push({ path: iss.path, message: iss.issues[0]?.message ?? iss.message });
      else problems.push({ path: iss.path, message: iss.message });
    }
  }
  const devices = new Map<string, Device>();
  const byClientId = new Map<string, Device>();
  if (parsed.success) {
    const defaults = parsed.data.defaults;
    for (const [id, d] of Object.entries(parsed.data.devices)) {
      const clientId = d.client_id ?? id;
      const taken = byClientId.get(clientId);
      if (taken) {
        problems.push({
          path: ["devices", id, "client_id"],
          message: `"${clientId}" is already the client id of device "${taken.id}" (each device needs its own)`,
        });
        continue;
      }
      const secret = parseArgon2(d.secret);
      if (!secret.ok) continue; // reported by the schema
      const device: Device = {
        id,
        clientId,
        secretHash: d.secret,
        secret: secret.value,
        mosquittoHash: d.mosquitto_secret ?? null,
        publish: d.publish,
        subscribe: d.subscribe,
        acl: { publish: [...defaults.publish, ...d.publish], subscribe: [...defaults.subscribe, ...d.subscribe] },
        created: d.created === undefined ? null : d.created instanceof Date ? d.created.toISOString() : d.created,
      };
      devices.set(id, device);
      byClientId.set(clientId, device);
    }
  }
  if (problems.length > 0) {
    const r = reportProblems(file, text, problems);
    throw new DevicesError(file, r.detail, r.line, r.column, r.keyPath);
  }
  const defaults = parsed.success ? parsed.data.defaults : { publish: [], subscribe: [] };
  return Object.freeze({ file, defaults, devices, byClientId });
}

/** Read and compile a devices file; a missing file is an empty registry. */
export function loadDevices(file: string): DevicesConfig {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return compileDevices("", file);
    throw new DevicesError(file, `cannot read file: ${err instanceof Error ? err.message : String(err)}`);
  }
  return compileDevices(text, file);
}

/** Identity of the file's current content on disk (rename-on-write changes the inode). */
function stampOf(file: string): string {
  try {
    const s = statSync(file);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  } catch {
    return "missing";
  }
}

/** Options of a registry. */
export interface DeviceRegistryOptions {
  readonly log?: Logger;
  /** Publish/subscribe checks look at the file at most this often; CONNECTs always do. */
  readonly checkIntervalMs?: number;
  readonly now?: () => number;
  /**
   * Called (on a later turn of the event loop) after an edit of the file was loaded, so the
   * broker can close sessions the new file no longer allows.
   */
  readonly onChange?: () => void;
  /** Checks a secret against a stored hash (default: argon2id on its own thread, `verifySecretOffThread`). */
  readonly verify?: (secret: Uint8Array, hash: Argon2Hash) => Promise<boolean>;
  /** Verifications one device's lane may hold waiting (default LOGINS_WAITING_PER_LANE); past it, busy. */
  readonly loginsWaitingPerLane?: number;
}

/** The live devices file: answers auth and ACL questions, reloading when the file changes. */
export class DeviceRegistry {
  private config: DevicesConfig;
  private stamp: string;
  private lastCheck: number;
  /** SHA-256 of secrets that verified, per device and stored hash: reconnect storms skip argon2. */
  private readonly verified = new Map<string, { secretHash: string; digest: Uint8Array }>();
  private dummy: Promise<Argon2Hash> | null = null;
  private readonly now: () => number;
  private readonly verify: (secret: Uint8Array, hash: Argon2Hash) => Promise<boolean>;
  /** Verifications in turn, a lane per device (login-queue.ts). */
  private readonly queue: LoginQueue;

  /** Load `file` (throws DevicesError when it is invalid; a missing file is empty). */
  constructor(
    readonly file: string,
    private readonly opts: DeviceRegistryOptions = {},
  ) {
    this.now = opts.now ?? Date.now;
    this.verify = opts.verify ?? verifySecretOffThread;
    this.queue = new LoginQueue(opts.loginsWaitingPerLane);
    this.stamp = stampOf(file);
    this.config = loadDevices(file);
    this.lastCheck = this.now();
    if (this.stamp === "missing")
      opts.log?.warn({ file }, "devices file not found: no device can log in until `fleet device add` creates it");
  }

  /** Logins waiting for their verification's turn (not counting the one running). */
  get loginsWaiting(): number {
    return this.queue.waiting;
  }

  /** The current compiled file. */
  get current(): DevicesConfig {
    return this.config;
  }

  /** Look at the file every `checkIntervalMs` even without traffic (so removals close sessions); returns the stop. */
  watch(): () => void {
    const timer = setInterval(() => this.refresh(), this.opts.checkIntervalMs ?? 1000);
    timer.unref?.();
    return () => clearInterval(timer);
  }

  /** Reload when the file changed; an invalid edit keeps the previous devices (and is logged). */
  refresh(force = false): void {
    const now = this.now();
    if (!force && now - this.lastCheck < (this.opts.checkIntervalMs ?? 1000)) return;
    this.lastCheck = now;
    const stamp = stampOf(this.file);
    if (stamp === this.stamp) return;
    this.stamp = stamp; // an invalid edit is reported once, not on every CONNECT
    try {
      this.config = loadDevices(this.file);
      this.opts.log?.info({ file: this.file, devices: this.config.devices.size }, "devices file reloaded");
      const onChange = this.opts.onChange;
      if (onChange) setImmediate(onChange);
    } catch (err) {
      this.opts.log?.error(
        { file: this.file },
        `devices file rejected, keeping the previous devices: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
  }

  /**
   * CONNECT check. A device logs in with username = device id, password = secret, and must
   * use its own client id (so it cannot take over another device's session). An anonymous
   * client (asked only when anonymous clients are allowed) may not use a device's client id.
   * A certified client (its user name is the CN of a certificate the TLS listener verified) needs
   * no secret: the CN must be a device, on its own client id.
   */
  async authenticate(client: ClientInfo, password: Uint8Array | null): Promise<boolean> {
    this.refresh(true);
    const { devices, byClientId } = this.config;
    const log = this.opts.log;
    if (client.certified && client.username !== null) {
      const device = devices.get(client.username);
      if (device?.clientId === client.id) return true;
      log?.debug(
        { client: client.id, certificate: client.username },
        device ? "connect refused: a device must use its own client id" : "connect refused: unknown device",
      );
      return false;
    }
    if (client.username === null) {
      const owner = byClientId.get(client.id);
      if (owner)
        log?.info({ client: client.id, device: owner.id }, "anonymous connect refused: client id belongs to a device");
      return owner === undefined;
    }
    const pw = password ?? new Uint8Array(0);
    const device = devices.get(client.username);
    // Refusals are logged at debug: the broker logs bad logins, at most one line per 10 s.
    // Every refusal costs one verification (or waits for the same secret's), so a timing cannot tell a
    // registered id from another. Verifications wait their turn (login-queue.ts): a lane per device id,
    // one for every other user name; a full lane rejects with BrokerBusy.
    const digest = secretDigest(pw);
    const key = Buffer.from(digest).toString("hex");
    if (!device) {
      const dummy = await this.dummyHash();
      await this.queue.check({ lane: "", key, gone: client.gone, source: client.host }, () => this.verify(pw, dummy));
      log?.debug({ client: client.id, username: client.username }, "connect refused: unknown device");
      return false;
    }
    const check = { lane: device.id, key: `${key} ${device.secretHash}`, gone: client.gone, source: client.host };
    if (client.id !== device.clientId) {
      await this.queue.check(check, () => this.verify(pw, device.secret));
      log?.debug({ client: client.id, device: device.id }, "connect refused: a device must use its own client id");
      return false;
    }
    const hit = this.verified.get(device.id);
    if (hit && hit.secretHash === device.secretHash && digestsEqual(hit.digest, digest)) return true;
    const ok = await this.queue.check(check, () => this.verify(pw, device.secret));
    if (!ok) {
      log?.debug({ client: client.id, device: device.id }, "connect refused: wrong secret");
      return false;
    }
    // The file may have changed while the login waited its turn: the device removed, its secret replaced.
    this.refresh(true);
    const now = this.config.devices.get(device.id);
    if (now?.secretHash !== device.secretHash || now.clientId !== device.clientId) {
      log?.info({ client: client.id, device: device.id }, "connect refused: the device changed while its login waited");
      return false;
    }
    this.verified.set(device.id, { secretHash: device.secretHash, digest });
    return true;
  }

  /**
   * Whether a connected device may keep its session when auth changes live: it logged in
   * through this registry with its device's current secret (or its certificate), on its own client id.
   */
  sessionValid(client: ClientInfo): boolean {
    if (client.username === null) return false;
    this.refresh(true);
    const device = this.config.devices.get(client.username);
    return (
      device !== undefined &&
      device.clientId === client.id &&
      // A certified client gave no secret: a new one for its device leaves it be.
      (client.certified === true || this.verified.get(device.id)?.secretHash === device.secretHash)
    );
  }

  /**
   * Publish ACL: anonymous clients (when allowed) are limited by the built-in rules only, and
   * never publish as a device's client id (e.g. a will stored before wills kept their user name).
   */
  mayPublish(client: ClientInfo, topic: string): boolean {
    const device = this.deviceOf(client);
    if (device === null) return !this.config.byClientId.has(client.id);
    return (
      device !== undefined && aclAllowsPublish(device.acl.publish, { clientId: client.id, username: device.id }, topic)
    );
  }

  /** Subscribe ACL: the filter must be covered by one of the device's patterns. */
  maySubscribe(client: ClientInfo, filter: string): boolean {
    const device = this.deviceOf(client);
    if (device === null) return true;
    return (
      device !== undefined &&
      aclAllowsSubscribe(device.acl.subscribe, { clientId: client.id, username: device.id }, filter)
    );
  }

  /** null = anonymous; undefined = a username that is (no longer) a device on this client id. */
  private deviceOf(client: ClientInfo): Device | null | undefined {
    if (client.username === null) return null;
    this.refresh();
    const device = this.config.devices.get(client.username);
    return device && device.clientId === client.id ? device : undefined;
  }

  private dummyHash(): Promise<Argon2Hash> {
    this.dummy ??= (async () => {
      const r = parseArgon2(await hashSecret(crypto.randomUUID()));
      if (!r.ok) throw new Error(r.problem);
      return r.value;
    })();
    return this.dummy;
  }
}

/** The broker hooks that enforce a registry (see `BrokerOptions`). */
export function deviceBrokerHooks(
  registry: DeviceRegistry,
): Required<
  Pick<BrokerOptions, "authenticate" | "authorizePublishTopic" | "authorizeSubscribeTopic" | "sessionValid">
> {
  return {
    authenticate: (client, password) => registry.authenticate(client, password),
    sessionValid: (client) => registry.sessionValid(client),
    authorizePublishTopic: (client, topic) => registry.mayPublish(client, topic),
    authorizeSubscribeTopic: (client, filter) => registry.maySubscribe(client, filter),
  };
}
