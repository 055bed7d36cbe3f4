"""The admin listener's control API: `GET /sessions` (a read) and the writes
`POST /backends/state`, `POST /sessions/close`, `POST /rebalance`.

Writes are off unless `admin.token_file` or `admin.token_env` names a secret; each needs
`Authorization: Bearer <token>`, compared in constant time (hmac.compare_digest). Bodies are
JSON objects, answers are JSON; every write is logged with the admin client's address and
counted (wsproxy_admin_actions_total{action, result}). The token is read when the API first
needs it and again after a reload; it never reaches a log line or a page. What the requests
mean is decided in policy/control.py and carried out by runtime/control.py.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.config import AdminConfig, defaults
from wsproxy.config.control import read_admin_token
from wsproxy.policy.control import BackendStateRequest, CloseRequest, ControlError, RebalanceRequest, Selector
from wsproxy.runtime.control import NotFound

if TYPE_CHECKING:
    from wsproxy.runtime.control import Control

log = logging.getLogger("wsproxy.admin")

JSON = "application/json"
WRITE_PATHS = {b"/backends/state": "backend_state", b"/sessions/close": "close", b"/rebalance": "rebalance"}
READ_PATHS = (b"/sessions",)
ACTIONS = ("backend_state", "close", "rebalance")
RESULTS = ("ok", "bad_request", "not_found", "unauthorized", "off")

Answer = tuple[int, bytes, tuple[tuple[str, str], ...]]


def _json(status: int, doc: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return status, json.dumps(doc, separators=(",", ":")).encode() + b"\n", headers


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (None: no such header)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class ControlApi:
    """Answers the control paths for one server's `Control`."""

    def __init__(self, control: Control, admin_config: Callable[[], AdminConfig | None]) -> None:
        self.control = control
        self._admin_config = admin_config  # the current snapshot's admin settings
        self._token: tuple[AdminConfig, bytes | None] | None = None  # (settings it was read for, token)
        self.counts: Counter[tuple[str, str]] = Counter()

    def handles(self, path: bytes) -> bool:
        return path in WRITE_PATHS or path in READ_PATHS

    def _current_token(self) -> bytes | None:
        cfg = self._admin_config()
        if cfg is None or not cfg.writable:
            return None
        if self._token is None or self._token[0] is not cfg:
            try:
                token: bytes | None = read_admin_token(cfg.token_file, cfg.token_env)
            except ValueError as exc:
                log.error("admin: write API unavailable: %s", exc)
                token = None
            self._token = (cfg, token)
        return self._token[1]

    def respond(
        self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes, peer: str
    ) -> Answer:
        path = target.split(b"?", 1)[0]
        if path in READ_PATHS:
            if method not in (b"GET", b"HEAD"):
                return _json(405, {"error": "GET /sessions"}, (("Allow", "GET, HEAD"),))
            return self._list(target)
        action = WRITE_PATHS[path]
        if method != b"POST":
            return _json(405, {"error": f"{path.decode()} takes POST with a JSON body"}, (("Allow", "POST"),))
        status, doc, result = self._write(action, headers, body)
        self.counts[(action, result)] += 1
        summary = doc.get("error") or ", ".join(f"{k}={v}" for k, v in doc.items() if not isinstance(v, dict))
        log.log(
            logging.INFO if result == "ok" else logging.WARNING,
            "admin: POST %s from %s: %d %s",
            path.decode(),
            peer,
            status,
            summary,
        )
        extra = (("WWW-Authenticate", 'Bearer realm="wsproxy"'),) if status == 401 else ()
        return _json(status, doc, extra)

    def _write(
        self, action: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, dict[str, Any], str]:
        token = self._current_token()
        if token is None:
            why = "the write API is off: set admin.token_file or admin.token_env"
            cfg = self._admin_config()
            if cfg is not None and cfg.writable:
                why = "the write API's token could not be read (see the proxy's log)"
            return 403, {"error": why}, "off"
        given = bearer(headers)
        if given is None or not hmac.compare_digest(given, token):
            return 401, {"error": "needs Authorization: Bearer <admin token>"}, "unauthorized"
        try:
            doc = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}, "bad_request"
        try:
            if action == "backend_state":
                return 200, self.control.set_backend_state(BackendStateRequest.parse(doc)), "ok"
            if action == "close":
                return 200, self.control.close(CloseRequest.parse(doc)), "ok"
            return 200, self.control.rebalance(RebalanceRequest.parse(doc)), "ok"
        except NotFound as exc:
            return 404, {"error": str(exc)}, "not_found"
        except ControlError as exc:
            return 400, {"error": str(exc)}, "bad_request"

    def _list(self, target: bytes) -> Answer:
        query = parse_qs(urlsplit(target.decode("latin-1")).query, max_num_fields=16)
        raw = {k: v[-1] for k, v in query.items()}
        try:
            after = _whole(raw.pop("after", "0"), "after", 0, 1 << 62)
            limit = _whole(raw.pop("limit", str(defaults.SESSIONS_PAGE)), "limit", 1, defaults.SESSIONS_PAGE_MAX)
            selector = Selector.parse(raw)
        except ControlError as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, self.control.sessions(selector, after=after, limit=limit))


def _whole(value: str, name: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ControlError(f"{name}: expected a whole number, got {value!r}") from None
    if not low <= n <= high:
        raise ControlError(f"{name}: expected {low}..{high}, got {n}")
    return n


class ControlCollector(Collector):
    """wsproxy_admin_actions_total, read at scrape time."""

    def __init__(self, api: Callable[[], ControlApi | None]) -> None:
        self._api = api

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "wsproxy_admin_actions",
            "Write requests on the admin listener by action and result",
            labels=["action", "result"],
        )
        api = self._api()
        counts = api.counts if api is not None else Counter()
        for action in ACTIONS:
            for result in RESULTS:
                family.add_metric([action, result], float(counts.get((action, result), 0)))
        return [family]
