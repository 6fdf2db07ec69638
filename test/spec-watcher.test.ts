/**
 * The fleet.toml watcher (gateway/fleet/reload.ts): a file written in place is deployed only
 * once it has settled, never a truncated state it passes through; a rename is picked up too.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SETTLE_MS, SpecWatcher } from "../gateway/fleet/index.ts";

const dir = mkdtempSync(join(tmpdir(), "fleet-spec-watcher-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const OLD = '[agents.a]\nmodule = "a.ts"\nsubscribe = ["a/+/r"]\n\n[agents.b]\nmodule = "b.ts"\n';
const NEW = `${OLD}subscribe = ["b/+/r"]\n`;

/** Watch `path` (its text now is the deployed one); `seen` gets the file's text at each onChange. */
function watching(path: string) {
  const seen: string[] = [];
  const w = new SpecWatcher(path, () => seen.push(readFileSync(path, "utf8")));
  w.start(readFileSync(path, "utf8"));
  return { seen, stop: () => w.stop() };
}

/** Write `text` into `path` in place (truncate, then two writes `pauseMs` apart), as `cat >` or scp do. */
async function writeInPlace(path: string, text: string, cut: number, pauseMs: number): Promise<void> {
  const f = await open(path, "w");
  await f.write(text.slice(0, cut));
  await f.sync();
  await Bun.sleep(pauseMs);
  await f.write(text.slice(cut));
  await f.close();
}

async function until(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await Bun.sleep(20);
}

describe("SpecWatcher", () => {
  test("a fleet.toml written in place with a pause is deployed once, whole, not its truncated part", async () => {
    const path = join(dir, "in-place.toml");
    writeFileSync(path, OLD);
    const w = watching(path);
    try {
      // The first write leaves a valid spec without type b: it must never be deployed.
      await writeInPlace(path, NEW, NEW.indexOf("[agents.b]"), 300);
      await until(() => w.seen.length > 0, 10_000);
      await Bun.sleep(SETTLE_MS + 500);
      expect(w.seen).toEqual([NEW]);
    } finally {
      w.stop();
    }
  }, 20_000);

  test("a file replaced by rename is deployed once it has been still for the settle window", async () => {
    const path = join(dir, "renamed.toml");
    writeFileSync(path, OLD);
    const w = watching(path);
    try {
      const at = Date.now();
      writeFileSync(`${path}.tmp`, NEW);
      renameSync(`${path}.tmp`, path);
      await until(() => w.seen.length > 0, 10_000);
      expect(w.seen).toEqual([NEW]);
      expect(Date.now() - at).toBeGreaterThanOrEqual(SETTLE_MS);
    } finally {
      w.stop();
    }
  }, 20_000);

  test("an agent module written in place with a pause is deployed once, after it has settled", async () => {
    const path = join(dir, "code.toml");
    const module = join(dir, "agent.ts");
    writeFileSync(path, OLD);
    writeFileSync(module, "export default 1;\n");
    const code: string[] = [];
    const w = new SpecWatcher(path, () => code.push(readFileSync(module, "utf8")), { codeFiles: () => [module] });
    w.start(OLD);
    try {
      const text = "export const a = 1;\nexport default a;\n";
      await writeInPlace(module, text, text.indexOf("export default"), 300);
      await until(() => code.length > 0, 10_000);
      await Bun.sleep(1500);
      expect(code).toEqual([text]);
    } finally {
      w.stop();
    }
  }, 20_000);
});
