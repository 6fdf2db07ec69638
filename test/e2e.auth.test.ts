/**
 * Who may call the HTTP API, and what it can never do: the gateway's own clock decides
 * retention (no client-supplied `now`), against a real gateway process.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { TestFleet, cleanupAll } from "./helpers/gateway.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

const TOML = fleetHeader("e2e-auth") + counterType("counter", "auth/+/in");

let fleet: TestFleet;

/** Call the API as the local operator; the body is parsed when it is JSON. */
async function call(path: string, init: RequestInit = {}): Promise<{ status: number; body: any }> {
  const headers = new Headers(init.headers);
  if (!headers.has("content-type")) headers.set("content-type", "application/json");
  const res = await fetch(fleet.httpUrl + path, { ...init, headers });
  const text = await res.text();
  try {
    return { status: res.status, body: JSON.parse(text) };
  } catch {
    return { status: res.status, body: text };
  }
}

const send = (topic: string, id: string) =>
  call("/api/send", { method: "POST", body: JSON.stringify({ topic, payload: { id }, id }) });

beforeAll(async () => {
  fleet = new TestFleet(TOML);
  await fleet.start();
}, 60_000);

afterAll(async () => {
  if (fleet?.running) expect(await fleet.stop()).toBe(0);
  await cleanupAll();
}, 60_000);

describe("retention runs on the gateway's clock", () => {
  test("POST /api/gc?now=<future> is refused and an already-processed id still starts no second episode", async () => {
    expect((await send("auth/gc/in", "once")).status).toBe(202);
    await fleet.waitCommitted("counter/gc", 1);

    const future = Date.now() + 400 * 86_400_000;
    const gc = await call(`/api/gc?now=${future}`, { method: "POST" });
    expect(gc.status).toBe(400);
    expect(gc.body.error.code).toBe("bad_query");
    const plain = await call("/api/gc", { method: "POST" });
    expect(plain.status).toBe(200);
    expect(plain.body.stimuliForgotten).toBe(0);

    const again = await send("auth/gc/in", "once");
    expect(again.status).toBe(200);
    expect(again.body.duplicates.length).toBe(1);
    expect(again.body.accepted).toEqual([]);
    const runs = await fleet.query("SELECT count(*) AS n FROM episodes WHERE agent = 'counter/gc'");
    expect(Number(runs[0]!.n)).toBe(1);
  }, 60_000);

  test("`fleet gc --now` is refused while the gateway runs unless it is a --dry-run preview", async () => {
    const future = String(Date.now() + 400 * 86_400_000);
    const refused = await fleet.cli("gc", "--config", fleet.configPath, "--now", future);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("--now works only with --dry-run or on a stopped gateway");
    const preview = await fleet.cli("gc", "--config", fleet.configPath, "--dry-run", "--now", future);
    expect(preview.code).toBe(0);
    expect(preview.json.stimuliForgotten).toBeGreaterThanOrEqual(1);
    expect((await send("auth/gc/in", "once")).body.duplicates.length).toBe(1);
  }, 60_000);
});
