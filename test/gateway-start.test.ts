/**
 * A gateway whose start fails lets go of what it took on the way: the sandbox uids it claimed
 * among the machine's gateways (root), its database, its warm spares and its listeners. A
 * process that embeds the gateway (a supervisor, a test) can start it again once the cause is
 * gone, and other gateways on the machine are not kept off those uids until that process exits.
 * In-process gateway, real ports, real libSQL file.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { uidClaims } from "../gateway/episode/index.ts";
import { DataDirInUse } from "../gateway/gateway.ts";
import { Store } from "../gateway/store/index.ts";
import { agentBlock, policyAgent, uidClaimsWork } from "./helpers/policy.ts";
import { fleetHeader } from "./helpers/toml.ts";
import { inProcessGateway } from "./helpers/in-process.ts";

let dir = "";
const stops: (() => unknown)[] = [];

afterEach(async () => {
  for (const stop of stops.splice(0).reverse()) await stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("a gateway whose start fails", () => {
  test("lets go of the uids it claimed and of its data dir: the same start works once the port is free", async () => {
    dir = mkdtempSync(join(tmpdir(), "fleet-start-fails-"));
    chmodSync(dir, 0o755); // episodes run as other uids when root
    const configPath = join(dir, "fleet.toml");
    writeFileSync(configPath, fleetHeader("start-fails") + agentBlock("steady", policyAgent("steady")));
    const dataDir = join(dir, "data");
    const owner = `the gateway of ${dataDir}`;
    const claimed = () => uidClaims().some((c) => c.owner === owner);
    // Something else listens on the MQTT port the gateway is told to use: its start fails late,
    // after the database is open, the uids are claimed and the warm spares are spawned.
    const squatter = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    stops.push(() => squatter.stop(true));
    const gateway = (mqttPort: number) => inProcessGateway(configPath, dataDir, { mqttPort });

    const failed = gateway(squatter.port);
    const error = await failed.start().then(
      () => null,
      (err: unknown) => String(err),
    );
    stops.push(() => failed.stop());
    expect(error).not.toBeNull();
    expect(failed.state).toBe("stopped");
    const claims = uidClaimsWork();
    if (claims) expect(claimed()).toBe(false);

    squatter.stop(true);
    const second = gateway(0);
    await second.start();
    stops.push(() => second.stop());
    expect(second.state).toBe("running");
    // The claim a start takes, where this machine hands out uids: what the failed one let go of.
    if (claims) expect(claimed()).toBe(true);
    await second.stop();
    if (claims) expect(claimed()).toBe(false);
  }, 60_000);

  test("on a data dir another gateway runs on is refused before anything is written to its database", async () => {
    dir = mkdtempSync(join(tmpdir(), "fleet-start-in-use-"));
    chmodSync(dir, 0o755); // episodes run as other uids when root
    const configPath = join(dir, "fleet.toml");
    const dataDir = join(dir, "data");
    const gateway = () => inProcessGateway(configPath, dataDir);
    writeFileSync(configPath, fleetHeader("in-use") + agentBlock("steady", policyAgent("steady")));
    const first = gateway();
    await first.start();
    await first.stop();
    // Another process runs the data dir now: its sandbox ledger names it (pid and start time).
    const other = Bun.spawn(["sleep", "30"]);
    stops.push(() => other.kill("SIGKILL"));
    const stat = readFileSync(`/proc/${other.pid}/stat`, "utf8");
    writeFileSync(
      join(dataDir, "sandboxes"),
      `gateway ${other.pid} ${stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]}\n`,
    );
    const counts = async () => {
      const s = await Store.open(join(dataDir, "fleet.db"), { synchronous: "normal" });
      try {
        const n = (sql: string) => s.client.execute(sql).then((rs) => Number(rs.rows[0]![0]));
        return {
          specs: await n("SELECT count(*) FROM spec_versions"),
          agents: await n("SELECT count(*) FROM agents"),
          meta: (await s.client.execute("SELECT key, value FROM meta ORDER BY key")).rows.map((r) => [r[0], r[1]]),
        };
      } finally {
        await s.close();
      }
    };
    const before = await counts();
    // A fleet.toml the running gateway does not have: a start that went on would record it and its agent.
    writeFileSync(
      configPath,
      fleetHeader("in-use") +
        agentBlock("steady", policyAgent("steady")) +
        agentBlock("extra", policyAgent("steady"), { instances: ["a"] }),
    );
    const second = gateway();
    const error = await second.start().then(
      () => null,
      (err: unknown) => err,
    );
    stops.push(() => second.stop());
    expect(error).toBeInstanceOf(DataDirInUse);
    expect(await counts()).toEqual(before);
  }, 60_000);
});
