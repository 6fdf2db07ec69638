/**
 * `fleet device add|list|remove|rekey|export` and `fleet quarantine [retry|drop <seq>]`, called by
 * main.ts. Devices edit the file named by `[broker] devices` (a running gateway re-reads it
 * at the next CONNECT); quarantine goes through the running gateway's HTTP API, or writes
 * the data dir directly when the gateway is stopped (it is then the only writer).
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import { writeFileDurably } from "../durable.ts";
import { join, resolve } from "node:path";
import { auditLocal, listQuarantine, resolveQuarantined, type QuarantineItem } from "../ops/index.ts";
import { parseStrictInt } from "../parse.ts";
import type { Store } from "../store/index.ts";
import { liveFetch, liveRead, type LiveEndpoint } from "./live.ts";
import { table } from "./table.ts";
import { DEVICE_USAGE } from "./usage.ts";

/** What the command needs from main.ts. */
export interface CliContext {
  readonly json: boolean;
  readonly configPath: string;
  dataDir(): Promise<string>;
  /** The running gateway's HTTP base URL, or null when it is stopped. */
  running(): Promise<LiveEndpoint | null>;
  /**
   * The data dir's database, read-only; a NoFleetData error when there is none. A command that looks stored
   * values up (episode ids, outcomes: named `lookup`, as `fleet show`) gets a SchemaVersionError instead
   * when an older release stored them in another form: its lookups would find nothing.
   */
  openReadonly(lookup?: string): Promise<Store>;
  /**
   * The data dir's database for a command that writes to it (gateway stopped); a NoFleetData error when there is
   * none, a SchemaVersionError (nothing changed) when an older release wrote it: only `fleet start` upgrades.
   */
  openWritable(): Promise<Store>;
}

/** Flags of `fleet device add`. */
export interface DeviceFlags {
  readonly publish?: readonly string[];
  readonly subscribe?: readonly string[];
  readonly clientId?: string;
  /** `device export --mosquitto DIR`: where the password and ACL files go. */
  readonly mosquitto?: string;
}

function usage(message: string): number {
  console.error(`fleet: ${message}\n\n${DEVICE_USAGE}`);
  return 2;
}

function out(ctx: CliContext, data: unknown, human: () => string): void {
  console.log(ctx.json ? JSON.stringify(data, null, 2) : human());
}

/** The devices registry and the spec loader: `device` commands load them, `quarantine` needs neither. */
const registry = () => import("../devices/index.ts");
const specs = () => import("../spec/index.ts");

async function devicesFile(ctx: CliContext): Promise<string> {
  const [{ DevicesError }, { loadSpec }] = await Promise.all([registry(), specs()]);
  const file = (await loadSpec(ctx.configPath)).spec.broker.devices_file;
  if (file === null)
    throw new DevicesError(ctx.configPath, 'names no devices file: add `devices = "devices.toml"` under [broker]');
  return file;
}

/** `fleet device <add|list|remove> ...` */
export async function deviceCommand(args: readonly string[], flags: DeviceFlags, ctx: CliContext): Promise<number> {
  const [sub, id] = args;
  const { addDevice, DevicesError, listDevices, loadDevices, rekeyDevice, removeDevice } = await registry();
  try {
    switch (sub) {
      case "add": {
        if (!id) return usage("device add needs a device id");
        const file = await devicesFile(ctx);
        const r = await addDevice(file, id, {
          publish: flags.publish,
          subscribe: flags.subscribe,
          clientId: flags.clientId,
        });
        const device = loadDevices(file).devices.get(id);
        const clientId = device?.clientId ?? id;
        const noAcl = device && device.acl.publish.length === 0 && device.acl.subscribe.length === 0;
        out(ctx, { id: r.id, secret: r.secret }, () =>
          [
            `added device ${id} to ${file}`,
            `secret: ${r.secret}`,
            `This secret is shown only now; the file keeps only hashes of it (argon2id, and $7$ for Mosquitto).`,
            `MQTT login: username "${id}", password = the secret, client id "${clientId}".`,
            ...(noAcl
              ? [
                  "note: no publish/subscribe patterns (here or in [defaults]): " +
                    "the device may connect but not publish or subscribe.",
                ]
              : []),
          ].join("\n"),
        );
        return 0;
      }
      case "list": {
        const file = await devicesFile(ctx);
        const devices = listDevices(file);
        const defaults = loadDevices(file).defaults;
        out(ctx, { file, defaults, devices }, () => {
          const rows = devices.map((d) => ({
            ...d,
            publish: d.publish.join(" "),
            subscribe: d.subscribe.join(" "),
            created: d.created?.slice(0, 19).replace("T", " "),
          }));
          const dflt =
            defaults.publish.length + defaults.subscribe.length > 0
              ? `\ndefaults: publish ${defaults.publish.join(" ") || "-"}; ` +
                `subscribe ${defaults.subscribe.join(" ") || "-"}`
              : "";
          return (
            `${table(rows, ["id", "client_id", "publish", "subscribe", "created"])}\n${devices.length} ` +
            `device(s) in ${file}${dflt}`
          );
        });
        return 0;
      }
      case "remove": {
        if (!id) return usage("device remove needs a device id");
        const file = await devicesFile(ctx);
        if (!removeDevice(file, id)) {
          console.error(`fleet: no device ${id} in ${file}`);
          return 1;
        }
        out(
          ctx,
          { ok: true, removed: id },
          () =>
            `removed device ${id} (it can no longer connect; a running gateway ` +
            `closes its live session within about a second)`,
        );
        return 0;
      }
      case "rekey": {
        if (!id) return usage("device rekey needs a device id");
        const r = await rekeyDevice(await devicesFile(ctx), id);
        out(ctx, { id: r.id, secret: r.secret }, () =>
          [
            `new secret for device ${id} in ${r.file}`,
            `secret: ${r.secret}`,
            "This secret is shown only now. The old one no longer logs in (re-export for Mosquitto).",
          ].join("\n"),
        );
        return 0;
      }
      case "export":
        return exportMosquitto(ctx, flags.mosquitto);
      default:
        return usage(sub ? `unknown device command "${sub}"` : "device needs add, list, remove, rekey or export");
    }
  } catch (err) {
    if (!(err instanceof DevicesError)) throw err;
    console.error(`fleet: ${err.message}`);
    return 1;
  }
}

/** `fleet device export --mosquitto DIR`: nothing is written unless every device can be expressed. */
async function exportMosquitto(ctx: CliContext, dir: string | undefined): Promise<number> {
  if (!dir) return usage("device export needs --mosquitto DIR");
  const [{ DevicesError, loadDevices, mosquittoExport, mosquittoHash }, { loadSpec }] = await Promise.all([
    registry(),
    specs(),
  ]);
  const spec = (await loadSpec(ctx.configPath)).spec;
  const file = spec.broker.devices_file;
  if (file === null)
    throw new DevicesError(ctx.configPath, 'names no devices file: add `devices = "devices.toml"` under [broker]');
  const ext = spec.broker.external;
  const password = ext?.password_env ? process.env[ext.password_env] : undefined;
  const gateway = ext?.username
    ? { username: ext.username, passwordHash: password ? mosquittoHash(password) : null }
    : null;
  const r = mosquittoExport(loadDevices(file), gateway, new Date());
  if (!r.ok) {
    if (ctx.json) out(ctx, { ok: false, problems: r.problems }, () => "");
    for (const p of r.problems) console.error(`fleet: ${file}: ${p}`);
    console.error("fleet: nothing written");
    return 1;
  }
  mkdirSync(dir, { recursive: true });
  const passwd = join(resolve(dir), "passwd");
  const acl = join(resolve(dir), "acl");
  // Each replaced whole (and kept by its owner, e.g. mosquitto): a broker reloading meanwhile reads the old or the new.
  writeFileDurably(passwd, r.passwd, 0o600);
  writeFileDurably(acl, r.acl, existsSync(acl) ? statSync(acl).mode & 0o777 : 0o644);
  const devices = loadDevices(file).devices.size;
  out(ctx, { ok: true, passwd, acl, devices, notes: r.notes }, () =>
    [
      `wrote ${passwd} and ${acl} (${devices} device(s))`,
      ...r.notes.map((n) => `note: ${n}`),
      "In mosquitto.conf (files readable by the mosquitto user; reload with SIGHUP after a re-export):",
      "  allow_anonymous false",
      `  password_file ${passwd}`,
      `  acl_file ${acl}`,
    ].join("\n"),
  );
  return 0;
}

function quarantineTable(items: readonly QuarantineItem[]): string {
  const rows = items.map((q) => ({
    seq: q.seq,
    agent: q.agent,
    stimulus: q.sid.length > 24 ? `${q.sid.slice(0, 23)}…` : q.sid,
    attempts: q.attempts,
    error: (q.last_error ?? "").split("\n")[0]!.slice(0, 60),
    episodes: q.episodes.join(","),
  }));
  return (
    `${table(rows, ["seq", "agent", "stimulus", "attempts", "error", "episodes"])}\n${items.length} ` +
    `quarantined stimulus(es)`
  );
}

/** `fleet quarantine [retry|drop <seq>]` */
export async function quarantineCommand(args: readonly string[], limitFlag: number, ctx: CliContext): Promise<number> {
  const [sub, seqText] = args;
  const limit = Number.isSafeInteger(limitFlag) && limitFlag > 0 ? Math.min(limitFlag, 10_000) : 100;
  const live = await ctx.running();
  if (sub === undefined || sub === "list") {
    let items: QuarantineItem[];
    if (live) {
      items = (await liveRead<{ stimuli: QuarantineItem[] }>(live, `/api/quarantine?limit=${limit}`, "quarantine"))
        .stimuli;
    } else {
      const store = await ctx.openReadonly();
      items = await listQuarantine(store, limit);
      await store.close();
    }
    out(ctx, { stimuli: items }, () => quarantineTable(items));
    return 0;
  }
  if (sub !== "retry" && sub !== "drop") return usage(`unknown quarantine command "${sub}"`);
  if (!seqText) return usage(`quarantine ${sub} needs a stimulus seq (the SEQ column)`);
  const parsedSeq = parseStrictInt(seqText, { name: "stimulus seq (the SEQ column)", min: 0 });
  if (!parsedSeq.ok) return usage(`quarantine ${sub}: ${parsedSeq.message}`);
  const seq = parsedSeq.value;
  let result: { ok: boolean; agent?: string; message?: string };
  if (live) {
    const res = await liveFetch(live, `/api/quarantine/${seq}/${sub}`, { method: "POST" });
    const body = (await res.json()) as { agent?: string; error?: { message: string } };
    result = res.ok
      ? { ok: true, agent: body.agent }
      : { ok: false, message: body.error?.message ?? `HTTP ${res.status}` };
  } else {
    const store = await ctx.openWritable();
    try {
      const r = await resolveQuarantined(store, seq, sub);
      result = r.ok ? { ok: true, agent: r.agent } : { ok: false, message: r.message };
      // Recorded as the running gateway records POST /api/quarantine/<seq>/<action> (http/access.ts).
      const status = r.ok ? 200 : r.code === "not_found" ? 404 : 409;
      await auditLocal(store, { action: `quarantine.${sub}`, target: `stimulus ${seq}`, status });
    } finally {
      await store.close();
    }
  }
  if (!result.ok) {
    if (ctx.json) out(ctx, { ok: false, seq, error: result.message }, () => "");
    console.error(`fleet: ${result.message}`);
    return 1;
  }
  const what =
    sub === "retry"
      ? `requeued for ${result.agent}${live ? "" : " (gateway stopped; runs at next start)"}`
      : `dropped (was for ${result.agent})`;
  out(ctx, { ok: true, seq, agent: result.agent, action: sub }, () => `stimulus ${seq} ${what}`);
  return 0;
}
