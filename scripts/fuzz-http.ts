/**
 * Throws odd requests at a real gateway's HTTP API and webhooks and checks every answer is a
 * deliberate one: `bun scripts/fuzz-http.ts [--seconds 60] [--seed 1] [--verbose]`. Paths from the
 * API's routes with their segments and query values replaced (ids, prefixes, encodings, huge or
 * negative numbers), methods, tokens (the operator's, a wrong one, none), content types, bodies
 * (JSON, broken JSON, deep nesting, binary) and the headers the API reads (Idempotency-Key,
 * traceparent, Origin, Host). Ends non-zero on any 5xx other than a documented 503, on a request
 * the gateway did not answer, if it exits, or if it logs an error (level 50+).
 */
import { chooser } from "../test/helpers/seeded.ts";
import { finish, fuzzArgs, sinkAgent } from "./bench/fuzzkit.ts";
import { tempDir } from "./bench/harness.ts";
import { startGateway } from "./bench/procs.ts";

const values = fuzzArgs(60);
const { rand, int, pick } = chooser(values.seed);

const FLEET = `
[fleet]
name = "fuzz-http"
[broker]
host = "127.0.0.1"
allow_anonymous = true
[http]
host = "127.0.0.1"
${sinkAgent('instances = ["a", "b"]')}
[hooks.h]
agent = "sink/h"
[hooks.d]
type = "sink"
key_field = "device"
dedup = "id"
max_body_bytes = 4096
`;

const SEGMENTS = [
  "sink",
  "a",
  "b",
  "h",
  "nope",
  "",
  "%00",
  "%2F",
  "..",
  "%2e%2e",
  "x".repeat(300),
  "\u00e9",
  "%ZZ",
  "01",
  "0193a1b2-7c3d-7e4f-8a5b-6c7d8e9f0a1b",
  "0193",
  "-1",
  "9".repeat(30),
];
const NUMBERS = [
  "",
  "0",
  "1",
  "-1",
  "50",
  "1000",
  "1001",
  "1e3",
  "NaN",
  "Infinity",
  "0x10",
  "9".repeat(25),
  "1.5",
  "abc",
  "%00",
];
const ROUTES = [
  "/healthz",
  "/readyz",
  "/metrics",
  "/",
  "/api/fleet",
  "/api/rejected?limit=N&before=N",
  "/api/agents?page=N&limit=N&q=S&status=S&type=S",
  "/api/agents?after=S&limit=N",
  "/api/agents/S/S",
  "/api/agents/S/S/episodes?limit=N&before=N&status=S&kind=S",
  "/api/agents/S/S/wakeups?state=S&limit=N",
  "/api/agents/S/S/checkpoints?limit=N&before=N",
  "/api/agents/S/S/state?at=N",
  "/api/agents/S/S/state/diff?from=N&to=N",
  "/api/episodes/S",
  "/api/episodes/S/events?kind=S",
  "/api/episodes/S/trace",
  "/api/trace?topic=S&at=N",
  "/api/quarantine?limit=N",
  "/api/outputs?limit=N&before=N&agent=S",
  "/api/activity?minutes=N&type=S",
  "/api/audit?limit=N&before=N",
  "POST /api/agents/S/S/pause",
  "POST /api/agents/S/S/resume",
  "POST /api/agents/S/S/stimuli",
  "POST /api/send",
  "POST /api/episodes/S/replay",
  "POST /api/rollouts/S/promote",
  "POST /api/deploy/check",
  "POST /api/quarantine/N/retry",
  "POST /api/quarantine/N/drop",
  "POST /api/gc?dry_run=1",
  "POST /hooks/h",
  "POST /hooks/d",
  "POST /hooks/S",
];

/** A route's method (mostly the one it takes) and its path with each S and N filled in. */
function request(): { method: string; path: string } {
  // Retiring an agent is for good: the fuzz leaves "a" and "b" as they were, so its reads stay interesting.
  const route = pick(ROUTES);
  const post = route.startsWith("POST ");
  const method =
    rand() < 0.85 ? (post ? "POST" : "GET") : pick(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]);
  const path = route
    .replace(/^POST /, "")
    .replace(/S/g, () => pick(SEGMENTS))
    .replace(/N/g, () => pick(NUMBERS));
  return { method, path };
}

function deep(n: number): string {
  return "[".repeat(n) + "]".repeat(n);
}

function body(): BodyInit | undefined {
  switch (int(9)) {
    case 0:
      return undefined;
    case 1:
      return JSON.stringify({ id: int(1000), device: pick(SEGMENTS), t: rand() * 100 });
    case 2:
      return JSON.stringify({ to: `sink/${pick(SEGMENTS)}`, data: { x: 1 }, agent: pick(SEGMENTS) });
    case 3:
      return '{"id": 1, "device": "a"'; // cut
    case 4:
      return deep(1 + int(200));
    case 5:
      return new Uint8Array(Array.from({ length: int(64) }, () => int(256)));
    case 6:
      return JSON.stringify({
        id: pick([null, "", "x".repeat(300), 1.5, {}, [], true]),
        device: pick([1, null, {}, "a"]),
      });
    case 7:
      return "x".repeat(int(20_000));
    default:
      return JSON.stringify(pick([null, 1, "s", [], {}, { spec: "[fleet]\nname = 1" }]));
  }
}

function headers(token: string): Record<string, string> {
  const h: Record<string, string> = {};
  const auth = rand();
  if (auth < 0.75) h.authorization = `Bearer ${token}`;
  else if (auth < 0.85) h.authorization = "Bearer wrong";
  else if (auth < 0.9) h.authorization = pick(["Basic x", "Bearer", "", `bearer  ${token}`]);
  if (rand() < 0.7)
    h["content-type"] = pick([
      "application/json",
      "text/plain",
      "application/x-www-form-urlencoded",
      "multipart/form-data; boundary=x",
      "application/json; charset=latin1",
    ]);
  if (rand() < 0.2) h["idempotency-key"] = pick(["k1", "", "x".repeat(300), "\u00e9"]);
  if (rand() < 0.1)
    h.traceparent = pick([
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      "garbage",
      `00-${"0".repeat(32)}-${"0".repeat(16)}-01`,
    ]);
  if (rand() < 0.05) h.origin = pick(["http://evil.example", "null"]);
  if (rand() < 0.05) h.host = pick(["evil.example", "127.0.0.1:1"]);
  if (rand() < 0.05) h["x-fleet-signature"] = pick(["sha256=00", "md5=1", ""]);
  return h;
}

const dir = tempDir("fuzz-http");
const gw = await startGateway("fuzz-http", FLEET, { dir });
const token = gw.headers.authorization!.replace(/^Bearer /i, "");
const base = `http://127.0.0.1:${gw.httpPort}`;
const until = performance.now() + Number(values.seconds) * 1000;
const statuses = new Map<number, number>();
const bad: string[] = [];
let requests = 0;
let failure: string | null = null;

async function one(): Promise<void> {
  const { method, path } = request();
  const url = base + path;
  const init: RequestInit = { method, headers: headers(token), signal: AbortSignal.timeout(15_000) };
  if (method !== "GET" && method !== "HEAD") init.body = body() ?? null;
  let res: Response;
  try {
    res = await fetch(url, init);
  } catch (err) {
    bad.push(`${method} ${url}: no answer (${String(err)})`);
    return;
  }
  const text = await res.text().catch(() => "");
  statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
  // 503s the API documents: storage unavailable, not ready, hook unconfigured, too many bodies in flight.
  if (
    res.status >= 500 &&
    !(res.status === 503 && /storage_unavailable|hook_unconfigured|busy|not ready|in flight/.test(text))
  )
    bad.push(`${method} ${url}: ${res.status} ${text.slice(0, 300)}`);
}

try {
  while (performance.now() < until && bad.length < 20) {
    await Promise.all(Array.from({ length: 8 }, one));
    requests += 8;
    try {
      process.kill(gw.pid, 0);
    } catch {
      failure = "the gateway exited";
      break;
    }
  }
  const health = await fetch(`${base}/healthz`);
  if (health.status !== 200) failure ??= `/healthz answered ${health.status} after the fuzz`;
} catch (err) {
  failure = String(err);
}
await gw.stop();
const byStatus = [...statuses].sort((a, b) => a[0] - b[0]).map(([s, n]) => `${s}: ${n}`);
console.log(`${requests} requests, seed ${values.seed}; answers ${byStatus.join(", ")}`);
console.log(`unexpected answers: ${bad.length}`);
for (const b of bad.slice(0, 20)) console.log(`  ${b}`);
if (bad.length > 0) failure ??= `${bad.length} unexpected answer(s)`;
await finish(dir, failure, values.verbose);
