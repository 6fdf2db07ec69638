/**
 * The bare episode baseline's child: says "ready", answers the first message, and waits
 * to be killed (as the gateway's runner kills an episode's process group after "done").
 * Given JOIN_CGROUP_ARG, it first joins the memory cgroup whose cgroup.procs is open on
 * CGROUP_PROCS_FD, as the episode host does (agents/host/main.ts).
 */
import { CGROUP_PROCS_FD, JOIN_CGROUP_ARG } from "../../agents/protocol.ts";

process.on("message", (msg: unknown) => {
  process.send!({ t: "done", echo: msg });
});

if (process.argv.includes(JOIN_CGROUP_ARG)) {
  const procs = Bun.file(CGROUP_PROCS_FD).writer();
  procs.write("0");
  void Promise.resolve(procs.flush())
    .then(() => procs.end())
    .then(
      () => process.send!({ t: "ready" }),
      () => process.exit(70),
    );
} else process.send!({ t: "ready" });
