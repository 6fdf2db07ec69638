/**
 * `fleet state` and `fleet trace`: what an agent knew, and why something happened.
 * Both read the data dir (read-only), whether the gateway runs or not.
 */
import {
  episodeForTopic,
  type PatchOp,
  stateAt,
  stateDiff,
  type Trace,
  type TraceEffect,
  type TraceNode,
  traceEpisode,
} from "../ops/index.ts";
import { type Cli, UsageError } from "./context.ts";
import { parseAgentId } from "../types.ts";

function seqArg(raw: string, what: string): number {
  if (!/^[1-9][0-9]{0,15}$/.test(raw))
    throw new UsageError(`${what} must be a checkpoint number (1, 2, ...), got "${raw}"`);
  return Number(raw);
}

/** `fleet state <type/key> [--at SEQ] [--diff A..B]`. */
export async function cmdState(cli: Cli, name: string | undefined): Promise<number> {
  const agent = name ? parseAgentId(name)?.id : undefined;
  if (!agent) throw new UsageError("state needs an agent (<type>/<key>)");
  if (cli.flags.diff !== undefined && cli.flags.at !== undefined)
    throw new UsageError("--at and --diff do not go together: --diff A..B names both checkpoints");
  const store = await cli.openReadonly();
  try {
    if (cli.flags.diff !== undefined) {
      const m = /^([^.]+)\.\.([^.]+)$/.exec(cli.flags.diff);
      if (!m) throw new UsageError(`--diff must be A..B (two checkpoint numbers), got "${cli.flags.diff}"`);
      const r = await stateDiff(store, agent, seqArg(m[1]!, "--diff A"), seqArg(m[2]!, "--diff B"));
      if ("code" in r) return miss(r.message);
      cli.print(
        { agent, from: r.from.seq, to: r.to.seq, patch: r.patch },
        () => `${agent} #${r.from.seq} -> #${r.to.seq}\n${describePatch(r.patch)}`,
      );
      return 0;
    }
    const at = cli.flags.at === undefined ? undefined : seqArg(cli.flags.at, "--at");
    const r = await stateAt(store, agent, at);
    if ("code" in r) return miss(r.message);
    // --json prints the state object itself, so scripts can pipe it; a collected one has none to print.
    if (cli.json && r.collected)
      return miss(`${agent} #${r.seq}: its state was collected by retention (the hash stays in the chain)`);
    if (cli.json) console.log(JSON.stringify(r.state, null, 2));
    else {
      const when = new Date(r.created_at).toISOString();
      const body = r.collected ? "(state collected by retention; the hash stays in the chain)" : pretty(r.state);
      console.log(`${agent} #${r.seq} ${r.hash.slice(0, 12)} (episode ${r.episode}, ${when})\n${body}`);
    }
    return 0;
  } finally {
    await store.close();
  }
}

/** `fleet trace <episode|prefix>` or `fleet trace --topic T [--at TIME]`. */
export async function cmdTrace(cli: Cli, episode: string | undefined): Promise<number> {
  const store = await cli.openReadonly("`fleet trace`");
  try {
    let id = episode;
    if (cli.flags.topic !== undefined) {
      const at = cli.flags.at === undefined ? undefined : timeArg(cli.flags.at);
      const found = await episodeForTopic(store, cli.flags.topic, at);
      if ("code" in found) return miss(found.message);
      id = found.id;
    }
    if (!id) throw new UsageError("trace needs an episode id (or a unique prefix), or --topic T");
    const trace = await traceEpisode(store, id);
    if ("code" in trace) return miss(trace.message);
    cli.print(trace, () => describeTrace(trace));
    return 0;
  } finally {
    await store.close();
  }
}

function timeArg(raw: string): number {
  const n = /^\d+$/.test(raw) ? Number(raw) : Date.parse(raw);
  if (!Number.isFinite(n)) throw new UsageError(`--at must be epoch ms or an ISO time, got "${raw}"`);
  return n;
}

function miss(message: string): number {
  console.error(`fleet: ${message}`);
  return 1;
}

const pretty = (v: unknown) => JSON.stringify(v, null, 2);
const short = (v: unknown) => {
  const s = JSON.stringify(v) ?? "null";
  return s.length > 100 ? `${s.slice(0, 97)}...` : s;
};

function describePatch(patch: readonly PatchOp[]): string {
  if (patch.length === 0) return "  (no change)";
  return patch
    .map((p) => {
      if (p.op === "add") return `  + ${p.path} = ${short(p.value)}`;
      if (p.op === "remove") return `  - ${p.path} (was ${short(p.from_value)})`;
      return `  ~ ${p.path}: ${short(p.from_value)} -> ${short(p.value)}`;
    })
    .join("\n");
}

function head(n: TraceNode): string {
  const s = n.stimulus;
  const cause = s ? `${s.kind}${s.topic ? ` ${s.topic}` : ""} (payload ${s.payload_hash.slice(0, 12)})` : "?";
  const received = s ? ` received ${new Date(s.received_at).toISOString()},` : "";
  const at = new Date(n.started_at).toISOString();
  return `episode ${n.episode} ${n.agent} ${n.status} ${n.ms} ms <- ${cause}${received} started ${at}`;
}

/** An effect a failed episode recorded: nothing was published or sent. */
const NOT_DONE = " (not delivered: the episode failed)";

function effectLines(e: TraceEffect, indent: string): string[] {
  switch (e.kind) {
    case "decide":
      return [`${indent}decide ${e.name} ${short(e.data)}`];
    case "emit":
      return [`${indent}emit -> ${e.topic}${e.seq === null ? NOT_DONE : ` seq ${e.seq}`} ${short(e.data)}`];
    case "publish":
      return [`${indent}publish -> ${e.topic}${e.ok ? (e.seq === null ? NOT_DONE : ` seq ${e.seq}`) : " (denied)"}`];
    case "tool":
      return [`${indent}tool ${e.tool}${e.ok ? "" : " (failed)"}`];
    case "send":
      return [
        `${indent}send -> ${e.to}${e.ok ? (e.sent ? "" : NOT_DONE) : " (denied)"}`,
        ...e.episodes.flatMap((c) => nodeLines(c, `${indent}    `)),
      ];
    case "wake":
      return [
        `${indent}wake ${e.id} due ${new Date(e.due_at).toISOString()} (${e.state})`,
        ...e.episodes.flatMap((c) => nodeLines(c, `${indent}    `)),
      ];
    case "cancel_wake":
      return [`${indent}cancel wake ${e.id}`];
    default: {
      const never: never = e;
      return [String(never)];
    }
  }
}

function nodeLines(n: TraceNode, indent: string): string[] {
  return [`${indent}${head(n)}`, ...n.effects.flatMap((e) => effectLines(e, `${indent}  `))];
}

function describeTrace(t: Trace): string {
  const up = t.upstream.map((n, i) => `${"  ".repeat(i)}${head(n)}`);
  return [...up, ...nodeLines(t.episode, "  ".repeat(t.upstream.length))].join("\n");
}
