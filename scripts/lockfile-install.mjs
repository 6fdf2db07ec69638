// npm does not read bun.lock. After `npm install` has brought Bun (a dev dependency),
// re-install with Bun from the committed lockfile so every machine runs the same
// dependency tree. Under `bun install` this is a no-op (Bun already used the lockfile).
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";

const agent = process.env.npm_config_user_agent ?? "";
const bun = "node_modules/.bin/bun";
if (agent.startsWith("npm") && existsSync(bun) && existsSync("bun.lock")) {
  execFileSync(bun, ["install", "--frozen-lockfile", "--ignore-scripts"], { stdio: "inherit" });
}
