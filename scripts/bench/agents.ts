/**
 * (d) what idle agents cost: gateway RSS with many agents vs an idle gateway with none,
 * and no agent subprocess left behind once their episodes finished.
 *
 * Driving 10,000 agents through an episode each takes minutes at this machine's episode
 * rate, so by default the agents are deployed as `instances` in fleet.toml (real agent
 * rows, each with its retained status topic) and a subset of them then gets one MQTT
 * stimulus each and runs a real episode (checkpoint, outbox, status). `--all-episodes`
 * sends a stimulus to every agent instead (slow; the faithful variant).
 */
import type { BenchOptions, Row } from "./harness.ts";
import { readFileSync } from "node:fs";
import { childPids, deltaRow, descendantPids, fmt, until } from "./harness.ts";
import { collect, connect, json, publishWindowed } from "./mqttkit.ts";
import { benchFleet, startGateway, type GatewayProc } from "./procs.ts";

const SETTLE_MS = 2000;

type Health = { agents: { total: number }; running_episodes: number; queued_stimuli: number; spares?: number[] };

async function settledRssMb(gw: GatewayProc): Promise<number> {
  await Bun.sleep(SETTLE_MS);
  const kb = gw.rssKb();
  if (kb === null) throw new Error("agents: the gateway is gone");
  return kb / 1024;
}

/** Run section (d). */
export async function benchAgents(o: BenchOptions & { allEpisodes: boolean }): Promise<Row[]> {
  const agents = o.quick ? 1_000 : 10_000;
  const driven = o.allEpisodes ? agents : o.quick ? 120 : 1_000;
  o.log(`agents: ${agents} agents deployed via fleet.toml instances, ${driven} of them run one episode each`);

  const idle = await startGateway("agents-idle", benchFleet({ maxConcurrent: 4 }));
  const idleMb = await settledRssMb(idle);
  await idle.stop();
  o.log(`  idle gateway, 0 agents: ${idleMb.toFixed(1)} MB`);

  const keys = Array.from({ length: agents }, (_, i) => `a${i}`);
  const gw = await startGateway("agents", benchFleet({ maxConcurrent: 4, instances: keys }));
  const deployed = await gw.api<Health>("/api/fleet");
  if (deployed.agents.total !== agents)
    throw new Error(`agents: expected ${agents} agents, /api/fleet says ${deployed.agents.total}`);
  const beforeMb = await settledRssMb(gw);
  o.log(`  ${agents} agents deployed, before episodes: ${beforeMb.toFixed(1)} MB`);

  const client = await connect(gw.mqttPort, "bench-agents");
  const committed = await collect(client, "fleet/episodes", (_t, p) =>
    json<{ status: string }>(p)?.status === "committed" ? true : null,
  );
  let maxChildren = 0;
  // Direct children of the gateway are episode roots (prlimit execs; bwrap forks below it),
  // except idle warm spares (started ahead of need, listed by /api/fleet): a spare listed
  // before or after the scan is not running an episode.
  const spares = async () => (await gw.api<Health>("/api/fleet")).spares ?? [];
  let sampling = false;
  const sampler = setInterval(async () => {
    if (sampling) return;
    sampling = true;
    try {
      const before = await spares();
      const kids = childPids(gw.pid);
      const idle = new Set([...before, ...(await spares())]);
      maxChildren = Math.max(maxChildren, kids.filter((p) => !idle.has(p)).length);
    } finally {
      sampling = false;
    }
  }, 50);
  const began = performance.now();
  let lastLog = began;
  await publishWindowed(client, driven, o.window, (i) => ({
    topic: `bench/a${i}/t`,
    payload: JSON.stringify({ id: `a${i}`, n: i }),
  }));
  await until(
    `${driven} committed episodes`,
    () => {
      if (performance.now() - lastLog > 10_000) {
        lastLog = performance.now();
        o.log(`  ... ${committed.matched.length}/${driven} episodes`);
      }
      return committed.matched.length >= driven ? true : null;
    },
    Math.max(60_000, driven * 100),
    20,
  );
  const episodeSecs = (performance.now() - began) / 1000;
  clearInterval(sampler);
  committed.close();
  await until(
    "the fleet to go quiet",
    async () => {
      const h = await gw.api<Health>("/api/fleet");
      return h.running_episodes === 0 && h.queued_stimuli === 0 ? h : null;
    },
    30_000,
    100,
  );
  const afterMb = await settledRssMb(gw);
  // Processes left = everything under the gateway outside the idle spares' process groups.
  const idleGroups = new Set(await spares());
  const left = descendantPids(gw.pid).filter((p) => !idleGroups.has(pgidOf(p)));
  const total = (await gw.api<Health>("/api/fleet")).agents.total;
  o.log(
    `  after ${driven} episodes (${(driven / episodeSecs).toFixed(1)}/s): ${afterMb.toFixed(1)} ` +
      `MB; ${left.length} subprocess(es) left, at most ${maxChildren} at once; ${total} agents`,
  );
  await gw.stop();

  const kb = (mb: number) => `${(((mb - idleMb) * 1024) / agents).toFixed(1)} KB/agent`;
  return [
    deltaRow(
      "agents",
      `RSS, ${fmt(agents)} agents deployed vs idle (0 agents)`,
      "MB",
      beforeMb,
      idleMb,
      null,
      `${kb(beforeMb)}; includes ${fmt(agents)} retained status messages in aedes' memory`,
    ),
    deltaRow(
      "agents",
      `RSS, after ${fmt(driven)} of them ran an episode vs idle`,
      "MB",
      afterMb,
      idleMb,
      null,
      kb(afterMb),
    ),
    deltaRow("agents", "agent subprocesses left after episodes", "", left.length, 0, 0),
    deltaRow("agents", "most episode subprocesses at once", "", maxChildren, 4, 0, "max_concurrent_episodes = 4"),
  ];
}

/** A process's group (field 5 of /proc/<pid>/stat); -1 when it is gone. */
export function pgidOf(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
  } catch {
    return -1;
  }
}
