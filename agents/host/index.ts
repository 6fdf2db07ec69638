/**
 * The episode host runtime: `main.ts` is the entry point of every episode subprocess
 * (it loads the agent module, runs one turn over IPC, and exits). The gateway spawns it
 * by path; nothing imports it as a library.
 */
import { fileURLToPath } from "node:url";

/** Absolute path of the episode subprocess entry point. */
export const HOST_ENTRY: string = fileURLToPath(new URL("./main.ts", import.meta.url));

/**
 * Everything the host runtime loads besides the agent's own files: this folder, the SDK and
 * the IPC protocol. The sandbox makes exactly these (read-only) visible of the project.
 */
export const HOST_PATHS: readonly string[] = Object.freeze([
  fileURLToPath(new URL(".", import.meta.url)).replace(/\/$/, ""),
  fileURLToPath(new URL("../sdk", import.meta.url)),
  fileURLToPath(new URL("../protocol.ts", import.meta.url)),
]);

/** The IPC protocol module (agents may import CHILD_CHANNEL_FD and friends from it). */
export const PROTOCOL_ENTRY: string = fileURLToPath(new URL("../protocol.ts", import.meta.url));

/** The SDK's entry point (package `agent-fleets`): bundles import it from here (gateway/code). */
export const SDK_ENTRY: string = fileURLToPath(new URL("../sdk/index.ts", import.meta.url));
