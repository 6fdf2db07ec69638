// The operator dashboard: a small vanilla module, no build step. Everything it shows comes
// from the gateway's JSON API; `/api/events` (server-sent events) keeps it live without
// reloads. The agent table pages on the server, so 10,000 agents cost one page of rows.

// ---- tiny DOM + fetch helpers ------------------------------------------------------

/** Build an element: h("td", { class: "num" }, "42"). Text is always set as text, never HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat())
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}
const $ = (sel, root = document) => root.querySelector(sel);
const tid = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function request(method, path) {
  const res = await fetch(path, { method, headers: { accept: "application/json" } });
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, body?.error?.message ?? `${res.status} ${res.statusText}`);
  return body;
}
const api = { get: (p) => request("GET", p), post: (p) => request("POST", p) };

/** Run `fn` at most once per `ms`, always including the last call. */
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  return () => {
    if (timer) return void (again = true);
    fn();
    timer = setTimeout(function tick() {
      if (again) {
        again = false;
        fn();
        timer = setTimeout(tick, ms);
      } else timer = null;
    }, ms);
  };
}
function debounce(fn, ms) {
  let t = null;
  return (...a) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...a), ms);
  };
}

// ---- formatting --------------------------------------------------------------------

const nf = new Intl.NumberFormat("en-US");
const fmtInt = (n) => nf.format(Math.round(n ?? 0));
const fmtRate = (n) => (n >= 100 ? fmtInt(n) : (Math.round((n ?? 0) * 10) / 10).toString());
const fmtPct = (r) => `${r >= 0.1 || r === 0 ? Math.round(r * 100) : (r * 100).toFixed(1)}%`;
const short = (hash, n = 10) => (hash ? hash.slice(0, n) : "—");

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = s / 60;
  if (m < 60) return `${Math.floor(m)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${Math.round(m % 60)} min`;
}
function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, (Date.now() - ts) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}
const clock = (ts) => (ts ? new Date(ts).toLocaleTimeString([], { hour12: false }) : "—");
/** A relative time that the page refreshes by itself. */
const when = (ts) =>
  h("span", { class: "ago", title: ts ? new Date(ts).toISOString() : "", dataset: { ts: String(ts ?? "") } }, ago(ts));
const pill = (status, text = status, testid) => h("span", { class: `pill ${status}`, "data-testid": testid }, text);

let toastTimer = null;
function toast(msg, bad = false) {
  let el = $(".toast");
  if (!el) document.body.append((el = h("div", { class: "toast", role: "status" })));
  el.textContent = msg;
  el.className = `toast show${bad ? " bad" : ""}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.className = "toast"), 2600);
}

// ---- fleet header (every view) -----------------------------------------------------

let health = null;
const healthListeners = new Set();

function setHealth(next) {
  health = next;
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
  document.title = `${next.fleet ?? "fleet"} · Agent Fleets`;
  for (const fn of healthListeners) fn(next);
}
const refreshHealth = throttle(() => api.get("/api/fleet").then(setHealth, () => undefined), 1500);

// ---- live events -------------------------------------------------------------------

let current = null; // the mounted view

function connectEvents() {
  const live = tid("live");
  const label = (state, text) => {
    live.dataset.state = state;
    live.lastElementChild.textContent = text;
  };
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => label("open", "live"));
  es.addEventListener("error", () => label("error", "reconnecting…"));
  es.addEventListener("health", (m) => setHealth(JSON.parse(m.data)));
  for (const kind of ["episode", "status"]) {
    es.addEventListener(kind, (m) => {
      const e = JSON.parse(m.data);
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

// ---- overview: KPIs, types, agent table ---------------------------------------------

const STATUSES = ["idle", "paused", "failed", "retired"];

function kpi(id, label, value, sub, level = "") {
  const parts = (Array.isArray(sub) ? sub : [sub]).map((p) => (typeof p === "string" ? h("span", {}, p) : p));
  return h(
    "div",
    { class: `kpi ${level}`, "data-testid": `kpi-${id}` },
    h("div", { class: "label" }, label),
    h("div", { class: "value", "data-testid": `kpi-${id}-value` }, value),
    h("div", { class: "sub" }, parts),
  );
}

function renderKpis(root, hl) {
  const agents = hl.agents ?? {};
  const count = (s) => agents[s] ?? (s === "idle" ? agents.active : 0) ?? 0;
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
    kpi(
      "budget",
      "Budget burn",
      fmtPct(burn),
      "agent closest to a limit",
      burn >= 1 ? "bad" : burn > 0.8 ? "warn" : "",
    ),
    kpi(
      "broker",
      "MQTT clients",
      fmtInt(broker.clients ?? 0),
      `${fmtInt(broker.messagesIn ?? 0)} in · ${fmtInt(broker.messagesOut ?? 0)} out`,
    ),
  );
}

function burnBar(r) {
  return h(
    "span",
    { class: `bar ${r >= 1 ? "bad" : r > 0.8 ? "warn" : ""}`, title: fmtPct(r) },
    h("i", { style: `width:${Math.min(100, r * 100).toFixed(1)}%` }),
  );
}

function renderTypes(tbody, hl, onPick) {
  const types = Object.entries(hl.types ?? {});
  if (types.length === 0)
    return tbody.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No agent types in the spec.")));
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

function overviewView(params) {
  const filters = {
    q: params.get("q") ?? "",
    status: params.get("status") ?? "",
    type: params.get("type") ?? "",
    page: Math.max(1, Number(params.get("page")) || 1),
  };
  const limit = 50;
  let total = 0;
  let seq = 0; // drop responses of superseded requests

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

  function syncUrl() {
    const p = new URLSearchParams();
    for (const k of ["q", "status", "type"]) if (filters[k]) p.set(k, filters[k]);
    if (filters.page > 1) p.set("page", String(filters.page));
    const qs = p.toString();
    history.replaceState(null, "", `#/${qs ? `?${qs}` : ""}`);
  }
  function go(page) {
    filters.page = Math.max(1, Math.min(page, Math.max(1, Math.ceil(total / limit))));
    syncUrl();
    loadAgents();
  }
  function setFilter(k, v) {
    filters[k] = v;
    filters.page = 1;
    syncUrl();
    loadAgents();
  }
  search.addEventListener(
    "input",
    debounce(() => setFilter("q", search.value.trim()), 200),
  );
  statusSel.addEventListener("change", () => setFilter("status", statusSel.value));
  typeSel.addEventListener("change", () => setFilter("type", typeSel.value));

  function agentRow(a) {
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

  async function loadAgents() {
    const my = ++seq;
    const p = new URLSearchParams({ page: String(filters.page), limit: String(limit) });
    for (const k of ["q", "status", "type"]) if (filters[k]) p.set(k, filters[k]);
    try {
      const res = await api.get(`/api/agents?${p}`);
      if (my !== seq) return;
      total = res.total;
      const from = res.total === 0 ? 0 : (res.page - 1) * res.limit + 1;
      countEl.textContent =
        res.agents.length === 0
          ? `${fmtInt(res.total)} agents`
          : `${fmtInt(from)}–${fmtInt(from + res.agents.length - 1)} of ${fmtInt(res.total)} agents`;
      pageEl.textContent = `Page ${fmtInt(res.page)} of ${fmtInt(res.pages ?? Math.max(1, Math.ceil(res.total / res.limit)))}`;
      prev.disabled = res.page <= 1;
      next.disabled = res.page * res.limit >= res.total;
      tbody.replaceChildren(
        ...(res.agents.length
          ? res.agents.map(agentRow)
          : [h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No agents match these filters."))]),
      );
    } catch (err) {
      if (my === seq)
        tbody.replaceChildren(
          h("tr", {}, h("td", { colspan: 9, class: "empty" }, `Could not load agents: ${err.message}`)),
        );
    }
  }
  const refreshAgents = throttle(loadAgents, 1500);

  function onHealth(hl) {
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

  const el = h(
    "div",
    {},
    kpis,
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
  );

  return {
    el,
    mount() {
      typeSel.append(...(filters.type ? [h("option", { value: filters.type }, filters.type)] : []));
      typeSel.value = filters.type;
      healthListeners.add(onHealth);
      if (health) onHealth(health);
      loadAgents();
    },
    unmount() {
      healthListeners.delete(onHealth);
    },
    reload: loadAgents,
    onFact(kind, e) {
      const row = tbody.querySelector(`tr[data-agent="${CSS.escape(e.agent)}"]`);
      if (!row) return;
      if (kind === "status") {
        row.querySelector("td.status").replaceChildren(pill(e.status));
        row.querySelector("td.reason").textContent = e.reason ?? "";
      }
      row.classList.remove("flash");
      void row.offsetWidth; // restart the animation
      row.classList.add("flash");
      refreshAgents();
    },
  };
}

// ---- agent page ------------------------------------------------------------------

function eventText(e) {
  const d = e.data;
  switch (e.kind) {
    case "stimulus":
      return `${d.kind}${d.topic ? ` ${d.topic}` : ""} ${JSON.stringify(d.payload)}`;
    case "decide":
      return `${d.name} ${JSON.stringify(d.data)}`;
    case "emit":
      return JSON.stringify(d.data);
    case "tool":
      return `${d.tool}(${(d.args ?? []).map((a) => JSON.stringify(a)).join(", ")}) → ${d.ok ? "" : "DENIED "}${JSON.stringify(d.result)}`;
    case "log":
      return `[${d.level}] ${d.msg}`;
    case "now":
      return `${d.v} (${new Date(d.v).toISOString()})`;
    case "random":
      return String(d.v);
    case "send":
      return `→ ${d.to} ${JSON.stringify(d.data)}`;
    case "failure":
      return `${d.kind}: ${d.message}`;
    case "end":
      return `ok in ${d.ms} ms`;
    default:
      return JSON.stringify(d);
  }
}

function agentView(type, key, selected) {
  const id = `${type}/${key}`;
  const base = `#/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}`;
  let agent = null;
  let follow = !selected; // show the newest episode until the operator picks one
  let known = new Set();

  const statusEl = h("span", { "data-testid": "agent-status-slot" });
  const reasonEl = h("div", { class: "reason", "data-testid": "agent-reason" });
  const pauseBtn = h("button", { class: "warn", "data-testid": "btn-pause", onclick: () => act("pause") }, "Pause");
  const resumeBtn = h(
    "button",
    { class: "primary", "data-testid": "btn-resume", onclick: () => act("resume") },
    "Resume",
  );
  const kpis = h("section", { class: "kpis" });
  const epBody = h("tbody");
  const detail = h(
    "div",
    { class: "panel-body", "data-testid": "episode-detail" },
    h("div", { class: "empty" }, "Select an episode."),
  );
  const detailTitle = h("h2", {}, "Episode");
  const chain = h("ol", { class: "chain", "data-testid": "checkpoint-chain" });

  function showStatus(status, reason) {
    statusEl.replaceChildren(pill(status, status, "agent-status"));
    reasonEl.textContent = reason ?? "";
    pauseBtn.disabled = status === "paused" || status === "retired";
    resumeBtn.disabled = status !== "paused" && status !== "failed";
  }

  async function act(action) {
    pauseBtn.disabled = resumeBtn.disabled = true;
    try {
      await api.post(`/api/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}/${action}`);
      toast(`${action === "pause" ? "Paused" : "Resumed"} ${id}`);
      await loadAgent();
      refreshHealth();
    } catch (err) {
      toast(`Could not ${action} ${id}: ${err.message}`, true);
      if (agent) showStatus(agent.status, agent.reason);
    }
  }

  async function loadAgent() {
    try {
      agent = await api.get(`/api/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}`);
    } catch (err) {
      el.replaceChildren(
        h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Fleet")),
        h(
          "div",
          { class: "panel" },
          h("div", { class: "empty" }, err.status === 404 ? `No agent ${id}.` : `Could not load ${id}: ${err.message}`),
        ),
      );
      return;
    }
    showStatus(agent.status, agent.reason);
    kpis.replaceChildren(
      kpi(
        "a-episodes",
        "Episodes",
        fmtInt(agent.episodes),
        `${fmtInt(agent.failures)} failed attempts`,
        agent.failures > 0 ? "warn" : "",
      ),
      kpi("a-queued", "Queued", fmtInt(agent.queued), "stimuli waiting"),
      kpi(
        "a-seq",
        "Checkpoint",
        agent.seq ? `#${agent.seq}` : "—",
        h("span", { class: "mono", title: agent.checkpoint ?? "" }, short(agent.checkpoint, 16)),
      ),
      kpi(
        "a-last",
        "Last episode",
        agent.last_episode_at ? ago(agent.last_episode_at) : "never",
        clock(agent.last_episode_at),
      ),
    );
    const head = agent.checkpoint;
    chain.replaceChildren(
      ...(agent.checkpoints.length
        ? agent.checkpoints.map((c) =>
            h(
              "li",
              {
                class: `${c.hash === head ? "head" : ""} ${c.collected ? "collected" : ""}`,
                dataset: { seq: String(c.seq) },
              },
              h(
                "div",
                {},
                h("b", {}, `#${c.seq} `),
                h("span", { class: "mono", title: c.hash }, short(c.hash, 16)),
                c.hash === head ? h("span", { class: "pill idle", style: "margin-left:8px" }, "head") : null,
                c.collected ? h("span", { class: "pill retired", style: "margin-left:8px" }, "collected") : null,
              ),
              h(
                "div",
                { class: "sub" },
                "episode ",
                h("a", { href: `${base}/${c.episode}`, class: "mono" }, short(c.episode, 13)),
                " · ",
                when(c.created_at),
                " · parent ",
                h("span", { class: "mono" }, short(c.parent, 8)),
              ),
            ),
          )
        : [
            h(
              "li",
              { class: "collected" },
              h("span", { class: "muted" }, "No checkpoint yet: the first committed episode seals #1."),
            ),
          ]),
    );
  }

  async function loadEpisodes() {
    let res;
    try {
      res = await api.get(`/api/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}/episodes?limit=25`);
    } catch {
      return;
    }
    const fresh = known.size > 0;
    const rows = res.episodes.map((e) => {
      const tr = h(
        "tr",
        {
          class: `clickable${e.id === selected ? " selected" : ""}${fresh && !known.has(e.id) ? " flash" : ""}`,
          dataset: { episode: e.id },
          onclick: () => select(e.id, true),
        },
        h("td", {}, clock(e.started_at), " ", h("span", { class: "muted" }, when(e.started_at))),
        h("td", {}, pill(e.status), e.error_kind ? h("span", { class: "muted" }, ` ${e.error_kind}`) : null),
        h("td", { class: "num" }, fmtMs(e.ms)),
        h("td", { class: "num" }, String(e.event_count)),
        h(
          "td",
          { class: "mono", title: e.stimulus },
          e.stimulus.length > 22 ? `${e.stimulus.slice(0, 22)}…` : e.stimulus,
        ),
      );
      return tr;
    });
    known = new Set(res.episodes.map((e) => e.id));
    epBody.replaceChildren(
      ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No episodes yet."))]),
    );
    const newest = res.episodes[0]?.id ?? null;
    if (follow && newest && newest !== selected) select(newest, false);
  }

  async function select(episode, byUser) {
    if (byUser) follow = false;
    selected = episode;
    history.replaceState(null, "", `${base}/${episode}`);
    for (const tr of epBody.querySelectorAll("tr[data-episode]"))
      tr.classList.toggle("selected", tr.dataset.episode === episode);
    let ep;
    try {
      ep = await api.get(`/api/episodes/${encodeURIComponent(episode)}`);
    } catch (err) {
      detail.replaceChildren(h("div", { class: "empty" }, `Could not load episode: ${err.message}`));
      return;
    }
    if (selected !== episode) return;
    detailTitle.textContent = `Episode ${short(ep.id, 13)}…`;
    detail.replaceChildren(
      h(
        "dl",
        { class: "kv" },
        h("dt", {}, "Status"),
        h(
          "dd",
          {},
          pill(ep.status),
          ep.error_kind ? ` ${ep.error_kind}` : "",
          ep.attempt > 1 ? h("span", { class: "muted" }, ` attempt ${ep.attempt}`) : "",
        ),
        h("dt", {}, "Episode"),
        h("dd", { class: "mono" }, ep.id),
        h("dt", {}, "Stimulus"),
        h("dd", { class: "mono" }, ep.stimulus),
        h("dt", {}, "Started"),
        h("dd", {}, new Date(ep.started_at).toLocaleString(), h("span", { class: "muted" }, ` · ${fmtMs(ep.ms)}`)),
        h("dt", {}, "Checkpoint"),
        h(
          "dd",
          { class: "mono", title: ep.checkpoint ?? "" },
          ep.checkpoint ? `${short(ep.checkpoint, 16)} ← ${short(ep.parent, 8)}` : "none (state unchanged)",
        ),
        h("dt", {}, "Spec"),
        h("dd", { class: "mono" }, short(ep.spec_version, 16)),
        ep.error
          ? [h("dt", {}, "Error"), h("dd", { style: "color:#b91c1c;white-space:pre-wrap" }, ep.error.split("\n")[0])]
          : null,
      ),
      h("div", { class: "section-title" }, `Decisions (${ep.decisions.length})`),
      ep.decisions.length
        ? h(
            "ul",
            { class: "decisions", "data-testid": "decisions" },
            ...ep.decisions.map((d) =>
              h("li", {}, h("b", {}, d.name), h("span", { class: "mono" }, JSON.stringify(d.data))),
            ),
          )
        : h("div", { class: "muted", "data-testid": "decisions" }, "No decisions recorded."),
      h("div", { class: "section-title" }, `Event log (${ep.events.length})`),
      h(
        "ol",
        { class: "events", "data-testid": "event-log" },
        ...ep.events.map((e) =>
          h(
            "li",
            { dataset: { kind: e.kind } },
            h("span", { class: "seq" }, String(e.seq)),
            h("span", { class: `k ${e.kind}` }, e.kind),
            h("span", { class: "d" }, eventText(e)),
          ),
        ),
      ),
    );
  }

  const refreshAgent = throttle(loadAgent, 700);
  const refreshEpisodes = throttle(loadEpisodes, 700);

  const el = h(
    "div",
    {},
    h(
      "div",
      { class: "crumbs" },
      h("a", { href: "#/" }, "Fleet"),
      " › ",
      h("a", { href: `#/?type=${encodeURIComponent(type)}` }, type),
      " › ",
      key,
    ),
    h(
      "div",
      { class: "agent-head" },
      h("div", {}, h("div", { class: "title" }, h("h1", { "data-testid": "agent-title" }, id), statusEl), reasonEl),
      h("div", { class: "actions" }, pauseBtn, resumeBtn),
    ),
    kpis,
    h(
      "div",
      { class: "grid2" },
      h(
        "div",
        {},
        h(
          "section",
          { class: "panel" },
          h(
            "div",
            { class: "panel-head" },
            h("h2", {}, "Recent episodes"),
            h("span", { class: "muted" }, "newest first"),
          ),
          h(
            "table",
            { "data-testid": "episodes-table" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "Started"),
                h("th", {}, "Status"),
                h("th", { class: "num" }, "Duration"),
                h("th", { class: "num" }, "Events"),
                h("th", {}, "Stimulus"),
              ),
            ),
            epBody,
          ),
        ),
        h(
          "section",
          { class: "panel" },
          h(
            "div",
            { class: "panel-head" },
            h("h2", {}, "Checkpoint chain"),
            h("span", { class: "muted" }, "newest first"),
          ),
          h("div", { class: "panel-body" }, chain),
        ),
      ),
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, detailTitle), detail),
    ),
  );

  return {
    el,
    async mount() {
      await loadAgent();
      await loadEpisodes();
      if (selected) select(selected, false);
    },
    reload() {
      loadAgent();
      loadEpisodes();
    },
    onFact(kind, e) {
      if (e.agent !== id) return;
      if (kind === "status") showStatus(e.status, e.reason);
      refreshAgent();
      if (kind === "episode") refreshEpisodes();
    },
  };
}

// ---- routing -----------------------------------------------------------------------

function route() {
  const [path, query = ""] = (location.hash.replace(/^#/, "") || "/").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "agents" && parts.length >= 3) return agentView(parts[1], parts[2], parts[3] ?? null);
  return overviewView(new URLSearchParams(query));
}

function render() {
  current?.unmount?.();
  current = route();
  $("#view").replaceChildren(current.el);
  window.scrollTo(0, 0);
  current.mount();
}

window.addEventListener("hashchange", render);
// Relative times stay true without re-fetching.
setInterval(() => {
  for (const el of document.querySelectorAll("[data-ts]"))
    if (el.dataset.ts) el.textContent = ago(Number(el.dataset.ts));
}, 5000);

api.get("/api/fleet").then(setHealth, (err) => toast(`Gateway unreachable: ${err.message}`, true));
connectEvents();
render();
