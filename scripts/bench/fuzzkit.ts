/**
 * What the fuzzers (scripts/fuzz-*.ts) share: their flags, the agent type they run, and the verdict on
 * the gateways they ran against, read from their stderr and logs once stopped. (Their seeded choices
 * come from test/helpers/seeded.ts.)
 */
import { readdirSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { scriptArgs, wholeFlag } from "./cli.ts";
import { cleanupAll } from "./harness.ts";

/** `--seconds`, `--seed`, `--verbose`, and a fuzzer's own boolean flags. */
export function fuzzArgs<F extends string>(
  seconds: number,
  flags: readonly F[] = [],
): { seconds: number; seed: number; verbose: boolean } & Record<F, boolean> {
  const usage =
    `usage: bun scripts/${basename(process.argv[1] ?? "fuzz", ".ts")}.ts [--seconds ${seconds}] [--seed 1]` +
    ` [--verbose]${flags.map((f) => ` [--${f}]`).join("")}`;
  const { values } = scriptArgs(usage, {
    options: {
      seconds: { type: "string", default: String(seconds) },
      seed: { type: "string", default: "1" },
      verbose: { type: "boolean", default: false },
      ...Object.fromEntries(flags.map((f) => [f, { type: "boolean", default: false }])),
    },
  });
  const v = values as Record<string, string | boolean>;
  const own = Object.fromEntries(flags.map((f) => [f, v[f] === true])) as Record<F, boolean>;
  return {
    seconds: wholeFlag(usage, "seconds", v.seconds as string),
    seed: wholeFlag(usage, "seed", v.seed as string, 0),
    verbose: v.verbose === true,
    ...own,
  };
}

/**
 * The agent type both fuzzers' fleets run: temp-monitor on `sensors/<key>/temperature`, deduplicated by
 * `id`, publishing alerts (a fuzzer's checks wait for its episodes' stimuli, not their outputs).
 */
export function sinkAgent(extra = ""): string {
  return `[agents.sink]
module = "${new URL("../../agents/examples/temp-monitor.ts", import.meta.url).pathname}"
subscribe = ["sensors/+/temperature"]
key = "{1}"
dedup = "id"
tools = ["publish"]
publish = ["alerts/#"]
config = { threshold = 80.0, hysteresis = 2.0 }
${extra}`;
}

/**
 * Print what the stopped gateways in `dir` left (stderr, log lines at level 50+, and with `verbose` their
 * logs by message: which refusals the fuzz reached) and exit: 1 if `failure` or either holds anything,
 * keeping the dir to look at; else 0, the run's temp dirs removed.
 */
export async function finish(dir: string, failure: string | null, verbose: boolean): Promise<never> {
  // Every gateway run in `dir`: gateway.log and .err, and those of earlier runs kept as gateway-*.log and .err.
  const files = readdirSync(dir).filter((f) => /^gateway.*\.(log|err)$/.test(f));
  const read = (ext: string) =>
    files
      .filter((f) => f.endsWith(ext))
      .map((f) => readFileSync(join(dir, f), "utf8"))
      .join("");
  const err = read(".err");
  const log = read(".log").split("\n");
  const errors = log.filter((l) => /"level":(50|60)|uncaught|unhandled/i.test(l));
  console.log(`gateway stderr: ${err.length} bytes; error lines in its log: ${errors.length}`);
  if (verbose) {
    const said = new Map<string, number>();
    for (const l of log) {
      const m = /"msg":"([^"]{0,60})/.exec(l);
      if (m) said.set(m[1]!, (said.get(m[1]!) ?? 0) + 1);
    }
    for (const [msg, n] of [...said].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`  ${n}\t${msg}`);
  }
  for (const l of errors.slice(0, 10)) console.log(`  ${l.slice(0, 600)}`);
  if (err.trim()) console.log(err.slice(0, 2000));
  const failed = failure !== null || errors.length > 0 || err.trim() !== "";
  if (failure) console.log(`FAILED: ${failure}`);
  if (failed) console.log(`kept: ${dir}`);
  else await cleanupAll();
  process.exit(failed ? 1 : 0);
}
