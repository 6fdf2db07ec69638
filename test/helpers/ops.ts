/**
 * Ops fixtures: a fleet data dir filled with many committed episodes through the gateway's
 * own commit path — `Store.intake`, `buildEvents` + `hashEvents`, `sealCheckpoint`,
 * `Store.commitEpisode` — with an injected clock, and no subprocesses. An episode's
 * subprocess only produces records and a state; everything durable after that is the code
 * below, so a store built here is what the gateway would have left behind, just faster.
 * Used by test/gc.test.ts and scripts/bench-ops.ts.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { EpisodeRecord, Stimulus } from "../../agents/protocol.ts";
import { blake3Hex } from "../../gateway/hash.ts";
import { hashEvents, sealCheckpoint } from "../../gateway/store/index.ts";
import { budgetWindows, buildEvents } from "../../gateway/episode/index.ts";
import { compileSpec } from "../../gateway/spec/index.ts";
import type { SpecVersion } from "../../gateway/spec/index.ts";
import { Store } from "../../gateway/store/index.ts";
import type { AgentId, NewStimulus, StimulusId } from "../../gateway/types.ts";

/** The repository root. */
export const ROOT = resolve(import.meta.dir, "../..");
export const DAY = 86_400_000;
export const HOUR = 3_600_000;

/** Shape of the synthetic fleet. */
export interface SyntheticFleetOptions {
  /** Agent types and their instance keys. */
  readonly types: readonly { readonly name: string; readonly keys: readonly string[] }[];
  /** `[agents.<type>.checkpoint] keep` of every type. */
  readonly keep: number;
  readonly episodesDays: number;
  readonly dedupDays: number;
  /** `[retention] quarantine_days` (the default, 30, when absent). */
  readonly quarantineDays?: number;
  /**
   * Every episode names a code bundle, as a gateway running pinned code does (docs/upgrading.md):
   * the module's code, stored as the gateway stores it (a `bundles` row under its BLAKE3 hash, so
   * `verify` passes); none by default.
   */
  readonly bundle?: boolean;
  /**
   * Stimulus ids as `s:` and the stimulus number zero-padded to this many digits, so every
   * episode's rows are the same size however long the run (scripts/soak.ts); unpadded by default.
   * Unpadded, rows grow by a byte or so each time the number gains a digit, and a store holding a
   * retention window grows with them until the window has turned over.
   */
  readonly sidDigits?: number;
}

/** The chain head of one agent, as the synthetic committer tracks it. */
interface Head {
  readonly id: AgentId;
  readonly type: string;
  readonly key: string;
  seq: number;
  hash: string | null;
  count: number;
}

/** A data dir with fleet.toml beside it, open in this process. */
export class SyntheticFleet {
  private readonly heads: Head[];
  private stimulusNo = 0;

  private constructor(
    readonly dir: string,
    readonly configPath: string,
    readonly dbPath: string,
    readonly store: Store,
    readonly spec: SpecVersion,
    private readonly bundle: string | null = null,
    private readonly sidDigits = 0,
  ) {
    this.heads = spec.spec.agents
      ? Object.values(spec.spec.agents).flatMap((t) =>
          t.instances.map((key) => ({
            id: `${t.name}/${key}` as AgentId,
            type: t.name,
            key,
            seq: 0,
            hash: null,
            count: 0,
          })),
        )
      : [];
  }

  /** Write `<dir>/fleet.toml`, open `<dir>/data/fleet.db` and record the spec version. */
  static async create(dir: string, opts: SyntheticFleetOptions): Promise<SyntheticFleet> {
    mkdirSync(join(dir, "data"), { recursive: true });
    const module = join(ROOT, "agents/examples/temp-monitor.ts");
    const toml = [
      `[fleet]\nname = "synthetic"\nsynchronous = "normal"\n`,
      ...opts.types.map(
        (t) =>
          `[agents.${t.name}]\nmodule = ${JSON.stringify(module)}\n` +
          `instances = [${t.keys.map((k) => JSON.stringify(k)).join(", ")}]\nconfig = { threshold = 80.0 }\n\n` +
          `[agents.${t.name}.checkpoint]\nkeep = ${opts.keep}\n`,
      ),
      `[retention]\nepisodes_days = ${opts.episodesDays}\ndedup_days = ${opts.dedupDays}\n` +
        (opts.quarantineDays === undefined ? "" : `quarantine_days = ${opts.quarantineDays}\n`),
    ].join("\n");
    const configPath = join(dir, "fleet.toml");
    writeFileSync(configPath, toml);
    const spec = await compileSpec(toml, configPath);
    const dbPath = join(dir, "data", "fleet.db");
    const store = await Store.open(dbPath, { synchronous: "normal" });
    await store.saveSpecVersion({ hash: spec.hash, path: configPath, text: toml, summary: "synthetic", at: 0 });
    let bundle: string | null = null;
    if (opts.bundle) {
      const code = readFileSync(module, "utf8");
      bundle = await blake3Hex(code);
      await store.saveBundle({ hash: bundle, module, code, at: 0 });
    }
    return new SyntheticFleet(dir, configPath, dbPath, store, spec, bundle, opts.sidDigits ?? 0);
  }

  /** Every agent id of the fleet. */
  get agents(): readonly AgentId[] {
    return this.heads.map((h) => h.id);
  }

  /**
   * Commit `count` episodes round-robin over the agents, the n-th at `start + n * spacingMs`
   * (its stimulus received 5 ms before). Chunks of `chunk` episodes: one intake job, then
   * every commit of the chunk fired at once so the group committer folds them together.
   */
  async commit(
    count: number,
    start: number,
    spacingMs: number,
    chunk = 2000,
  ): Promise<{ first: number; last: number }> {
    const enc = new TextEncoder();
    let last = start;
    for (let base = 0; base < count; base += chunk) {
      const n = Math.min(chunk, count - base);
      const plan = Array.from({ length: n }, (_, i) => {
        const at = start + (base + i) * spacingMs;
        const head = this.heads[(this.stimulusNo + i) % this.heads.length]!;
        const value = (this.stimulusNo + i) % 100;
        const no = String(this.stimulusNo + i).padStart(this.sidDigits, "0");
        return { at, head, value, sid: `s:${no}` as StimulusId };
      });
      this.stimulusNo += n;
      const intake: NewStimulus[] = plan.map((p) => ({
        agent: p.head.id,
        type: p.head.type,
        key: p.head.key,
        sid: p.sid,
        kind: "mqtt",
        topic: `sensors/${p.head.key}/temperature`,
        payload: enc.encode(JSON.stringify({ id: p.sid, value: p.value })),
        receivedAt: p.at - 5,
      }));
      const seqs = await this.store.intake(intake);
      const commits = [];
      for (const [i, p] of plan.entries()) {
        const stimulusSeq = seqs[i]!.seq;
        if (stimulusSeq === null) throw new Error(`stimulus ${p.sid} was a duplicate`);
        commits.push(await this.episode(p.head, p.at, stimulusSeq, p.sid, p.value));
        last = p.at;
      }
      await Promise.all(commits.map((c) => this.store.commitEpisode(c)));
    }
    return { first: start, last };
  }

  /** One episode's commit, exactly as EpisodeExecutor builds it after a successful run. */
  private async episode(head: Head, at: number, stimulusSeq: number, sid: StimulusId, value: number) {
    const episode = Bun.randomUUIDv7("hex", at);
    const stimulus: Stimulus = {
      id: sid,
      kind: "mqtt",
      topic: `sensors/${head.key}/temperature`,
      payload: { id: sid, value },
      received_at: at - 5,
    };
    head.count += 1;
    const state = { alarm: false, count: head.count, last: value };
    const records: EpisodeRecord[] = [
      { k: "now", v: at - 1 },
      { k: "decide", name: "reading", data: { value } },
      { k: "emit", data: { value, alarm: false, count: head.count } },
    ];
    const events = buildEvents(episode, stimulus, { ok: true, state, records, ms: 1 });
    const eventsHash = await hashEvents(events);
    const seq = head.seq + 1;
    const parent = head.hash;
    const { hash, stateText } = await sealCheckpoint({
      agent: head.id,
      seq,
      parent,
      episode,
      spec_version: this.spec.hash,
      state,
    });
    head.seq = seq;
    head.hash = hash;
    const win = budgetWindows(at - 2); // the turn that starts an episode books its windows
    return {
      episode: {
        id: episode,
        gateway: this.store.gatewayId,
        agent: head.id,
        stimulusSeq,
        stimulusId: sid,
        stimulusKind: "mqtt",
        specVersion: this.spec.hash,
        status: "committed" as const,
        attempt: 1,
        startedAt: at - 2,
        endedAt: at,
        checkpoint: hash,
        parent,
        eventsHash,
        eventCount: events.length,
        bundle: this.bundle,
      },
      events,
      checkpoint: {
        hash,
        gateway: this.store.gatewayId,
        agent: head.id,
        seq,
        parent,
        episode,
        specVersion: this.spec.hash,
        state: stateText,
        createdAt: at,
      },
      outbox: [],
      inbox: [],
      usage: { hourWindow: win.hourWindow, dayWindow: win.dayWindow, toolCalls: 0, tokens: 0, cost: 0 },
    };
  }

  /** Row counts of the tables retention works on. */
  async counts(): Promise<{
    checkpoints: number;
    live: number;
    tombstones: number;
    episodes: number;
    events: number;
    stimuli: number;
    usage: number;
  }> {
    const one = async (q: string) => Number((await this.store.client.execute(q)).rows[0]![0]);
    return {
      checkpoints: await one("SELECT count(*) FROM checkpoints"),
      live: await one("SELECT count(*) FROM checkpoints WHERE state IS NOT NULL"),
      tombstones: await one("SELECT count(*) FROM checkpoints WHERE state IS NULL"),
      episodes: await one("SELECT count(*) FROM episodes"),
      events: await one("SELECT count(*) FROM events"),
      stimuli: await one("SELECT count(*) FROM stimuli"),
      usage: await one("SELECT count(*) FROM budget_usage"),
    };
  }

  /** Move the WAL into the main file so its size is the database's size. */
  async checkpointWal(): Promise<void> {
    await this.store.writer.drain();
    await this.store.client.execute("PRAGMA wal_checkpoint(TRUNCATE)");
  }

  close(): Promise<void> {
    return this.store.close();
  }
}
