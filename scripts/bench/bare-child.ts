/**
 * The bare episode baseline's child: says "ready", answers the first message, and waits
 * to be killed (as the gateway's runner kills an episode's process group after "done").
 * Given JOIN_CGROUP_ARG, it first joins the memory cgroup whose cgroup.procs is open on
 * CGROUP_PROCS_FD, as the episode host does (agents/host/main.ts); given NICE_ARG, it lowers its priority first;
 * it raises its oom_score_adj as the host does.
 */
import { getPriority, setPriority } from "node:os";
import { CGROUP_PROCS_FD, EPISODE_OOM_SCORE_ADJ, JOIN_CGROUP_ARG, niceArg } from "../../agents/protocol.ts";

// As the episode host lowers its own priority when asked (NICE_ARG), in place of a `nice` wrapper.
const lowerBy = niceArg(process.argv);
if (lowerBy !== null) setPriority(Math.min(19, getPriority() + lowerBy));
// And makes itself the OOM killer's first choice (agents/host/main.ts raiseOomScore), before it says ready.
// Through Bun.write, not node:fs: importing node:fs costs a fresh Bun ~3 ms of CPU, which the host (which
// imports it anyway) does not pay for this, and the baseline must not either.
const oom = Bun.write("/proc/self/oom_score_adj", String(EPISODE_OOM_SCORE_ADJ)).catch(() => 0);

process.on("message", (msg: unknown) => {
  process.send!({ t: "done", echo: msg });
});

if (process.argv.includes(JOIN_CGROUP_ARG)) {
  const procs = Bun.file(CGROUP_PROCS_FD).writer();
  procs.write("0");
  void Promise.resolve(procs.flush())
    .then(() => procs.end())
    .then(() => oom)
    .then(
      () => process.send!({ t: "ready" }),
      () => process.exit(70),
    );
} else void oom.then(() => process.send!({ t: "ready" }));
