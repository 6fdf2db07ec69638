/**
 * Replay (docs/http-api.md): re-run a recorded episode in a fresh subprocess on its recorded inputs
 * — the parent checkpoint's state, the stimulus, tool results, `now()` and `random()` —
 * and compare what it produces (decisions, emits, sends, tool calls, final state) with what
 * was recorded. Like Temporal's replayer, `--module` runs history against new code.
 */
import { existsSync } from "node:fs";
import type { EpisodeRecord, ReplayInputs, Stimulus } from "../../agents/protocol.ts";
import { canonicalJson } from "../hash.ts";
import type { RunResult, SpawnOptions } from "../episode/index.ts";
import type { AgentTypeSpec } from "../spec/index.ts";
import { hashEvents, IntegrityError, verifyCheckpointRow } from "../store/index.ts";
import type { CheckpointRow, Store } from "../store/index.ts";
import type { AgentId } from "../types.ts";
import { EventLogError, readEventLog } from "./events.ts";

/** The first difference between a recording and a replay. */
export interface Divergence {
  /** e.g. "decision #2", "state", "outcome". */
  readonly at: string;
  readonly expected: unknown;
  readonly actual: unknown;
}

/** Which episode a replay ran, and, when it may not have run the episode's own code, what it ran instead. */
interface Replayed {
  readonly episode: string;
  readonly agent: string;
  /** Set when no bundle was recorded (before code was pinned): `code not pinned: ran the module file as it is now`. */
  readonly note?: string;
}

/** Result of replaying one episode. */
export type ReplayResult =
  | (Replayed & { readonly verdict: "MATCH" })
  | (Replayed & { readonly verdict: "DIVERGED"; readonly divergence: Divergence })
  | { readonly episode: string; readonly agent: string; readonly verdict: "UNREPLAYABLE"; readonly reason: string };

type Rec = EpisodeRecord;

/** The observable behaviour of an episode, in comparable form. */
function behaviour(records: readonly Rec[]): { label: string; value: unknown }[] {
  const out: { label: string; value: unknown }[] = [];
  const n: Record<string, number> = {};
  for (const r of records) {
    const kind = r.k === "decide" ? "decision" : r.k;
    if (kind === "now" || kind === "random" || kind === "log") continue;
    n[kind] = (n[kind] ?? 0) + 1;
    const value =
      r.k === "decide"
        ? { name: r.name, data: r.data }
        : r.k === "emit"
          ? r.data
          : r.k === "send"
            ? { to: r.to, data: r.data }
            : r.k === "tool"
              ? { tool: r.tool, args: r.args }
              : r;
    out.push({ label: `${kind} #${n[kind]}`, value });
  }
  return out;
}

/** Compare two behaviours; the first difference or null. */
export function firstDivergence(expected: readonly Rec[], actual: readonly Rec[]): Divergence | null {
  const e = behaviour(expected);
  const a = behaviour(actual);
  for (let i = 0; i < Math.max(e.length, a.length); i++) {
    const x = e[i];
    const y = a[i];
    if (!x || !y)
      return { at: (x ?? y)!.label, expected: x ? x.value : "(nothing)", actual: y ? y.value : "(nothing)" };
    if (x.label !== y.label || canonicalJson(x.value) !== canonicalJson(y.value))
      return {
        at: x.label === y.label ? x.label : `step ${i + 1}`,
        expected: { [x.label]: x.value },
        actual: { [y.label]: y.value },
      };
  }
  return null;
}

/**
 * What a replay answers from, out of an episode's records (stimulus and ending left out): `now` and
 * `random` in order, and the tool results in the order the episode got them, each with its call id.
 */
export function replayInputs(records: readonly Rec[]): ReplayInputs {
  return {
    now: records.flatMap((r) => (r.k === "now" ? [r.v] : [])),
    random: records.flatMap((r) => (r.k === "random" ? [r.v] : [])),
    tools: records.flatMap((r) => (r.k === "tool" ? [{ call: r.call, tool: r.tool, ok: r.ok, result: r.result }] : [])),
    pending_wakes: records.find((r) => r.k === "pending_wakes")?.ids,
  };
}

/** The file of a stored code bundle (gateway/code `BundleFiles.file`). */
export type BundleFileOf = (hash: string) => Promise<string>;

/**
 * Replay one episode on the code it ran: the bundle it names (else, for an episode from before
 * code was pinned, its type's module file). `moduleOverride` runs the recording against other code,
 * `candidate` with another type's `config` and `budget` (the deploy check's candidate, ./deploy-check.ts).
 */
export async function replayEpisode(
  store: Store,
  episodeId: string,
  spawn: SpawnOptions,
  moduleOverride?: string,
  candidate?: Pick<AgentTypeSpec, "config" | "budget">,
  bundleFile?: BundleFileOf,
): Promise<ReplayResult> {
  const ep = await store.getEpisode(episodeId);
  if (!ep) return { episode: episodeId, agent: "?", verdict: "UNREPLAYABLE", reason: "no such episode" };
  const base = { episode: ep.id, agent: ep.agent };
  // A damaged log is an EventLogError naming the episode, not a verdict: nothing can say what it recorded.
  const events = await readEventLog(store, ep.id);
  if (events.length === 0)
    return { ...base, verdict: "UNREPLAYABLE", reason: "its event log was collected by retention" };
  // Recorded inputs that are not what was sealed would make any verdict meaningless.
  if ((await hashEvents(events)) !== ep.eventsHash)
    return { ...base, verdict: "UNREPLAYABLE", reason: "its event log does not match its hash (see fleet verify)" };
  const parsed = events.map((e) => JSON.parse(e.data) as unknown);
  const stimulus = parsed[0] as Stimulus;
  const records = events
    .slice(1)
    .flatMap((e, i) => (["stimulus", "end", "failure"].includes(e.kind) ? [] : [parsed[i + 1] as Rec]));
  const ending = events[events.length - 1]!;

  let state: unknown = null;
  let stateVersion = 1;
  if (ep.parent) {
    const parent = await store.getCheckpoint(ep.parent);
    if (!parent || parent.state === null)
      return { ...base, verdict: "UNREPLAYABLE", reason: "its parent checkpoint was collected" };
    if (!(await intact(parent)))
      return { ...base, verdict: "UNREPLAYABLE", reason: "its parent checkpoint does not match its hash" };
    state = JSON.parse(parent.state);
    stateVersion = parent.stateVersion ?? 1;
  }
  // The state it sealed, compared at the end: a checkpoint edited since is no evidence either way.
  const sealed = ep.checkpoint ? await store.getCheckpoint(ep.checkpoint) : undefined;
  if (sealed && sealed.state !== null && !(await intact(sealed)))
    return { ...base, verdict: "UNREPLAYABLE", reason: "its checkpoint does not match its hash" };
  const sv =
    (await store.db.query.specVersions.findFirst({ where: (t, { eq }) => eq(t.hash, ep.specVersion) })) ?? null;
  if (!sv)
    return { ...base, verdict: "UNREPLAYABLE", reason: `spec version ${ep.specVersion.slice(0, 12)} is not stored` };
  const [{ compileSpec }, { runEpisode, CHILD_LIMITS, runLimitsFor }] = await Promise.all([
    import("../spec/index.ts"),
    import("../episode/index.ts"),
  ]);
  const spec = (await compileSpec(sv.text, sv.path)).spec;
  const [typeName, key] = [ep.agent.slice(0, ep.agent.indexOf("/")), ep.agent.slice(ep.agent.indexOf("/") + 1)];
  const type = spec.agents[typeName];
  if (!type) return { ...base, verdict: "UNREPLAYABLE", reason: `type ${typeName} is not in its spec version` };

  let module = moduleOverride ?? type.module_path;
  if (moduleOverride === undefined && ep.bundle) {
    if (!bundleFile)
      return { ...base, verdict: "UNREPLAYABLE", reason: "it ran a code bundle and no bundle store was given" };
    try {
      module = await bundleFile(ep.bundle);
    } catch (err) {
      return { ...base, verdict: "UNREPLAYABLE", reason: `its code bundle cannot be loaded: ${String(err)}` };
    }
  } else if (moduleOverride === undefined && !existsSync(module)) {
    // An episode from before code bundles ran its module file: gone since, there is nothing to run.
    return { ...base, verdict: "UNREPLAYABLE", reason: `it ran ${module}, which is no longer there (no code bundle)` };
  }
  // Such an episode runs on its module file, which may have changed since: the verdict says so.
  const ran: Replayed =
    moduleOverride === undefined && !ep.bundle
      ? { ...base, note: `code not pinned: ran the module file as it is now (${module})` }
      : base;
  const inputs = replayInputs(records);
  const budget = (candidate ?? type).budget;
  const run = await runEpisode(
    {
      t: "start",
      episode: ep.id,
      agent: { type: typeName, key, id: ep.agent },
      module,
      config: (candidate ?? type).config,
      state,
      state_version: stateVersion,
      fresh: ep.parent === null,
      stimulus,
      replay: inputs,
      limits: CHILD_LIMITS,
      wakes: { pending: inputs.pending_wakes ?? [], max: type.max_wakeups },
    },
    // A replay is not on the clock of a live fleet: allow at least 10 s.
    runLimitsFor(budget, 10_000),
    async () => ({ ok: false, result: { error: "failed", reason: "replay: tools are answered from the recording" } }),
    spawn,
  );
  // ...but code slower than the type's episode_timeout_ms would time out live: it fails here as it would there.
  const timeoutMs = budget.episode_timeout_ms;
  const result: RunResult =
    run.codeMs !== undefined && run.codeMs > timeoutMs
      ? {
          ok: false,
          kind: "timeout",
          message: `episode exceeded ${timeoutMs} ms (episode_timeout_ms; the replay ran ${Math.round(run.codeMs)} ms)`,
          records: run.records,
          ms: run.ms,
        }
      : run;

  // Other code with a newer state version migrates the recorded state first: that is the upgrade, not
  // a divergence. Its decisions, outputs and tool calls are compared; its final state (the new shape) is not.
  const migrated = result.records.some((r) => r.k === "migrate") && !records.some((r) => r.k === "migrate");
  const actual = migrated ? result.records.filter((r) => r.k !== "migrate") : result.records;
  // Nor is it where a fresh agent's first episode starts from the new version's init (nothing to migrate).
  const otherShape = result.ok && sealed != null && (result.version ?? 1) !== (sealed.stateVersion ?? 1);
  const recordedOk = ending.kind === "end";
  if (recordedOk && !result.ok) {
    // Other code that did something else first (a decision, or a tool call the recording cannot
    // answer, which then fails it) diverged there; only one that failed on the same path failed.
    const early = firstDivergence(records, actual);
    if (early && early.actual !== "(nothing)") return { ...ran, verdict: "DIVERGED", divergence: early };
  }
  if (result.ok !== recordedOk) {
    return {
      ...ran,
      verdict: "DIVERGED",
      divergence: {
        at: "outcome",
        expected: recordedOk ? "committed" : JSON.parse(ending.data),
        actual: result.ok ? "committed" : { kind: result.kind, message: result.message.split("\n")[0] },
      },
    };
  }
  if (!result.ok && !recordedOk) {
    // Both failed: the same way? (a timeout replayed as a throw is new behaviour)
    const recorded = JSON.parse(ending.data) as { kind: string; message: string };
    if (recorded.kind !== result.kind) {
      return {
        ...ran,
        verdict: "DIVERGED",
        divergence: {
          at: "outcome",
          expected: { kind: recorded.kind },
          actual: { kind: result.kind, message: result.message.split("\n")[0] },
        },
      };
    }
  }
  const d = firstDivergence(records, actual);
  if (d) return { ...ran, verdict: "DIVERGED", divergence: d };
  if (result.ok && ep.checkpoint && !migrated && !otherShape) {
    const cp = await store.getCheckpoint(ep.checkpoint);
    if (cp && cp.state !== null && cp.state !== canonicalJson(result.state)) {
      return {
        ...ran,
        verdict: "DIVERGED",
        divergence: { at: "state", expected: JSON.parse(cp.state), actual: result.state },
      };
    }
  }
  return { ...ran, verdict: "MATCH" };
}

/** Whether a stored checkpoint's state still hashes to its name. */
async function intact(row: CheckpointRow): Promise<boolean> {
  try {
    await verifyCheckpointRow(row);
    return true;
  } catch (err) {
    if (err instanceof IntegrityError) return false;
    throw err;
  }
}

/**
 * `replayEpisode` where an unreadable event log (damaged storage) is a verdict, UNREPLAYABLE with its
 * cause, not an error: for replays of many episodes, which go on past it.
 */
export async function replayOrUnreplayable(...args: Parameters<typeof replayEpisode>): Promise<ReplayResult> {
  try {
    return await replayEpisode(...args);
  } catch (err) {
    if (!(err instanceof EventLogError)) throw err;
    const ep = await args[0].getEpisode(err.episode);
    return { episode: err.episode, agent: ep?.agent ?? "?", verdict: "UNREPLAYABLE", reason: err.message };
  }
}

/** Replay an agent's whole recorded history (committed episodes, oldest first). */
export async function replayAgent(
  store: Store,
  agent: AgentId,
  spawn: SpawnOptions,
  moduleOverride?: string,
  bundleFile?: BundleFileOf,
): Promise<ReplayResult[]> {
  const out: ReplayResult[] = [];
  for (let after = ""; ; ) {
    const page = await store.scanEpisodes(agent, after, 200);
    for (const ep of page)
      if (ep.status === "committed")
        out.push(await replayOrUnreplayable(store, ep.id, spawn, moduleOverride, undefined, bundleFile));
    if (page.length < 200) return out;
    after = page[page.length - 1]!.id;
  }
}
