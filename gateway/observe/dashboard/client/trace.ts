/** `#/trace/<episode>`: one episode's lineage on a page of its own (where the output feed links). */
import { api } from "./api.ts";
import { h, messageOf } from "./dom.ts";
import { short } from "./format.ts";
import type { View } from "./health.ts";
import { showTrace } from "./history.ts";

/** The trace page of `episode` (an id or a unique prefix). */
export function traceView(episode: string): View {
  const crumbs = h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Fleet"), " › trace");
  const title = h("h1", { "data-testid": "trace-title" }, `Trace of episode ${short(episode, 13)}…`);
  const body = h("div", { class: "panel-body", "data-testid": "lineage" });
  const el = h("div", {}, crumbs, h("div", { class: "agent-head" }, title), h("section", { class: "panel" }, body));
  return {
    el,
    async mount() {
      try {
        const ep = await api.episode(episode);
        const [type = "", key = ""] = [
          ep.agent.slice(0, ep.agent.indexOf("/")),
          ep.agent.slice(ep.agent.indexOf("/") + 1),
        ];
        const agentHref = `#/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}`;
        crumbs.replaceChildren(
          h("a", { href: "#/" }, "Fleet"),
          " › ",
          h("a", { href: agentHref }, ep.agent),
          " › ",
          h("a", { href: `${agentHref}/${ep.id}` }, `episode ${short(ep.id, 13)}…`),
          " › trace",
        );
      } catch (err) {
        body.replaceChildren(h("div", { class: "empty" }, `Could not load episode ${episode}: ${messageOf(err)}`));
        return;
      }
      await showTrace(body, episode);
    },
  };
}
