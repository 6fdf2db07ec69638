/**
 * `fleet token add|list|revoke` (docs/README.md) and `fleet audit`. Tokens live in
 * `<data-dir>/tokens.json` (0600, digests only); the running gateway re-reads the file on the
 * next request and records each added or revoked token in its audit log. With the gateway
 * stopped, the command appends that record to the data dir's audit log itself.
 */
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import {
  addToken,
  diffTokens,
  parseScope,
  parseTokenSnapshot,
  readTokens,
  revokeToken,
  SCOPES,
  TOKENS_AUDITED_META,
  TOKENS_FILE,
  TokenFileError,
  tokenAuditRecords,
  tokenSnapshot,
} from "../auth/index.ts";
import { appendAuditWithMeta, listAudit } from "../store/index.ts";
import { localActor } from "../ops/index.ts";
import { auditView } from "../store/index.ts";
import { table, UsageError, when, type Cli } from "./context.ts";

async function tokensFile(cli: Cli): Promise<string> {
  const dir = await cli.dataDir();
  mkdirSync(dir, { recursive: true });
  return join(dir, TOKENS_FILE);
}

/**
 * Make a change to the tokens file and, with the gateway stopped, record it in the data dir's audit log
 * (we are its only writer), with the file as audited (TOKENS_AUDITED_META): the next start then records
 * nothing twice. Changes the log has not recorded yet are recorded as the gateway would have
 * (`tokens-file`). The database is opened before the change, so a data dir that cannot take the record
 * (one an older release wrote) refuses the command with the file unchanged. `change` returns false when
 * it changed nothing.
 */
async function changeTokens(cli: Cli, file: string, change: () => boolean): Promise<boolean> {
  const db = join(await cli.dataDir(), "fleet.db");
  // The running gateway records it when it re-reads the file.
  const store = (await cli.running()) || !existsSync(db) ? null : await cli.openWritable();
  try {
    const before = readTokens(file);
    if (!change()) return false;
    if (store === null) return true;
    const at = Date.now();
    const now = readTokens(file);
    const seen = await store.getMeta(TOKENS_AUDITED_META);
    const missed =
      seen === null ? [] : tokenAuditRecords(diffTokens(parseTokenSnapshot(seen), before), "tokens-file", at);
    const own = tokenAuditRecords(diffTokens(before, now), localActor(), at);
    await appendAuditWithMeta(store, [...missed, ...own], TOKENS_AUDITED_META, tokenSnapshot(now));
    return true;
  } finally {
    await store?.close();
  }
}

/** `fleet token <add|list|revoke> ...` */
export async function cmdToken(cli: Cli, sub: string | undefined, name: string | undefined): Promise<number> {
  const file = await tokensFile(cli);
  try {
    switch (sub) {
      case "add": {
        if (!name) throw new UsageError("token add needs a name");
        const scope = cli.flags.scope === undefined ? null : parseScope(cli.flags.scope);
        if (scope === null) throw new UsageError(`token add needs --scope ${SCOPES.join("|")}`);
        let token = "";
        await changeTokens(cli, file, () => {
          token = addToken(file, name, scope);
          return true;
        });
        cli.print({ name, scope, token }, () =>
          [
            `token ${name} (scope ${scope}): ${token}`,
            "This token is shown only now; the tokens file keeps its SHA-256.",
            "Send it as `Authorization: Bearer <token>`, or paste it into the dashboard's sign-in form.",
          ].join("\n"),
        );
        return 0;
      }
      case "list": {
        const tokens = readTokens(file).map((t) => ({ name: t.name, scope: t.scope, created: t.created }));
        cli.print(
          { file, tokens },
          () => `${table(tokens, ["name", "scope", "created"])}\n${tokens.length} token(s) in ${file}`,
        );
        return 0;
      }
      case "revoke": {
        if (!name) throw new UsageError("token revoke needs a name");
        if (!(await changeTokens(cli, file, () => revokeToken(file, name)))) {
          console.error(`fleet: no token named ${name} in ${file}`);
          return 1;
        }
        cli.print({ ok: true, revoked: name }, () => `revoked token ${name} (refused from the next request on)`);
        return 0;
      }
      default:
        throw new UsageError(sub ? `unknown token command "${sub}"` : "token needs add, list or revoke");
    }
  } catch (err) {
    if (!(err instanceof TokenFileError)) throw err;
    console.error(`fleet: ${err.message}`);
    return 1;
  }
}

/** `fleet audit [--limit N] [--before SEQ]`: read from the data dir, gateway running or not. */
export async function cmdAudit(cli: Cli): Promise<number> {
  const limit = Number(cli.flags.limit ?? 50);
  const before = cli.flags.before === undefined ? undefined : Number(cli.flags.before);
  if (!Number.isSafeInteger(limit) || limit < 1) throw new UsageError("--limit must be a positive integer");
  if (before !== undefined && !Number.isSafeInteger(before)) throw new UsageError("--before must be an audit seq");
  const store = await cli.openReadonly();
  const rows = await listAudit(store, { limit, before });
  await store.close();
  const records = rows.map(auditView);
  const last = rows.at(-1);
  cli.print({ records, next_before: rows.length === limit && last ? last.seq : null }, () =>
    table(
      records.map((r) => ({ ...r, when: when(r.at) })),
      ["seq", "when", "actor", "action", "target", "status", "detail"],
    ),
  );
  return 0;
}
