export * from "./server.ts";
export { intakeResponse, refusedResponse } from "./hooks.ts";
export { type AccessDeps, type AuditEntry, createGuard, needOf } from "./access.ts";
export { BodyBudget, readRequestBody } from "./limits.ts";
export { signInPage } from "./session.ts";
export { activityRoutes } from "./activity.ts";
