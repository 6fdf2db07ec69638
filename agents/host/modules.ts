/**
 * How agent bundles name the host runtime's own modules (docs/upgrading.md). A bundle imports the
 * SDK and the IPC protocol by these fixed specifiers, never by a path of the install that built it,
 * so it runs wherever the product is installed, and its hash is the code's alone. The episode host
 * (main.ts) answers them with its own copy: one `ToolDenied` class for the agent and the host.
 * Imports nothing, so the host pays nothing for it at start.
 */

/** The SDK (the package name an agent imports it by). */
export const SDK_SPECIFIER = "agent-fleets";

/** The IPC protocol: answered by the host runtime only (no package exports it). */
export const PROTOCOL_SPECIFIER = "agent-fleets/protocol";

/**
 * The SDK's or the protocol's absolute path, as bundles stored by releases before 2026-12-04 import
 * them (`/<install>/agents/sdk/index.ts`, `/<install>/agents/protocol.ts`); `legacyHostSpecifier`
 * says which. The host answers these too, so such a bundle runs after the install moved or went.
 */
export const LEGACY_HOST_IMPORT: RegExp = /^\/(?:.*\/)?agents\/(?:sdk\/index|protocol)\.ts$/;

/** The specifier a legacy absolute import of the SDK or protocol stands for, or null for any other path. */
export function legacyHostSpecifier(path: string): string | null {
  if (!LEGACY_HOST_IMPORT.test(path)) return null;
  return path.endsWith("/agents/protocol.ts") ? PROTOCOL_SPECIFIER : SDK_SPECIFIER;
}
