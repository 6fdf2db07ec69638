#!/usr/bin/env bun
/**
 * What starting one sandbox costs the machine, for the runner's own command line and variants of it:
 *
 *   bun scripts/bench-sandbox.ts [--starts 200] [--rounds 5]
 *
 * Each start runs the command line the runner gives a warm spare (`hostCommand`: prlimit, bubblewrap
 * with the runtime's binds, a uid of its own) with `bun -e 0` inside in place of the host runtime, and
 * waits for it to exit. The variants add back what the runner no longer does (a `nice` exec in front,
 * the host runtime's sources bound) or take away what it still does (prlimit), in alternating rounds.
 * Per start it prints the machine's CPU (every core, `/proc/stat`: the child, bubblewrap, the kernel's
 * workers) and the CPU `wait4` reports for the process tree (bubblewrap's inner processes are reaped
 * inside its pid namespace, so this misses most of them, but it is steadier). Run it on a quiet box;
 * it measures, it does not test.
 */
import { HOST_PATHS } from "../agents/host/index.ts";
import { defaultSpawnOptions, hostCommand, type ProcessLimits } from "../gateway/episode/index.ts";
import { scriptArgs, wholeFlag } from "./bench/cli.ts";
import { machineBusyMs, quantile } from "./bench/harness.ts";

const USAGE = `usage: bun scripts/bench-sandbox.ts [--starts 200] [--rounds 5]
  the machine's CPU per sandbox start, for the runner's command line and variants of it`;
const { values } = scriptArgs(USAGE, {
  options: { starts: { type: "string", default: "200" }, rounds: { type: "string", default: "5" } },
});
const STARTS = wholeFlag(USAGE, "starts", values.starts);
const ROUNDS = wholeFlag(USAGE, "rounds", values.rounds);

const spawn = defaultSpawnOptions("auto");
if (!spawn.bwrap) {
  console.error("bubblewrap is not usable here: nothing to measure");
  process.exit(1);
}
// A generous process limit: a uid's exiting processes still count for a moment after the start returns.
const limits: ProcessLimits = { timeoutMs: 10_000, memoryMb: 128, maxOpenFiles: 256, maxProcesses: 4096 };
const runner = hostCommand(limits, { ...spawn, memcg: null });
/** The command with `bun -e 0` after bubblewrap's `--` in place of the host runtime and its arguments. */
const bunInside = (cmd: string[]) => [...cmd.slice(0, cmd.lastIndexOf("--") + 1), spawn.bun, "-e", "0"];
const remount = runner.indexOf("--remount-ro");
const bwrapAt = runner.indexOf(spawn.bwrap);
const variants: Record<string, string[]> = {
  "the runner's": bunInside(runner),
  "+ a nice exec": ["/usr/bin/nice", "-n", "19", ...bunInside(runner)],
  "+ the host's sources bound": bunInside([
    ...runner.slice(0, remount),
    ...HOST_PATHS.flatMap((p) => ["--ro-bind", p, p]),
    ...runner.slice(remount),
  ]),
  "- prlimit": bunInside(runner.slice(bwrapAt)),
};

const machine: Record<string, number[]> = {};
const tree: Record<string, number[]> = {};
for (let round = 0; round < ROUNDS; round++)
  for (const [name, cmd] of Object.entries(variants)) {
    const before = machineBusyMs();
    let treeMs = 0;
    for (let i = 0; i < STARTS; i++) {
      const uid = spawn.uids?.take() ?? null;
      const proc = Bun.spawn(cmd, {
        env: {},
        stdout: "ignore",
        stderr: "inherit",
        detached: true,
        ...(uid !== null ? { uid, gid: uid } : {}),
      });
      const code = await proc.exited;
      if (uid !== null) spawn.uids?.give(uid);
      if (code !== 0) throw new Error(`${name}: exit code ${code}`);
      const usage = proc.resourceUsage();
      if (usage) treeMs += (Number(usage.cpuTime.user) + Number(usage.cpuTime.system)) / 1000;
    }
    (machine[name] ??= []).push((machineBusyMs() - before) / STARTS);
    (tree[name] ??= []).push(treeMs / STARTS);
  }

const median = (v: number[]) => quantile(v, 0.5);
const base = median(machine["the runner's"]!);
console.log(`sandbox starts: ${STARTS} per variant and round, ${ROUNDS} rounds, medians (ms of CPU per start)`);
console.log(
  `${"variant".padEnd(28)} ${"machine".padStart(8)} ${"vs runner".padStart(10)} ${"tree".padStart(6)}  rounds`,
);
for (const name of Object.keys(variants)) {
  const m = median(machine[name]!);
  const delta = name === "the runner's" ? "" : `${m - base >= 0 ? "+" : ""}${(m - base).toFixed(2)}`;
  const rounds = machine[name]!.map((x) => x.toFixed(1)).join(" ");
  const treeMs = median(tree[name]!).toFixed(2);
  console.log(`${name.padEnd(28)} ${m.toFixed(2).padStart(8)} ${delta.padStart(10)} ${treeMs.padStart(6)}  ${rounds}`);
}
