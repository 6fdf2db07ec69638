export * from "./authenticator.ts";
export * from "./local.ts";
export * from "./scopes.ts";
export * from "./sessions.ts";
export * from "./tokens.ts";
