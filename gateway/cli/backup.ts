/**
 * `fleet backup FILE` (online: works while the gateway runs) and `fleet restore FILE`
 * (into an empty data dir, gateway stopped). Both check the copy before reporting success.
 */
import { join } from "node:path";
import { type BackupReport, backupDatabase, restoreDatabase } from "../ops/index.ts";
import { type Cli, UsageError } from "./context.ts";
import { SCHEMA_VERSION } from "../store/index.ts";

function describe(verb: string, r: BackupReport): string {
  const v = r.verify;
  const upgraded =
    r.upgraded_from === null
      ? ""
      : verb === "restored"
        ? `, upgraded from the backup's v${r.upgraded_from}`
        : `, an older release's: verified in a scratch copy upgraded to v${SCHEMA_VERSION}`;
  return (
    `${verb} ${r.file} (${r.bytes} bytes, schema v${r.schema_version}${upgraded}): ` +
    `${v.agents} agent(s), ${v.checkpoints} checkpoint(s), ${v.episodes} episode(s) verified`
  );
}

/** `fleet backup FILE`. */
export async function cmdBackup(cli: Cli, file: string | undefined): Promise<number> {
  if (!file) throw new UsageError("backup needs a target FILE");
  const report = await backupDatabase(join(await cli.dataDir(), "fleet.db"), file);
  cli.print(report, () => describe("backed up to", report));
  return 0;
}

/** `fleet restore FILE`. */
export async function cmdRestore(cli: Cli, file: string | undefined): Promise<number> {
  if (!file) throw new UsageError("restore needs a backup FILE");
  const report = await restoreDatabase(file, await cli.dataDir(), (await cli.running()) !== null);
  cli.print(report, () => describe("restored", report));
  return 0;
}
