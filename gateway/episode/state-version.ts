/**
 * The state version a committed checkpoint records (docs/upgrading.md) is the gateway's to decide,
 * not the subprocess's. The child's `done` says which version it ran and what it migrated from, but
 * agent code can write that message itself (fd 3): a forged `version: 999` stamped into a checkpoint
 * made the next episode of the real code (version 1) fail `invalid_state`, and every later deploy of
 * the type was refused as lowering the version, with no way out. So the gateway stamps the version the
 * code declares (read in a check subprocess, once per bundle), and a claim that differs from it, or a
 * migration other than the one due, fails the episode as `protocol`: nothing is committed.
 */

/** What the gateway stamps into the checkpoint. */
export interface StampedVersion {
  readonly version: number;
  /** The previous checkpoint's version, when this episode migrated the state from it. */
  readonly migratedFrom?: number;
}

/** Why the claim is not stamped: the child's lie (`protocol`), or the gateway could not tell (`infra`). */
export interface VersionRefused {
  readonly kind: "protocol" | "infra";
  readonly message: string;
}

/**
 * The version to stamp for an episode whose child claimed `claim`. `declared`: the code's
 * `defineAgent({ version })` as the gateway read it, null when it could not; `previous`: the version of
 * the state the episode started from (1 when its checkpoint records none); `fresh`: it started from init().
 */
export function confirmStateVersion(
  claim: { readonly version?: number; readonly migratedFrom?: number },
  known: { readonly declared: number | null; readonly previous: number; readonly fresh: boolean },
): StampedVersion | VersionRefused {
  const claimed = claim.version ?? 1;
  const { declared, previous, fresh } = known;
  if (declared === null) {
    // Unknown code version: only a claim that changes nothing is taken (the state's own version, or 1 for new state).
    const unchanged = claim.migratedFrom === undefined && claimed === (fresh ? 1 : previous);
    if (unchanged) return { version: claimed };
    return {
      kind: "infra",
      message:
        `the subprocess reported state version ${claimed}, and the version its code declares could not be read ` +
        "(a check of the code failed): nothing is committed",
    };
  }
  if (claimed !== declared)
    return {
      kind: "protocol",
      message:
        `the subprocess reported state version ${claimed}; its code declares version ${declared} ` +
        "(defineAgent({ version })): nothing is committed",
    };
  if (!fresh && previous > declared)
    return {
      kind: "protocol",
      message: `the subprocess ended an episode on state of version ${previous}, newer than its code's ${declared}`,
    };
  const due = !fresh && previous < declared ? previous : undefined;
  if (claim.migratedFrom !== due) {
    const said = claim.migratedFrom === undefined ? "no migration" : `a migration from version ${claim.migratedFrom}`;
    const wanted = due === undefined ? "none was due" : `one from version ${due} was due`;
    const state = fresh ? "none: new state" : previous;
    return {
      kind: "protocol",
      message:
        `the subprocess reported ${said}; ${wanted} (state version ${state}, code version ${declared}): ` +
        "nothing is committed",
    };
  }
  return due === undefined ? { version: declared } : { version: declared, migratedFrom: due };
}
