/**
 * Staging roots of warm spares (gateway/episode/staging.ts) on the host side: what a root holds
 * while an episode runs in it and after, without a sandbox (tests/runner.test.ts checks what an
 * agent inside bubblewrap can see).
 */
import { afterAll, describe, expect, test } from "bun:test";
import {
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { type AgentFiles, type Bind, StagingRoot } from "../gateway/episode/index.ts";

const host = mkdtempSync(join(tmpdir(), "fleet-staging-test-"));
afterAll(() => rmSync(host, { recursive: true, force: true }));

/** A runtime whose mount points sit under `host` (nothing is mounted: only the skeleton matters here). */
const RUNTIME: readonly Bind[] = [
  { kind: "dir", path: join(host, "runtime/lib") },
  { kind: "file", path: join(host, "runtime/bun") },
];

/** An agent's files on the host: a module, a local import and an npm package. */
function agent(name: string): AgentFiles {
  const app = join(host, "apps", name);
  mkdirSync(join(app, "lib"), { recursive: true });
  mkdirSync(join(app, "node_modules/pkg"), { recursive: true });
  writeFileSync(join(app, "agent.ts"), `export default "${name}";`);
  writeFileSync(join(app, "lib/util.ts"), `export const who = "${name}";`);
  writeFileSync(join(app, "node_modules/pkg/index.js"), `module.exports = "${name}";`);
  const files = [join(app, "agent.ts"), join(app, "lib/util.ts")];
  return { files, packages: [join(app, "node_modules/pkg")], watched: files, links: [] };
}

/** Every path in a root, relative to it, with a trailing slash for folders. */
function tree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      out.push(relative(dir, p) + (e.isDirectory() ? "/" : ""));
      if (e.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return out.sort();
}

describe("a warm spare's staging root", () => {
  test("staging shows the agent's files at their real paths; a root handed out again for no agent is emptied", () => {
    const root = StagingRoot.for(RUNTIME);
    const skeleton = tree(root.dir);
    const a = agent("alpha");
    root.stage(a);
    for (const f of a.files) expect(readFileSync(join(root.dir, f), "utf8")).toBe(readFileSync(f, "utf8"));
    expect(readFileSync(join(root.dir, a.packages[0]!, "index.js"), "utf8")).toBe('module.exports = "alpha";');
    root.recycle();
    const again = StagingRoot.for(RUNTIME);
    expect(again.dir).toBe(root.dir); // the root is reused
    expect(tree(again.dir)).toEqual(skeleton);
    again.recycle();
  });

  test("a recycled root handed out for another agent shows none of the first agent's files", () => {
    const first = StagingRoot.for(RUNTIME);
    first.stage(agent("bravo"));
    first.recycle();
    const b = agent("charlie");
    const again = StagingRoot.for(RUNTIME, b);
    expect(again.dir).toBe(first.dir);
    expect(tree(again.dir).some((p) => p.includes("bravo"))).toBe(false);
    again.stage(b);
    const shown = tree(again.dir);
    expect(shown.some((p) => p.includes("bravo"))).toBe(false);
    expect(shown.some((p) => p.includes("charlie"))).toBe(true);
    again.recycle();
  });

  test("a recycled root keeps its agent's files for that agent's next spare", () => {
    const a = agent("hotel");
    const root = StagingRoot.for(RUNTIME, a);
    root.stage(a);
    root.recycle();
    new StagingRoot(RUNTIME).recycle(); // another root, freed after it
    const next = StagingRoot.for(RUNTIME, a);
    expect(next.dir).toBe(root.dir);
    expect(next.holds(a)).toBe(true);
    next.stage(a); // nothing to move
    expect(readFileSync(join(next.dir, a.files[0]!), "utf8")).toBe('export default "hotel";');
    next.recycle();
  });

  test("a root staged for one agent and then for another shows only the second one's files", () => {
    const root = new StagingRoot(RUNTIME);
    const skeleton = tree(root.dir);
    const a = agent("india");
    const b = agent("juliet");
    root.stage(a);
    root.stage(b);
    const shown = tree(root.dir);
    expect(shown.some((p) => p.includes("india"))).toBe(false);
    expect(readFileSync(join(root.dir, b.files[0]!), "utf8")).toBe('export default "juliet";');
    expect(root.unstage()).toBe(true);
    expect(tree(root.dir)).toEqual(skeleton);
    root.remove();
  });

  test("the same agent staged again after a recycle sees its files as they are on the host", () => {
    const a = agent("delta");
    for (let i = 0; i < 3; i++) {
      writeFileSync(a.files[0]!, `export default "delta ${i}";`); // edited in place: the same file
      const root = StagingRoot.for(RUNTIME);
      root.stage(a);
      expect(readFileSync(join(root.dir, a.files[0]!), "utf8")).toBe(`export default "delta ${i}";`);
      root.recycle();
    }
  });

  test("two roots staged at once for the same agent each show its files", () => {
    const a = agent("echo");
    const r1 = new StagingRoot(RUNTIME);
    const r2 = new StagingRoot(RUNTIME);
    r1.stage(a);
    r2.stage(a);
    for (const r of [r1, r2]) expect(readFileSync(join(r.dir, a.files[1]!), "utf8")).toBe('export const who = "echo";');
    r1.recycle();
    expect(readFileSync(join(r2.dir, a.files[1]!), "utf8")).toBe('export const who = "echo";');
    r2.remove();
  });

  test("a file the runtime already mounts is not staged over its mount point", () => {
    const root = new StagingRoot(RUNTIME);
    const bun = join(host, "runtime/bun");
    root.stage({ files: [bun], packages: [], watched: [bun], links: [] });
    expect(statSync(join(root.dir, bun)).size).toBe(0); // still the empty mount point of the skeleton
    root.remove();
  });

  test("an npm package is shown whole without copying its bytes (its files linked, its symlinks kept)", () => {
    const a = agent("golf");
    const pkg = a.packages[0]!;
    mkdirSync(join(pkg, "lib"), { recursive: true });
    writeFileSync(join(pkg, "lib/real.js"), "module.exports = 1;");
    symlinkSync(join(pkg, "lib/real.js"), join(pkg, "alias.js"));
    symlinkSync("lib", join(pkg, "lib-link"));
    const root = new StagingRoot(RUNTIME);
    root.stage(a);
    const shown = (p: string) => join(root.dir, pkg, p);
    expect(statSync(shown("index.js")).ino).toBe(statSync(join(pkg, "index.js")).ino);
    // Links as they are: in the sandbox they resolve against its binds, as in a cold start.
    expect(readlinkSync(shown("alias.js"))).toBe(join(pkg, "lib/real.js"));
    expect(readlinkSync(shown("lib-link"))).toBe("lib");
    expect(readFileSync(shown("lib-link/real.js"), "utf8")).toBe("module.exports = 1;");
    root.remove();
  });

  test("a link out of a package stages nothing of what it points at (a token file, the data dir, /)", () => {
    const a = agent("hotel");
    const pkg = a.packages[0]!;
    const gateway = mkdtempSync(join(host, "gateway-data-"));
    writeFileSync(join(gateway, "local-admin.token"), "fleet_secret", { mode: 0o600 });
    symlinkSync(join(gateway, "local-admin.token"), join(pkg, "token.txt"));
    symlinkSync(gateway, join(pkg, "data"));
    symlinkSync("/", join(pkg, "everything"));
    const root = new StagingRoot(RUNTIME);
    root.stage(a);
    const staged = tree(root.dir).filter((p) => p.startsWith(relative("/", pkg)));
    // The links themselves, nothing under them, and no copy of the token anywhere in the root.
    for (const link of ["token.txt", "data", "everything"]) {
      expect(lstatSync(join(root.dir, pkg, link)).isSymbolicLink()).toBe(true);
      expect(staged.some((p) => p.startsWith(`${relative("/", join(pkg, link))}/`))).toBe(false);
    }
    const files = tree(root.dir).filter((p) => !p.endsWith("/"));
    const holdsToken = files.some((p) => {
      const at = join(root.dir, p);
      return !lstatSync(at).isSymbolicLink() && readFileSync(at, "utf8") === "fleet_secret";
    });
    expect(holdsToken).toBe(false);
    root.remove();
  });
});
