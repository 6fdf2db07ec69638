/**
 * The options of every `fleet` command (docs/cli.md). parseArgs reads the union of them; each command then
 * accepts only its own (and the common ones), so an option a command does not take is a bad command line
 * (exit 2) instead of being ignored while the command runs: `retire X --dry-run` must never retire X.
 */
import { UsageError } from "./context.ts";

/** Every option of every command, as parseArgs reads them. */
export const ARGS = {
  allowPositionals: true,
  strict: true,
  tokens: true,
  options: {
    config: { type: "string" },
    "data-dir": { type: "string" },
    "mqtt-port": { type: "string" },
    "http-port": { type: "string" },
    json: { type: "boolean", default: false },
    agent: { type: "string" },
    type: { type: "string" },
    status: { type: "string" },
    kind: { type: "string" },
    state: { type: "string" },
    limit: { type: "string" },
    page: { type: "string" },
    id: { type: "string" },
    module: { type: "string" },
    "dry-run": { type: "boolean", default: false },
    "watchdog-sec": { type: "string" },
    now: { type: "string" },
    scope: { type: "string" },
    before: { type: "string" },
    publish: { type: "string", multiple: true },
    subscribe: { type: "string", multiple: true },
    "client-id": { type: "string" },
    mosquitto: { type: "string" },
    central: { type: "string" },
    url: { type: "string" },
    "token-env": { type: "string" },
    port: { type: "string" },
    host: { type: "string" },
    fleet: { type: "string" },
    at: { type: "string" },
    diff: { type: "string" },
    topic: { type: "string" },
    user: { type: "string" },
    dir: { type: "string" },
    check: { type: "boolean", default: false },
    drain: { type: "boolean", default: false },
    episodes: { type: "string" },
    agents: { type: "string" },
    from: { type: "string" },
    to: { type: "string" },
    out: { type: "string" },
    partial: { type: "boolean", default: false },
    "create-sessions": { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
} as const;

type OptionName = keyof typeof ARGS.options;

/** Options every command takes. */
const COMMON: readonly OptionName[] = ["config", "data-dir", "json", "help"];

/** What the commands that also read the central database take with `--central URL`. */
const CENTRAL: readonly OptionName[] = ["central", "fleet", "token-env"];

/** Each command's own options; `device add` and `device export` have theirs, the other device commands none. */
const COMMAND_OPTIONS: Readonly<Record<string, readonly OptionName[]>> = {
  start: ["mqtt-port", "http-port"],
  status: [],
  agents: ["type", "status", "limit", "page", ...CENTRAL],
  episodes: ["kind", "status", "limit", "before", ...CENTRAL],
  show: [...CENTRAL],
  wakeups: ["state", "limit"],
  verify: ["agent", ...CENTRAL],
  replay: ["module", "agent"],
  pause: [],
  resume: [],
  retire: ["drain"],
  gc: ["dry-run", "now"],
  send: ["id"],
  validate: [],
  deploy: ["check", "episodes", "agents", "type"],
  state: ["at", "diff"],
  trace: ["topic", "at"],
  backup: [],
  restore: [],
  reshard: ["from", "to", "out", "partial", "create-sessions"],
  "install-service": ["user", "dir", "dry-run", "watchdog-sec"],
  central: ["url", "host", "port", "token-env"],
  device: [],
  "device add": ["publish", "subscribe", "client-id"],
  "device export": ["mosquitto"],
  token: [],
  "token add": ["scope"],
  audit: ["limit", "before", ...CENTRAL],
  rollout: [],
  quarantine: ["limit"],
};

/**
 * A UsageError naming the first option given on the command line that `cmd` (with its subcommand `sub`) does
 * not take. An unknown command is left to the dispatcher ("unknown command").
 */
export function checkOptions(cmd: string, sub: string | undefined, given: readonly string[]): void {
  const own = COMMAND_OPTIONS[`${cmd} ${sub}`] ?? COMMAND_OPTIONS[cmd];
  if (own === undefined) return;
  const name = sub !== undefined && COMMAND_OPTIONS[`${cmd} ${sub}`] ? `${cmd} ${sub}` : cmd;
  for (const option of given) {
    if (!(COMMON as readonly string[]).includes(option) && !(own as readonly string[]).includes(option))
      throw new UsageError(`${name} does not take --${option}`);
  }
}
