/** The fleet header every view shares: the latest health summary and who listens for it. */
import { api } from "./api.ts";
import { throttle, tid } from "./dom.ts";
import { fmtMs, short } from "./format.ts";
import type { Fact, Health } from "./types.ts";

/** A mounted page: its element and how it follows live facts. */
export interface View {
  readonly el: HTMLElement;
  mount(): void | Promise<void>;
  unmount?(): void;
  /** Re-read what is on screen (events were dropped). */
  reload?(): void;
  onFact?(kind: "episode" | "status", fact: Fact): void;
}

let latest: Health | null = null;
const listeners = new Set<(h: Health) => void>();

/** The newest health summary seen, if any. */
export const currentHealth = (): Health | null => latest;

/** Call `fn` with every new health summary; returns the unsubscribe. */
export function onHealth(fn: (h: Health) => void): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Show a new health summary in the header and hand it to the listeners. */
export function setHealth(next: Health): void {
  latest = next;
  tid("fleet-name").textContent = next.fleet ?? "";
  const st = tid("gateway-state");
  st.textContent = next.state;
  st.className = `pill state ${next.state}`;
  const sv = tid("spec-version");
  sv.textContent = short(next.spec_version, 12);
  sv.title = next.spec_version ?? "";
  tid("uptime").textContent = fmtMs((next.uptime_s ?? 0) * 1000);
  const err = tid("spec-error");
  err.hidden = !next.spec_error;
  err.textContent = next.spec_error
    ? `fleet.toml reload rejected — still running spec ${short(next.spec_version, 12)}:\n${next.spec_error}`
    : "";
  // Failing commits (e.g. a full disk): nothing new is acknowledged until storage recovers.
  const storage = tid("storage-error");
  const notReady = next.state === "running" && next.readiness !== undefined && !next.readiness.ready;
  storage.hidden = !notReady;
  storage.textContent = notReady ? `Not ready — ${next.readiness?.reason ?? "unknown reason"}` : "";
  // Rollouts in progress, and the last one that rolled back (docs/upgrading.md).
  const shown = (next.rollouts ?? []).filter((r) => r.state === "canary" || r.state === "rolled_back");
  const ro = tid("rollouts");
  ro.hidden = shown.length === 0;
  ro.classList.toggle(
    "error",
    shown.some((r) => r.state === "rolled_back"),
  );
  ro.textContent = shown
    .map((r) =>
      r.state === "canary"
        ? `Rollout of ${r.type}: new code ${short(r.to_bundle, 12)} on ${r.canary_agents.length} canary agent(s), ` +
          `${r.episodes}/${r.min_episodes} episode(s), ${r.failures} failed`
        : `Rollout of ${r.type} rolled back to ${r.from_bundle ? short(r.from_bundle, 12) : "the module file"}: ` +
          `${r.reason ?? ""}`,
    )
    .join("\n");
  document.title = `${next.fleet ?? "fleet"} · Agent Fleets`;
  for (const fn of listeners) fn(next);
}

/** Re-read the health summary, at most every 1.5 s. */
export const refreshHealth = throttle(() => {
  api.health().then(setHealth, () => undefined);
}, 1500);
