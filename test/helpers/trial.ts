/**
 * A crash trial with every way into the fleet at once: devices' readings fanned out to two agent
 * types, webhooks, agents sending to each other and setting wake-ups, with a durable broker and a
 * subscriber that keeps a session, while the gateway is killed with SIGKILL one to three times at
 * seeded moments (mid-burst, or while it recovers the last one's backlog) or stopped gracefully, with
 * fleet.toml hot-reloaded, a new release of the ledger's code deployed (state version 2, with a
 * `migrate`), and agents paused and resumed in between. Devices and webhook callers retry
 * what was not acknowledged, as real ones do. Optionally on a real Mosquitto as the external broker, and
 * replicating to a real central server that is killed too.
 *
 * After the last start it checks what the contract promises (docs/guarantees.md), and returns every
 * breach it finds rather than stopping at the first: each acknowledged stimulus committed exactly
 * once by each agent it was routed to, each committed send delivered and each committed wake-up
 * fired exactly once (and none that no committed episode made), each agent's state and checkpoint
 * chain matching its committed history (and the code release that wrote each checkpoint: never the
 * old one after the new, the migration once per agent), nothing left queued, pending or quarantined, `fleet verify`
 * clean, and every committed episode's summary delivered to the persistent subscriber.
 *
 * The suite runs a few seeds (test/e2e.crash-trials.test.ts); `bun scripts/crash-trials.ts` runs a
 * campaign of many.
 */
import { cpSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, connectAsync, type MqttClient } from "mqtt";
import { ownerShard, shardFleetName } from "../../gateway/shard.ts";
import { idOfSql, STATUS_COMMITTED } from "../../gateway/store/index.ts";
import { fixture, runCli, TestFleet, waitFor } from "./gateway.ts";
import { Mosquitto } from "./mosquitto.ts";
import { caughtUp, expectCentralEqualsLocal, replicationToml } from "./replication.ts";
import { Sqld } from "./sqld.ts";
import { chooser } from "./seeded.ts";
import { agentType, fleetHeader, q } from "./toml.ts";

/**
 * After its last start the fleet must finish every stimulus and wake-up, committing episodes all along: a
 * breach when none commits for STALL_MS while work is left, or when it is not quiet within QUIET_WITHIN_MS.
 * Progress, not a deadline, is the check: inside a busy CI run on a slow 2-core box the episodes (nice 19)
 * get little CPU beside the other test files, and a trial's backlog took 90 s, then over 180 s, to drain
 * (nothing lost: still queued, committing one or two a second).
 */
const STALL_MS = 60_000;
const QUIET_WITHIN_MS = 480_000;

const KEYS = ["k0", "k1", "k2", "k3"] as const;

/** One thing a device or a webhook caller asks of the fleet, retried until acknowledged. */
interface Op {
  readonly id: string;
  readonly via: "mqtt" | "webhook";
  readonly key: string;
  /** The ledger agent its ledger episode sends to. */
  readonly to?: string;
  /** The delay of the wake-up its ledger episode sets, ms. */
  readonly wake?: number;
}

export interface TrialOptions {
  readonly seed: number;
  /** Operations (readings and webhook calls); default 160. */
  readonly ops?: number;
  /** Lives that end (by SIGKILL, or a quarter of them by a graceful stop); default 1 to 3, seeded. */
  readonly kills?: number;
  /**
   * "embedded" (default): the gateway's own broker on its libSQL persistence. "mosquitto": a real
   * Mosquitto as `[broker] url`, which devices and the subscriber use and which stays up through the
   * kills (it queues what devices publish meanwhile in the gateway's session).
   */
  readonly broker?: "embedded" | "mosquitto";
  /**
   * Replicate to a real central server (sqld), which is itself killed with SIGKILL and restarted in
   * one of the lives; after the last start the central copy must equal the gateway's, row for row.
   */
  readonly replicate?: boolean;
  /**
   * Gateways sharing the fleet (`[fleet] shard`, docs/shards.md; 1 by default, more need
   * `broker: "mosquitto"`): each life ends one of them, the others run on; webhooks and operator
   * calls go to the owner of their agent, and sends cross between shards through the broker.
   */
  readonly shards?: number;
  readonly log?: (line: string) => void;
  /** Copy the directory (data dir, fleet.toml, the gateway's log) of a trial that found a problem to
   *  a temp dir of its own, named in the log, before the harness removes it. */
  readonly keep?: boolean;
}

export interface TrialReport {
  readonly seed: number;
  readonly ops: number;
  readonly kills: number;
  /** Lives ended by a graceful stop (SIGTERM) instead of a kill. */
  readonly stops: number;
  /** Hot reloads of fleet.toml made during the trial (the upgrade's included). */
  readonly reloads: number;
  /** Whether the ledger's new release (test/fixtures/agents/ledger-v2.ts) was deployed during the trial. */
  readonly upgraded: boolean;
  /** Agents paused (and resumed, unless a kill came first) during the trial. */
  readonly pauses: number;
  /** Kills that landed while the gateway recovered the previous one's backlog, nothing published. */
  readonly recoveryKills: number;
  /** Operations sent more than once (again after a kill took the first answer, or a refusal). */
  readonly resent: number;
  readonly committed: number;
  readonly sends: number;
  readonly wakes: number;
  readonly seconds: number;
  /** Every breach of the contract found; empty when the trial held. */
  readonly problems: string[];
}

/** The stimulus id an operation's ledger episode runs under (docs/http-api.md, dedup). */
const sidOf = (op: Op): string => (op.via === "mqtt" ? `id:${op.id}` : `idem:${op.id}`);

function plan(seed: number, n: number): Op[] {
  const c = chooser(seed);
  return Array.from({ length: n }, (_, i) => {
    const roll = c.rand();
    return {
      id: `op-${seed}-${i}`,
      via: c.rand() < 0.15 ? "webhook" : "mqtt",
      key: c.pick(KEYS),
      ...(roll < 0.2 ? { to: `ledger/${c.pick(KEYS)}` } : {}),
      ...(roll >= 0.2 && roll < 0.35 ? { wake: 20 + c.int(400) } : {}),
    };
  });
}

interface Setup {
  readonly seed: number;
  readonly mosquitto: Mosquitto | null;
  readonly central: Sqld | null;
  /** `[fleet] shard` as "i/N", or null. */
  readonly shard: string | null;
}

/** What the trial changes in fleet.toml as it goes: the fleet's concurrency, the ledger's code release. */
interface Edits {
  maxConcurrent: number;
  release: 1 | 2;
}

function fleetToml(
  { seed, mosquitto, central, shard }: Setup,
  edits: Edits = { maxConcurrent: 4, release: 1 },
): string {
  const broker = mosquitto
    ? `url = ${q(mosquitto.url)}\nclient_id = ${q(`gw-trial-${seed}`)}`
    : 'persistence = "libsql"';
  return (
    fleetHeader(`trial-${seed}`, {
      broker,
      maxConcurrent: edits.maxConcurrent,
      fleet: shard ? `shard = ${q(shard)}` : undefined,
    }) +
    agentType("ledger", fixture(edits.release === 1 ? "ledger" : "ledger-v2"), ["trial/+/in"], {
      dedup: "id",
      // keep = 0: no checkpoint is collected, so the chain is the committed history.
      extra: 'tools = ["send"]\n[agents.ledger.checkpoint]\nkeep = 0\n',
    }) +
    agentType("mirror", fixture("counter"), ["trial/+/in"], {
      dedup: "id",
      extra: "[agents.mirror.checkpoint]\nkeep = 0\n",
    }) +
    `\n[hooks.trial]\ntype = ${q("ledger")}\nkey_field = ${q("key")}\n` +
    (central ? replicationToml(central.url) : "")
  );
}

/** Run one trial; never throws for a breach of the contract (see `problems`), only for a broken harness. */
export async function crashTrial(o: TrialOptions): Promise<TrialReport> {
  const began = performance.now();
  const log = o.log ?? (() => undefined);
  const c = chooser(o.seed ^ 0x5eed);
  const ops = plan(o.seed, o.ops ?? 160);
  const bySid = new Map(ops.map((op) => [sidOf(op), op]));
  const kills = o.kills ?? 1 + c.int(3);
  const shards = o.shards ?? 1;
  if (shards > 1 && o.broker !== "mosquitto") throw new Error('shards need the external broker (broker: "mosquitto")');
  const mosquitto = o.broker === "mosquitto" ? await Mosquitto.start() : null;
  const central = o.replicate ? await Sqld.start() : null;
  // The life at whose start the ledger's new release is deployed, in two trials of five (drawn apart from
  // the rest, so it does not move the other seeded moments).
  const u = chooser(o.seed ^ 0x0c0de);
  const upgradeLife = u.rand() < 0.4 ? u.int(kills + 1) : null;
  // The life in which the central server is killed, and how long it stays down.
  const centralDown = central ? { life: c.int(kills + 1), ms: 200 + c.int(2000) } : null;
  const setups: Setup[] = Array.from({ length: shards }, (_, i) => ({
    seed: o.seed,
    mosquitto,
    central,
    shard: shards > 1 ? `${i + 1}/${shards}` : null,
  }));
  const edits: Edits = { maxConcurrent: 4, release: 1 };
  const fleets = setups.map((setup) => new TestFleet(fleetToml(setup, edits)));
  const tomls = () => setups.map((setup) => fleetToml(setup, edits));
  const owner = (agent: string) => fleets[shards > 1 ? ownerShard(agent, shards) - 1 : 0]!;
  // Breaches seen along the way (a graceful stop that failed); the rest are found after the last start.
  const along: string[] = [];
  let stops = 0;
  const disturbed = { reloads: 0, pauses: 0 };
  const mqttUrl = () => (mosquitto ? mosquitto.url : `mqtt://127.0.0.1:${fleets[0]!.mqttPort}`);
  let device: MqttClient | null = null;
  let centralBack: Promise<void> | undefined;
  const acked = new Set<string>();
  const tries = new Map<string, number>();
  let recoveryKills = 0;
  const watched = new Set<string>();
  let watcher: MqttClient | null = null;
  // The gateway this life ends (with one shard, always the one).
  let victim = fleets[0]!;
  const name = (f: TestFleet) => (shards > 1 ? `shard ${fleets.indexOf(f) + 1}` : "the gateway");
  try {
    for (let life = 0; life <= kills; life++) {
      for (const f of fleets) if (!f.running) await f.start();
      watcher?.end(true);
      watcher = await summaries(mqttUrl(), `trial-${o.seed}-watch`, watched);
      if (life === upgradeLife) {
        edits.release = 2;
        rewrite(fleets, tomls());
        disturbed.reloads++;
        log(
          `  life ${life}: fleet.toml edited: the ledger's new release (ledger-v2.ts: state version 2, with a migrate)`,
        );
      }
      if (central && centralDown?.life === life) {
        await central.kill();
        log(`  life ${life}: central server killed for ${centralDown.ms} ms`);
        centralBack = Bun.sleep(centralDown.ms).then(() => central.restart());
      }
      const last = life === kills;
      if (!last && life > 0 && c.rand() < 0.3) {
        // Killed again while it runs the backlog the previous kill left (and redelivers outputs).
        await Bun.sleep(c.int(400));
        recoveryKills++;
        log(`  life ${life}: ${name(victim)} killed while recovering, ${acked.size}/${ops.length} acknowledged`);
        await victim.kill();
        continue;
      }
      const remaining = ops.length - acked.size;
      const killAt = last ? Infinity : acked.size + 5 + c.int(Math.max(1, Math.floor(remaining * 0.6)));
      device?.end(true);
      device = null;
      const settle = disturb(fleets, owner, c, { edits, tomls }, (line) => log(`  life ${life}: ${line}`), disturbed);
      const window = 4 + c.int(24);
      // The last life sends until everything is acknowledged: a refusal (a full queue) is retried, on a
      // new connection when the gateway closed the device's to withhold a PUBACK.
      for (let round = 0; ; round++) {
        if (!device?.connected) {
          device?.end(true);
          device = await connectAsync(mqttUrl(), { clientId: `trial-${o.seed}-device-${life}`, reconnectPeriod: 0 });
        }
        const hookUrl = (op: Op) => `${owner(`ledger/${op.key}`).httpUrl}/hooks/trial`;
        const { killed, refused } = await drive(hookUrl, device, ops, { acked, tries }, { killAt, window });
        if (killed || acked.size === ops.length) break;
        if (!last) {
          log(`  life ${life}: everything sent, ${acked.size} acknowledged; not acknowledged: ${reasons(refused)}`);
          break;
        }
        if (round === 300) throw new Error(`only ${acked.size}/${ops.length} acknowledged; ${reasons(refused)}`);
        await Bun.sleep(200);
      }
      if (last) {
        await settle();
        // An agent paused when a kill came stays paused (that is durable): resume every one.
        await Promise.all(KEYS.map((k) => operate(owner(`ledger/${k}`), `ledger/${k}`, "resume")));
        break;
      }
      if (shards > 1) victim = fleets[c.int(shards)]!;
      if (c.rand() < 0.25) {
        // A graceful stop instead (SIGTERM: the drain), with episodes running and more queued.
        stops++;
        log(`  life ${life}: ${name(victim)} stopped (SIGTERM) at ${acked.size}/${ops.length} acknowledged`);
        const code = await victim.stop(60_000).catch((err: Error) => err.message);
        if (code !== 0) along.push(`life ${life}: a graceful stop ended with ${code}`);
      } else {
        log(`  life ${life}: ${name(victim)} killed at ${acked.size}/${ops.length} acknowledged`);
        await victim.kill();
      }
      await settle();
    }
    await centralBack;
    if (acked.size < ops.length) throw new Error(`only ${acked.size} of ${ops.length} operations acknowledged`);
    const all = async <T>(sql: string) => (await Promise.all(fleets.map((f) => f.query<T>(sql)))).flat();
    const lastStart = Date.now();
    let episodes = -1;
    let progressAt = lastStart;
    const quiet = await waitFor(
      async () => {
        const [left, done] = await Promise.all([
          all<{ n: number }>(
            "SELECT (SELECT count(*) FROM stimuli WHERE state <> 'done') + " +
              "(SELECT count(*) FROM wakeups WHERE state = 'pending') AS n",
          ),
          all<{ n: number }>("SELECT count(*) AS n FROM episodes"),
        ]);
        if (left.every((r) => Number(r.n) === 0)) return "quiet";
        const n = done.reduce((sum, r) => sum + Number(r.n), 0);
        if (n !== episodes) [episodes, progressAt] = [n, Date.now()];
        return Date.now() - progressAt > STALL_MS ? `no episode ended for ${STALL_MS / 1000} s` : undefined;
      },
      QUIET_WITHIN_MS,
      "every stimulus done and every wake-up fired",
      200,
    ).then(
      (outcome) => (outcome === "quiet" ? null : outcome),
      () => `not quiet ${QUIET_WITHIN_MS / 1000} s after the last start`,
    );
    if (quiet !== null) {
      // A breach too (what is left is listed by `check` below): say which agents hold it, and how.
      const agents = await all<{ id: string; status: string; paused_until: number | null }>(
        "SELECT id, status, paused_until FROM agents WHERE id IN " +
          "(SELECT agent FROM stimuli WHERE state <> 'done' UNION SELECT agent FROM wakeups WHERE state = 'pending')",
      );
      const after = Math.round((Date.now() - lastStart) / 1000);
      along.push(`${quiet} (${after} s after the last start); agents holding work: ${JSON.stringify(agents)}`);
    }
    const committed = await all<{ id: string; agent: string; stimulus_id: string }>(
      `SELECT ${idOfSql("id")} AS id, agent, stimulus_id FROM episodes WHERE status = ${STATUS_COMMITTED}`,
    );
    // At least once to a subscriber with a session: give the outbox the time to publish the last ones.
    await waitFor(() => committed.every((e) => watched.has(e.id)) || undefined, 30_000, "every summary").catch(
      () => undefined,
    );
    const problems = [...along, ...(await check(all, ops, bySid, committed, watched))];
    for (const [i, f] of fleets.entries()) {
      const verify = await f.cli("verify");
      if (verify.code !== 0)
        problems.push(`${name(f)}: fleet verify exited ${verify.code}: ${verify.stdout}${verify.stderr}`);
      // A shard replicates under a fleet name of its own (docs/shards.md).
      const shard = shards > 1 ? { index: i + 1, count: shards } : null;
      if (central) problems.push(...(await centralProblems(f, central, shardFleetName(`trial-${o.seed}`, shard))));
    }
    const sends = ops.filter((op) => op.to).length;
    const wakes = ops.filter((op) => op.wake !== undefined).length;
    if (problems.length > 0 && o.keep === true) {
      const kept = mkdtempSync(join(tmpdir(), `fleet-crash-trial-${o.seed}-`));
      for (const [i, f] of fleets.entries()) {
        await f.stop();
        cpSync(f.dir, join(kept, `gateway-${i + 1}`), { recursive: true });
      }
      log(`  ${problems.length} problem(s); the gateways' directories are kept in ${kept}`);
    }
    return {
      seed: o.seed,
      ops: ops.length,
      kills: kills - stops,
      stops,
      ...disturbed,
      upgraded: edits.release === 2,
      recoveryKills,
      resent: [...tries.values()].filter((n) => n > 1).length,
      committed: committed.length,
      sends,
      wakes,
      seconds: (performance.now() - began) / 1000,
      problems,
    };
  } finally {
    watcher?.end(true);
    device?.end(true);
    for (const f of fleets) await f.dispose();
    await mosquitto?.dispose();
    await central?.dispose();
  }
}

/**
 * A subscriber to `fleet/episodes` with a clean = false session, adding each committed episode's id to
 * `into`: the summaries of episodes committed while it is away wait for it. It does not reconnect by
 * itself: a connection the broker drops shows as summaries missing. Its handler is in place before the
 * CONNACK, so nothing the session held is missed.
 */
async function summaries(url: string, clientId: string, into: Set<string>): Promise<MqttClient> {
  const client = connect(url, { clientId, clean: false, reconnectPeriod: 0, manualConnect: true });
  client.on("message", (_topic, payload) => {
    const s = JSON.parse(payload.toString()) as { episode?: string; status?: string };
    if (s.status === "committed" && typeof s.episode === "string") into.add(s.episode);
  });
  const connected = new Promise((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  client.connect();
  await connected;
  await client.subscribeAsync("fleet/episodes", { qos: 1 });
  return client;
}

/**
 * What else happens during a life, at seeded moments: a hot reload of fleet.toml (another
 * `max_concurrent_episodes`), an agent paused and resumed through the API. Returns what ends them:
 * a kill may come first, and an agent it left paused stays paused (it is resumed at the end).
 */
function disturb(
  fleets: readonly TestFleet[],
  owner: (agent: string) => TestFleet,
  c: ReturnType<typeof chooser>,
  config: { readonly edits: Edits; readonly tomls: () => string[] },
  log: (line: string) => void,
  count: { reloads: number; pauses: number },
): () => Promise<void> {
  const timers: ReturnType<typeof setTimeout>[] = [];
  const calls: Promise<unknown>[] = [];
  // A life lasts a second or two: the moments fall early in it.
  if (c.rand() < 0.4) {
    const n = c.pick([2, 3, 4]);
    timers.push(
      setTimeout(() => {
        config.edits.maxConcurrent = n;
        rewrite(fleets, config.tomls());
        count.reloads++;
        log(`fleet.toml edited: max_concurrent_episodes = ${n}`);
      }, c.int(600)),
    );
  }
  if (c.rand() < 0.4) {
    const agent = `ledger/${c.pick(KEYS)}`;
    const at = c.int(400);
    const held = 50 + c.int(400);
    timers.push(
      setTimeout(() => {
        count.pauses++;
        log(`${agent} paused for ${held} ms`);
        calls.push(operate(owner(agent), agent, "pause"));
      }, at),
    );
    timers.push(setTimeout(() => calls.push(operate(owner(agent), agent, "resume")), at + held));
  }
  return async () => {
    for (const t of timers) clearTimeout(t);
    await Promise.allSettled(calls);
  };
}

/** Write each gateway's fleet.toml: a hot reload (or what the next start reads, for a gateway down). */
function rewrite(fleets: readonly TestFleet[], texts: readonly string[]): void {
  for (const [i, f] of fleets.entries()) writeFileSync(f.configPath, texts[i]!);
}

/** `POST /api/agents/<id>/pause|resume` as the operator; an agent not made yet (404) or a gateway gone is fine. */
async function operate(fleet: TestFleet, agent: string, action: "pause" | "resume"): Promise<void> {
  try {
    // (A gateway just stopped has removed its token file: `fetch` throws before it sends.)
    if (fleet.running) await fleet.fetch(`/api/agents/${agent}/${action}`, { method: "POST" });
  } catch {}
}

/**
 * Send every operation not yet acknowledged, at most `window` unanswered at once, until all are
 * answered or `killAt` acknowledgements are in (then `killed`: time to kill). A device sends a reading
 * again only after a reconnection, as the `mqtt` client does; a webhook caller retries a failed call.
 * `refused` counts the answers that were not acknowledgements, by reason (a full queue's 429, a
 * connection the gateway closed to withhold a PUBACK).
 */
async function drive(
  hookUrl: (op: Op) => string,
  device: MqttClient,
  ops: readonly Op[],
  { acked, tries }: { acked: Set<string>; tries: Map<string, number> },
  o: { killAt: number; window: number },
): Promise<{ killed: boolean; refused: Map<string, number> }> {
  const refused = new Map<string, number>();
  const refuse = (why: string) => refused.set(why, (refused.get(why) ?? 0) + 1);
  let inflight = 0;
  let wake: (() => void) | null = null;
  const settle = () => {
    inflight--;
    wake?.();
  };
  const ack = (op: Op) => acked.add(op.id);
  for (const op of ops) {
    if (acked.has(op.id)) continue;
    while (inflight >= o.window && acked.size < o.killAt) await new Promise<void>((r) => (wake = r));
    if (acked.size >= o.killAt) return { killed: true, refused };
    inflight++;
    const body = JSON.stringify({ id: op.id, key: op.key, to: op.to, wake: op.wake });
    const sent =
      op.via === "mqtt"
        ? device.publishAsync(`trial/${op.key}/in`, body, { qos: 1 }).then(() => ack(op))
        : fetch(hookUrl(op), {
            method: "POST",
            headers: { "content-type": "application/json", "idempotency-key": op.id },
            body,
          }).then((r) => (r.status === 200 || r.status === 202 ? ack(op) : refuse(`HTTP ${r.status}`)));
    tries.set(op.id, (tries.get(op.id) ?? 0) + 1);
    sent.catch((err: Error) => refuse(`${op.via}: ${err.message}`)).finally(settle);
  }
  while (inflight > 0 && acked.size < o.killAt) await new Promise<void>((r) => (wake = r));
  return { killed: acked.size >= o.killAt, refused };
}

const reasons = (refused: ReadonlyMap<string, number>) =>
  [...refused].map(([why, n]) => `${n} x ${why}`).join(", ") || "none";

/** Every breach of the contract in the data dir after the last start, as one line each. */
async function check(
  all: <T>(sql: string) => Promise<T[]>,
  ops: readonly Op[],
  bySid: ReadonlyMap<string, Op>,
  committed: readonly { id: string; agent: string; stimulus_id: string }[],
  watched: ReadonlySet<string>,
): Promise<string[]> {
  const problems: string[] = [];
  const count = new Map<string, number>();
  for (const e of committed)
    count.set(`${e.agent} ${e.stimulus_id}`, (count.get(`${e.agent} ${e.stimulus_id}`) ?? 0) + 1);
  for (const [k, n] of count) if (n > 1) problems.push(`${k}: committed ${n} times`);
  for (const op of ops) {
    const ledger = count.get(`ledger/${op.key} ${sidOf(op)}`) ?? 0;
    if (ledger !== 1)
      problems.push(`${op.id} (${op.via}, acknowledged): ledger/${op.key} committed it ${ledger} times`);
    const mirror = count.get(`mirror/${op.key} ${sidOf(op)}`) ?? 0;
    if (op.via === "mqtt" && mirror !== 1)
      problems.push(`${op.id} (mqtt, acknowledged): mirror/${op.key} committed it ${mirror} times`);
  }

  // What each agent's newest state says it ran, against what the store says it committed.
  const heads = await all<{ id: string; head_seq: number; state: string | null; chain: number }>(
    "SELECT a.id, a.head_seq, c.state, (SELECT count(*) FROM checkpoints WHERE agent = a.id) AS chain " +
      "FROM agents a LEFT JOIN checkpoints c ON c.hash = a.head_hash",
  );
  for (const h of heads) {
    const n = committed.filter((e) => e.agent === h.id).length;
    if (Number(h.head_seq) !== n || Number(h.chain) !== n)
      problems.push(`${h.id}: ${n} committed episodes, head_seq ${h.head_seq}, ${h.chain} checkpoints`);
    if (!h.id.startsWith("ledger/") || h.state === null) continue;
    const seen = (JSON.parse(h.state) as { seen: Record<string, number> }).seen;
    for (const [ref, times] of Object.entries(seen)) {
      if (times !== 1) problems.push(`${h.id}: its state counted ${ref} ${times} times`);
      const [kind, sid] = ref.startsWith("inbox:") || ref.startsWith("wake:") ? ref.split(/:(.*)/s) : ["", ref];
      const op = bySid.get(sid!);
      const made =
        kind === "inbox"
          ? op?.to === h.id && count.get(`ledger/${op.key} ${sid}`) === 1
          : kind === "wake"
            ? op?.wake !== undefined && `ledger/${op.key}` === h.id
            : op !== undefined && `ledger/${op.key}` === h.id;
      if (!made) problems.push(`${h.id}: ran ${ref}, which no acknowledged operation or committed episode made`);
    }
    for (const op of ops) {
      if (op.to === h.id && seen[`inbox:${sidOf(op)}`] !== 1)
        problems.push(`${h.id}: the send of ${op.id}'s episode arrived ${seen[`inbox:${sidOf(op)}`] ?? 0} times`);
      if (op.wake !== undefined && `ledger/${op.key}` === h.id && seen[`wake:${sidOf(op)}`] !== 1)
        problems.push(`${h.id}: the wake-up of ${op.id}'s episode fired ${seen[`wake:${sidOf(op)}`] ?? 0} times`);
    }
  }
  problems.push(...(await releaseProblems(all, heads)));
  const left = await all<{ agent: string; sid: string; state: string }>(
    "SELECT agent, sid, state FROM stimuli WHERE state <> 'done'",
  );
  for (const s of left) problems.push(`stimulus ${s.sid} of ${s.agent} left ${s.state}`);
  const unseen = committed.filter((e) => !watched.has(e.id));
  if (unseen.length > 0)
    problems.push(
      `${unseen.length} committed episodes' summaries never reached the subscriber with a session ` +
        `(first: ${unseen[0]!.id} of ${unseen[0]!.agent})`,
    );
  return problems;
}

/**
 * The code releases in each ledger agent's chain (`keep = 0`: the whole committed history): the state
 * version of its checkpoints never goes back from 2 to 1, the migration is recorded on the first
 * checkpoint of version 2 that follows one of version 1 and on no other, and the state counts as many
 * migrations and version 2 episodes as the chain holds (a migration or an episode that was not
 * committed, cut off by a kill, left nothing).
 */
async function releaseProblems(
  all: <T>(sql: string) => Promise<T[]>,
  heads: readonly { id: string; state: string | null }[],
): Promise<string[]> {
  const problems: string[] = [];
  const rows = await all<{ agent: string; seq: number; version: number | null; from_version: number | null }>(
    "SELECT agent, seq, state_version AS version, migrated_from AS from_version FROM checkpoints " +
      "WHERE agent LIKE 'ledger/%' ORDER BY agent, seq",
  );
  for (const h of heads) {
    if (!h.id.startsWith("ledger/") || h.state === null) continue;
    const chain = rows.filter((r) => r.agent === h.id);
    let migrations = 0;
    for (const [i, r] of chain.entries()) {
      const version = Number(r.version ?? 1);
      const before = i === 0 ? null : Number(chain[i - 1]!.version ?? 1);
      if (before !== null && version < before)
        problems.push(`${h.id}: checkpoint ${r.seq} written by version ${version} after version ${before}`);
      const migrated = before === 1 && version === 2;
      if (migrated) migrations++;
      if ((r.from_version === null ? null : Number(r.from_version)) !== (migrated ? 1 : null))
        problems.push(`${h.id}: checkpoint ${r.seq} (version ${version}) says migrated from ${r.from_version}`);
    }
    const state = JSON.parse(h.state) as { migrated?: number; v2?: number };
    const v2 = chain.filter((r) => Number(r.version ?? 1) === 2).length;
    if ((state.migrated ?? 0) !== migrations)
      problems.push(`${h.id}: its state counts ${state.migrated ?? 0} migrations, its chain ${migrations}`);
    if ((state.v2 ?? 0) !== v2)
      problems.push(`${h.id}: its state counts ${state.v2 ?? 0} version 2 episodes, its chain ${v2}`);
  }
  return problems;
}

/** The central copy against the gateway's, once the gateway says it has caught up; one line per breach. */
async function centralProblems(fleet: TestFleet, central: Sqld, name: string): Promise<string[]> {
  const db = central.client();
  try {
    await caughtUp(fleet, 120_000);
    await expectCentralEqualsLocal(fleet, db, name);
    const verify = await runCli(["verify", "--central", central.url, "--json"]);
    const found = (verify.json as { problems?: unknown[] } | undefined)?.problems;
    return verify.code === 0 && found?.length === 0
      ? []
      : [`fleet verify --central exited ${verify.code}: ${verify.stdout.slice(0, 2000)}${verify.stderr.slice(0, 500)}`];
  } catch (err) {
    return [`replication: ${String((err as Error).message).slice(0, 2000)}`];
  } finally {
    db.close();
  }
}
