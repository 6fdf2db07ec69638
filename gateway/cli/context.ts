/**
 * What every `fleet` command shares: the parsed flags, where the config and data dir are,
 * whether a gateway is running, and how output is printed (human text or `--json`).
 * main.ts builds one `Cli` from the command line and hands it to the command it runs. The store, the spec
 * loader and the token file are imported when a command first asks for them, so a call loads only what it uses.
 */
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { CliContext } from "./devices.ts";
import { parseStrictInt } from "../parse.ts";
import { processRuns } from "../pids.ts";
import type { Store } from "../store/index.ts";
import type { LiveEndpoint } from "./live.ts";
import { OperatorError } from "../errors.ts";

/** A bad command line: main.ts prints the message with the usage and exits 2. */
export class UsageError extends Error {}

/** The data dir holds no fleet database (a wrong --data-dir, or no gateway started there yet): one line, exit 1. */
export class NoFleetData extends OperatorError {
  override readonly name = "NoFleetData";
}

/** A numeric flag or argument parsed strictly: `dflt` when absent, a UsageError naming it when bad. */
export function intArg(
  name: string,
  raw: string | undefined,
  dflt: number,
  bounds: { min?: number; max?: number },
): number;
export function intArg(
  name: string,
  raw: string | undefined,
  dflt: undefined,
  bounds: { min?: number; max?: number },
): number | undefined;
export function intArg(
  name: string,
  raw: string | undefined,
  dflt: number | undefined,
  bounds: { min?: number; max?: number },
): number | undefined {
  if (raw === undefined) return dflt;
  const v = parseStrictInt(raw, { name, ...bounds });
  if (!v.ok) throw new UsageError(v.message);
  return v.value;
}

/** The flags main.ts parses (every one optional on the command line). */
export interface CliFlags {
  readonly config?: string;
  readonly "data-dir"?: string;
  readonly "mqtt-port"?: string;
  readonly "http-port"?: string;
  readonly json: boolean;
  readonly agent?: string;
  readonly type?: string;
  readonly status?: string;
  readonly kind?: string;
  readonly state?: string;
  readonly limit?: string;
  readonly page?: string;
  readonly id?: string;
  readonly module?: string;
  readonly "dry-run": boolean;
  readonly now?: string;
  readonly scope?: string;
  readonly before?: string;
  readonly publish?: string[];
  readonly subscribe?: string[];
  readonly "client-id"?: string;
  /** `device export --mosquitto DIR`. */
  readonly mosquitto?: string;
  /** Read the central database at this URL instead of the data dir. */
  readonly central?: string;
  /** With --central: one fleet (name) or gateway (id). */
  readonly fleet?: string;
  /** With --central and `fleet central`: the env var holding the central server's token. */
  readonly "token-env"?: string;
  /** `fleet central`: the central server's URL, where to listen. */
  readonly url?: string;
  readonly port?: string;
  readonly host?: string;
  /** `state --at SEQ`, `trace --at TIME`. */
  readonly at?: string;
  /** `state --diff A..B`. */
  readonly diff?: string;
  /** `trace --topic T`. */
  readonly topic?: string;
  /** `retire --drain`: finish the queued stimuli first. */
  readonly drain?: boolean;
  /** `deploy --check`: replay history against the candidate instead of applying anything. */
  readonly check?: boolean;
  /** `deploy --check`: committed episodes per sampled agent, agents per changed type. */
  readonly episodes?: string;
  readonly agents?: string;
  /** `reshard --from DIR1,DIR2 --to N --out PREFIX`. */
  readonly from?: string;
  readonly to?: string;
  readonly out?: string;
  /** `reshard --partial`: the sources may be only some shards of their layout. */
  readonly partial?: boolean;
  /** `reshard --to N --create-sessions`: the new layout's broker sessions, before the gateways stop. */
  readonly "create-sessions"?: boolean;
  readonly help: boolean;
}

/** A running gateway, as its `gateway.json` and a live pid say. */
export interface LiveGateway extends LiveEndpoint {
  readonly mqtt_port: number;
}

/** What a command gets: the flags and the environment derived from them. */
export interface Cli extends CliContext {
  readonly flags: CliFlags;
  dataDir(): Promise<string>;
  running(): Promise<LiveGateway | null>;
  /** Print `data` as JSON with --json, else the human text. */
  print(data: unknown, human: () => string): void;
}

/** A database an older release wrote, opened read-only by this command (it is upgraded at a gateway's start). */
let olderSchema: {
  readonly file: string;
  readonly found: number;
  readonly supported: number;
  readonly hint: string;
} | null = null;

/** Why a read of an older data dir failed, in its words, for an error naming what is missing; else null. */
export function olderSchemaHint(reason: string): string | null {
  if (olderSchema === null || !/no such (table|column)/.test(reason)) return null;
  return (
    `${olderSchema.file} has schema version ${olderSchema.found}, older than this code's ${olderSchema.supported}, ` +
    `and this command reads what the upgrade adds (${reason}): ${olderSchema.hint}`
  );
}

/** The command environment for these flags (and FLEET_CONFIG / FLEET_DATA_DIR). */
export function createCli(flags: CliFlags): Cli {
  const configPath = resolve(flags.config ?? process.env.FLEET_CONFIG ?? "fleet.toml");

  async function dataDir(): Promise<string> {
    if (flags["data-dir"]) return resolve(flags["data-dir"]);
    if (process.env.FLEET_DATA_DIR) return resolve(process.env.FLEET_DATA_DIR);
    if (!existsSync(configPath)) return resolve(".fleet"); // the default [fleet] data_dir
    try {
      const { loadSpec } = await import("../spec/index.ts");
      return resolve((await loadSpec(configPath)).spec.fleet.data_dir);
    } catch (err) {
      // A fleet.toml that does not load (say an edit the running gateway refused) still names the data dir the
      // gateway runs on; a file that is not even TOML names none, and ./.fleet would be a stray fleet.
      const named = await dataDirNamedIn(configPath);
      if (named === null) throw err;
      return resolve(named);
    }
  }

  async function running(): Promise<LiveGateway | null> {
    const dir = await dataDir();
    const file = join(dir, "gateway.json");
    if (!existsSync(file)) return null;
    try {
      const g = JSON.parse(readFileSync(file, "utf8")) as {
        http_port: number;
        mqtt_port: number;
        pid: number;
        pid_start?: string;
        boot_id?: string;
        https?: boolean;
      };
      // A gateway killed with -9 (or a power cut) leaves its gateway.json, whose pid may be another process's by now.
      if (!processRuns(g.pid, g.pid_start, g.boot_id)) return null;
      const { readLocalToken } = await import("../auth/index.ts");
      return {
        http: `${g.https ? "https" : "http"}://127.0.0.1:${g.http_port}`,
        mqtt_port: g.mqtt_port,
        token: readLocalToken(dir),
      };
    } catch {
      return null;
    }
  }

  async function databaseFile(): Promise<string> {
    const dir = await dataDir();
    const file = join(dir, "fleet.db");
    if (!existsSync(file))
      throw new NoFleetData(`no fleet data in ${dir} (start the gateway first, or pass --data-dir)`);
    return file;
  }

  async function openReadonly(lookup?: string): Promise<Store> {
    const file = await databaseFile();
    const { Store, schemaVersion, SCHEMA_VERSION, SchemaVersionError, STORED_FORMS_VERSION, UPGRADE_HINT } =
      await import("../store/index.ts");
    const store = await Store.open(file, { synchronous: "normal", readonly: true });
    const found = await schemaVersion(store.client);
    if (found < SCHEMA_VERSION) olderSchema = { file, found, supported: SCHEMA_VERSION, hint: UPGRADE_HINT };
    if (lookup !== undefined && found > 0 && found < STORED_FORMS_VERSION) {
      await store.close();
      throw new SchemaVersionError(
        found,
        SCHEMA_VERSION,
        `${file} has schema version ${found}, older than this code's ${SCHEMA_VERSION}, and ${lookup} looks ` +
          `episodes up by ids and outcomes in the form schema ${STORED_FORMS_VERSION} stores them: ${UPGRADE_HINT}`,
      );
    }
    return store;
  }

  async function openWritable(): Promise<Store> {
    const file = await databaseFile();
    const { Store } = await import("../store/index.ts");
    return Store.open(file, { synchronous: "full" });
  }

  return {
    flags,
    json: flags.json,
    configPath,
    dataDir,
    running,
    openReadonly,
    openWritable,
    print: (data, human) => console.log(flags.json ? JSON.stringify(data, null, 2) : human()),
  };
}

/** `[fleet] data_dir` of a fleet.toml that parses as TOML (the default when it has none), else null. */
async function dataDirNamedIn(file: string): Promise<string | null> {
  const { parse: parseToml } = await import("smol-toml");
  try {
    const doc = parseToml(readFileSync(file, "utf8")) as { fleet?: { data_dir?: unknown } };
    const named = doc.fleet?.data_dir ?? ".fleet";
    return typeof named === "string" && named !== "" ? named : null;
  } catch {
    return null;
  }
}

/** A timestamp as `YYYY-MM-DD HH:MM:SS` (UTC), or "-" for none (0 is the epoch: `ctx.wakeAt(0)`). */
export const when = (ms: number | null): string =>
  ms === null ? "-" : new Date(ms).toISOString().replace("T", " ").slice(0, 19);

export { table } from "./table.ts";
