/**
 * `fleet start`: the gateway in this process until SIGTERM/SIGINT, what it prints once running, and how a
 * second stop signal ends a drain. The only command that loads the whole gateway.
 */
import { intArg, UsageError, type Cli } from "./context.ts";
import { Gateway } from "../gateway.ts";
import { createLogger } from "../observe/index.ts";
import type { Logger } from "pino";
import { commitFailureKind } from "../store/index.ts";
import { parseStrictInt } from "../parse.ts";
import { SystemdService } from "../systemd.ts";

/** A port flag: 0 picks a free port. */
const PORT = { min: 0, max: 65_535 } as const;

/**
 * TEST ONLY: `FLEET_TEST_CLOCK_OFFSET_MS` shifts the started gateway's clock (budget windows,
 * timers, retention, lag) by that many milliseconds, so end-to-end tests can start well inside
 * an hour window instead of racing the wall clock. Read here and nowhere else; never set it on a
 * real fleet (the gateway logs a warning when it is set).
 */
function testClock(): (() => number) | undefined {
  const raw = process.env.FLEET_TEST_CLOCK_OFFSET_MS;
  if (raw === undefined || raw === "") return undefined;
  const offset = parseStrictInt(raw, { name: "FLEET_TEST_CLOCK_OFFSET_MS" });
  if (!offset.ok) throw new UsageError(offset.message);
  return () => Date.now() + offset.value;
}

/** `fleet start`: run the gateway in this process until SIGTERM/SIGINT; SIGHUP reloads fleet.toml. */
export async function cmdStart(cli: Cli): Promise<void> {
  const { flags } = cli;
  const log = createLogger();
  const now = testClock();
  if (now)
    log.warn({ offset_ms: now() - Date.now() }, "FLEET_TEST_CLOCK_OFFSET_MS is set: the clock is shifted (tests only)");
  const gw = new Gateway({
    now,
    configPath: cli.configPath,
    dataDir: flags["data-dir"] ?? process.env.FLEET_DATA_DIR,
    mqttPort: intArg("--mqtt-port", flags["mqtt-port"], undefined, PORT),
    httpPort: intArg("--http-port", flags["http-port"], undefined, PORT),
    logger: log,
  });
  // Under systemd (Type=notify, docs/deploy.md): readiness, the watchdog, the status line.
  const systemd = SystemdService.fromEnv(log);
  const stop = stopOnSignals(() => {
    systemd?.stopping(gw.spec?.spec.fleet.drain_timeout_ms ?? 10_000);
    return gw.stop();
  }, log);
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGHUP", () => {
    const reload = () => gw.reload("SIGHUP");
    void (systemd ? systemd.reload(reload, gw) : reload());
  });
  systemd?.starting();
  try {
    await gw.start();
  } catch (err) {
    systemd?.close();
    throw diskRefusedStart(err, gw.dataDir) ?? err;
  }
  systemd?.ready(gw);
  const http = gw.spec.spec.http;
  const bound = { host: http.host, port: gw.http.port, noToken: http.allow_unauthenticated };
  console.log(runningLine(gw.spec.spec.broker.external?.url ?? null, gw.broker.port, bound, gw.dataDir));
  // A file refused at start (the version that ran before runs): said where a person starting it looks.
  if (gw.specError) console.error(`WARNING: fleet.toml ${gw.specError}`);
  if (bound.noToken && !isLoopbackAddress(bound.host))
    console.error(
      `WARNING: the HTTP API on ${bound.host} needs no token ([http] allow_unauthenticated): ` +
        "anyone who reaches this address can change the fleet as admin",
    );
}

/**
 * A start the data dir's disk refused (full: a new database, the local token; read-only): one line
 * that says so and names the data dir, instead of libSQL's or the file system's bare message.
 */
export function diskRefusedStart(err: unknown, dataDir: string | undefined): Error | null {
  const code = String((err as { code?: unknown } | null)?.code ?? "");
  const kind = code === "ENOSPC" ? "disk_full" : code === "EROFS" ? "readonly" : commitFailureKind(err);
  if (kind !== "disk_full" && kind !== "readonly") return null;
  const where = dataDir ?? "the data dir";
  const what = kind === "disk_full" ? "is full: free space" : "is read-only: make it writable";
  const why = err instanceof Error ? err.message : String(err);
  return new Error(`cannot start: the disk of ${where} ${what} and start again (${why})`);
}

/** Whether a listen address is this machine only. */
function isLoopbackAddress(host: string): boolean {
  return host === "localhost" || host === "::1" || host.startsWith("127.");
}

/**
 * What `fleet start` prints once running: the MQTT port it listens on (or the external broker it
 * uses), the HTTP address it binds, and whether that API needs no token.
 */
export function runningLine(
  externalUrl: string | null,
  mqttPort: number,
  http: { readonly host: string; readonly port: number; readonly noToken: boolean },
  dataDir: string,
): string {
  const mqtt = externalUrl === null ? `mqtt on port ${mqttPort}` : `external broker ${externalUrl}`;
  const address = http.host.includes(":") ? `[${http.host}]:${http.port}` : `${http.host}:${http.port}`;
  return `fleet running: ${mqtt}, http on ${address}${http.noToken ? " (no token needed)" : ""}, data in ${dataDir}`;
}

/** A second stop signal's exit status: 128 + the signal's number, as a shell reports a process it killed. */
const FORCED_EXIT = { SIGTERM: 143, SIGINT: 130 } as const;

/**
 * The SIGTERM/SIGINT handler of `fleet start`: the first signal drains the gateway, then exits 0. A second one
 * during the drain exits at once with 128 + its number, never 0, since the drain did not finish (what was
 * running or queued runs again at the next start: stimuli are durable).
 */
export function stopOnSignals(
  drain: () => Promise<void>,
  log: Pick<Logger, "info" | "warn">,
  exit: (code: number) => void = (code) => process.exit(code),
): (signal: keyof typeof FORCED_EXIT) => void {
  let state: "running" | "draining" | "forced" = "running";
  return (signal) => {
    if (state !== "running") {
      state = "forced";
      const code = FORCED_EXIT[signal];
      log.warn({ signal, exit_code: code }, "second stop signal during the drain: exiting now, the drain unfinished");
      exit(code);
      return;
    }
    state = "draining";
    log.info({ signal }, "shutting down");
    void drain().then(() => {
      if (state === "draining") exit(0);
    });
  };
}
