/** The overview's audit panel: the newest operator actions (who, what, target, when, result). */
import { ApiError, api } from "./api.ts";
import { h, messageOf, throttle } from "./dom.ts";
import { when } from "./format.ts";
import type { AuditRecord } from "./types.ts";

/** The panel and how to (re)load it. */
export function auditPanel(): { el: HTMLElement; load(): Promise<void>; refresh(): void } {
  const tbody = h("tbody");
  const row = (text: string) => h("tr", {}, h("td", { colspan: 6, class: "empty" }, text));
  const line = (r: AuditRecord) =>
    h(
      "tr",
      { "data-seq": r.seq },
      h("td", {}, when(r.at)),
      h("td", {}, r.actor),
      h("td", {}, r.action),
      h("td", {}, r.target ?? ""),
      h("td", { class: r.result }, `${r.result} (${r.status})`),
      h("td", {}, r.detail ?? ""),
    );
  async function load(): Promise<void> {
    try {
      const { records } = await api.audit(20);
      tbody.replaceChildren(...(records.length ? records.map(line) : [row("No operator actions yet.")]));
    } catch (err) {
      const text =
        err instanceof ApiError && err.status === 403
          ? "The audit log needs an admin token."
          : `Could not load the audit log: ${messageOf(err)}`;
      tbody.replaceChildren(row(text));
    }
  }
  const el = h(
    "section",
    { class: "panel audit" },
    h("div", { class: "panel-head" }, h("h2", {}, "Audit log")),
    h(
      "table",
      { "data-testid": "audit-table" },
      h(
        "thead",
        {},
        h("tr", {}, ...["When", "Who", "Action", "Target", "Result", "Detail"].map((t) => h("th", {}, t))),
      ),
      tbody,
    ),
  );
  return { el, load, refresh: throttle(() => void load(), 1000) };
}
