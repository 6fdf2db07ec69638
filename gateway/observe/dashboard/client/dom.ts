/** Tiny DOM helpers: element building (text is always text, never HTML), lookups, timing, toasts. */

/** A child of `h`: nodes and text; null, undefined and false are skipped; arrays are flattened. */
export type Child = Node | string | number | null | undefined | false | readonly Child[];
/** Attributes of `h`: `on<event>` handlers, `dataset`, and plain attributes (true = present). */
export type Attrs = Record<string, unknown>;

/** Build an element: `h("td", { class: "num" }, "42")`. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v as EventListener);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el: HTMLElement, children: readonly Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** The element with `data-testid="<id>"` (the page's fixed slots); throws when the page lacks it. */
export function tid<E extends HTMLElement = HTMLElement>(id: string, root: ParentNode = document): E {
  const el = root.querySelector<E>(`[data-testid="${id}"]`);
  if (!el) throw new Error(`no [data-testid="${id}"] on the page`);
  return el;
}

/** Run `fn` at most once per `ms`, always including the last call. */
export function throttle(fn: () => void, ms: number): () => void {
  let timer: ReturnType<typeof setTimeout> | null = null;
  let again = false;
  return () => {
    if (timer) {
      again = true;
      return;
    }
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

/** Run `fn` once calls stop for `ms`. */
export function debounce(fn: () => void, ms: number): () => void {
  let t: ReturnType<typeof setTimeout> | undefined;
  return () => {
    clearTimeout(t);
    t = setTimeout(fn, ms);
  };
}

let toastTimer: ReturnType<typeof setTimeout> | undefined;
/** A short message at the bottom of the page. */
export function toast(msg: string, bad = false): void {
  let el = document.querySelector<HTMLElement>(".toast");
  if (!el) {
    el = h("div", { class: "toast", role: "status" });
    document.body.append(el);
  }
  const shown = el;
  shown.textContent = msg;
  shown.className = `toast show${bad ? " bad" : ""}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    shown.className = "toast";
  }, 2600);
}

/** The message of anything thrown. */
export const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));
