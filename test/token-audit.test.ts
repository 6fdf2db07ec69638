/**
 * Tokens added or revoked in the tokens file are each recorded once in the audit log
 * (docs/access.md), also when the gateway stopped before it saw the change. In-process gateway,
 * real libSQL file; `fleet token` on a stopped gateway through the real CLI.
 */
import { afterEach, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { addToken, revokeToken, TOKENS_FILE } from "../gateway/auth/index.ts";
import { listAudit, Store } from "../gateway/store/index.ts";
import { runCli } from "./helpers/gateway.ts";
import { agentBlock, policyAgent } from "./helpers/policy.ts";
import { fleetHeader } from "./helpers/toml.ts";
import { inProcessGateway } from "./helpers/in-process.ts";

let dir = "";
afterEach(() => rmSync(dir, { recursive: true, force: true }));

function setup() {
  dir = mkdtempSync(join(tmpdir(), "fleet-token-audit-"));
  chmodSync(dir, 0o755); // episodes run as other uids when root
  const configPath = join(dir, "fleet.toml");
  writeFileSync(configPath, fleetHeader("token-audit") + agentBlock("steady", policyAgent("steady")));
  const dataDir = join(dir, "data");
  const run = async (between: () => unknown = () => {}) => {
    const gw = inProcessGateway(configPath, dataDir);
    await gw.start();
    await between();
    await gw.stop();
  };
  /** The token records of the audit log, oldest first, as `action target actor`. */
  const tokenRecords = async () => {
    const s = await Store.open(join(dataDir, "fleet.db"), { synchronous: "normal" });
    try {
      return (await listAudit(s, { limit: 100 }))
        .filter((r) => r.action.startsWith("token."))
        .reverse()
        .map((r) => `${r.action} ${r.target} ${r.actor.startsWith("local:") ? "local" : r.actor}`);
    } finally {
      await s.close();
    }
  };
  return { configPath, dataDir, file: join(dataDir, TOKENS_FILE), run, tokenRecords };
}

test("a token added or revoked just before a stop, unseen, is recorded once at the next start", async () => {
  const { file, run, tokenRecords } = setup();
  await run();
  // Changed right before the stop: the gateway's 1 s look at the file does not come before it.
  await run(() => {
    addToken(file, "sneaky", "admin");
    addToken(file, "gone", "read");
  });
  await run(() => revokeToken(file, "gone"));
  await run();
  expect(await tokenRecords()).toEqual([
    "token.add sneaky tokens-file",
    "token.add gone tokens-file",
    "token.revoke gone tokens-file",
  ]);
}, 60_000);

test("fleet token on a stopped gateway is recorded once, as local:<user>, not again at the next start", async () => {
  const { configPath, dataDir, run, tokenRecords } = setup();
  await run();
  const cli = (...args: string[]) => runCli(["--config", configPath, "--data-dir", dataDir, "token", ...args]);
  expect((await cli("add", "offline", "--scope", "read")).code).toBe(0);
  expect((await cli("revoke", "offline")).code).toBe(0);
  await run();
  expect(await tokenRecords()).toEqual(["token.add offline local", "token.revoke offline local"]);
}, 60_000);
