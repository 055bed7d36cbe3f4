"""What the status page shows: the data behind /status.json and the page that renders it.

`build_status` turns the server's live objects (pools, backends, the session registry, recent
errors) into plain JSON-ready data, bounded however many sessions are open: only the top
`TOP_SESSIONS` by age and by bytes are listed. `RecentErrors` keeps the last warnings and errors
logged under `wsproxy` in a fixed-size ring. `STATUS_HTML` is a self-contained page (no external
assets, works offline) that fetches /status.json every two seconds (`?refresh=SECONDS` changes
that) and redraws itself, building every node with textContent so a client-chosen path can never
inject markup. It draws its charts of the last 15 minutes itself (inline SVG, from the history in
/status.json), and shows drain/ready buttons when opened as `/status#token=ADMIN_TOKEN`.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from wsproxy.observe.metrics import admin_state, backend_health

TOP_SESSIONS = 20
RECENT_ERRORS = 50
MAX_ERROR_CHARS = 500  # a logged message longer than this is cut in the ring


class RecentErrors(logging.Handler):
    """The last RECENT_ERRORS records at WARNING or above, for the status page."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        super().__init__(level=logging.WARNING)
        self.entries: deque[dict[str, str]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError) as exc:  # a bad format string in a log call
            message = f"{record.msg!r} (unformattable: {exc})"
        self.entries.append(
            {
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message[:MAX_ERROR_CHARS],
            }
        )


def session_row(session: Any, now: float) -> dict[str, Any]:
    """One live session for the status page (reads its relay's stats directly)."""
    o = session.outcome
    st = session.relay.stats if session.relay is not None else None
    host, port = session.client_addr[0], session.client_addr[1]
    return {
        "client": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "listener": str(session.listener.address),
        "pool": o.pool,
        "backend": o.backend,
        "path": o.path,
        "subprotocol": o.subprotocol,
        "age_s": round(max(0.0, now - session.started), 3),
        "bytes_from_client": st.client_bytes_in if st else 0,
        "bytes_from_backend": st.backend_bytes_in if st else 0,
        "messages_to_backend": st.messages_to_backend if st else 0,
        "messages_to_client": st.messages_to_client if st else 0,
    }


def _bytes(session: Any) -> int:
    st = session.relay.stats
    return int(st.client_bytes_in + st.backend_bytes_in)


def build_status(
    *,
    pools: Mapping[str, Any],
    sessions: Iterable[Any],
    now: float,
    wall_time: float,
    draining: bool,
    config: Any,
    listeners: Iterable[tuple[Any, tuple[str, int]]],
    errors: Iterable[dict[str, str]],
    top: int = TOP_SESSIONS,
) -> dict[str, Any]:
    """The /status.json document (`now` on the session clock, `wall_time` in Unix seconds for
    the page's timestamp: the caller reads both clocks)."""
    sessions = list(sessions)
    relaying = [s for s in sessions if s.relay is not None and s.outcome.status == 101]
    handshaking = sum(1 for s in sessions if s.relay is None)
    per_backend: dict[tuple[str, str], int] = {}
    for s in relaying:
        key = (s.outcome.pool, s.outcome.backend)
        per_backend[key] = per_backend.get(key, 0) + 1
    pool_rows = []
    for name, pool in pools.items():
        backends = []
        for b in pool.backends:
            state, up = backend_health(b, now)
            backends.append(
                {
                    "name": b.name,
                    "health": state,
                    "up": up,
                    "weight": b.weight,
                    "admin_state": admin_state(b),
                    "active_sessions": per_backend.get((name, b.name), 0),
                }
            )
        pool_rows.append(
            {
                "name": name,
                "balance": pool.config.balance,
                "active_sessions": sum(row["active_sessions"] for row in backends),
                "backends": backends,
            }
        )
    by_age = heapq.nsmallest(top, relaying, key=lambda s: s.started)
    by_bytes = heapq.nlargest(top, relaying, key=_bytes)
    return {
        "time": datetime.fromtimestamp(wall_time, UTC).isoformat(timespec="seconds"),
        "draining": draining,
        "config": {"source": config.source, "sha256": config.digest},
        "listeners": [{"address": str(lst.address), "bound": f"{host}:{port}"} for lst, (host, port) in listeners],
        "sessions": {"active": len(relaying), "handshaking": handshaking},
        "pools": pool_rows,
        "recent_errors": list(errors)[::-1],  # newest first
        "top_sessions_by_age": [session_row(s, now) for s in by_age],
        "top_sessions_by_bytes": [session_row(s, now) for s in by_bytes],
    }


STATUS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wsproxy status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; background: #fff; margin-bottom: .5em; }
  th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
  th { background: #f0f0f0; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .up { color: #176d2c; font-weight: 600; }
  .down { color: #b3261e; font-weight: 600; }
  .muted { color: #777; }
  .big { font-size: 2em; font-weight: 700; }
  #stale { color: #b3261e; }
  .charts { display: flex; flex-wrap: wrap; gap: 1em; }
  .chart { background: #fff; border: 1px solid #ddd; padding: .4em .6em; }
  .chart h3 { font-size: .95em; margin: 0 0 .2em; }
  .legend { font-size: .85em; margin-right: .8em; white-space: nowrap; }
  .legend i { display: inline-block; width: .8em; height: .8em; margin-right: .25em; vertical-align: -1px; }
  button { font: inherit; padding: .05em .6em; margin-right: .3em; cursor: pointer; }
  #totals span.num { font-weight: 600; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>wsproxy</h1>
<div class="muted"><span id="config"></span> &middot; updated <span id="updated">never</span>
  <span id="stale"></span></div>
<p><span class="big" id="active">&ndash;</span> active sessions
  <span class="muted">(<span id="handshaking">0</span> in handshake)</span> <span id="draining"></span></p>
<p id="totals" class="muted"></p>
<h2>Last 15 minutes</h2>
<div class="charts" id="charts"></div>
<h2>Pools and backends</h2>
<div id="control" class="muted"></div>
<div id="pools"></div>
<h2>Recent errors</h2>
<div id="errors"></div>
<h2>Oldest sessions</h2>
<div id="by_age"></div>
<h2>Busiest sessions (bytes)</h2>
<div id="by_bytes"></div>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function table(headers, rows) {
  if (!rows.length) return el("p", "none", "muted");
  const t = el("table"), head = el("tr");
  headers.forEach(h => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach(cells => {
    const tr = el("tr");
    cells.forEach(c => tr.appendChild(c instanceof Node ? c : el("td", c, typeof c === "number" ? "num" : "")));
    t.appendChild(tr);
  });
  return t;
}
function put(id, node) { const box = document.getElementById(id); box.replaceChildren(node); }
function sessionRows(list) {
  return list.map(s => [s.client, s.pool, s.backend, s.path, s.age_s.toFixed(1) + " s",
    s.bytes_from_client + s.bytes_from_backend, s.messages_to_backend + s.messages_to_client]);
}
function render(d) {
  document.getElementById("config").textContent = d.config.source + " (sha256 " + d.config.sha256.slice(0, 12) + ")";
  document.getElementById("active").textContent = d.sessions.active;
  document.getElementById("handshaking").textContent = d.sessions.handshaking;
  document.getElementById("draining").textContent = d.draining ? "draining" : "";
  const pools = document.createDocumentFragment();
  d.pools.forEach(p => {
    pools.appendChild(el("h3", p.name + " (" + p.balance + ", " + p.active_sessions + " active)"));
    const headers = ["backend", "health", "weight", "active sessions", "admin state"];
    if (token) headers.push("control");
    pools.appendChild(table(headers, p.backends.map(b => {
      const row = [b.name, el("td", b.health, b.up ? "up" : "down"), b.weight, b.active_sessions,
        el("td", b.admin_state, b.admin_state === "ready" ? "up" : "down")];
      if (token) row.push(controls(p.name, b));
      return row;
    })));
  });
  put("pools", pools);
  put("errors", table(["time", "level", "message"], d.recent_errors.map(e => [e.time, e.level, e.message])));
  const cols = ["client", "pool", "backend", "path", "age", "bytes", "messages"];
  put("by_age", table(cols, sessionRows(d.top_sessions_by_age)));
  put("by_bytes", table(cols, sessionRows(d.top_sessions_by_bytes)));
  renderTotals(d);
  renderCharts(d);
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  document.getElementById("stale").textContent = "";
}
// --- control: drain/ready buttons when the page is opened as /status#token=ADMIN_TOKEN --------
// The token stays in the fragment (never sent in a request line, never in a log) and goes out
// only in the Authorization header of the page's own POSTs.
let token = null;
function readToken() {
  token = new URLSearchParams(location.hash.slice(1)).get("token");
  document.getElementById("control").textContent = token ? "control enabled (admin token from the address)" : "";
}
readToken();
window.addEventListener("hashchange", readToken);
function controls(pool, b) {
  const td = el("td");
  [["drain", "drain"], ["ready", "ready"]].forEach(([label, state]) => {
    const button = el("button", label);
    button.dataset.backend = b.name;
    button.dataset.state = state;
    button.disabled = b.admin_state === state;
    button.addEventListener("click", () => setState(pool, b.name, state));
    td.appendChild(button);
  });
  return td;
}
async function setState(pool, backend, state) {
  const box = document.getElementById("control");
  try {
    const r = await fetch("backends/state", {method: "POST", cache: "no-store",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({pool: pool, backend: backend, state: state})});
    const doc = await r.json();
    box.textContent = r.ok ? backend + ": " + doc.previous + " \u2192 " + doc.state
                           : backend + ": " + r.status + " " + doc.error;
  } catch (e) {
    box.textContent = backend + ": " + e.message;
  }
}
// --- totals, rates and charts ----------------------------------------------------------------
function fmt(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  return n >= 1e4 ? (n / 1e3).toFixed(1) + "k" : String(Math.round(n * 100) / 100);
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + Math.floor(s % 60) + "s";
}
function renderTotals(d) {
  const box = document.getElementById("totals");
  box.replaceChildren();
  const add = (label, id, value, rate) => {
    box.appendChild(document.createTextNode(label + " "));
    const n = el("span", fmt(value), "num"); n.id = id; n.dataset.value = value; box.appendChild(n);
    box.appendChild(document.createTextNode((rate === undefined ? "" : " (" + fmt(rate) + "/s)") + " \u00b7 "));
  };
  const uptime = el("span", duration(d.uptime_s), "num"); uptime.id = "uptime"; uptime.dataset.value = d.uptime_s;
  box.appendChild(document.createTextNode("up "));
  box.appendChild(uptime);
  box.appendChild(document.createTextNode(" \u00b7 "));
  add("sessions", "total_new", d.totals.new, d.rates.new);
  add("messages to backends", "total_to_backend", d.totals.to_backend, d.rates.to_backend);
  add("to clients", "total_to_client", d.totals.to_client, d.rates.to_client);
  add("closes", "total_closes", d.totals.closes, d.rates.closes);
}
// the SVG namespace, derived from the page's own (XHTML's) rather than spelled as a URL
const SVG_NS = document.documentElement.namespaceURI.replace("1999/xhtml", "2000/svg");
const COLOURS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7d8c", "#6e7781"];
// series: [{name, points: [[t, v], ...]}], t in seconds (negative: before now)
function chart(id, title, series) {
  const W = 420, H = 110, L = 4, T = 6, span = 900;
  const box = el("div", null, "chart"); box.id = "chart-" + id;
  box.appendChild(el("h3", title));
  const max = Math.max(1, ...series.flatMap(s => s.points.map(p => p[1])));
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
  svg.dataset.max = max; svg.dataset.top = T; svg.dataset.height = H;
  const x = t => L + (W - 2 * L) * (1 + Math.max(-span, t) / span), y = v => T + H * (1 - v / max);
  const axis = document.createElementNS(SVG_NS, "text");
  axis.setAttribute("x", L); axis.setAttribute("y", H + T + 9); axis.setAttribute("font-size", "10");
  axis.textContent = "15 min ago \u2014 max " + fmt(max) + " \u2014 now";
  svg.appendChild(axis);
  const base = document.createElementNS(SVG_NS, "line");
  base.setAttribute("x1", L); base.setAttribute("x2", W - L);
  base.setAttribute("y1", T + H); base.setAttribute("y2", T + H);
  base.setAttribute("stroke", "#bbb"); svg.appendChild(base);
  const legend = el("div");
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length], line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points", s.points.map(p => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(2)).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", colour); line.setAttribute("stroke-width", "1.6");
    line.dataset.series = s.name;
    svg.appendChild(line);
    const last = s.points.length ? s.points[s.points.length - 1][1] : 0;
    const item = el("span", null, "legend"), swatch = el("i");
    swatch.style.background = colour;
    item.appendChild(swatch); item.appendChild(document.createTextNode(s.name + ": " + fmt(last)));
    item.dataset.series = s.name; item.dataset.last = last;
    legend.appendChild(item);
  });
  box.appendChild(svg); box.appendChild(legend);
  return box;
}
function renderCharts(d) {
  const samples = d.history.samples.concat([{t: 0, ...d.now}]);  // the last point is now
  const level = (pick) => samples.map(s => [s.t, pick(s) || 0]);
  const rate = (pick) => samples.slice(1).map((s, i) => {
    const prev = samples[i], dt = s.t - prev.t;
    return [s.t, dt > 0 ? Math.max(0, ((pick(s) || 0) - (pick(prev) || 0)) / dt) : 0];
  });
  const names = (key) => [...new Set(samples.flatMap(s => Object.keys(s[key])))].sort().slice(0, 6);
  const charts = document.createDocumentFragment();
  charts.appendChild(chart("open", "open sessions", [{name: "total", points: level(s => s.total.open)}]
    .concat(names("pools").map(p => ({name: p, points: level(s => (s.pools[p] || {}).open)})))));
  charts.appendChild(chart("backends", "open sessions per backend",
    names("backends").map(b => ({name: b, points: level(s => (s.backends[b] || {}).open)}))));
  charts.appendChild(chart("new", "new sessions per second", [{name: "total", points: rate(s => s.total.new)}]
    .concat(names("pools").map(p => ({name: p, points: rate(s => (s.pools[p] || {}).new)})))));
  charts.appendChild(chart("messages", "messages per second", [
    {name: "to backends", points: rate(s => s.total.to_backend)},
    {name: "to clients", points: rate(s => s.total.to_client)}]));
  charts.appendChild(chart("closes", "closes per second, by code class",
    Object.keys(d.now.closes).map(c => ({name: c, points: rate(s => s.closes[c])}))));
  put("charts", charts);
}
async function refresh() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    document.getElementById("stale").textContent = "(cannot reach the proxy: " + e.message + ")";
  }
  setTimeout(refresh, period);
}
// ?refresh=SECONDS (0.2 to 60) changes the default period of 2 s
const asked = parseFloat(new URLSearchParams(location.search).get("refresh"));
const period = 1000 * (isFinite(asked) ? Math.min(60, Math.max(0.2, asked)) : 2);
refresh();
</script>
</body>
</html>
"""
