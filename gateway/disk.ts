/**
 * The data disk's free space (statfs), shared by the disk reserve (observe/disk.ts) and the CLI, which reads
 * it for `fleet status` and `fleet gc` without loading the gateway's parts.
 */
import { statfsSync } from "node:fs";

/** Free and total bytes of the filesystem holding a path. */
export interface DiskSpace {
  readonly freeBytes: number;
  readonly totalBytes: number;
}

/** statfs of `dir`: the bytes an unprivileged writer may still use, and the filesystem's size. */
export function diskSpace(dir: string): DiskSpace {
  const s = statfsSync(dir);
  return { freeBytes: s.bavail * s.bsize, totalBytes: s.blocks * s.bsize };
}

/** A mebibyte, the unit `[fleet] disk_free_limit_mb` and the lines about it use. */
export const MB = 1024 * 1024;

/** Bytes as MB with one decimal, as the reserve's lines and `fleet status` and `fleet gc` print them. */
export function mbText(bytes: number): string {
  return (bytes / MB).toFixed(1);
}
