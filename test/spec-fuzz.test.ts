/**
 * The shipped fleet.toml, mutated a few thousand ways (lines dropped, repeated or cut by a stray
 * character; values of every TOML type put where others belong; unknown keys, dotted keys and
 * tables added): `compileSpec` either compiles it or throws a SpecError that names the file, line
 * and column, never another error and never a message with a hole in it. The same for a devices
 * file and `compileDevices`.
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { compileDevices, DevicesError } from "../gateway/devices/index.ts";
import { compileSpec, type ConfigFileError, SpecError } from "../gateway/spec/index.ts";
import { ROOT, seeded } from "./helpers/gateway.ts";

const FILE = join(ROOT, "fleet.toml");
const BASE = readFileSync(FILE, "utf8");

const VALUES = [
  '""',
  '"x"',
  "0",
  "-1",
  "1e400",
  "nan",
  "inf",
  "true",
  "[]",
  '[1, "a"]',
  "{}",
  "{ a = 1 }",
  "1979-05-27T07:32:00Z",
  '"5m"',
  '"* * * * *"',
  '"#"',
  '"+/+"',
  '"{9}"',
  "9999999999999999999",
  '"\\u0000"',
  "[[]]",
  '"../../etc/passwd"',
];
const KEYS = ["subscribe", "key", "every", "cron", "tools", "publish", "config", "budget", "instances", "dedup"];
const MORE_KEYS = ["module", "max_queue", "retry", "checkpoint", "rollout", "warm_spares", "port", "max_packet_bytes"];
const TABLES = [
  "[agents.x]",
  "[agents.x.budget]",
  "[[agents]]",
  "[hooks.h]",
  "[fleet]",
  "[broker]",
  '[agents."a b"]',
  "[agents.temp-monitor.retry]",
  "[agents.temp-monitor.rollout]",
  "[replication]",
  "[telemetry]",
  "[sources.s]",
];
const STRAYS = ["[", "]", "=", '"', "'", "#", "\\", "\u0000", "{", "}", ",", "\t"];

/** A devices file as `fleet device add` writes it, with defaults and every per-device key. */
const DEVICES = `[defaults]
publish = ["fleet/agents/+/%u/inbox"]
subscribe = ["fleet/agents/+/%u/out"]

[devices.boiler-1]
secret = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
publish = ["sensors/%c/#"]
subscribe = ["alerts/%u/#"]
client_id = "boiler-1"
created = "2025-01-01T00:00:00.000Z"

[devices."boiler.2"]
secret = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
publish = ["sensors/%u/#", "fleet/agents/t/%u/inbox"]
`;
const DEVICE_KEYS = ["secret", "publish", "subscribe", "client_id", "created", "mosquitto_secret"];
const DEVICE_VALUES = ['"a/#/b"', '"$SYS/#"', '"%c/+"', '"x/%z"', '"$argon2id$v=19$m=1,t=1,p=1$$"', '"a b"', '"#"'];
const DEVICE_TABLES = ["[devices.x]", "[devices]", "[[devices]]", "[defaults]", '[devices."a/b"]', "[other]"];

function mutator(seed: number, base = BASE, keys = [KEYS, MORE_KEYS], tables = TABLES, values = VALUES): () => string {
  const rand = seeded(seed);
  const int = (n: number): number => Math.floor(rand() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  const key = (): string => pick(pick(keys));
  return () => {
    const lines = base.split("\n");
    for (let k = 0; k < 1 + int(3); k++) {
      const i = int(lines.length);
      const line = lines[i] ?? "";
      switch (int(8)) {
        case 0:
          lines.splice(i, 1);
          break;
        case 1:
          lines.splice(i, 0, line);
          break;
        case 2: {
          const m = /^(\s*[\w.-]+\s*=\s*)/.exec(line);
          if (m) lines[i] = m[1] + pick(values);
          break;
        }
        case 3:
          lines.splice(i, 0, `${key()} = ${pick(values)}`);
          break;
        case 4: {
          const at = int(line.length + 1);
          lines[i] = line.slice(0, at) + pick(STRAYS) + line.slice(at);
          break;
        }
        case 5:
          lines.splice(i, 0, pick(tables));
          break;
        case 6:
          lines[i] = line.replace(/\d+/, () => pick(["0", "-5", "99999999999", "1.5"]));
          break;
        default:
          lines.splice(i, 0, `${key()}.${key()} = ${pick(values)}`);
      }
    }
    return lines.join("\n");
  };
}

/**
 * Compile 2,000 texts from `next` as `file`: how many compiled and were refused, and each refusal that
 * was not an `errorClass` naming the file, line and column with a whole message (with its text).
 */
async function fuzzCompile(
  next: () => string,
  compile: (text: string, file: string) => unknown,
  errorClass: typeof ConfigFileError,
  file: string,
): Promise<{ compiled: number; refused: number; wrong: string[] }> {
  const out = { compiled: 0, refused: 0, wrong: [] as string[] };
  for (let i = 0; i < 2000; i++) {
    const text = next();
    try {
      await compile(text, file);
      out.compiled++;
    } catch (err) {
      out.refused++;
      const ok =
        err instanceof errorClass &&
        err.line !== null &&
        err.message.startsWith(`${file}:${err.line}:${err.column}: `) &&
        !/undefined|\[object|NaN/.test(err.message);
      if (!ok) out.wrong.push(`${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}\n${text}`);
    }
  }
  return out;
}

describe("mangled configuration files", () => {
  test("a mangled fleet.toml compiles, or fails with a SpecError at a line and column", async () => {
    const r = await fuzzCompile(mutator(13), compileSpec, SpecError, FILE);
    expect(r.wrong.slice(0, 3)).toEqual([]);
    // Both outcomes happen: the mutations reach the schema's checks, not only the TOML parser.
    expect(r.compiled).toBeGreaterThan(100);
    expect(r.refused).toBeGreaterThan(1000);
  }, 60_000);

  test("a mangled devices file compiles, or fails with a DevicesError at a line and column", async () => {
    const next = mutator(29, DEVICES, [DEVICE_KEYS], DEVICE_TABLES, [...VALUES, ...DEVICE_VALUES]);
    const r = await fuzzCompile(next, compileDevices, DevicesError, "/etc/fleet/devices.toml");
    expect(r.wrong.slice(0, 3)).toEqual([]);
    expect(r.compiled).toBeGreaterThan(100);
    expect(r.refused).toBeGreaterThan(1000);
  });
});
