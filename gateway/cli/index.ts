/**
 * The `fleet` command line. `main.ts` is the entry point (the package's `fleet` bin):
 * it parses flags and dispatches to the commands in start.ts, read.ts (data dir, read-only),
 * ops.ts (through the running gateway's API, or the file when it is stopped), devices.ts and the rest,
 * each imported when its command runs. This door exports the context the commands share.
 */
export { type Cli, type CliFlags, createCli, UsageError } from "./context.ts";
export { DEFAULT_WATCHDOG_SEC, serviceBun, serviceUnit } from "./service.ts";
export { describeSend, type SendReport } from "./ops.ts";
export { runningLine, stopOnSignals } from "./start.ts";
