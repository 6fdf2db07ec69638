/**
 * The flags of the scripts in scripts/: `--help` (or `-h`) prints the usage and exits 0; an unknown flag,
 * a flag without its value, or a count that is not a whole number prints what was wrong and the usage,
 * and exits 2 before anything runs (no stack trace, and no run of a whole benchmark because of a typo).
 */
import { basename } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";

type Parsed<T extends ParseArgsConfig> = ReturnType<typeof parseArgs<T>>;

/** The script's name as the user typed it, for its messages. */
const SCRIPT = basename(process.argv[1] ?? "script", ".ts");

/** Print `problem` and the usage to stderr, and exit 2. */
export function usageError(usage: string, problem: string): never {
  console.error(`${SCRIPT}: ${problem}\n${usage}`);
  process.exit(2);
}

/** `parseArgs` (strict) with `--help` and clear errors; `usage` is the whole help text. */
export function scriptArgs<T extends ParseArgsConfig>(usage: string, config: T): Parsed<T> {
  const args = config.args ?? process.argv.slice(2);
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage);
    process.exit(0);
  }
  try {
    return parseArgs({ ...config, args, strict: true }) as Parsed<T>;
  } catch (err) {
    return usageError(usage, (err as Error).message.split("\n")[0]!);
  }
}

/** Flag `name`'s value as a whole number of at least `min`, or a usage error. */
export function wholeFlag(usage: string, name: string, raw: string | undefined, min = 1): number {
  const n = Number(raw);
  if (raw !== undefined && raw.trim() !== "" && Number.isSafeInteger(n) && n >= min) return n;
  return usageError(usage, `--${name} is a whole number of at least ${min}, not ${JSON.stringify(raw)}`);
}
