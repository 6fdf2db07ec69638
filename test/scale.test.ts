/**
 * What keeps a gateway with many agents cheap to start (issue 13): instances already deployed
 * for a spec version are not checked again, and every agent's status is re-published in keyset
 * pages after the start instead of before it.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FleetEvents } from "../gateway/events.ts";
import { deployInstances } from "../gateway/fleet/index.ts";
import { republishStatuses } from "../gateway/observe/index.ts";
import { compileSpec } from "../gateway/spec/index.ts";
import { Store } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const root = mkdtempSync(join(tmpdir(), "fleet-scale-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const open = () => Store.open(join(root, `s${n++}`, "fleet.db"), { synchronous: "normal" });

const toml = (keys: readonly string[]) =>
  `[fleet]\nname = "scale"\n\n[agents.dev]\nmodule = "./agent.ts"\n` +
  `instances = [${keys.map((k) => JSON.stringify(k)).join(", ")}]\n`;

const agentCount = async (store: Store) =>
  Number((await store.client.execute("SELECT count(*) FROM agents")).rows[0]![0]);

describe("many agents", () => {
  test("a spec version's instances are deployed once; a new version deploys only what is new", async () => {
    const store = await open();
    const v1 = await compileSpec(toml(["a", "b", "c"]), join(root, "fleet.toml"));
    await deployInstances(store, v1, 1000);
    expect(await agentCount(store)).toBe(3);
    // A restart on the same version re-checks nothing: an agent row changed meanwhile stays as it is.
    await store.setAgentStatus("dev/a" as AgentId, "retired", "by test");
    await deployInstances(store, v1, 2000);
    expect((await store.getAgent("dev/a" as AgentId))?.status).toBe("retired");
    const v2 = await compileSpec(toml(["a", "b", "c", "d"]), join(root, "fleet.toml"));
    await deployInstances(store, v2, 3000);
    expect(await agentCount(store)).toBe(4);
    expect((await store.getAgent("dev/d" as AgentId))?.createdAt).toBe(3000);
    expect((await store.getAgent("dev/a" as AgentId))?.createdAt).toBe(1000);
    await store.close();
  });

  test("every agent's status is re-published once, in pages, and a stopping gateway ends it", async () => {
    const store = await open();
    const keys = Array.from({ length: 2500 }, (_, i) => `k${String(i).padStart(4, "0")}`);
    await store.ensureAgents(keys.map((k) => ({ id: `dev/${k}` as AgentId, type: "dev", key: k })));
    await store.setAgentStatus("dev/k1200" as AgentId, "paused", "by operator");
    const events = new FleetEvents();
    const seen = new Map<string, string>();
    events.on("status", (e) => {
      expect(seen.has(e.agent)).toBe(false);
      seen.set(e.agent, e.status);
    });
    expect(await republishStatuses(store, events)).toBe(2500);
    expect(seen.size).toBe(2500);
    expect(seen.get("dev/k1200")).toBe("paused");
    expect(seen.get("dev/k0000")).toBe("idle");
    // Stopped after the first page.
    const later = new FleetEvents();
    let count = 0;
    later.on("status", () => count++);
    expect(await republishStatuses(store, later, () => count >= 1000)).toBe(1000); // four pages of 250
    await store.close();
  });

  test("agent pages are the same rows in the same order, deep pages and filters included", async () => {
    const store = await open();
    const keys = Array.from({ length: 1200 }, (_, i) => `k${String(i).padStart(4, "0")}`);
    await store.ensureAgents(keys.map((k) => ({ id: `dev/${k}` as AgentId, type: "dev", key: k })));
    for (const k of ["k0003", "k0500", "k1199"]) await store.setAgentStatus(`dev/${k}` as AgentId, "paused", null);
    const deep = await store.listAgents({ limit: 50, offset: 1150 });
    expect(deep.total).toBe(1200);
    expect(deep.rows.map((r) => r.key)).toEqual(keys.slice(1150));
    const paused = await store.listAgents({ status: "paused", limit: 2, offset: 1 });
    expect(paused.total).toBe(3);
    expect(paused.rows.map((r) => r.key)).toEqual(["k0500", "k1199"]);
    expect((await store.listAgents({ limit: 10, offset: 5000 })).rows).toEqual([]);
    await store.close();
  });
});
