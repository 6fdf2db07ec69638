/**
 * Sealed checkpoints (docs/guarantees.md): `{agent, seq, parent, episode, spec_version, state}`
 * hashed with BLAKE3 over its canonical encoding; `parent` is the previous hash, so an
 * agent's history is a hash chain. A checkpoint whose hash does not match is refused.
 */
import { canonicalJson, blake3Hex, hashValue } from "../hash.ts";
import type { Blake3Hex } from "../spec/index.ts";
import type { CheckpointRow } from "./store.ts";

/** The sealed content of a checkpoint. */
export interface CheckpointRecord {
  readonly agent: string;
  readonly seq: number;
  readonly parent: string | null;
  readonly episode: string;
  readonly spec_version: string;
  readonly state: unknown;
  /**
   * `defineAgent({ version })` of the code that wrote `state` (docs/upgrading.md). Sealed only when
   * set, so checkpoints written before state versions existed keep their hashes.
   */
  readonly state_version?: number;
  /** The version the episode migrated the state from, when it ran `migrate`; sealed only when set. */
  readonly migrated_from?: number;
}

/** A stored checkpoint failed its integrity check. */
export class IntegrityError extends Error {
  override readonly name = "IntegrityError";
  constructor(
    readonly agent: string,
    readonly seq: number,
    readonly hash: string,
    /** What is wrong, without the checkpoint's name (the message has both). */
    readonly detail: string,
  ) {
    super(`checkpoint ${agent}#${seq} (${hash.slice(0, 12)}…): ${detail}`);
  }
}

/** Seal a record: its hash and the canonical state text to store. */
export async function sealCheckpoint(rec: CheckpointRecord): Promise<{ hash: Blake3Hex; stateText: string }> {
  const stateText = canonicalJson(rec.state);
  return { hash: await hashSealed(rec, stateText), stateText };
}

/** The hash covers the canonical header and the exact stored state text, byte for byte. */
function hashSealed(rec: Omit<CheckpointRecord, "state">, stateText: string): Promise<Blake3Hex> {
  const header = {
    agent: rec.agent,
    seq: rec.seq,
    parent: rec.parent,
    episode: rec.episode,
    spec_version: rec.spec_version,
    state_version: rec.state_version,
    migrated_from: rec.migrated_from,
  };
  return blake3Hex(`${canonicalJson(header)}\n${stateText}`);
}

/** Recompute a stored row's hash; throws IntegrityError on mismatch or unreadable state. */
export async function verifyCheckpointRow(row: CheckpointRow): Promise<unknown> {
  if (row.state === null)
    throw new IntegrityError(row.agent, row.seq, row.hash, "state was collected (tombstone); cannot be loaded");
  const hash = await hashSealed(
    {
      agent: row.agent,
      seq: row.seq,
      parent: row.parent,
      episode: row.episode,
      spec_version: row.specVersion,
      state_version: row.stateVersion ?? undefined,
      migrated_from: row.migratedFrom ?? undefined,
    },
    row.state,
  );
  if (hash !== row.hash)
    throw new IntegrityError(row.agent, row.seq, row.hash, `hash mismatch (recomputed ${hash.slice(0, 12)}…)`);
  try {
    return JSON.parse(row.state);
  } catch {
    throw new IntegrityError(row.agent, row.seq, row.hash, "stored state is not valid JSON");
  }
}

/** Hash of an episode's event log, stored with the episode and checked by `fleet verify`. */
export function hashEvents(events: readonly { seq: number; kind: string; data: string }[]): Promise<Blake3Hex> {
  return hashValue(events.map((e) => [e.seq, e.kind, e.data]));
}
