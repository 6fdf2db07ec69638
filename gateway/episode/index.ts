export * from "./decide.ts";
export * from "./effects.ts";
export * from "./executor.ts";
export * from "./records.ts";
export * from "./runner.ts";
export * from "./tools/index.ts";
export * from "./infra.ts";
export * from "./config-check.ts";
export { buildHostRuntime, hostBuildProblem, hostScript, runtimeDir } from "./host-runtime.ts";
