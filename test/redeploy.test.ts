/**
 * A reload is applied in steps: the new version is stored and adopted (new episodes start on it),
 * then its instances, retired types, budgets and timers are brought in line. A write that fails
 * between the two (the disk filled) must not leave the version half applied: the next reload
 * finishes it, though fleet.toml has not changed since.
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { agentId } from "../gateway/types.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";
import { inProcessGateway } from "./helpers/in-process.ts";

const dir = mkdtempSync(join(tmpdir(), "fleet-redeploy-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

test("a reload cut short after its adoption is finished by the next reload of the same fleet.toml", async () => {
  const config = join(dir, "fleet.toml");
  const first = fleetHeader("redeploy-test") + counterType("counter", "c/+/in", { instances: ["a"] });
  writeFileSync(config, first);
  const gw = inProcessGateway(config, join(dir, "data"));
  await gw.start();
  try {
    const before = (await gw.health()).spec_version;
    // A new type with an instance: stored and adopted, then its instance row fails to be written.
    writeFileSync(config, first + counterType("second", "s/+/in", { instances: ["x"] }));
    const ensureAgents = gw.store.ensureAgents.bind(gw.store);
    gw.store.ensureAgents = async () => {
      throw new Error("SQLITE_FULL: database or disk is full");
    };
    await gw.reload("test");
    const edited = (await gw.health()).spec_version;
    expect(edited).not.toBe(before);
    const cut = await gw.health();
    expect(cut.spec_version).toBe(edited);
    expect(cut.spec_error).toContain("applied in part: spec ");
    expect(cut.spec_error).toContain("database or disk is full");
    expect(await gw.store.getAgent(agentId("second", "x")!)).toBeUndefined();

    // The disk has room again; fleet.toml is as it was.
    gw.store.ensureAgents = ensureAgents;
    await gw.reload("storage recovered");
    const settled = await gw.health();
    expect(settled.spec_version).toBe(edited);
    expect(settled.spec_error).toBeNull();
    expect(await gw.store.getAgent(agentId("second", "x")!)).toMatchObject({ type: "second", status: "active" });
  } finally {
    await gw.stop();
  }
}, 60_000);
