/** How numbers, durations and times read on the page. */
import { h } from "./dom.ts";

const nf = new Intl.NumberFormat("en-US");
export const fmtInt = (n: number | null | undefined): string => nf.format(Math.round(n ?? 0));
export const fmtRate = (n: number): string => (n >= 100 ? fmtInt(n) : (Math.round((n ?? 0) * 10) / 10).toString());
export const fmtPct = (r: number): string => `${r >= 0.1 || r === 0 ? Math.round(r * 100) : (r * 100).toFixed(1)}%`;
export const short = (hash: string | null | undefined, n = 10): string => (hash ? hash.slice(0, n) : "—");

/** A size: "512 B", "3.4 KB", "12 MB". */
export function fmtBytes(n: number | null | undefined): string {
  const b = Math.max(0, n ?? 0);
  if (b < 1024) return `${Math.round(b)} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let v = b / 1024;
  let i = 0;
  for (; v >= 1024 && i < units.length - 1; i++) v /= 1024;
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/**
 * A duration: "850 ms", "4.2 s", "3 min 5 s", "2 h 10 min". Rounded to the smallest unit shown
 * before it is split, so 119.7 s reads "2 min 0 s", never "1 min 60 s".
 */
export function fmtMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "—";
  if (Math.round(ms) < 1000) return `${Math.round(ms)} ms`;
  const tenths = Math.round(ms / 100);
  if (tenths < 100) return `${(tenths / 10).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  const m = Math.round(ms / 60_000);
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** How long ago: "just now", "5m ago", "never". */
export function ago(ts: number | null | undefined): string {
  if (!ts) return "never";
  const s = Math.max(0, (Date.now() - ts) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** Local wall-clock time of day. */
export const clock = (ts: number | null | undefined): string =>
  ts ? new Date(ts).toLocaleTimeString([], { hour12: false }) : "—";

/** A relative time that the page refreshes by itself (main.ts rewrites every `[data-ts]`). */
export const when = (ts: number | null | undefined): HTMLSpanElement =>
  h("span", { class: "ago", title: ts ? new Date(ts).toISOString() : "", dataset: { ts: String(ts ?? "") } }, ago(ts));

/** A status pill. */
export const pill = (status: string, text: string = status, testid?: string): HTMLSpanElement =>
  h("span", { class: `pill ${status}`, "data-testid": testid }, text);
