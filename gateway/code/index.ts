export * from "./bundle.ts";
export * from "./files.ts";
export * from "./pin.ts";
export * from "./source-map.ts";
export * from "./scope.ts";
