/**
 * The episode host runtime: `main.ts` is the entry point of every episode subprocess
 * (it loads the agent module, runs one turn over IPC, and exits). The gateway spawns it
 * by path; nothing imports it as a library.
 */
import { fileURLToPath } from "node:url";
import { PROTOCOL_SPECIFIER, SDK_SPECIFIER } from "./modules.ts";

export { LEGACY_HOST_IMPORT, legacyHostSpecifier, PROTOCOL_SPECIFIER, SDK_SPECIFIER } from "./modules.ts";

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

/** The SDK's entry point (package `agent-fleets`). */
export const SDK_ENTRY: string = fileURLToPath(new URL("../sdk/index.ts", import.meta.url));

/** The modules the host runtime answers for agent bundles: each one's file, and the specifier bundles import it by. */
export const HOST_MODULES: Readonly<Record<string, string>> = Object.freeze({
  [SDK_ENTRY]: SDK_SPECIFIER,
  [PROTOCOL_ENTRY]: PROTOCOL_SPECIFIER,
});
