export * from "./server.ts";
export { intakeResponse } from "./hooks.ts";
