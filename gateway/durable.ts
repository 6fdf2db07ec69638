/**
 * Files that must survive a power cut, not only a kill -9. A process killed with -9 loses nothing it
 * wrote: the page cache outlives it. A power cut loses what is only there, and a file renamed over
 * another can come back empty on a file system without ext4's rename heuristic (f2fs and XFS, common
 * on edge boxes' flash): every device refused, or every API token gone. fleet.db is SQLite's to sync;
 * these are for the files the gateway and the CLI write themselves.
 */
import {
  chmodSync,
  chownSync,
  closeSync,
  fsyncSync,
  openSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { basename, dirname, join } from "node:path";

/** Put `file`'s bytes on the disk (fsync): a rename or link that names it after this finds it whole. */
export function syncFile(file: string): void {
  const fd = openSync(file, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Put `dir`'s entries on the disk (fsync of the folder): a file just created, renamed or linked in it
 * stays. Best effort where it cannot be done: a folder this user may write but not read (EACCES), or a
 * file system that cannot sync one (EINVAL), whose entries are as durable as they get.
 */
export function syncDir(dir: string): void {
  let fd: number;
  try {
    fd = openSync(dir, "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EACCES") return;
    throw err;
  }
  try {
    fsyncSync(fd);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EINVAL") throw err;
  } finally {
    closeSync(fd);
  }
}

/**
 * Replace `file` with `text`, whole or not at all, also across a power cut: written beside it,
 * synced, renamed over it, then the folder synced. `mode` is the new file's. The file keeps its
 * owner where this process may give it (root editing a file the service user owns and must read).
 */
export function writeFileDurably(file: string, text: string, mode: number): void {
  const tmp = join(dirname(file), `.${basename(file)}.${process.pid}.${Date.now()}.tmp`);
  const before = statSync(file, { throwIfNoEntry: false });
  try {
    writeFileSync(tmp, text, { mode });
    chmodSync(tmp, mode);
    if (before && (before.uid !== process.getuid?.() || before.gid !== process.getgid?.()))
      try {
        chownSync(tmp, before.uid, before.gid);
      } catch {
        // not root: the file is this user's now, as any file it writes
      }
    syncFile(tmp);
    renameSync(tmp, file);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
  syncDir(dirname(file));
}
