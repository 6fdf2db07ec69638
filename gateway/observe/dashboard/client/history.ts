/**
 * Provenance on the agent page: the state at a checkpoint with what changed from its
 * parent (a JSON Patch), and an episode's lineage (what caused it, what it caused).
 */
import { api } from "./api.ts";
import { h, messageOf } from "./dom.ts";
import { fmtMs, pill, short, when } from "./format.ts";
import type { PatchOp, Trace, TraceEffect, TraceNode } from "./types.ts";

const json = (v: unknown) => JSON.stringify(v) ?? "null";

function patchLine(p: PatchOp): HTMLLIElement {
  const sign = p.op === "add" ? "+" : p.op === "remove" ? "−" : "~";
  const text =
    p.op === "add"
      ? `${p.path} = ${json(p.value)}`
      : p.op === "remove"
        ? `${p.path} (was ${json(p.from_value)})`
        : `${p.path}: ${json(p.from_value)} → ${json(p.value)}`;
  return h("li", { class: `patch ${p.op}` }, h("b", {}, sign), " ", h("span", { class: "mono" }, text));
}

/**
 * The state at checkpoint `seq` (the head when absent) and its diff from `seq - 1`, into
 * `target`. Collected checkpoints say so instead of showing nothing.
 */
export async function showState(target: HTMLElement, type: string, key: string, seq?: number): Promise<void> {
  target.replaceChildren(h("div", { class: "muted" }, "Loading state…"));
  try {
    const at = await api.state(type, key, seq);
    const title = h("div", { class: "section-title" }, `State at #${at.seq} · `, when(at.created_at));
    if (at.collected) {
      target.replaceChildren(
        title,
        h("div", { class: "muted" }, "Collected by retention (the hash stays in the chain)."),
      );
      return;
    }
    const parts: HTMLElement[] = [
      title,
      h("pre", { class: "state mono", "data-testid": "state-json" }, JSON.stringify(at.state, null, 2)),
    ];
    if (at.seq > 1) {
      try {
        const { patch } = await api.stateDiff(type, key, at.seq - 1, at.seq);
        parts.push(
          h("div", { class: "section-title" }, `Changed from #${at.seq - 1} (${patch.length})`),
          patch.length
            ? h("ul", { class: "patch-list", "data-testid": "state-diff" }, ...patch.map(patchLine))
            : h("div", { class: "muted", "data-testid": "state-diff" }, "No change."),
        );
      } catch (err) {
        parts.push(h("div", { class: "muted" }, `No diff from #${at.seq - 1}: ${messageOf(err)}`));
      }
    }
    target.replaceChildren(...parts);
  } catch (err) {
    target.replaceChildren(h("div", { class: "muted" }, `No state: ${messageOf(err)}`));
  }
}

const agentLink = (agent: string, episode: string) => {
  const [type = "", key = ""] = agent.split("/");
  return `#/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}/${episode}`;
};

function nodeHead(n: TraceNode): HTMLElement {
  const s = n.stimulus;
  return h(
    "div",
    { class: "trace-head" },
    h("a", { href: agentLink(n.agent, n.episode) }, n.agent),
    " ",
    pill(n.status),
    " ",
    h("span", { class: "muted" }, `${fmtMs(n.ms)} · `, when(n.started_at)),
    s ? h("span", { class: "mono muted" }, ` ← ${s.kind}${s.topic ? ` ${s.topic}` : ""}`) : null,
  );
}

/** An effect a failed episode recorded: nothing was published or sent. */
const NOT_DONE = " (not delivered: the episode failed)";

function effectItem(e: TraceEffect): HTMLLIElement {
  switch (e.kind) {
    case "decide":
      return h("li", {}, h("b", {}, "decide "), e.name, " ", h("span", { class: "mono" }, json(e.data)));
    case "emit":
      return h(
        "li",
        {},
        h("b", {}, "emit "),
        h("span", { class: "mono" }, e.seq === null ? e.topic : `${e.topic} #${e.seq}`),
        e.seq === null ? NOT_DONE : "",
      );
    case "publish":
      return h(
        "li",
        {},
        h("b", {}, "publish "),
        h("span", { class: "mono" }, e.topic),
        e.ok ? (e.seq === null ? NOT_DONE : "") : " (denied)",
      );
    case "tool":
      return h("li", {}, h("b", {}, "tool "), e.tool, e.ok ? "" : " (failed)");
    case "send":
      return h(
        "li",
        {},
        h("b", {}, "send "),
        h("span", { class: "mono" }, e.to),
        e.ok ? (e.sent ? "" : NOT_DONE) : " (denied)",
        ...e.episodes.map((c) => traceNode(c)),
      );
    case "wake":
      return h(
        "li",
        {},
        h("b", {}, "wake-up "),
        h("span", { class: "mono" }, e.id),
        ` due ${new Date(e.due_at).toISOString()} (${e.state})`,
        ...e.episodes.map((c) => traceNode(c)),
      );
    case "cancel_wake":
      return h("li", {}, h("b", {}, "cancel wake-up "), h("span", { class: "mono" }, e.id));
    default: {
      const never: never = e;
      return h("li", {}, json(never));
    }
  }
}

function traceNode(n: TraceNode): HTMLElement {
  return h(
    "div",
    { class: "trace-node", dataset: { episode: n.episode } },
    nodeHead(n),
    n.effects.length ? h("ul", { class: "trace-effects" }, ...n.effects.map(effectItem)) : null,
  );
}

/** How the episode above caused `n`: a `ctx.send`, or a wake-up it set. */
export const causeLink = (n: TraceNode): string => (n.stimulus?.set_by ? "set the wake-up →" : "sent →");

/** An episode's lineage: its causes (root first), then the episode and everything below it. */
export async function showTrace(target: HTMLElement, episode: string): Promise<void> {
  let t: Trace;
  try {
    t = await api.trace(episode);
  } catch (err) {
    target.replaceChildren(h("div", { class: "muted" }, `No lineage: ${messageOf(err)}`));
    return;
  }
  target.replaceChildren(
    h("div", { class: "section-title" }, "Lineage"),
    h(
      "div",
      { class: "trace", "data-testid": "trace" },
      ...t.upstream.map((u, i) =>
        h(
          "div",
          { class: "trace-up" },
          nodeHead(u),
          h("span", { class: "muted" }, causeLink(t.upstream[i + 1] ?? t.episode)),
        ),
      ),
      traceNode(t.episode),
    ),
    h("div", { class: "muted" }, `episode ${short(t.episode.episode, 13)}…`),
  );
}
