"""Runtime control carried out on a running server: backend admin states, closes by selector,
rebalancing, the session list, and the per-server control state (session ids, the storm
shield's log, reconnect tracking).

The decisions are pure (policy/control.py, policy/storm.py, policy/reconnects.py); this module
applies them to the live sessions and pools of one `Server`. Every close it starts is spread at
a flat rate over a window by the server's one spreading task (`Server._spread_closes`, which
uses reload_plan.spread), so no operator action closes a crowd of sessions in one instant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from wsproxy.config import defaults
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.control import (
    MAINT,
    READY,
    BackendStateRequest,
    CloseRequest,
    ControlError,
    RebalanceRequest,
    Selector,
    rebalance_quota,
)
from wsproxy.protocol.relay import SERVICE_RESTART

if TYPE_CHECKING:
    from wsproxy.runtime.server import Server
    from wsproxy.runtime.session import Session

log = logging.getLogger("wsproxy.control")


class NotFound(ControlError):
    """The request names a pool or backend the running config does not have (a 404)."""


def _client(session: Session) -> str:
    host, port = session.client_addr[0], session.client_addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Control:
    """What one server's operator may change at runtime, and the session ids it refers to."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._ids: dict[Session, int] = {}  # open sessions only: bounded by the registry
        self._next_id = 1

    # --- the registry's ids --------------------------------------------------------------------

    def track(self, session: Session) -> None:
        self._ids[session] = self._next_id
        self._next_id += 1

    def forget(self, session: Session) -> None:
        self._ids.pop(session, None)

    # --- reads ---------------------------------------------------------------------------------

    def _relaying(self) -> Iterable[Session]:
        return (s for s in self.server.sessions if s.relay is not None and s.backend is not None)

    def _matches(self, selector: Selector, session: Session, now: float) -> bool:
        o = session.outcome
        return selector.matches(
            pool=o.pool, backend=o.backend, client=_client(session), path=o.path, age=now - session.started
        )

    def session_row(self, session: Session, now: float) -> dict[str, Any]:
        o = session.outcome
        assert session.relay is not None
        st = session.relay.stats
        last = session.last_activity
        return {
            "id": self._ids.get(session, 0),
            "client": _client(session),
            "pool": o.pool,
            "backend": o.backend,
            "route": o.path,
            "age_s": round(max(0.0, now - session.started), 3),
            "messages_to_backend": st.messages_to_backend,
            "messages_to_client": st.messages_to_client,
            "bytes_from_client": st.client_bytes_in,
            "bytes_from_backend": st.backend_bytes_in,
            "idle_s": round(max(0.0, now - last), 3) if last is not None else None,
            "closing": session.closing,
        }

    def sessions(self, selector: Selector, *, after: int = 0, limit: int = defaults.SESSIONS_PAGE) -> dict[str, Any]:
        """One page of open sessions (by id, ascending) matching `selector`; `next` is the
        cursor for the following page (None: this was the last)."""
        now = trio.current_time()
        limit = max(1, min(limit, defaults.SESSIONS_PAGE_MAX))
        ids = self._ids
        picked = sorted(
            ((ids.get(s, 0), s) for s in self._relaying() if ids.get(s, 0) > after and self._matches(selector, s, now)),
            key=lambda pair: pair[0],
        )
        page = picked[:limit]
        rows = [self.session_row(s, now) for _, s in page]
        more = len(picked) > limit
        return {"sessions": rows, "count": len(rows), "matching": len(picked), "next": page[-1][0] if more else None}

    # --- writes --------------------------------------------------------------------------------

    def _find(self, pool_name: str, backend_name: str | None) -> tuple[Pool, Backend | None]:
        pool = self.server.snapshot.pools.get(pool_name)
        if pool is None:
            raise NotFound(f"no pool {pool_name!r}")
        if backend_name is None:
            return pool, None
        backend = pool.find(backend_name)
        if backend is None:
            raise NotFound(f"pool {pool_name!r} has no backend {backend_name!r}")
        return pool, backend

    def _spread(self, sessions: list[Session], window: float, code: int, reason: str) -> None:
        nursery = self.server._connections
        if sessions and nursery is not None:
            nursery.start_soon(self.server._spread_closes, sessions, window, code, reason)

    def set_backend_state(self, req: BackendStateRequest) -> dict[str, Any]:
        pool, backend = self._find(req.pool, req.backend)
        assert backend is not None
        now = trio.current_time()
        before = backend.admin.state
        backend.admin.set(req.state, now)
        if req.weight is not None:
            pool.set_weight(backend, req.weight)
        if req.state == READY and before != READY and pool.config.health is not None:
            backend.health.restart_ramp(now)  # slow start, as after a recovery
        closing = 0
        window = req.spread if req.spread is not None else self.server.snapshot.config.reload.drain_window
        if req.state == MAINT:
            doomed = [s for s in self.server.sessions if s.backend is backend and not s.closing]
            closing = len(doomed)
            self._spread(doomed, window, SERVICE_RESTART, "backend in maintenance")
        return {
            "pool": pool.name,
            "backend": backend.name,
            "state": backend.admin.state,
            "previous": before,
            "weight": backend.weight,
            "active_sessions": backend.active,
            "closing": closing,
            "spread_s": window if closing else 0.0,
        }

    def close(self, req: CloseRequest) -> dict[str, Any]:
        now = trio.current_time()
        doomed = [s for s in self._relaying() if not s.closing and self._matches(req.selector, s, now)]
        self._spread(doomed, req.spread, req.code, req.reason)
        return {"closing": len(doomed), "code": req.code, "spread_s": req.spread}

    def rebalance(self, req: RebalanceRequest) -> dict[str, Any]:
        pool, only = self._find(req.pool, req.backend)
        on: dict[Backend, list[Session]] = {b: [] for b in pool.backends}
        for s in self._relaying():
            if s.backend in on and not s.closing:
                on[s.backend].append(s)
        loads = [(len(on[b]), max(b.weight, 1)) for b in pool.backends]
        quota = rebalance_quota(loads, req.percent, None if only is None else pool.backends.index(only))
        doomed: list[Session] = []
        moved: dict[str, int] = {}
        for b, n in zip(pool.backends, quota, strict=True):
            if n:
                # the youngest first: they hold the least state, and the oldest keep their place
                doomed += sorted(on[b], key=lambda s: s.started, reverse=True)[:n]
                moved[b.name] = n
        self._spread(doomed, req.over, SERVICE_RESTART, "rebalancing")
        return {"pool": pool.name, "closing": len(doomed), "by_backend": moved, "spread_s": req.over}
