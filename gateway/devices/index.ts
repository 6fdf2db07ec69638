export * from "./acl.ts";
export * from "./file.ts";
export * from "./registry.ts";
export * from "./secret.ts";
export * from "./mosquitto.ts";
export * from "./crl.ts";
