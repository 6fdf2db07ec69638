#!/usr/bin/env bun
/**
 * Summarise a V8-format CPU profile (`bun --cpu-prof`, written by the benches with
 * BENCH_PROFILE_DIR=DIR) by sample counts: the functions most often on top of the stack (self)
 * and on the stack at all (inclusive).
 *
 *   bun scripts/profile-summary.ts DIR/episodes.cpuprofile [--top 40] [--from SECONDS]
 *
 * Counts, not the time between samples: a sampler that stops while the thread sleeps in the
 * event loop hands the whole gap to the next sample, which makes "self time" of whatever ran
 * after an idle spell look huge (the markdown profile's failure mode). `--from` skips start-up.
 */
import { scriptArgs, usageError, wholeFlag } from "./bench/cli.ts";

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
  readonly children?: readonly number[];
}

interface Profile {
  readonly nodes: readonly ProfileNode[];
  readonly samples: readonly number[];
  readonly timeDeltas: readonly number[];
  readonly startTime: number;
  readonly endTime: number;
}

const USAGE = `usage: bun scripts/profile-summary.ts FILE.cpuprofile [--top 40] [--from SECONDS]
  self and inclusive time per function of a CPU profile (--from: skip the first seconds)`;
const { values, positionals } = scriptArgs(USAGE, {
  options: { top: { type: "string", default: "40" }, from: { type: "string", default: "0" } },
  allowPositionals: true,
});
const file = positionals[0];
if (!file) usageError(USAGE, "which profile? (FILE.cpuprofile)");
const top = wholeFlag(USAGE, "top", values.top);
const fromUs = wholeFlag(USAGE, "from", values.from, 0) * 1e6;
const profile = (await Bun.file(file).json()) as Profile;

const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const root = process.cwd();
const label = (n: ProfileNode): string => {
  const url = n.callFrame.url.startsWith(root) ? n.callFrame.url.slice(root.length + 1) : n.callFrame.url;
  return `${n.callFrame.functionName || "(anonymous)"} ${url ? `${url}:${n.callFrame.lineNumber + 1}` : "[native]"}`;
};
const IDLE = new Set(["(idle)", "(program)", "(root)", "(garbage collector)"]);

const self = new Map<string, number>();
const inclusive = new Map<string, number>();
let counted = 0;
let at = 0;
profile.samples.forEach((id, i) => {
  at += profile.timeDeltas[i] ?? 0;
  const leaf = nodes.get(id);
  if (at < fromUs || !leaf || IDLE.has(leaf.callFrame.functionName)) return;
  counted++;
  const name = label(leaf);
  self.set(name, (self.get(name) ?? 0) + 1);
  const seen = new Set<string>();
  for (let n: number | undefined = id; n !== undefined; n = parent.get(n)) {
    const node = nodes.get(n)!;
    const l = label(node);
    if (IDLE.has(node.callFrame.functionName) || seen.has(l)) continue;
    seen.add(l);
    inclusive.set(l, (inclusive.get(l) ?? 0) + 1);
  }
});

const span = (profile.endTime - profile.startTime) / 1e6;
console.log(`${file}: ${counted} samples on the JS thread over ${span.toFixed(1)} s (from ${values.from} s)`);
for (const [title, counts] of [
  ["self", self],
  ["inclusive", inclusive],
] as const) {
  console.log(`\n## ${title}\n`);
  for (const [name, n] of [...counts].sort((a, b) => b[1] - a[1]).slice(0, top))
    console.log(`${((100 * n) / Math.max(1, counted)).toFixed(1).padStart(5)}%  ${String(n).padStart(6)}  ${name}`);
}
