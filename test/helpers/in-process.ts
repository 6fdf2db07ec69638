/**
 * A gateway in the test's own process, for tests that reach into it (its store, its timers, a
 * failure injected between two of its steps); most end-to-end tests run `fleet start` as a
 * subprocess instead (./gateway.ts `TestFleet`).
 */
import pino from "pino";
import { readLocalToken } from "../../gateway/auth/index.ts";
import { Gateway, type GatewayOptions } from "../../gateway/gateway.ts";

/** A gateway on `configPath` and `dataDir`, not started: ports the system picks, a silent logger, unless `opts` say. */
export function inProcessGateway(
  configPath: string,
  dataDir: string,
  opts: Omit<Partial<GatewayOptions>, "configPath" | "dataDir"> = {},
): Gateway {
  return new Gateway({ configPath, dataDir, mqttPort: 0, httpPort: 0, logger: pino({ level: "silent" }), ...opts });
}

/** A started gateway's HTTP API: its base URL and the data dir's local admin token. */
export function apiOf(gw: Gateway, dataDir: string): { base: string; token: string } {
  const token = readLocalToken(dataDir);
  if (token === null) throw new Error(`no local admin token in ${dataDir}`);
  return { base: `http://127.0.0.1:${gw.http.port}`, token };
}
