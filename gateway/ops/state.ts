/**
 * `fleet state <agent> [--at SEQ] [--diff A..B]`: an agent's state at any retained
 * checkpoint, and what changed between two of them as an RFC 6902 JSON Patch.
 */
import { type CheckpointRow, IntegrityError, type Store, verifyCheckpointRow } from "../store/index.ts";
import type { AgentId } from "../types.ts";

/** One change between two states (RFC 6902 subset: the ops a diff needs). */
export type PatchOp =
  | { readonly op: "add"; readonly path: string; readonly value: unknown }
  | { readonly op: "remove"; readonly path: string; readonly from_value: unknown }
  | { readonly op: "replace"; readonly path: string; readonly from_value: unknown; readonly value: unknown };

/** An agent's state at one checkpoint. */
export interface StateAt {
  readonly agent: string;
  readonly seq: number;
  readonly hash: string;
  readonly episode: string;
  readonly created_at: number;
  /** null when retention collected this checkpoint's state (the hash stays in the chain). */
  readonly state: unknown;
  readonly collected: boolean;
}

/**
 * Why a state read has nothing to show: `tampered` when the stored state does not hash to its
 * checkpoint (it is refused, as loading it for an episode is, rather than shown under that hash).
 */
export type StateMiss =
  | { readonly code: "no_agent"; readonly message: string }
  | { readonly code: "no_checkpoint"; readonly message: string }
  | { readonly code: "tampered"; readonly message: string };

const pointerToken = (key: string) => key.replaceAll("~", "~0").replaceAll("/", "~1");
const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/** The JSON Patch that turns `a` into `b` (objects by key, arrays by index). */
export function diffJson(a: unknown, b: unknown, path = ""): PatchOp[] {
  if (isObject(a) && isObject(b)) {
    const ops: PatchOp[] = [];
    for (const k of Object.keys(a).sort()) {
      if (!Object.hasOwn(b, k)) ops.push({ op: "remove", path: `${path}/${pointerToken(k)}`, from_value: a[k] });
      else ops.push(...diffJson(a[k], b[k], `${path}/${pointerToken(k)}`));
    }
    for (const k of Object.keys(b).sort()) {
      if (!Object.hasOwn(a, k)) ops.push({ op: "add", path: `${path}/${pointerToken(k)}`, value: b[k] });
    }
    return ops;
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    const ops: PatchOp[] = [];
    const common = Math.min(a.length, b.length);
    for (let i = 0; i < common; i++) ops.push(...diffJson(a[i], b[i], `${path}/${i}`));
    for (let i = common; i < b.length; i++) ops.push({ op: "add", path: `${path}/${i}`, value: b[i] });
    // Remove from the end so each index is valid when its op applies.
    for (let i = a.length - 1; i >= common; i--) ops.push({ op: "remove", path: `${path}/${i}`, from_value: a[i] });
    return ops;
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [{ op: "replace", path, from_value: a, value: b }];
}

/** The state of `row`, checked against its hash as the loader checks it. */
async function stateOf(agent: string, row: CheckpointRow): Promise<StateAt | StateMiss> {
  let state: unknown = null;
  if (row.state !== null) {
    try {
      state = await verifyCheckpointRow(row);
    } catch (err) {
      if (!(err instanceof IntegrityError)) throw err;
      const message = `${err.message}: its stored state is not shown (\`fleet verify\` checks every checkpoint)`;
      return { code: "tampered", message };
    }
  }
  return {
    agent,
    seq: row.seq,
    hash: row.hash,
    episode: row.episode,
    created_at: row.createdAt,
    state,
    collected: row.state === null,
  };
}

/** The state at checkpoint `seq` (default: the head). */
export async function stateAt(store: Store, agent: AgentId, seq?: number): Promise<StateAt | StateMiss> {
  const a = await store.getAgent(agent);
  if (!a) return { code: "no_agent", message: `no agent ${agent}` };
  const want = seq ?? a.headSeq;
  if (want === 0) return { code: "no_checkpoint", message: `${agent} has no checkpoint yet (no episode committed)` };
  const row = await store.checkpointAt(agent, want);
  if (!row) {
    const hint = want <= a.anchorSeq ? " (collected by retention)" : ` (head is #${a.headSeq})`;
    return { code: "no_checkpoint", message: `${agent} has no checkpoint #${want}${hint}` };
  }
  return stateOf(agent, row);
}

/** The patch from checkpoint `from` to checkpoint `to`. */
export async function stateDiff(
  store: Store,
  agent: AgentId,
  from: number,
  to: number,
): Promise<{ from: StateAt; to: StateAt; patch: PatchOp[] } | StateMiss> {
  const a = await stateAt(store, agent, from);
  if ("code" in a) return a;
  const b = await stateAt(store, agent, to);
  if ("code" in b) return b;
  if (a.collected || b.collected) {
    return { code: "no_checkpoint", message: `the state of #${a.collected ? from : to} was collected by retention` };
  }
  return { from: a, to: b, patch: diffJson(a.state, b.state) };
}
