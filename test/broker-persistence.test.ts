/**
 * aedes-persistence's own conformance suite (`abstract.js`, unmodified) run against the
 * libSQL broker persistence, through a small adapter from its node:test-style `t` to bun:test.
 */
import { afterAll, expect, test } from "bun:test";
import assert from "node:assert";
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LibsqlPersistence } from "../broker/index.ts";

type Assert = Record<string, (...args: unknown[]) => void>;
interface TestContext {
  plan(n: number): void;
  diagnostic(msg: string): void;
  assert: Assert;
}

const require = createRequire(import.meta.url);
const abstract = require("aedes-persistence/abstract.js") as (opts: {
  test: (name: string, fn: (t: TestContext) => Promise<void>) => void;
  persistence: () => unknown;
  testAsync: boolean;
}) => void;

const dir = mkdtempSync(join(tmpdir(), "broker-persistence-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** node:test's `t` as abstract.js uses it: counted assertions (legacy node:assert) and `plan`. */
function adapt(name: string, fn: (t: TestContext) => Promise<void>): void {
  test(`aedes-persistence abstract: ${name}`, async () => {
    let planned: number | null = null;
    let count = 0;
    const counted: Assert = {};
    for (const k of ["equal", "notEqual", "deepEqual", "ok", "strictEqual", "deepStrictEqual"] as const) {
      counted[k] = (...args: unknown[]) => {
        count++;
        (assert[k] as (...a: unknown[]) => void)(...args);
      };
    }
    await fn({ plan: (p) => void (planned = p), diagnostic: () => undefined, assert: counted });
    if (planned !== null) expect(count).toBe(planned);
  });
}

abstract({
  test: adapt,
  persistence: () => new LibsqlPersistence({ path: join(dir, `p${n++}.db`), synchronous: "normal" }),
  testAsync: true,
});
