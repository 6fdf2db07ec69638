/**
 * `[broker] tls_crl`: the revocation lists the TLS listeners check client certificates against, re-read
 * when the file changes (a CA publishes a new list every few days, and a revocation must not wait for a
 * restart). A list that does not parse is logged and the previous one stays in force.
 */
import { readFileSync, statSync } from "node:fs";
import type { Logger } from "pino";

/** How often the file is looked at, ms. */
const CHECK_MS = 1000;

export class CrlWatch {
  private timer: ReturnType<typeof setInterval> | null = null;
  /** The file as last looked at (inode, size, mtime): a change of any of them is a new file. */
  private seen = "";
  private applying: Promise<void> | null = null;

  constructor(
    private readonly file: string,
    /** The lists the listeners hold now. */
    private applied: string,
    /** Hand new lists to the listeners; rejects when they cannot use them. */
    private readonly apply: (pem: string) => Promise<void>,
    private readonly log: Logger,
    private readonly checkMs = CHECK_MS,
  ) {}

  /** Look now (the file may have changed since the listeners read it), then every `checkMs`. */
  start(): Promise<void> {
    this.timer ??= setInterval(() => void this.check(), this.checkMs);
    this.timer.unref();
    return this.check();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Apply the file if it changed since it was last looked at; one check at a time. */
  check(): Promise<void> {
    this.applying ??= this.reread().finally(() => (this.applying = null));
    return this.applying;
  }

  private async reread(): Promise<void> {
    let signature: string;
    let pem: string;
    try {
      const st = statSync(this.file);
      signature = `${st.ino}:${st.size}:${st.mtimeMs}`;
      if (signature === this.seen) return;
      pem = readFileSync(this.file, "utf8");
    } catch (err) {
      // A file being replaced may be missing for a moment: the lists in force stay, and the next look retries.
      const code = (err as { code?: string }).code;
      if (this.seen !== "missing")
        this.log.warn({ file: this.file, code }, "tls_crl unreadable; the lists in force stay");
      this.seen = "missing";
      return;
    }
    this.seen = signature;
    if (pem === this.applied) return;
    try {
      await this.apply(pem);
      this.applied = pem;
      this.log.info({ file: this.file }, "tls_crl reloaded: new TLS connections are checked against it");
    } catch (err) {
      this.log.error(
        { file: this.file, err: err instanceof Error ? err.message : String(err) },
        "tls_crl not applied: the listeners keep the lists they had",
      );
    }
  }
}
