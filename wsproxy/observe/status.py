"""What the status page shows: the data behind /status.json and the page that renders it.

`build_status` turns the server's live objects (pools, backends, the session registry, recent
errors) into plain JSON-ready data, bounded however many sessions are open: only the top
`TOP_SESSIONS` by age and by bytes are listed. `RecentErrors` keeps the last warnings and errors
logged under `wsproxy` in a fixed-size ring. `STATUS_HTML` is a self-contained page (no external
assets, works offline) that fetches /status.json every two seconds (`?refresh=SECONDS` changes
that) and redraws itself, building every node with textContent so a client-chosen path can never
inject markup.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from wsproxy.observe.metrics import backend_health

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
</style>
</head>
<body>
<h1>wsproxy</h1>
<div class="muted"><span id="config"></span> &middot; updated <span id="updated">never</span>
  <span id="stale"></span></div>
<p><span class="big" id="active">&ndash;</span> active sessions
  <span class="muted">(<span id="handshaking">0</span> in handshake)</span> <span id="draining"></span></p>
<h2>Pools and backends</h2>
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
    pools.appendChild(table(["backend", "health", "weight", "active sessions"], p.backends.map(b =>
      [b.name, el("td", b.health, b.up ? "up" : "down"), b.weight, b.active_sessions])));
  });
  put("pools", pools);
  put("errors", table(["time", "level", "message"], d.recent_errors.map(e => [e.time, e.level, e.message])));
  const cols = ["client", "pool", "backend", "path", "age", "bytes", "messages"];
  put("by_age", table(cols, sessionRows(d.top_sessions_by_age)));
  put("by_bytes", table(cols, sessionRows(d.top_sessions_by_bytes)));
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  document.getElementById("stale").textContent = "";
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
