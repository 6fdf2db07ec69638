/**
 * The CLI's usage text, kept apart from the commands so that `fleet --help` and a refused command line load
 * nothing else.
 */

/** Usage lines of `device` and `quarantine`. */
export const DEVICE_USAGE = `  device add <id> [--publish PATTERN]... [--subscribe PATTERN]... [--client-id ID]
                              register a device; prints its secret once
  device list | device remove <id>
  device rekey <id>           issue a device a new secret (printed once); its patterns stay
  device export --mosquitto DIR
                              write DIR/passwd and DIR/acl for Mosquitto (external broker mode)
  quarantine [--limit N]      poison stimuli with their failures
  quarantine retry|drop <seq> requeue (attempts reset) or drop one`;

/** Usage line of `rollout`. */
export const ROLLOUT_USAGE = `  rollout promote|abort <type>  decide a canary rollout by hand (gateway running)`;

/** Usage lines of `token` and `audit`. */
export const TOKEN_USAGE = `  token add <name> --scope read|operate|admin
                              create an API token; prints it once (only its SHA-256 is kept)
  token list | token revoke <name>
  audit [--limit N] [--before SEQ]  operator actions, newest first`;

/** `fleet --help`: every command, then the options they share. */
export const USAGE = `usage: fleet <command> [args] [--json]

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
export function commandUsage(cmd: string): string {
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
