/**
 * The overview's quarantine panel: poison stimuli (failed `retry.max_attempts` times) with their
 * last error, and Retry / Discard buttons. Both go through `POST /api/quarantine/<seq>/retry|drop`,
 * the routes `fleet quarantine` uses (operate scope, audited).
 */
import { api } from "./api.ts";
import { h, messageOf, throttle, toast } from "./dom.ts";
import { when } from "./format.ts";
import type { Quarantined } from "./types.ts";

/** The panel and how to (re)load it. */
export function quarantinePanel(): { el: HTMLElement; load(): Promise<void>; refresh(): void } {
  const tbody = h("tbody");
  const count = h("span", { class: "muted", "data-testid": "quarantine-count" }, "");
  const row = (text: string) => h("tr", {}, h("td", { colspan: 6, class: "empty" }, text));

  async function act(q: Quarantined, action: "retry" | "drop", buttons: HTMLButtonElement[]): Promise<void> {
    if (action === "drop" && !confirm(`Discard stimulus ${q.seq} of ${q.agent}? It will never run.`)) return;
    for (const b of buttons) b.disabled = true;
    try {
      await api.resolveQuarantined(q.seq, action);
      toast(action === "retry" ? `Stimulus ${q.seq} is back in ${q.agent}'s queue` : `Discarded stimulus ${q.seq}`);
    } catch (err) {
      toast(`Could not ${action === "retry" ? "retry" : "discard"} stimulus ${q.seq}: ${messageOf(err)}`, true);
    }
    await load();
  }

  function line(q: Quarantined): HTMLTableRowElement {
    const retry = h("button", { class: "primary small", "data-testid": "btn-q-retry" }, "Retry");
    const drop = h("button", { class: "warn small", "data-testid": "btn-q-discard" }, "Discard");
    retry.addEventListener("click", () => void act(q, "retry", [retry, drop]));
    drop.addEventListener("click", () => void act(q, "drop", [retry, drop]));
    const href = `#/agents/${q.agent.split("/").map(encodeURIComponent).join("/")}`;
    const last = q.episodes.at(-1);
    return h(
      "tr",
      { dataset: { seq: String(q.seq), agent: q.agent } },
      h("td", {}, h("a", { href }, q.agent)),
      h("td", {}, q.kind, q.topic ? h("span", { class: "muted mono" }, ` ${q.topic}`) : null),
      h("td", { class: "num" }, String(q.attempts)),
      h(
        "td",
        { class: "error", title: q.last_error ?? "" },
        last ? h("a", { href: `#/trace/${last}` }, (q.last_error ?? "").split("\n")[0]?.slice(0, 90) ?? "") : "",
      ),
      h("td", {}, when(q.quarantined_at ?? q.received_at)),
      h("td", {}, h("div", { class: "row-actions" }, retry, drop)),
    );
  }

  async function load(): Promise<void> {
    try {
      const { stimuli } = await api.quarantine(50);
      count.textContent = stimuli.length === 50 ? "50+ stimuli" : `${stimuli.length} stimuli`;
      tbody.replaceChildren(...(stimuli.length ? stimuli.map(line) : [row("Nothing is quarantined.")]));
    } catch (err) {
      tbody.replaceChildren(row(`Could not load the quarantine: ${messageOf(err)}`));
    }
  }

  const el = h(
    "section",
    { class: "panel" },
    h("div", { class: "panel-head" }, h("h2", {}, "Quarantine"), count),
    h(
      "table",
      { "data-testid": "quarantine-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "Agent"),
          h("th", {}, "Stimulus"),
          h("th", { class: "num" }, "Attempts"),
          h("th", {}, "Last error"),
          h("th", {}, "Quarantined"),
          h("th", {}, ""),
        ),
      ),
      tbody,
    ),
  );
  return { el, load, refresh: throttle(() => void load(), 800) };
}
