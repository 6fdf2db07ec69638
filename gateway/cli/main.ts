#!/usr/bin/env bun
/**
 * `fleet <command>` (docs/cli.md, §7): parses the command line and dispatches. Read commands
 * (read.ts) open the data dir read-only and work whether the gateway runs or not;
 * commands that change the fleet (ops.ts, devices.ts) go through the running
 * gateway's HTTP API (it is the only writer), or to the file when it is stopped.
 * Each command's module is imported when that command runs: a read loads the store and its views,
 * not the broker, the HTTP server and the episode runner that `start` needs.
 */
import { parseArgs } from "node:util";
import { createCli, intArg, olderSchemaHint, UsageError } from "./context.ts";
import { ARGS, checkOptions } from "./options.ts";
import { commandUsage, USAGE } from "./usage.ts";
import { ConfigFileError, errorReason, OperatorError } from "../errors.ts";

/** The command line, or exit 2 with the usage when parseArgs refuses it (unknown option, missing value). */
function parseCommandLine() {
  try {
    return parseArgs({ ...ARGS, args: negativeValues(process.argv.slice(2)) });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (typeof code !== "string" || !code.startsWith("ERR_PARSE_ARGS")) throw err;
    console.error(`fleet: ${(err as Error).message}\n\n${USAGE}`);
    process.exit(2);
  }
}

/**
 * `--at -1` as `--at=-1`: parseArgs takes a value starting with a dash for an option and refuses it as
 * ambiguous, so a negative number reaches the flag's own range check ("--at must be …") instead.
 */
function negativeValues(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const next = argv[i + 1];
    const name = arg.startsWith("--") && !arg.includes("=") ? arg.slice(2) : undefined;
    const option = name === undefined ? undefined : (ARGS.options as Record<string, { type: string }>)[name];
    if (option?.type === "string" && next !== undefined && /^-\d/.test(next)) {
      out.push(`${arg}=${next}`);
      i++;
    } else out.push(arg);
  }
  return out;
}

/** The commands' modules, each loaded by the first command that needs it. */
const ops = () => import("./ops.ts");
const read = () => import("./read.ts");
const central = () => import("./central.ts");
const history = () => import("./history.ts");
const backup = () => import("./backup.ts");
const devices = () => import("./devices.ts");
const token = () => import("./token.ts");

const { values: flags, positionals, tokens } = parseCommandLine();
/** The options given on the command line (a boolean's default is in `flags` too). */
const given = tokens.flatMap((t) => (t.kind === "option" ? [t.name] : []));

const cli = createCli(flags);

/** Run the command; its exit code, or -1 to keep the process running (`start`). */
async function main(): Promise<number> {
  const [cmd, a1, a2] = positionals;
  if (flags.help && cmd) {
    console.log(commandUsage(cmd));
    return 0;
  }
  if (flags.help || !cmd) {
    console.log(USAGE);
    return cmd || flags.help ? 0 : 2;
  }
  checkOptions(cmd, a1, given);
  switch (cmd) {
    case "start":
      await (await import("./start.ts")).cmdStart(cli);
      return -1; // keep running
    case "status":
      return (await read()).cmdStatus(cli);
    case "agents":
      return flags.central ? (await central()).cmdCentralAgents(cli) : (await read()).cmdAgents(cli);
    case "episodes":
      if (flags.central && (flags.kind !== undefined || flags.status !== undefined))
        throw new UsageError("--kind and --status filter local episodes only (not with --central)");
      return flags.central ? (await central()).cmdCentralEpisodes(cli, a1) : (await read()).cmdEpisodes(cli, a1);
    case "wakeups":
      return (await read()).cmdWakeups(cli, a1);
    case "show":
      return flags.central ? (await central()).cmdCentralShow(cli, a1) : (await read()).cmdShow(cli, a1);
    case "verify":
      return flags.central ? (await central()).cmdCentralVerify(cli) : (await read()).cmdVerify(cli);
    case "replay":
      return (await read()).cmdReplay(cli, a1);
    case "gc":
      return (await ops()).cmdGc(cli);
    case "pause":
    case "resume":
    case "retire":
      return (await ops()).cmdLifecycle(cli, cmd, a1);
    case "send":
      return (await ops()).cmdSend(cli, a1, a2);
    case "validate":
      return (await ops()).cmdValidate(cli, a1);
    case "deploy":
      return (await import("./deploy.ts")).cmdDeploy(cli, a1);
    case "state":
      return (await history()).cmdState(cli, a1);
    case "trace":
      return (await history()).cmdTrace(cli, a1);
    case "central":
      await (await central()).cmdCentralServe(cli);
      return -1; // keep serving
    case "backup":
      return (await backup()).cmdBackup(cli, a1);
    case "restore":
      return (await backup()).cmdRestore(cli, a1);
    case "reshard":
      return (await import("./reshard.ts")).cmdReshard(cli);
    case "install-service":
      return (await import("./service.ts")).cmdInstallService(cli, {
        user: flags.user,
        dir: flags.dir,
        watchdogSec: flags["watchdog-sec"],
      });
    case "device":
      return (await devices()).deviceCommand(
        positionals.slice(1),
        {
          publish: flags.publish,
          subscribe: flags.subscribe,
          clientId: flags["client-id"],
          mosquitto: flags.mosquitto,
        },
        cli,
      );
    case "token":
      return (await token()).cmdToken(cli, a1, a2);
    case "audit":
      return flags.central ? (await central()).cmdCentralAudit(cli) : (await token()).cmdAudit(cli);
    case "rollout":
      return (await import("./rollout.ts")).cmdRollout(cli, a1, a2);
    case "quarantine":
      return (await devices()).quarantineCommand(
        positionals.slice(1),
        intArg("--limit", flags.limit, 100, { min: 1, max: 10_000 }),
        cli,
      );
    default:
      throw new UsageError(`unknown command "${cmd}"`);
  }
}

main().then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      console.error(`fleet: ${err.message}\n\n${USAGE}`);
      process.exit(2);
    }
    if (err instanceof ConfigFileError) {
      console.error(`fleet: invalid ${err.subject}: ${err.message}`);
      process.exit(1);
    }
    if (err instanceof OperatorError) {
      console.error(`fleet: ${err.message}`);
      process.exit(1);
    }
    // Anything else: one line with what went wrong (a drizzle "Failed query" quotes its SQL and every parameter;
    // its libSQL cause says why). FLEET_DEBUG=1 prints the whole error with its stack, for a bug report.
    if (process.env.FLEET_DEBUG === "1") console.error(err);
    const reason = errorReason(err);
    console.error(`fleet: ${olderSchemaHint(reason) ?? reason}`);
    process.exit(1);
  },
);
