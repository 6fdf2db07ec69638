/**
 * The overview's output feed: what committed episodes emitted or published (alerts included),
 * newest first, each linking to its episode's trace. Live: every committed episode on the event
 * stream re-reads the newest page, and outputs not seen before flash in at the top.
 */
import { api } from "./api.ts";
import { h, messageOf, throttle } from "./dom.ts";
import { clock, when } from "./format.ts";
import type { OutputItem } from "./types.ts";

const SHOWN = 30;

function dataText(v: unknown): string {
  const text = typeof v === "string" ? v : (JSON.stringify(v) ?? "null");
  return text.length > 160 ? `${text.slice(0, 160)}…` : text;
}

function item(o: OutputItem, key: string, fresh: boolean): HTMLLIElement {
  const alert = o.topic.startsWith("alerts/");
  return h(
    "li",
    {
      class: `${alert ? "alert" : ""}${fresh ? " flash" : ""}`,
      dataset: { key, episode: o.episode, topic: o.topic, agent: o.agent },
    },
    h("div", { class: "when" }, clock(o.at), h("span", { class: "muted" }, " ", when(o.at))),
    h(
      "div",
      { class: "what" },
      h("span", { class: `pill ${alert ? "failed" : "idle"}` }, o.kind === "emit" ? "emit" : "publish"),
      " ",
      h("span", { class: "mono topic" }, o.topic),
      h("div", { class: "mono data" }, dataText(o.data)),
    ),
    h(
      "div",
      { class: "who" },
      h("a", { href: `#/agents/${o.agent.split("/").map(encodeURIComponent).join("/")}` }, o.agent),
      h(
        "a",
        { href: `#/trace/${o.episode}`, "data-testid": "feed-trace", title: `The lineage of episode ${o.episode}` },
        "trace →",
      ),
    ),
  );
}

/**
 * The feed panel (of the whole fleet, or of one `agent`): `load()` once mounted, `onCommitted()`
 * for each committed episode seen live.
 */
export function outputFeed(agent?: string): { el: HTMLElement; load(): Promise<void>; onCommitted(): void } {
  const list = h("ol", { class: "feed", "data-testid": "output-feed" });
  let seen: Set<string> | null = null;

  async function load(): Promise<void> {
    let outputs: readonly OutputItem[];
    try {
      outputs = (await api.outputs(agent ? 10 : SHOWN, agent)).outputs;
    } catch (err) {
      list.replaceChildren(h("li", { class: "empty" }, `Could not load outputs: ${messageOf(err)}`));
      return;
    }
    // One episode may output several times: number them within the episode for a stable key.
    const n = new Map<string, number>();
    const keyed = outputs.map((o) => {
      const i = (n.get(o.episode) ?? 0) + 1;
      n.set(o.episode, i);
      return [o, `${o.episode}:${o.topic}:${i}`] as const;
    });
    const before = seen;
    seen = new Set(keyed.map(([, k]) => k));
    list.replaceChildren(
      ...(keyed.length
        ? keyed.map(([o, k]) => item(o, k, before !== null && !before.has(k)))
        : [h("li", { class: "empty" }, "No outputs yet.")]),
    );
  }

  const el = h(
    "section",
    { class: "panel" },
    h(
      "div",
      { class: "panel-head" },
      h("h2", {}, agent ? "Outputs" : "Outputs and alerts"),
      h("span", { class: "muted" }, "newest first"),
    ),
    list,
  );
  return { el, load, onCommitted: throttle(() => void load(), 800) };
}
