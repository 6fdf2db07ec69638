/**
 * (redeploy) How long an edit of fleet.toml takes to take effect (SPEC: "within 2 s"), while
 * episodes run: from the write to the new spec version being live with a newly added type's
 * instance deployed, read through the HTTP API. The baseline is the same edit applied by SIGHUP,
 * which reloads at once: the difference is the file watcher's wait for the file to settle
 * (gateway/fleet/reload.ts SETTLE_MS, a file written in place passes through truncated states).
 * Interleaved rounds on one gateway, medians and the worst round.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { BenchOptions, Row } from "./harness.ts";
import { fmt, killPid, quantile, until } from "./harness.ts";
import { connect } from "./mqttkit.ts";
import { benchFleet, NOOP_AGENT, startGateway, type GatewayProc } from "./procs.ts";

const ROUNDS = 5;
/** The contract's bound on an edit taking effect. */
const TARGET_MS = 2000;
/** Stimuli/s published throughout, so every reload happens while episodes run. */
const LOAD_PER_S = 40;
/** Between two edits: the watcher's late look at a SIGHUP-applied file has come and gone. */
const QUIET_MS = 2500;

/** The bench fleet with `n` extra agent types (one instance each): every edit adds one. */
function fleetWith(n: number): string {
  let text = benchFleet({ maxConcurrent: 2 });
  for (let i = 1; i <= n; i++)
    text += `\n[agents.extra${i}]\nmodule = ${JSON.stringify(NOOP_AGENT)}\ninstances = ["x"]\n`;
  return text;
}

/** Write the next edit, apply it (`how`), and time until the new version and type are live. */
async function applyMs(gw: GatewayProc, config: string, n: number, how: "edit" | "sighup"): Promise<number> {
  const before = (await gw.api<{ spec_version: string }>("/api/fleet")).spec_version;
  const began = performance.now();
  writeFileSync(config, fleetWith(n));
  if (how === "sighup") killPid(gw.pid, "SIGHUP");
  await until(
    `extra${n}/x after ${how === "edit" ? "the edit" : "SIGHUP"}`,
    async () => {
      const { spec_version } = await gw.api<{ spec_version: string }>("/api/fleet");
      if (spec_version === before) return null;
      const res = await fetch(`http://127.0.0.1:${gw.httpPort}/api/agents/extra${n}/x`, { headers: gw.headers });
      return res.ok ? true : null;
    },
    30_000,
    10,
  );
  return performance.now() - began;
}

/** Publish QoS 1 stimuli to the bench agents at LOAD_PER_S until stopped; the count sent. */
async function load(port: number): Promise<{ stop(): Promise<number> }> {
  const c = await connect(port, "redeploy-load");
  let sent = 0;
  const timer = setInterval(() => {
    const id = `l${sent++}`;
    void c.publishAsync(`bench/k${sent % 8}/t`, JSON.stringify({ id }), { qos: 1 }).catch(() => undefined);
  }, 1000 / LOAD_PER_S);
  return {
    stop: async () => {
      clearInterval(timer);
      await c.endAsync();
      return sent;
    },
  };
}

/** Run the section. */
export async function benchRedeploy(o: BenchOptions): Promise<Row[]> {
  const rounds = o.quick ? 2 : ROUNDS;
  o.log(`redeploy: ${rounds} rounds, an edit of fleet.toml vs the same edit by SIGHUP, ${LOAD_PER_S} stimuli/s`);
  const gw = await startGateway("redeploy", fleetWith(0));
  const config = join(gw.dataDir, "..", "fleet.toml");
  const edits: number[] = [];
  const sighups: number[] = [];
  let n = 0;
  const publisher = await load(gw.mqttPort);
  try {
    for (let r = 0; r < rounds; r++) {
      await Bun.sleep(QUIET_MS);
      edits.push(await applyMs(gw, config, ++n, "edit"));
      await Bun.sleep(QUIET_MS);
      sighups.push(await applyMs(gw, config, ++n, "sighup"));
      o.log(`  round ${r + 1}: edit ${edits.at(-1)!.toFixed(0)} ms, SIGHUP ${sighups.at(-1)!.toFixed(0)} ms`);
    }
  } finally {
    const sent = await publisher.stop();
    o.log(`  ${sent} stimuli published meanwhile`);
    await gw.stop();
  }
  const row = (metric: string, gateway: number, baseline: number): Row => ({
    section: "redeploy",
    metric,
    unit: "ms",
    gateway,
    baseline,
    ratio: gateway - baseline,
    ratioKind: "+",
    target: `<= ${fmt(TARGET_MS)} ms`,
    ok: gateway <= TARGET_MS,
    note: "baseline: the same edit applied by SIGHUP (no settle wait); the target is the gateway's own time",
  });
  return [
    row("fleet.toml edit -> live, median", quantile(edits, 0.5), quantile(sighups, 0.5)),
    row("fleet.toml edit -> live, worst round", Math.max(...edits), Math.max(...sighups)),
  ];
}
