/**
 * Hot redeploy support: watching fleet.toml and describing what changed between two
 * spec versions. redeploy.ts applies the change.
 */
import { statSync, watch, type FSWatcher } from "node:fs";
import { readFile } from "node:fs/promises";
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

/**
 * Calls `onChange` when the file's text changes: fs.watch on its directory (editors
 * replace files by rename) plus a poll as a safety net, debounced. The poll also looks at
 * `codeFiles` (the agent modules and what they import): an edit there is new code to deploy.
 */
export class SpecWatcher {
  private last: string | null = null;
  private codeStamp: string | null = null;
  private watcher: FSWatcher | null = null;
  private poll: ReturnType<typeof setInterval> | null = null;
  private debounce: ReturnType<typeof setTimeout> | null = null;

  constructor(
    private readonly path: string,
    private readonly onChange: () => void,
    private readonly pollMs = 1000,
    private readonly codeFiles: () => readonly string[] = () => [],
  ) {}

  /** Start watching; `initialText` is the text already loaded. */
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
      const stamp = this.stampCode();
      if (stamp !== this.codeStamp) {
        this.codeStamp = stamp;
        this.onChange();
      }
      this.check();
    }, this.pollMs);
    this.poll.unref?.();
  }

  stop(): void {
    this.watcher?.close();
    if (this.poll) clearInterval(this.poll);
    if (this.debounce) clearTimeout(this.debounce);
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

  private check(): void {
    if (this.debounce) clearTimeout(this.debounce);
    this.debounce = setTimeout(async () => {
      const text = await readFile(this.path, "utf8").catch(() => null);
      if (text === null || text === this.last) return;
      this.last = text;
      this.onChange();
    }, 100);
  }
}
