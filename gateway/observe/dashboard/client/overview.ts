/** The overview page: fleet KPIs, agent types, and the server-paged, searchable agent table. */
import { api } from "./api.ts";
import { type Child, debounce, h, messageOf, throttle } from "./dom.ts";
import { fmtBytes, fmtInt, fmtMs, fmtPct, fmtRate, pill, short, when } from "./format.ts";
import { auditPanel } from "./audit.ts";
import { activityCharts } from "./charts.ts";
import { outputFeed } from "./feed.ts";
import { quarantinePanel } from "./quarantine.ts";
import { currentHealth, onHealth, type View } from "./health.ts";
import { type Agent, type Fact, type Health, type Replication, STATUSES } from "./types.ts";

/** One KPI tile. */
export function kpi(id: string, label: string, value: string, sub: Child, level = ""): HTMLDivElement {
  const parts = (Array.isArray(sub) ? sub : [sub]).map((p) => (typeof p === "string" ? h("span", {}, p) : p));
  return h(
    "div",
    { class: `kpi ${level}`, "data-testid": `kpi-${id}` },
    h("div", { class: "label" }, label),
    h("div", { class: "value", "data-testid": `kpi-${id}-value` }, value),
    h("div", { class: "sub" }, parts),
  );
}

const level = (r: number, warn: number, bad: number) => (r >= bad ? "bad" : r > warn ? "warn" : "");

/**
 * Replication to the central server: rows the center has not confirmed, their size and age,
 * the confirmed cursor, the last push and the last error (docs/replication.md).
 */
function replicationKpi(r: Replication): HTMLDivElement {
  const lagMs = r.backlog.lag_s * 1000;
  const failing = r.last_error !== null;
  const sub: Child[] = [
    h("span", { "data-testid": "repl-backlog" }, `${fmtBytes(r.backlog.bytes)} · lag ${fmtMs(lagMs)}`),
    h(
      "span",
      { "data-testid": "repl-cursor" },
      r.cursor ? `confirmed #${fmtInt(r.cursor.confirmed_seq)} of #${fmtInt(r.cursor.queued_seq)}` : "",
    ),
    h("span", { "data-testid": "repl-last-push" }, "last push ", when(r.last_push_at)),
  ];
  if (r.lost_rows > 0) sub.push(h("span", { class: "bad-text" }, `${fmtInt(r.lost_rows)} rows lost`));
  if (r.last_error)
    sub.push(
      h(
        "span",
        { class: "bad-text", "data-testid": "repl-error", title: r.last_error.message },
        `${r.last_error.kind}: ${r.last_error.message}`,
      ),
    );
  const tile = kpi(
    "replication",
    `Replication · ${r.state}`,
    fmtInt(r.backlog.rows),
    sub,
    failing || r.over_backlog ? "bad" : lagMs > 60_000 ? "warn" : "",
  );
  tile.title = `rows not yet confirmed by ${r.url}`;
  return tile;
}

function renderKpis(root: HTMLElement, hl: Health): void {
  const agents = hl.agents ?? {};
  const count = (s: string) => agents[s as keyof typeof agents] ?? (s === "idle" ? agents.active : 0) ?? 0;
  const rates = hl.rates ?? { episodes_per_min: 0, failures_per_min: 0, failure_ratio: 0 };
  const lag = hl.lag_ms ?? 0;
  const burn = hl.budget_burn ?? 0;
  const broker = hl.broker ?? {};
  root.replaceChildren(
    kpi(
      "agents",
      "Agents",
      fmtInt(agents.total ?? 0),
      STATUSES.map((s) =>
        h(
          "span",
          { class: "chip", "data-testid": `count-${s}` },
          h("i", { class: `dot ${s}` }),
          `${fmtInt(count(s))} ${s}`,
        ),
      ),
    ),
    kpi("running", "Running now", fmtInt(hl.running_episodes ?? 0), [
      `${fmtInt(hl.queued_stimuli ?? 0)} stimuli queued`,
      `${fmtInt(hl.subprocesses ?? 0)} subprocesses`,
    ]),
    kpi("episode-rate", "Episodes / min", fmtRate(rates.episodes_per_min), `last ${rates.window_s ?? 60} s`),
    kpi(
      "failure-rate",
      "Failure rate",
      fmtPct(rates.failure_ratio),
      `${fmtRate(rates.failures_per_min)} failed / min`,
      rates.failure_ratio > 0.2 ? "bad" : rates.failure_ratio > 0.05 ? "warn" : "",
    ),
    kpi("lag", "Lag", fmtMs(lag), "oldest waiting stimulus", lag > 60_000 ? "bad" : lag > 5_000 ? "warn" : ""),
    kpi("budget", "Budget burn", fmtPct(burn), "agent closest to a limit", level(burn, 0.8, 1)),
    kpi(
      "broker",
      "MQTT clients",
      fmtInt(broker.clients ?? 0),
      `${fmtInt(broker.messagesIn ?? 0)} in · ${fmtInt(broker.messagesOut ?? 0)} out`,
    ),
    ...(hl.replication ? [replicationKpi(hl.replication)] : []),
  );
}

function burnBar(r: number): HTMLSpanElement {
  return h(
    "span",
    { class: `bar ${level(r, 0.8, 1)}`, title: fmtPct(r) },
    h("i", { style: `width:${Math.min(100, r * 100).toFixed(1)}%` }),
  );
}

function renderTypes(tbody: HTMLElement, hl: Health, onPick: (type: string) => void): void {
  const types = Object.entries(hl.types ?? {});
  if (types.length === 0) {
    tbody.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No agent types in the spec.")));
    return;
  }
  tbody.replaceChildren(
    ...types.map(([name, t]) => {
      const total = STATUSES.reduce((n, s) => n + (t.agents?.[s] ?? 0), 0);
      return h(
        "tr",
        { class: "clickable", dataset: { type: name }, onclick: () => onPick(name), title: `Show ${name} agents` },
        h("td", {}, h("b", {}, name)),
        h("td", { class: "num" }, fmtInt(total)),
        ...STATUSES.map((s) =>
          h("td", { class: "num" }, t.agents?.[s] ? fmtInt(t.agents[s]) : h("span", { class: "muted" }, "0")),
        ),
        h("td", { class: "num" }, fmtInt(t.queued)),
        h("td", { class: "num" }, fmtMs(t.lag_ms)),
        h("td", {}, burnBar(t.budget_burn ?? 0), " ", h("span", { class: "muted" }, `${fmtInt(t.episodes_hour)} ep/h`)),
      );
    }),
  );
}

type Filter = "q" | "status" | "type";
const FILTERS: readonly Filter[] = ["q", "status", "type"];

function agentRow(a: Agent): HTMLTableRowElement {
  const href = `#/agents/${encodeURIComponent(a.type)}/${encodeURIComponent(a.key)}`;
  return h(
    "tr",
    { dataset: { agent: a.id } },
    h("td", {}, h("a", { href, "data-testid": "agent-link" }, a.id)),
    h("td", {}, a.type),
    h("td", { class: "status" }, pill(a.status)),
    h("td", { class: "num", "data-col": "episodes" }, fmtInt(a.episodes)),
    h("td", { class: "num" }, a.failures ? h("span", { style: "color:#b91c1c" }, fmtInt(a.failures)) : "0"),
    h("td", { class: "num" }, fmtInt(a.queued)),
    h(
      "td",
      {},
      a.seq
        ? h("span", { class: "mono" }, `#${a.seq} `, h("span", { class: "muted" }, short(a.checkpoint, 8)))
        : h("span", { class: "muted" }, "—"),
    ),
    h("td", {}, when(a.last_episode_at)),
    h("td", { class: "muted reason" }, a.reason ?? ""),
  );
}

/** The overview page for the hash route's query (`q`, `status`, `type`, `page`). */
export function overviewView(params: URLSearchParams): View {
  const filters: Record<Filter, string> & { page: number } = {
    q: params.get("q") ?? "",
    status: params.get("status") ?? "",
    type: params.get("type") ?? "",
    page: Math.max(1, Number(params.get("page")) || 1),
  };
  const limit = 50;
  let total = 0;
  let seq = 0; // drop responses of superseded requests
  let unsubscribe: (() => void) | null = null;

  const kpis = h("section", { class: "kpis", "data-testid": "overview" });
  const typesBody = h("tbody");
  const search = h("input", {
    type: "search",
    placeholder: "Search agents by type/key…",
    value: filters.q,
    "data-testid": "agent-search",
    "aria-label": "Search agents",
  });
  const statusSel = h(
    "select",
    { "data-testid": "filter-status", "aria-label": "Status" },
    h("option", { value: "" }, "All statuses"),
    ...STATUSES.map((s) => h("option", { value: s }, s)),
  );
  const typeSel = h(
    "select",
    { "data-testid": "filter-type", "aria-label": "Type" },
    h("option", { value: "" }, "All types"),
  );
  statusSel.value = filters.status;
  const countEl = h("span", { class: "muted", "data-testid": "agents-count" }, "");
  const tbody = h("tbody");
  const prev = h("button", { onclick: () => go(filters.page - 1), "data-testid": "page-prev" }, "‹ Prev");
  const next = h("button", { onclick: () => go(filters.page + 1), "data-testid": "page-next" }, "Next ›");
  const pageEl = h("span", {}, "");

  function syncUrl(): void {
    const p = new URLSearchParams();
    for (const k of FILTERS) if (filters[k]) p.set(k, filters[k]);
    if (filters.page > 1) p.set("page", String(filters.page));
    const qs = p.toString();
    history.replaceState(null, "", `#/${qs ? `?${qs}` : ""}`);
  }
  function go(page: number): void {
    filters.page = Math.max(1, Math.min(page, Math.max(1, Math.ceil(total / limit))));
    syncUrl();
    void loadAgents();
  }
  function setFilter(k: Filter, v: string): void {
    filters[k] = v;
    filters.page = 1;
    syncUrl();
    void loadAgents();
  }
  search.addEventListener(
    "input",
    debounce(() => setFilter("q", search.value.trim()), 200),
  );
  statusSel.addEventListener("change", () => setFilter("status", statusSel.value));
  typeSel.addEventListener("change", () => setFilter("type", typeSel.value));

  const emptyRow = (text: string) => h("tr", {}, h("td", { colspan: 9, class: "empty" }, text));

  async function loadAgents(): Promise<void> {
    const my = ++seq;
    const p = new URLSearchParams({ page: String(filters.page), limit: String(limit) });
    for (const k of FILTERS) if (filters[k]) p.set(k, filters[k]);
    try {
      const res = await api.agents(p);
      if (my !== seq) return;
      total = res.total;
      const from = res.total === 0 ? 0 : (res.page - 1) * res.limit + 1;
      countEl.textContent =
        res.agents.length === 0
          ? `${fmtInt(res.total)} agents`
          : `${fmtInt(from)}–${fmtInt(from + res.agents.length - 1)} of ${fmtInt(res.total)} agents`;
      const pages = res.pages ?? Math.max(1, Math.ceil(res.total / res.limit));
      pageEl.textContent = `Page ${fmtInt(res.page)} of ${fmtInt(pages)}`;
      prev.disabled = res.page <= 1;
      next.disabled = res.page * res.limit >= res.total;
      tbody.replaceChildren(
        ...(res.agents.length ? res.agents.map(agentRow) : [emptyRow("No agents match these filters.")]),
      );
    } catch (err) {
      if (my === seq) tbody.replaceChildren(emptyRow(`Could not load agents: ${messageOf(err)}`));
    }
  }
  const refreshAgents = throttle(() => void loadAgents(), 1500);

  function showHealth(hl: Health): void {
    renderKpis(kpis, hl);
    renderTypes(typesBody, hl, (t) => {
      typeSel.value = t;
      setFilter("type", t);
    });
    const names = Object.keys(hl.types ?? {});
    const have = [...typeSel.options].map((o) => o.value).filter(Boolean);
    if (names.join("\n") !== have.join("\n")) {
      typeSel.replaceChildren(
        h("option", { value: "" }, "All types"),
        ...names.map((n) => h("option", { value: n }, n)),
      );
      typeSel.value = filters.type;
    }
  }

  const audit = auditPanel();
  const charts = activityCharts();
  const feed = outputFeed();
  const quarantine = quarantinePanel();
  const el = h(
    "div",
    {},
    kpis,
    charts.el,
    h("div", { class: "grid2" }, feed.el, quarantine.el),
    h(
      "section",
      { class: "panel" },
      h("div", { class: "panel-head" }, h("h2", {}, "Agent types")),
      h(
        "table",
        { "data-testid": "types-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Type"),
            h("th", { class: "num" }, "Agents"),
            ...STATUSES.map((s) => h("th", { class: "num" }, s)),
            h("th", { class: "num" }, "Queued"),
            h("th", { class: "num" }, "Lag"),
            h("th", {}, "Budget burn"),
          ),
        ),
        typesBody,
      ),
    ),
    h(
      "section",
      { class: "panel" },
      h(
        "div",
        { class: "panel-head" },
        h("h2", {}, "Agents"),
        h("div", { class: "toolbar" }, search, statusSel, typeSel),
      ),
      h(
        "table",
        { "data-testid": "agents-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["Agent", "Type", "Status"].map((t) => h("th", {}, t)),
            ...["Episodes", "Failures", "Queued"].map((t) => h("th", { class: "num" }, t)),
            h("th", {}, "Checkpoint"),
            h("th", {}, "Last episode"),
            h("th", {}, "Reason"),
          ),
        ),
        tbody,
      ),
      h("div", { class: "pager" }, countEl, h("div", { class: "buttons" }, pageEl, prev, next)),
    ),
    audit.el,
  );

  return {
    el,
    mount() {
      typeSel.append(...(filters.type ? [h("option", { value: filters.type }, filters.type)] : []));
      typeSel.value = filters.type;
      unsubscribe = onHealth(showHealth);
      const hl = currentHealth();
      if (hl) showHealth(hl);
      void loadAgents();
      void audit.load();
      void charts.load();
      void feed.load();
      void quarantine.load();
    },
    unmount() {
      unsubscribe?.();
      charts.stop();
    },
    reload: () => {
      void loadAgents();
      void charts.load();
      void feed.load();
      void quarantine.load();
    },
    onFact(kind, e: Fact) {
      if (kind === "episode") {
        charts.onEpisode();
        if (e.status === "committed") feed.onCommitted();
        if (e.quarantined) quarantine.refresh();
      }
      const row = tbody.querySelector<HTMLElement>(`tr[data-agent="${CSS.escape(e.agent)}"]`);
      if (!row) return;
      if (kind === "status") {
        row.querySelector("td.status")?.replaceChildren(pill(e.status ?? ""));
        const reason = row.querySelector("td.reason");
        if (reason) reason.textContent = e.reason ?? "";
      }
      row.classList.remove("flash");
      void row.offsetWidth; // restart the animation
      row.classList.add("flash");
      refreshAgents();
      if (kind === "status") audit.refresh();
    },
  };
}
