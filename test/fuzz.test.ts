/**
 * The fuzzers in scripts/ against a real gateway, briefly. fuzz-mqtt: raw TCP (or WebSocket)
 * connections send valid MQTT 3.1.1 and 5 packets with bytes flipped, cut, inserted or a bad remaining
 * length; a well-behaved device must still be acknowledged every 200 connections, and again after a
 * restart on the data dir the fuzz left. fuzz-http: the API's routes with odd segments, query values,
 * methods, tokens, bodies and headers. Each script exits non-zero if the gateway exits, stops
 * answering, answers 5xx (HTTP), writes to stderr or logs an error.
 */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { ROOT } from "./helpers/gateway.ts";

/** Run scripts/fuzz-<which>.ts for 6 s: its exit code and everything it printed. */
async function run(which: "mqtt" | "http", ...args: string[]): Promise<{ code: number; out: string }> {
  const proc = Bun.spawn([process.execPath, join(ROOT, `scripts/fuzz-${which}.ts`), "--seconds", "6", ...args], {
    cwd: ROOT,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  return { code: await proc.exited, out: out + err };
}

function counts(out: string): { connections: number; checks: number; stimuli: number; keys: string[] } {
  const m = /(\d+) fuzzed connections, (\d+) acknowledged checks, (\d+) stimuli recorded/.exec(out);
  const keys = /agents recorded: (.*)/.exec(out)?.[1] ?? "";
  if (!m) throw new Error(`no summary in the fuzzer's output:\n${out}`);
  return { connections: Number(m[1]), checks: Number(m[2]), stimuli: Number(m[3]), keys: keys ? keys.split(",") : [] };
}

describe("mutated MQTT from many connections", () => {
  test("the gateway stays up, logs no error and keeps acknowledging a device's QoS 1 publishes", async () => {
    const { code, out } = await run("mqtt", "--seed", "7");
    expect({ code, out }).toEqual({ code: 0, out: expect.any(String) });
    const c = counts(out);
    expect(c.connections).toBeGreaterThanOrEqual(200);
    expect(c.checks).toBeGreaterThanOrEqual(2);
    // Valid packets between the broken ones got through to the store.
    expect(c.stimuli).toBeGreaterThan(c.checks);
    // Anonymous clients may publish any sensor's readings: the fuzzed ones for "b" ran too.
    expect(c.keys).toContain("b");
    // What the fuzz left in the store (sessions, queues, retained messages, wills) loads: it starts again and serves.
    expect(out).toContain("restarted on the fuzzed data dir and served: yes");
  }, 60_000);

  test("with logins required, fuzzed and guessed CONNECTs record nothing outside the device's own topics", async () => {
    const { code, out } = await run("mqtt", "--seed", "21", "--auth");
    expect({ code, out }).toEqual({ code: 0, out: expect.any(String) });
    const c = counts(out);
    expect(c.checks).toBeGreaterThanOrEqual(2);
    expect(c.stimuli).toBeGreaterThan(c.checks);
    // Anonymous and guessing connections published to sensors/b/...: refused at CONNECT, so only the two
    // devices' own agents ran ("fz", which the fuzz logs in as, and "fzcheck", the checks' device).
    expect(c.keys.sort()).toEqual(["fz", "fzcheck"]);
  }, 60_000);

  test("on the libSQL broker persistence, fuzzed sessions leave the gateway serving, and it starts again", async () => {
    const { code, out } = await run("mqtt", "--seed", "31", "--auth", "--libsql");
    expect({ code, out }).toEqual({ code: 0, out: expect.any(String) });
    const c = counts(out);
    expect(c.checks).toBeGreaterThanOrEqual(2);
    expect(c.stimuli).toBeGreaterThan(c.checks);
    // broker.db with what the fuzz left (sessions, queues, QoS 2 state, wills) loads, and a device is served.
    expect(out).toContain("restarted on the fuzzed data dir and served: yes");
  }, 60_000);
});

describe("mutated MQTT over WebSocket", () => {
  test("binary frames cut anywhere, text frames and junk frames leave the gateway serving", async () => {
    const { code, out } = await run("mqtt", "--seed", "11", "--ws");
    expect({ code, out }).toEqual({ code: 0, out: expect.any(String) });
    expect(counts(out).checks).toBeGreaterThanOrEqual(2);
    // Half the connections went over the WebSocket listener, and it took them.
    expect(Number(/WebSocket connections opened: (\d+)/.exec(out)?.[1])).toBeGreaterThan(50);
  }, 60_000);
});

describe("odd HTTP requests (scripts/fuzz-http.ts)", () => {
  test("every route, method, token, body and header mix is answered on purpose: no 5xx, no error logged", async () => {
    const { code, out } = await run("http", "--seed", "3");
    expect({ code, out }).toEqual({ code: 0, out: expect.any(String) });
    const answers = /(\d+) requests, seed 3; answers (.*)/.exec(out);
    expect(Number(answers?.[1])).toBeGreaterThan(100);
    // Requests got past the token check to the routes' own answers, and some were refused there.
    expect(answers?.[2]).toMatch(/\b200: \d+/);
    expect(answers?.[2]).toMatch(/\b400: \d+/);
    expect(answers?.[2]).toMatch(/\b401: \d+/);
  }, 60_000);
});
