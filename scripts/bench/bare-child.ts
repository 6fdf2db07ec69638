/**
 * The bare episode baseline's child: says "ready", answers the first message, and waits
 * to be killed (as the gateway's runner kills an episode's process group after "done").
 */
process.on("message", (msg: unknown) => {
  process.send!({ t: "done", echo: msg });
});
process.send!({ t: "ready" });
