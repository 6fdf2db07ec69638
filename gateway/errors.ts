/**
 * The errors the CLI reports as one line and exit 1, defined apart from the code that throws them so that
 * `fleet <command>` can tell them from a bug without loading every part of the gateway (gateway/cli/main.ts).
 */

/**
 * An error whose message is all an operator needs (a refused backup, a data dir in use, a schema this code
 * cannot use, …): the CLI prints `fleet: <message>` and exits 1, with no stack.
 */
export class OperatorError extends Error {}

/** A problem in a configuration file: line/column for syntax, key path for schema. */
export class ConfigFileError extends Error {
  override readonly name: string = "ConfigFileError";
  /** What the file is, for the CLI's "invalid <subject>: …" line. */
  readonly subject: string = "configuration file";
  constructor(
    /** File the error is in. */
    readonly file: string,
    /** Human sentence, e.g. "agents.t.budget.episodes_per_hour must be a positive integer". */
    readonly detail: string,
    readonly line: number | null = null,
    readonly column: number | null = null,
    /** Dotted key path for schema errors. */
    readonly keyPath: string | null = null,
  ) {
    super(line !== null ? `${file}:${line}:${column ?? 0}: ${detail}` : `${file}: ${detail}`);
  }
}

/**
 * What went wrong, in one line: the innermost cause's message (a drizzle "Failed query" wraps the
 * libSQL error that says why, and quotes every parameter, binary ids included).
 */
export function errorReason(err: unknown): string {
  let e: unknown = err;
  while (e instanceof Error && e.cause !== undefined && e.cause !== null) e = e.cause;
  const message = e instanceof Error ? e.message : String(e);
  return message.split("\n")[0]!.trim();
}
