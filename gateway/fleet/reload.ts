/**
 * Hot redeploy support: watching fleet.toml and describing what changed between two
 * spec versions. redeploy.ts applies the change.
 */
import { statSync, watch, type FSWatcher } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { basename, dirname } from "node:path";
import { canonicalJson } from "../hash.ts";
import type { FleetSpec } from "../spec/index.ts";

/** What a new spec changes, by agent type. */
export interface SpecDiff {
  readonly added: string[];
  readonly removed: string[];
  readonly changed: string[];
  /** One line for the log and the spec_versions table. */
  readonly summary: string;
}

/** Compare two compiled specs. */
export function diffSpecs(before: FleetSpec, after: FleetSpec): SpecDiff {
  const added = Object.keys(after.agents).filter((t) => !before.agents[t]);
  const removed = Object.keys(before.agents).filter((t) => !after.agents[t]);
  const changed = Object.keys(after.agents).filter(
    (t) => before.agents[t] && canonicalJson(before.agents[t]) !== canonicalJson(after.agents[t]),
  );
  const other = (["fleet", "broker", "http", "llm", "hooks", "retention"] as const).filter(
    (k) => canonicalJson(before[k]) !== canonicalJson(after[k]),
  );
  const parts = [
    added.length ? `added ${added.join(", ")}` : "",
    removed.length ? `removed ${removed.join(", ")}` : "",
    changed.length ? `changed ${changed.join(", ")}` : "",
    other.length ? `changed [${other.join("], [")}]` : "",
  ].filter(Boolean);
  return { added, removed, changed, summary: parts.join("; ") || "no effective change" };
}

/** How long a changed file must stay the same before it is deployed (SpecWatcher). */
export const SETTLE_MS = 1000;

/** What a SpecWatcher compares between two reads: a changed file is deployed once two agree. */
interface Sample {
  readonly text: string;
  readonly stamp: string;
}

/** Options of a SpecWatcher; the defaults are the gateway's. */
export interface SpecWatcherOptions {
  /** How often the file and `codeFiles` are polled (a safety net under fs.watch). */
  readonly pollMs?: number;
  /** How long a changed file must stay the same (text, size and mtime) before `onChange`. */
  readonly settleMs?: number;
  /** The agent modules and what they import: an edit there is new code to deploy. */
  readonly codeFiles?: () => readonly string[];
}

/**
 * Calls `onChange` when the file's text changes and has settled: fs.watch on its directory
 * (editors replace files by rename) plus a poll as a safety net. A file written in place
 * (`cat >`, scp, rsync --inplace) passes through truncated states that may well parse (a
 * prefix that ends before an `[agents.X]` table removes type X), so a change is deployed only
 * once two reads `settleMs` apart find the same text, size and mtime. The poll also looks at
 * `codeFiles`; a change there is deployed once two polls in a row agree on it.
 */
export class SpecWatcher {
  private last: string | null = null;
  private codeStamp: string | null = null;
  /** A changed code stamp seen by the last poll, not yet deployed (it must hold for one more poll). */
  private codeCandidate: string | null = null;
  /** The changed file as the last read found it, not yet deployed (it must hold for `settleMs`). */
  private candidate: Sample | null = null;
  private watcher: FSWatcher | null = null;
  private poll: ReturnType<typeof setInterval> | null = null;
  private settle: ReturnType<typeof setTimeout> | null = null;
  private readonly pollMs: number;
  private readonly settleMs: number;
  private readonly codeFiles: () => readonly string[];

  constructor(
    private readonly path: string,
    private readonly onChange: () => void,
    opts: SpecWatcherOptions = {},
  ) {
    this.pollMs = opts.pollMs ?? 1000;
    this.settleMs = opts.settleMs ?? SETTLE_MS;
    this.codeFiles = opts.codeFiles ?? (() => []);
  }

  /** Start watching; `initialText` is the file's text as last read (a different text is a change). */
  start(initialText: string): void {
    this.last = initialText;
    try {
      const name = basename(this.path);
      this.watcher = watch(dirname(this.path), (_e, file) => {
        if (!file || file.toString() === name) this.check();
      });
    } catch {
      // no inotify: the poll still works
    }
    this.codeStamp = this.stampCode();
    this.poll = setInterval(() => {
      this.checkCode();
      this.check();
    }, this.pollMs);
    this.poll.unref?.();
  }

  stop(): void {
    this.watcher?.close();
    if (this.poll) clearInterval(this.poll);
    this.poll = null;
    if (this.settle) clearTimeout(this.settle);
    this.settle = null;
  }

  /** A code change is deployed when two polls in a row see the same new stamp (a file written in place has settled). */
  private checkCode(): void {
    const stamp = this.stampCode();
    if (stamp === this.codeStamp) {
      this.codeCandidate = null;
    } else if (stamp !== this.codeCandidate) {
      this.codeCandidate = stamp;
    } else {
      this.codeStamp = stamp;
      this.codeCandidate = null;
      this.onChange();
    }
  }

  /** Size and mtime of every code file: changes when any is edited, replaced or removed. */
  private stampCode(): string {
    let files: readonly string[];
    try {
      files = this.codeFiles();
    } catch {
      return this.codeStamp ?? "";
    }
    return files
      .map((f) => {
        try {
          const st = statSync(f);
          return `${f}:${st.size}:${st.mtimeMs}`;
        } catch {
          return `${f}:-`;
        }
      })
      .join("\n");
  }

  /** The file may have changed: read it soon, unless a read is already planned. */
  private check(): void {
    if (this.settle) return;
    this.settle = setTimeout(() => void this.sample(), 100);
  }

  /**
   * Read the file. The same text as deployed: nothing to do. A text that differs from the
   * last read (or a size or mtime that does): it is still being written, read again in
   * `settleMs`. The same changed text twice: settled, deploy it.
   */
  private async sample(): Promise<void> {
    const now = await read(this.path);
    this.settle = null;
    if (this.poll === null) return; // stopped meanwhile
    if (now === null || now.text === this.last) {
      this.candidate = null;
      return;
    }
    const before = this.candidate;
    if (before && before.text === now.text && before.stamp === now.stamp) {
      this.candidate = null;
      this.last = now.text;
      this.onChange();
      return;
    }
    this.candidate = now;
    this.settle = setTimeout(() => void this.sample(), this.settleMs);
  }
}

/** The file's text with its size and mtime (read after it), or null while it cannot be read. */
async function read(path: string): Promise<Sample | null> {
  try {
    const text = await readFile(path, "utf8");
    const st = await stat(path);
    return { text, stamp: `${st.size}:${st.mtimeMs}` };
  } catch {
    return null;
  }
}
