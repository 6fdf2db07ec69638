/**
 * The agent page's wake-ups panel: the agent's durable wake-ups (`ctx.wakeIn` / `ctx.wakeAt`),
 * latest due first, each with its state, due time, and links to the episode that set it and
 * (for a cancelled one) the episode that cancelled it. Re-read when the agent's episodes change.
 */
import { api } from "./api.ts";
import { h, messageOf } from "./dom.ts";
import { clock, short, when } from "./format.ts";
import type { Wakeup } from "./types.ts";

const SHOWN = 20;
const PILL: Record<Wakeup["state"], string> = {
  pending: "running",
  fired: "idle",
  cancelled: "paused",
  dropped: "failed",
};

function payloadText(v: unknown): string {
  const text = JSON.stringify(v) ?? "null";
  return text.length > 80 ? `${text.slice(0, 80)}…` : text;
}

function row(w: Wakeup, agentPath: string): HTMLTableRowElement {
  const episodeLink = (ep: string) =>
    h("a", { href: `#/agents/${agentPath}?episode=${ep}`, class: "mono" }, short(ep, 8));
  const settled =
    (w.state === "cancelled" || w.state === "fired") && w.done_by
      ? h("span", {}, "by ", episodeLink(w.done_by))
      : w.state === "dropped"
        ? h("span", { class: "muted" }, w.done_by ?? "")
        : "";
  return h(
    "tr",
    { dataset: { wake: w.id, state: w.state } },
    h("td", {}, h("span", { class: `pill ${PILL[w.state]}` }, w.state)),
    h("td", {}, clock(w.due_at), " ", h("span", { class: "muted" }, when(w.due_at))),
    h("td", {}, episodeLink(w.set_by)),
    h("td", { class: "mono" }, payloadText(w.payload)),
    h("td", {}, settled),
  );
}

/** The panel body for agent `<type>/<key>`; `load()` reads the newest wake-ups. */
export function wakeupsPanel(type: string, key: string): { el: HTMLElement; load(): Promise<void> } {
  const body = h("tbody", {});
  const note = h("div", { class: "muted" });
  const agentPath = `${encodeURIComponent(type)}/${encodeURIComponent(key)}`;
  const el = h(
    "div",
    { class: "panel-body", "data-testid": "wakeups" },
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "State"),
          h("th", {}, "Due"),
          h("th", {}, "Set by"),
          h("th", {}, "Payload"),
          h("th", {}, ""),
        ),
      ),
      body,
    ),
    note,
  );
  async function load(): Promise<void> {
    try {
      const { wakeups } = await api.wakeups(type, key, SHOWN);
      body.replaceChildren(...wakeups.map((w) => row(w, agentPath)));
      note.textContent = wakeups.length === 0 ? "No wake-ups: the agent has not called ctx.wakeIn or ctx.wakeAt." : "";
    } catch (err) {
      note.textContent = `wake-ups unavailable: ${messageOf(err)}`;
    }
  }
  return { el, load };
}
