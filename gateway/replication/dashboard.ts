/**
 * The central dashboard: one static page that reads the JSON API of server.ts. Every fleet
 * side by side (agents by status, episodes and failures in the last hour, today's budget
 * burn, replication lag and lost rows); a fleet's agents and operator actions; an agent's episodes;
 * an episode's log. Off loopback the API wants a bearer token: the page asks for it when an /api
 * call answers 401 and sends it on every call after.
 */
import { createHash } from "node:crypto";

const STYLE = `body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}h1{font-size:1.2rem}h2{font-size:1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}a{color:#0550ae;cursor:pointer}.bad{color:#b00}.muted{color:#777}
pre{background:#f6f6f6;padding:.5rem}
#signout{float:right;font:inherit}
`;

const SCRIPT = `const $ = (s) => document.querySelector(s);
const ENTITY = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" };
const esc = (v) => String(v ?? "-").replace(/[&<>"]/g, (c) => ENTITY[c]);
// The API token of a server off loopback (FLEET_CENTRAL_API_TOKEN), pasted once per tab: kept in
// sessionStorage (gone with the tab, and never a cookie, so no other site's page can make the browser send it).
const TOKEN = "fleet-central-token";
class Unauthorized extends Error {}
const get = async (p) => {
  const token = sessionStorage.getItem(TOKEN);
  const r = await fetch(p, token ? { headers: { authorization: "Bearer " + token } } : {});
  if (r.status === 401) {
    const why = await r.json().then((b) => b.error.message, () => "");
    throw new Unauthorized(p + ": 401" + (why ? " (" + why + ")" : ""));
  }
  if (!r.ok) throw new Error(p + ": " + r.status);
  return r.json();
};
const signedIn = () => { $("#signout").hidden = !sessionStorage.getItem(TOKEN); };
// The server answered 401: a token held was refused, so it is dropped; the form says why and asks for one.
function signIn(message) {
  sessionStorage.removeItem(TOKEN); signedIn();
  $("#crumbs").innerHTML = "";
  $("#main").innerHTML = '<form id="signin"><p class="bad" id="signin-error">' + esc(message) + "</p>"
    + "<p>This server needs its API token (FLEET_CENTRAL_API_TOKEN).</p>"
    + '<label>token <input id="token" type="password" autocomplete="off" required></label> '
    + "<button>Sign in</button></form>";
  $("#token").focus();
}
const time = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "-");
function table(rows, cols) {
  return "<table><tr>" + cols.map((c) => "<th>" + esc(c[0]) + "</th>").join("") + "</tr>" +
    rows.map((r) => "<tr>" + cols.map((c) => "<td>" + c[1](r) + "</td>").join("") + "</tr>").join("") + "</table>";
}
async function fleets() {
  const d = await get("/api/fleets");
  $("#at").textContent = time(d.at); $("#crumbs").innerHTML = "";
  $("#main").innerHTML = gaps(d.incomplete) + (d.fleets.length === 0 ? "no gateway has replicated yet"
    : table(d.fleets, [
    ["fleet", (f) => '<a data-go="#/fleet/' + esc(f.gateway) + '">' + esc(f.fleet) + "</a> <span class=muted>"
        + esc(f.gateway.slice(0, 8)) + "</span>" + (f.superseded ? " <span class=muted>(superseded)</span>"
        : f.shard ? ' <a data-go="#/fleet/' + esc(f.base) + '">' + esc(f.base) + " whole</a>" : "")],
    ["agents", (f) => esc(Object.entries(f.agents).map(([k, v]) => k + " " + v).join(", "))],
    ["episodes/h", (f) => esc(f.episodesLastHour)],
    ["failures/h", (f) => '<span class="' + (f.failuresLastHour ? "bad" : "") + '">' + esc(f.failuresLastHour)
        + "</span>"],
    ["tokens today", (f) => esc(f.tokensToday)], ["cost today", (f) => esc(f.costToday)],
    ["bytes today", (f) => esc(f.bytesToday)],
    ["backlog rows", (f) => esc(f.backlogRows)], ["lag s", (f) => esc(Math.round(f.lagS))],
    ["lost rows", (f) => '<span class="' + (f.lostRows ? "bad" : "") + '">' + esc(f.lostRows) + "</span>"],
    ["last push", (f) => esc(time(f.lastPushAt))],
  ]));
}
// A sharded fleet whose newest layout has shards that never reported: their agents are not in this view.
const gaps = (list) => (list || []).map((g) => '<p class="bad">fleet ' + esc(g.fleet) + ": layout of "
    + esc(g.shards) + " shards: " + esc(g.missing.join(", ")) + " not reported yet; "
    + "their agents are missing from this view</p>").join("");
async function fleet(gw) {
  const d = await get("/api/fleets/" + encodeURIComponent(gw) + "/agents?limit=500");
  $("#crumbs").innerHTML = '<a data-go="#/">all fleets</a> / ' + esc(gw);
  $("#main").innerHTML = gaps(d.incomplete) + d.total + " agent(s)" + table(d.agents, [
    ["agent", (a) => '<a data-go="#/agent/' + esc(gw) + "/" + esc(a.id) + '">' + esc(a.id) + "</a>"],
    ["status", (a) => esc(a.status)], ["reason", (a) => esc(a.reason)],
    ["episodes", (a) => esc(a.episodes)], ["failures", (a) => esc(a.failures)], ["seq", (a) => esc(a.headSeq)],
    ["last episode", (a) => esc(time(a.lastEpisodeAt))],
  ]);
  const acts = await get("/api/fleets/" + encodeURIComponent(gw) + "/audit?limit=50");
  $("#main").innerHTML += "<h2>operator actions</h2>" + (acts.records.length === 0 ? "none replicated" :
    table(acts.records, [
      ["when", (r) => esc(time(r.at))], ["actor", (r) => esc(r.actor)], ["action", (r) => esc(r.action)],
      ["target", (r) => esc(r.target)],
      ["result", (r) => '<span class="' + (r.result === "ok" ? "" : "bad") + '">' + esc(r.status) + "</span>"],
      ["detail", (r) => esc(r.detail)],
    ]));
}
async function agent(gw, id) {
  const d = await get("/api/fleets/" + encodeURIComponent(gw) + "/agents/" + id + "/episodes?limit=200");
  $("#crumbs").innerHTML = '<a data-go="#/">all fleets</a> / <a data-go="#/fleet/' + esc(gw) + '">' + esc(gw)
      + "</a> / " + esc(id);
  $("#main").innerHTML = table(d.episodes, [
    ["episode", (e) => '<a data-go="#/episode/' + esc(e.id) + '">' + esc(e.id) + "</a>"],
    ["status", (e) => esc(e.status)], ["started", (e) => esc(time(e.startedAt))],
    ["ms", (e) => esc(e.endedAt - e.startedAt)], ["error", (e) => esc(e.errorKind)],
        ["checkpoint", (e) => esc((e.checkpoint || "").slice(0, 12))],
  ]);
}
async function episode(id) {
  const d = await get("/api/episodes/" + encodeURIComponent(id));
  const e = d.episode;
  $("#crumbs").innerHTML = '<a data-go="#/">all fleets</a> / <a data-go="#/fleet/' + esc(e.gateway) + '">'
      + esc(e.fleet) +
    '</a> / <a data-go="#/agent/' + esc(e.gateway) + "/" + esc(e.agent) + '">' + esc(e.agent) + "</a> / " + esc(id);
  $("#main").innerHTML = "<p>" + esc(e.status) + " " + esc(time(e.startedAt)) + " checkpoint "
      + esc(e.checkpoint) + "</p>" +
    table(d.events, [["seq", (v) => esc(v.seq)], ["kind", (v) => esc(v.kind)], ["data", (v) => "<code>"
        + esc(v.data) + "</code>"]]);
}
async function show() {
  const h = location.hash.slice(2).split("/");
  try {
    if (h[0] === "fleet") await fleet(h[1]);
    else if (h[0] === "agent") await agent(h[1], h.slice(2).join("/"));
    else if (h[0] === "episode") await episode(h[1]);
    else await fleets();
  } catch (err) {
    if (err instanceof Unauthorized) signIn(err.message);
    else $("#main").innerHTML = '<p class="bad">' + esc(err.message) + "</p>";
  }
}
// The token goes into sessionStorage only: the form is never submitted (form-action 'none'; its input has no name).
document.addEventListener("submit", (ev) => {
  if (ev.target.id !== "signin") return;
  ev.preventDefault();
  sessionStorage.setItem(TOKEN, $("#token").value.trim()); signedIn(); show();
});
$("#signout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN); signedIn(); show(); });
signedIn();
document.addEventListener("click", (ev) => { const go = ev.target.closest("[data-go]");
    if (go) location.hash = go.dataset.go; });
addEventListener("hashchange", show);
show();
// The overview refreshes itself, but not over the sign-in form (it would take the token being typed).
setInterval(() => { if (!$("#signin") && (!location.hash || location.hash === "#/")) show(); }, 5000);
`;

/** The page, self-contained: its style and script are inline, and nothing else is loaded. */
export const DASHBOARD_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Agent Fleets: central view</title>
<style>${STYLE}</style></head><body>
<h1>Agent Fleets — central view <span class="muted" id="at"></span>
<button id="signout" type="button" hidden>sign out</button></h1>
<nav id="crumbs"></nav><main id="main">loading…</main>
<script>${SCRIPT}</script></body></html>
`;

const sha256 = (text: string) => `'sha256-${createHash("sha256").update(text).digest("base64")}'`;

/**
 * The page's headers, as the gateway's sign-in page sends them: no page of another origin may frame
 * it (X-Frame-Options and CSP both), and the CSP lets run only this page's own style and script (by
 * their hashes), talk only to this server, and submit no form anywhere: what an injected tag tried
 * would not run, and could not carry the token off.
 */
export const DASHBOARD_HEADERS = {
  "content-type": "text/html; charset=utf-8",
  "cache-control": "no-store",
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "referrer-policy": "no-referrer",
  "content-security-policy":
    `default-src 'none'; style-src ${sha256(STYLE)}; script-src ${sha256(SCRIPT)}; connect-src 'self'; ` +
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
} as const;
