export * from "./bundle.ts";
export * from "./files.ts";
export * from "./pin.ts";
