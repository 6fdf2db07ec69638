/** An agent's page: status and actions, KPIs, recent episodes, the checkpoint chain, one episode's log. */
import { ApiError, api } from "./api.ts";
import { h, messageOf, throttle, toast } from "./dom.ts";
import { ago, clock, fmtInt, fmtMs, pill, short, when } from "./format.ts";
import { refreshHealth, type View } from "./health.ts";
import { outputFeed } from "./feed.ts";
import { wakeupsPanel } from "./wakeups.ts";
import { showState, showTrace } from "./history.ts";
import { kpi } from "./overview.ts";
import { type AgentDetail, type Checkpoint, EPISODE_KINDS, type Episode } from "./types.ts";
import type { EpisodeDetail, EpisodeEvent, ReplayResult } from "./types.ts";

/** One event log entry as a line of text. */
function eventText(e: EpisodeEvent): string {
  const d = e.data;
  switch (e.kind) {
    case "stimulus":
      return `${d.kind}${d.topic ? ` ${d.topic}` : ""} ${JSON.stringify(d.payload)}`;
    case "decide":
      return `${d.name} ${JSON.stringify(d.data)}`;
    case "emit":
      return JSON.stringify(d.data);
    case "tool": {
      const args = ((d.args ?? []) as unknown[]).map((a) => JSON.stringify(a)).join(", ");
      return `${d.tool}(${args}) → ${d.ok ? "" : "DENIED "}${JSON.stringify(d.result)}`;
    }
    case "log":
      return `[${d.level}] ${d.msg}`;
    case "now":
      return `${d.v} (${new Date(d.v).toISOString()})`;
    case "random":
      return String(d.v);
    case "send":
      return `→ ${d.to} ${JSON.stringify(d.data)}`;
    case "wake":
      return `${d.id} due ${new Date(d.at).toISOString()} ${JSON.stringify(d.data)}`;
    case "cancel_wake":
      return `cancel ${d.id}`;
    case "failure":
      return `${d.kind}: ${d.message}`;
    case "end":
      return `ok in ${d.ms} ms`;
    default:
      return JSON.stringify(d);
  }
}

function chainLink(c: Checkpoint, head: string | null, base: string, onPick: () => void): HTMLLIElement {
  return h(
    "li",
    {
      class: `clickable ${c.hash === head ? "head" : ""} ${c.collected ? "collected" : ""}`,
      dataset: { seq: String(c.seq) },
      title: "Show the state at this checkpoint and what changed",
      onclick: onPick,
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
  );
}

function episodeDetail(ep: EpisodeDetail): HTMLElement[] {
  return [
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
  ];
}

/** The verdict of a replay, as `fleet replay` words it: MATCH, or DIFF with the first difference. */
function verdictView(r: ReplayResult): HTMLElement {
  if (r.verdict === "MATCH")
    return h(
      "span",
      {},
      h("span", { class: "pill committed", "data-testid": "replay-verdict" }, "MATCH"),
      " ",
      h("span", { class: "muted" }, "same decisions, outputs, tool calls and state"),
    );
  if (r.verdict === "UNREPLAYABLE")
    return h(
      "span",
      {},
      h("span", { class: "pill retired", "data-testid": "replay-verdict" }, "UNREPLAYABLE"),
      ` ${r.reason}`,
    );
  const d = r.divergence;
  return h(
    "span",
    {},
    h("span", { class: "pill failed", "data-testid": "replay-verdict" }, "DIFF"),
    ` at ${d.at}: expected `,
    h("code", {}, JSON.stringify(d.expected)),
    ", got ",
    h("code", {}, JSON.stringify(d.actual)),
  );
}

/** A Replay button for episode `id` and where its verdict appears. */
function replayBar(id: string): HTMLElement {
  const out = h("span", { class: "replay-out", "data-testid": "replay-result" });
  const btn = h(
    "button",
    { "data-testid": "btn-replay", title: "Re-run on its recorded inputs (fleet replay)" },
    "Replay",
  );
  btn.addEventListener("click", async () => {
    btn.disabled = true;
    out.replaceChildren(h("span", { class: "muted" }, "Replaying…"));
    try {
      out.replaceChildren(verdictView(await api.replay(id)));
    } catch (err) {
      out.replaceChildren(h("span", { class: "muted" }, `Could not replay: ${messageOf(err)}`));
    } finally {
      btn.disabled = false;
    }
  });
  return h("div", { class: "replay-bar" }, btn, out);
}

function episodeRow(e: Episode, cls: string, onPick: () => void): HTMLTableRowElement {
  return h(
    "tr",
    { class: cls, dataset: { episode: e.id }, onclick: onPick },
    h("td", {}, clock(e.started_at), " ", h("span", { class: "muted" }, when(e.started_at))),
    h("td", {}, pill(e.status), e.error_kind ? h("span", { class: "muted" }, ` ${e.error_kind}`) : null),
    h("td", { class: "kind" }, e.kind ?? "—"),
    h("td", { class: "num" }, fmtMs(e.ms)),
    h("td", { class: "num" }, String(e.event_count)),
    h("td", { class: "mono", title: e.stimulus }, e.stimulus.length > 22 ? `${e.stimulus.slice(0, 22)}…` : e.stimulus),
  );
}

const panel = (title: HTMLElement | string, body: HTMLElement, note?: string) =>
  h(
    "section",
    { class: "panel" },
    h(
      "div",
      { class: "panel-head" },
      typeof title === "string" ? h("h2", {}, title) : title,
      note ? h("span", { class: "muted" }, note) : null,
    ),
    body,
  );

/** The page of agent `<type>/<key>`, with episode `selected` open (else it follows the newest). */
export function agentView(type: string, key: string, selectedAtStart: string | null): View {
  const id = `${type}/${key}`;
  const base = `#/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}`;
  let selected = selectedAtStart;
  let agent: AgentDetail | null = null;
  let follow = !selected; // show the newest episode until the operator picks one
  let known = new Set<string>();

  const statusEl = h("span", { "data-testid": "agent-status-slot" });
  const reasonEl = h("div", { class: "reason", "data-testid": "agent-reason" });
  const pauseBtn = h("button", { class: "warn", "data-testid": "btn-pause", onclick: () => act("pause") }, "Pause");
  const resumeBtn = h(
    "button",
    { class: "primary", "data-testid": "btn-resume", onclick: () => act("resume") },
    "Resume",
  );
  const retireBtn = h(
    "button",
    { class: "danger", "data-testid": "btn-retire", onclick: () => void retire() },
    "Retire",
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
  const stateBody = h("div", { class: "panel-body", "data-testid": "state-panel" });
  let stateSeq: number | null = -1; // the head seq whose state is shown; a new checkpoint refreshes it

  function showStatus(status: string, reason: string | null | undefined): void {
    statusEl.replaceChildren(pill(status, status, "agent-status"));
    reasonEl.textContent = reason ?? "";
    // A draining agent retires by itself once its queue is empty (`fleet retire --drain`).
    pauseBtn.disabled = status !== "idle"; // paused already, retired, draining, or failed (its reason would be hidden)
    resumeBtn.disabled = status !== "paused" && status !== "failed";
    retireBtn.disabled = status === "retired";
  }

  async function retire(): Promise<void> {
    const ok = confirm(`Retire ${id}? It never runs again and stimuli for it are refused. This cannot be undone.`);
    if (!ok) return;
    retireBtn.disabled = true;
    try {
      await api.lifecycle(type, key, "retire");
      toast(`Retired ${id}`);
      await loadAgent();
      refreshHealth();
    } catch (err) {
      toast(`Could not retire ${id}: ${messageOf(err)}`, true);
      if (agent) showStatus(agent.status, agent.reason);
    }
  }

  async function act(action: "pause" | "resume"): Promise<void> {
    pauseBtn.disabled = resumeBtn.disabled = true;
    try {
      await api.lifecycle(type, key, action);
      toast(`${action === "pause" ? "Paused" : "Resumed"} ${id}`);
      await loadAgent();
      refreshHealth();
    } catch (err) {
      toast(`Could not ${action} ${id}: ${messageOf(err)}`, true);
      if (agent) showStatus(agent.status, agent.reason);
    }
  }

  async function loadAgent(): Promise<void> {
    let a: AgentDetail;
    try {
      a = await api.agent(type, key);
    } catch (err) {
      const missing = err instanceof ApiError && err.status === 404;
      el.replaceChildren(
        h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Fleet")),
        h(
          "div",
          { class: "panel" },
          h("div", { class: "empty" }, missing ? `No agent ${id}.` : `Could not load ${id}: ${messageOf(err)}`),
        ),
      );
      return;
    }
    agent = a;
    showStatus(a.status, a.reason);
    if (a.seq !== stateSeq) {
      stateSeq = a.seq;
      void showState(stateBody, type, key);
    }
    kpis.replaceChildren(
      kpi(
        "a-episodes",
        "Episodes",
        fmtInt(a.episodes),
        `${fmtInt(a.failures)} failed attempts`,
        a.failures > 0 ? "warn" : "",
      ),
      kpi("a-queued", "Queued", fmtInt(a.queued), "stimuli waiting"),
      kpi(
        "a-seq",
        "Checkpoint",
        a.seq ? `#${a.seq}` : "—",
        h("span", { class: "mono", title: a.checkpoint ?? "" }, short(a.checkpoint, 16)),
      ),
      kpi("a-last", "Last episode", a.last_episode_at ? ago(a.last_episode_at) : "never", clock(a.last_episode_at)),
    );
    chain.replaceChildren(
      ...(a.checkpoints.length
        ? a.checkpoints.map((c) => chainLink(c, a.checkpoint, base, () => void showState(stateBody, type, key, c.seq)))
        : [
            h(
              "li",
              { class: "collected" },
              h("span", { class: "muted" }, "No checkpoint yet: the first committed episode seals #1."),
            ),
          ]),
    );
  }

  const kindSel = h(
    "select",
    { "data-testid": "filter-kind", "aria-label": "Stimulus kind", onchange: () => refilter() },
    h("option", { value: "" }, "All kinds"),
    ...EPISODE_KINDS.map((k) => h("option", { value: k }, k)),
  );
  const statusSel = h(
    "select",
    { "data-testid": "filter-episode-status", "aria-label": "Episode status", onchange: () => refilter() },
    h("option", { value: "" }, "All statuses"),
    h("option", { value: "committed" }, "committed"),
    h("option", { value: "failed" }, "failed"),
  );
  const filter = (): Record<string, string> => ({
    ...(kindSel.value ? { kind: kindSel.value } : {}),
    ...(statusSel.value ? { status: statusSel.value } : {}),
  });
  const emptyText = () => (kindSel.value || statusSel.value ? "No episodes match these filters." : "No episodes yet.");
  let loadSeq = 0; // drop answers to superseded filters
  function refilter(): void {
    known = new Set();
    void loadEpisodes();
  }

  async function loadEpisodes(): Promise<void> {
    const my = ++loadSeq;
    let episodes: readonly Episode[];
    try {
      episodes = (await api.episodes(type, key, 25, filter())).episodes;
    } catch (err) {
      if (my === loadSeq) toast(`Could not load episodes: ${messageOf(err)}`, true);
      return;
    }
    if (my !== loadSeq) return;
    const fresh = known.size > 0;
    const rows = episodes.map((e) =>
      episodeRow(
        e,
        `clickable${e.id === selected ? " selected" : ""}${fresh && !known.has(e.id) ? " flash" : ""}`,
        () => select(e.id, true),
      ),
    );
    known = new Set(episodes.map((e) => e.id));
    epBody.replaceChildren(
      ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, emptyText()))]),
    );
    const newest = episodes[0]?.id ?? null;
    if (follow && newest && newest !== selected) void select(newest, false);
  }

  async function select(episode: string, byUser: boolean): Promise<void> {
    if (byUser) follow = false;
    selected = episode;
    history.replaceState(null, "", `${base}/${episode}`);
    for (const tr of epBody.querySelectorAll<HTMLElement>("tr[data-episode]"))
      tr.classList.toggle("selected", tr.dataset.episode === episode);
    let ep: EpisodeDetail;
    try {
      ep = await api.episode(episode);
    } catch (err) {
      detail.replaceChildren(h("div", { class: "empty" }, `Could not load episode: ${messageOf(err)}`));
      return;
    }
    if (selected !== episode) return;
    detailTitle.textContent = `Episode ${short(ep.id, 13)}…`;
    const lineage = h("div", { "data-testid": "lineage" });
    detail.replaceChildren(replayBar(ep.id), ...episodeDetail(ep), lineage);
    void showTrace(lineage, episode);
  }

  const outputs = outputFeed(id);
  const wakes = wakeupsPanel(type, key);
  const refreshWakes = throttle(() => void wakes.load(), 700);
  const refreshAgent = throttle(() => void loadAgent(), 700);
  const refreshEpisodes = throttle(() => void loadEpisodes(), 700);

  const episodesTable = h(
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
        h("th", {}, "Kind"),
        h("th", { class: "num" }, "Duration"),
        h("th", { class: "num" }, "Events"),
        h("th", {}, "Stimulus"),
      ),
    ),
    epBody,
  );
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
      h("div", { class: "actions" }, pauseBtn, resumeBtn, retireBtn),
    ),
    kpis,
    h(
      "div",
      { class: "grid2" },
      h(
        "div",
        {},
        panel(
          h("div", { class: "toolbar" }, h("h2", {}, "Recent episodes"), kindSel, statusSel),
          episodesTable,
          "newest first",
        ),
        panel("State", stateBody, "click a checkpoint for its state and diff"),
        panel("Checkpoint chain", h("div", { class: "panel-body" }, chain), "newest first"),
        panel("Wake-ups", wakes.el, "ctx.wakeIn / ctx.wakeAt, latest due first"),
      ),
      h("div", {}, panel(detailTitle, detail), outputs.el),
    ),
  );

  return {
    el,
    async mount() {
      await loadAgent();
      await loadEpisodes();
      if (selected) void select(selected, false);
      void outputs.load();
      void wakes.load();
    },
    reload() {
      void loadAgent();
      void loadEpisodes();
      void outputs.load();
      void wakes.load();
    },
    onFact(kind, e) {
      if (e.agent !== id) return;
      if (kind === "status") showStatus(e.status ?? "", e.reason);
      refreshAgent();
      if (kind === "episode") {
        refreshEpisodes();
        refreshWakes();
      }
      if (kind === "episode" && e.status === "committed") outputs.onCommitted();
    },
  };
}
