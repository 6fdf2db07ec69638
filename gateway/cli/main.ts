#!/usr/bin/env bun
/**
 * `fleet <command>` (docs/cli.md, §7): parses the command line and dispatches. Read commands
 * (cli-read.ts) open the data dir read-only and work whether the gateway runs or not;
 * commands that change the fleet (cli-ops.ts, cli-devices.ts) go through the running
 * gateway's HTTP API (it is the only writer), or to the file when it is stopped.
 */
import { parseArgs } from "node:util";
import { createCli, intArg, NoFleetData, olderSchemaHint, UsageError } from "./context.ts";
import { DEVICE_USAGE, deviceCommand, quarantineCommand } from "./devices.ts";
import { cmdRollout, ROLLOUT_USAGE } from "./rollout.ts";
import { cmdGc, cmdLifecycle, cmdSend, cmdStart, cmdValidate } from "./ops.ts";
import { cmdAudit, cmdToken, TOKEN_USAGE } from "./token.ts";
import { cmdAgents, cmdEpisodes, cmdReplay, cmdShow, cmdStatus, cmdVerify, cmdWakeups } from "./read.ts";
import { DevicesError } from "../devices/index.ts";
import { BackupError, errorReason, EventLogError, ReshardError, ShardSessionsError } from "../ops/index.ts";
import { SessionPrepareError } from "../../broker/index.ts";
import { SchemaVersionError } from "../store/index.ts";
import { cmdBackup, cmdRestore } from "./backup.ts";
import { cmdReshard } from "./reshard.ts";
import {
  cmdCentralAgents,
  cmdCentralAudit,
  cmdCentralEpisodes,
  cmdCentralServe,
  cmdCentralShow,
  cmdCentralVerify,
} from "./central.ts";
import { CentralError } from "../replication/index.ts";
import { cmdState, cmdTrace } from "./history.ts";
import { cmdInstallService } from "./service.ts";
import { cmdDeploy } from "./deploy.ts";
import { ARGS, checkOptions } from "./options.ts";
import { SpecError } from "../spec/index.ts";
import { DataDirInUse, ShardChanged } from "../gateway.ts";

const USAGE = `usage: fleet <command> [args] [--json]

  start [--config FILE] [--data-dir DIR] [--mqtt-port N] [--http-port N]
  status                      fleet health, spec version, reload errors
  agents [--type T] [--status S] [--limit N] [--page N]
  episodes <type/key> [--kind K] [--status committed|failed] [--limit N] [--before MS]
                              its episodes, newest first; K: mqtt, timer, webhook, inbox, manual, wake
  show <episode>              one episode with its event log
  wakeups <type/key> [--state pending|fired|cancelled|dropped] [--limit N]
                              the agent's durable wake-ups
  verify [--agent type/key]   recompute every hash chain; exit 1 on mismatch
  replay <episode> [--module FILE]          re-run an episode on its recorded inputs: MATCH or first divergence
  replay --agent <type/key> [--module FILE] replay an agent's whole history (regression test for new code)
  pause|resume|retire <type/key>
  retire <type/key> --drain   take no new stimuli, run those already queued, then retire
  gc [--dry-run] [--now MS]   apply retention now (checkpoint.keep, episodes_days, dedup_days);
                              --now: a --dry-run preview, or on a stopped gateway only (warns)
  send <topic> <json> [--id ID]
  validate [FILE]             check a fleet.toml without touching the fleet
  deploy --check [FILE] [--episodes N] [--agents M] [--type T,...]
                              replay the last N committed episodes of M agents of every type whose module,
                              code or config FILE changes (default: the fleet's fleet.toml) on the new code;
                              per type MATCH / DIVERGED / FAILED / UNREPLAYABLE, and what a reload would refuse;
                              exit 1 on any DIVERGED, FAILED or refusal
  state <type/key> [--at SEQ] [--diff A..B]   the agent's state at a checkpoint, or a JSON Patch between two
  trace <episode> | --topic T [--at TIME]      an episode's lineage: its cause upstream, its effects downstream
  backup FILE                 consistent, verified copy of the database (works while running); exit 1 when it
                              does not verify (the copy is kept)
  restore FILE                put a backup in place in a data dir with no database (gateway stopped)
  reshard --from DIR1,DIR2 --to N --out PREFIX [--partial]
                              offline (gateways stopped): move each agent's chain into the data dir of its
                              shard under N shards (PREFIX1..PREFIXN) and verify every chain
  reshard --to N --create-sessions
                              before stopping the gateways: create on the external broker the sessions the
                              N-shard layout needs that the running one lacks, so nothing published during
                              the switch is lost
  install-service [--user fleet] [--dir /opt/fleet] [--data-dir /var/lib/<user>] [--watchdog-sec 30] [--dry-run]
                              write a hardened systemd unit (Type=notify, a watchdog; --dry-run prints it);
                              docs/deploy.md

  agents|episodes|show|verify|audit --central URL [--fleet NAME|GATEWAY] [--token-env NAME]
                              the same over the central libSQL server every gateway replicates to
                              verify names a tampered row. Token: env --token-env NAME, else the one
                              [replication] auth_token_env names in fleet.toml, else FLEET_CENTRAL_TOKEN
                              with their own options: agents --type --status --limit --page,
                              episodes and audit --limit --before, verify --agent
  central --url URL [--host H] [--port N] [--token-env NAME]
                              read-only dashboard + JSON API over the central database
                              (binds 127.0.0.1:8090; off loopback needs env FLEET_CENTRAL_API_TOKEN)
${ROLLOUT_USAGE}
${DEVICE_USAGE}
${TOKEN_USAGE}

  Common: --config FILE (env FLEET_CONFIG, default ./fleet.toml), --data-dir DIR (env FLEET_DATA_DIR),
          --json (JSON output, e.g. device add --json), --help (fleet <command> --help: that command's usage)`;

/** `fleet <command> --help`: the usage lines of that command (with their continuation lines), then the common ones. */
function commandUsage(cmd: string): string {
  const blocks: string[][] = [];
  for (const line of USAGE.split("\n").slice(1)) {
    if (/^ {2}\S/.test(line)) blocks.push([line]);
    else if (/^ {3,}\S/.test(line)) blocks.at(-1)?.push(line);
  }
  const names = (block: string[]) => block[0]!.trim().split(/\s/)[0]!.split("|");
  const own = blocks.filter((b) => names(b).includes(cmd));
  const common = blocks.filter((b) => names(b).includes("Common:"));
  if (own.length === 0) return USAGE;
  return `usage: fleet ${cmd} …\n\n${[...own, ...common].map((b) => b.join("\n")).join("\n")}`;
}

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
      await cmdStart(cli);
      return -1; // keep running
    case "status":
      return cmdStatus(cli);
    case "agents":
      return flags.central ? cmdCentralAgents(cli) : cmdAgents(cli);
    case "episodes":
      if (flags.central && (flags.kind !== undefined || flags.status !== undefined))
        throw new UsageError("--kind and --status filter local episodes only (not with --central)");
      return flags.central ? cmdCentralEpisodes(cli, a1) : cmdEpisodes(cli, a1);
    case "wakeups":
      return cmdWakeups(cli, a1);
    case "show":
      return flags.central ? cmdCentralShow(cli, a1) : cmdShow(cli, a1);
    case "verify":
      return flags.central ? cmdCentralVerify(cli) : cmdVerify(cli);
    case "replay":
      return cmdReplay(cli, a1);
    case "gc":
      return cmdGc(cli);
    case "pause":
    case "resume":
    case "retire":
      return cmdLifecycle(cli, cmd, a1);
    case "send":
      return cmdSend(cli, a1, a2);
    case "validate":
      return cmdValidate(cli, a1);
    case "deploy":
      return cmdDeploy(cli, a1);
    case "state":
      return cmdState(cli, a1);
    case "trace":
      return cmdTrace(cli, a1);
    case "central":
      await cmdCentralServe(cli);
      return -1; // keep serving
    case "backup":
      return cmdBackup(cli, a1);
    case "restore":
      return cmdRestore(cli, a1);
    case "reshard":
      return cmdReshard(cli);
    case "install-service":
      return cmdInstallService(cli, { user: flags.user, dir: flags.dir, watchdogSec: flags["watchdog-sec"] });
    case "device":
      return deviceCommand(
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
      return cmdToken(cli, a1, a2);
    case "audit":
      return flags.central ? cmdCentralAudit(cli) : cmdAudit(cli);
    case "rollout":
      return cmdRollout(cli, a1, a2);
    case "quarantine":
      return quarantineCommand(positionals.slice(1), intArg("--limit", flags.limit, 100, { min: 1, max: 10_000 }), cli);
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
    if (err instanceof SpecError) {
      console.error(`fleet: invalid fleet spec: ${err.message}`);
      process.exit(1);
    }
    if (
      err instanceof BackupError ||
      err instanceof DataDirInUse ||
      err instanceof EventLogError ||
      err instanceof ReshardError ||
      err instanceof ShardSessionsError ||
      err instanceof SessionPrepareError ||
      err instanceof SchemaVersionError ||
      err instanceof NoFleetData ||
      err instanceof ShardChanged ||
      err instanceof CentralError
    ) {
      console.error(`fleet: ${err.message}`);
      process.exit(1);
    }
    if (err instanceof DevicesError) {
      console.error(`fleet: invalid devices file: ${err.message}`);
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
