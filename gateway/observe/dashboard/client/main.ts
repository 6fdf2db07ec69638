/**
 * The operator dashboard's entry (bundled by gateway/observe/dashboard/index.ts with
 * Bun.build). Everything it shows comes from the gateway's JSON API; `/api/events`
 * (server-sent events) keeps it live without reloads. The agent table pages on the
 * server, so 10,000 agents cost one page of rows.
 */
import { agentView } from "./agent.ts";
import { api } from "./api.ts";
import { messageOf, tid, toast } from "./dom.ts";
import { ago } from "./format.ts";
import { refreshHealth, setHealth, type View } from "./health.ts";
import { overviewView } from "./overview.ts";
import { traceView } from "./trace.ts";
import type { Fact, Health } from "./types.ts";

let current: View | null = null; // the mounted view

function connectEvents(): void {
  const live = tid("live");
  const label = (state: string, text: string) => {
    live.dataset.state = state;
    if (live.lastElementChild) live.lastElementChild.textContent = text;
  };
  const es = api.events();
  es.addEventListener("open", () => label("open", "live"));
  es.addEventListener("error", () => label("error", "reconnecting…"));
  es.addEventListener("health", (m) => setHealth(JSON.parse((m as MessageEvent<string>).data) as Health));
  for (const kind of ["episode", "status"] as const) {
    es.addEventListener(kind, (m) => {
      const e = JSON.parse((m as MessageEvent<string>).data) as Fact;
      current?.onFact?.(kind, e);
      if (kind === "episode") refreshHealth();
    });
  }
  // We fell behind and events were dropped: re-read what is on screen.
  es.addEventListener("resync", () => {
    refreshHealth();
    current?.reload?.();
  });
}

/** The view for the hash route: `#/?q=…` (overview), `#/agents/<type>/<key>[/<episode>]`, `#/trace/<episode>`. */
function route(): View {
  const [path = "/", query = ""] = (location.hash.replace(/^#/, "") || "/").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const [first, type, key, episode] = parts;
  if (first === "agents" && type !== undefined && key !== undefined) return agentView(type, key, episode ?? null);
  if (first === "trace" && type !== undefined) return traceView(type);
  return overviewView(new URLSearchParams(query));
}

function render(): void {
  current?.unmount?.();
  current = route();
  document.getElementById("view")?.replaceChildren(current.el);
  window.scrollTo(0, 0);
  void current.mount();
}

window.addEventListener("hashchange", render);
// Relative times stay true without re-fetching.
setInterval(() => {
  for (const el of document.querySelectorAll<HTMLElement>("[data-ts]"))
    if (el.dataset.ts) el.textContent = ago(Number(el.dataset.ts));
}, 5000);

api.health().then(setHealth, (err: unknown) => toast(`Gateway unreachable: ${messageOf(err)}`, true));
api.session().then(
  (s) => {
    tid("whoami").textContent = `${s.name} (${s.scope})`;
    const out = tid<HTMLButtonElement>("sign-out");
    out.hidden = false;
    out.addEventListener("click", () => void api.signOut().finally(() => location.reload()));
  },
  () => undefined,
);
connectEvents();
render();
