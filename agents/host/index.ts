/**
 * The episode host runtime: `main.ts` is the entry point of every episode subprocess
 * (it loads the agent module, runs one turn over IPC, and exits). The gateway spawns it
 * by path; nothing imports it as a library.
 */
import { fileURLToPath } from "node:url";

/** Absolute path of the episode subprocess entry point. */
export const HOST_ENTRY: string = fileURLToPath(new URL("./main.ts", import.meta.url));
