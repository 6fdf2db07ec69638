/**
 * Small charts of the last hour (episodes/min, failures/min, lag) drawn as inline SVG from
 * `GET /api/activity`'s per-minute buckets: one bar per minute, no chart library. Every bar
 * carries its minute and value (`data-t`, `data-value`) and a tooltip.
 */
import { api } from "./api.ts";
import { h, messageOf, throttle } from "./dom.ts";
import { clock, fmtInt, fmtMs } from "./format.ts";
import type { MinuteBucket } from "./types.ts";

const NS = "http://www.w3.org/2000/svg";
const W = 600;
const H = 80;
const MINUTES = 60;

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number>,
  ...children: (SVGElement | string)[]
): SVGElementTagNameMap[K] {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c);
  return el;
}

interface Series {
  readonly id: string;
  readonly title: string;
  readonly value: (b: MinuteBucket) => number | null;
  readonly fmt: (n: number) => string;
  readonly summary: (values: readonly (number | null)[]) => string;
}

const SERIES: readonly Series[] = [
  {
    id: "episodes",
    title: "Episodes / min",
    value: (b) => b.episodes,
    fmt: fmtInt,
    summary: (v) => `${fmtInt(v.reduce<number>((n, x) => n + (x ?? 0), 0))} in the last hour`,
  },
  {
    id: "failures",
    title: "Failures / min",
    value: (b) => b.failures,
    fmt: fmtInt,
    summary: (v) => `${fmtInt(v.reduce<number>((n, x) => n + (x ?? 0), 0))} in the last hour`,
  },
  {
    id: "lag",
    title: "Lag (longest wait to start)",
    value: (b) => b.lag_ms_max,
    fmt: fmtMs,
    summary: (v) => `max ${fmtMs(v.reduce<number>((m, x) => Math.max(m, x ?? 0), 0))}`,
  },
];

function chart(s: Series, buckets: readonly MinuteBucket[]): HTMLElement {
  const values = buckets.map(s.value);
  const top = Math.max(1, ...values.map((v) => v ?? 0));
  const step = W / Math.max(1, buckets.length);
  const bars = buckets.map((b, i) => {
    const v = values[i] ?? null;
    const height = v === null ? 0 : Math.max(v > 0 ? 2 : 0, (v / top) * (H - 4));
    return svg(
      "rect",
      {
        class: `b ${s.id}`,
        x: (i * step + 1).toFixed(1),
        y: (H - height).toFixed(1),
        width: Math.max(1, step - 2).toFixed(1),
        height: height.toFixed(1),
        "data-t": b.t,
        "data-value": v === null ? "" : v,
      },
      svg("title", {}, `${clock(b.t)} · ${v === null ? "no episodes" : s.fmt(v)}`),
    );
  });
  return h(
    "figure",
    { class: "chart", "data-testid": `chart-${s.id}` },
    h(
      "figcaption",
      {},
      h("b", {}, s.title),
      h("span", { class: "muted", "data-testid": `chart-${s.id}-summary` }, s.summary(values)),
    ),
    svg(
      "svg",
      { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": s.title },
      svg("line", { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: "axis" }),
      ...bars,
    ) as unknown as HTMLElement,
    h(
      "div",
      { class: "axis-labels muted" },
      h("span", {}, `−${buckets.length} min`),
      h("span", {}, `peak ${s.fmt(top === 1 && values.every((v) => !v) ? 0 : top)}`),
      h("span", {}, "now"),
    ),
  );
}

/** The charts panel: `load()` once mounted and every minute; `onEpisode()` for live facts. */
export function activityCharts(): { el: HTMLElement; load(): Promise<void>; onEpisode(): void; stop(): void } {
  const body = h("div", { class: "charts", "data-testid": "charts" });
  async function load(): Promise<void> {
    try {
      const a = await api.activity(MINUTES);
      body.replaceChildren(...SERIES.map((s) => chart(s, a.buckets)));
      body.dataset.now = String(a.now);
    } catch (err) {
      body.replaceChildren(h("div", { class: "empty" }, `Could not load activity: ${messageOf(err)}`));
    }
  }
  const timer = setInterval(() => void load(), 60_000);
  const el = h(
    "section",
    { class: "panel" },
    h("div", { class: "panel-head" }, h("h2", {}, "Last hour"), h("span", { class: "muted" }, "per minute")),
    body,
  );
  return { el, load, onEpisode: throttle(() => void load(), 3000), stop: () => clearInterval(timer) };
}
