/**
 * Regenerate the docs that are derived from code: docs/fleet-toml.md from the zod schema.
 * test/docs.test.ts fails when a committed page differs from what this writes.
 *
 * Usage: bun scripts/gen-docs.ts
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { fleetTomlReference } from "../gateway/spec/index.ts";

const target = join(import.meta.dir, "..", "docs", "fleet-toml.md");
writeFileSync(target, fleetTomlReference());
console.log(`wrote ${target}`);
