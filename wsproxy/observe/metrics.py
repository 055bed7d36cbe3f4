"""Every Prometheus metric wsproxy exports, owned by one `Metrics` object per `Server`.

Each server gets its own `CollectorRegistry` (never prometheus_client's global one), so many
proxies in one process (the tests) never share or collide on counters. Sessions report events at
their sources: a handshake's outcome, a retry, a proxy ping, a dead peer, a stalled send; what a
session carried (close codes, duration) is counted once, when it ends, from its `SessionRecord`.
Messages and bytes are summed at scrape time: the totals of ended sessions plus each open
session's live `RelayStats`, so an hours-long session shows its traffic as it flows and the
per-frame paths still carry no metric calls. Backend health,
weight and the loaded config are read at scrape time from the live objects. Nothing here reads
a clock or touches a socket.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.protocol.sides import Side

if TYPE_CHECKING:
    from wsproxy.config import Config
    from wsproxy.observe.http_log import HttpRecord
    from wsproxy.observe.session_log import SessionRecord

# WebSocket sessions live from milliseconds to days.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)
# Handshakes and send stalls: a millisecond on loopback to seconds through a slow backend.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Plain HTTP requests: milliseconds to a long poll's minute.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Handshake outcomes (the `outcome` label of wsproxy_handshakes_total).
UPGRADED = "upgraded"  # the client got a 101 and the relay ran
REJECTED = "rejected"  # the proxy answered an error itself (bad request, no route, every backend failed)
BACKEND_RESPONSE = "backend_response"  # the backend answered a normal HTTP response, passed on as is
ABORTED = "aborted"  # the client left before it got an answer (or sent no request)

# Backpressure events (the `event` label of wsproxy_backpressure_events_total).
SEND_STALLED = "send_stalled"  # a send to the peer waited at least SEND_STALL_SECONDS for its TCP window
BUFFER_FULL = "buffer_full"  # the relay's output queue was full: reading from the sender paused
SLOW_CONSUMER_CLOSED = "slow_consumer_closed"  # the peer took nothing for limits.slow_consumer_timeout

# A send on loopback or a healthy network completes in microseconds; one that took this long
# waited for the peer to open its window, not for the scheduler.
SEND_STALL_SECONDS = 0.1

# Health states counted as "can take new sessions" when a health object has no `up` of its own.
_UP_STATES = frozenset({"up", "healthy", "falling", "slow_start", "unchecked"})


def status_label(status: int) -> str:
    """The `status` label: the HTTP status, or "none" when the client got no answer."""
    return str(status) if status else "none"


# Close codes with a meaning of their own (the IANA registry; 1004 is reserved, 1005 and 1006 are
# what a close without a code and a vanished peer are recorded as). Peers choose the rest, so
# they are counted by class: a label per application code would let any peer add ~2000 series.
REGISTERED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1005, 1016)})


def close_code_label(code: int | None) -> str:
    """The `code` label: a registered code as itself (no code at all is 1005, RFC 6455 section
    7.1.5); 3000-3999 as "3xxx", 4000-4999 as "4xxx"; anything else "invalid"."""
    if code is None:
        return "1005"
    if code in REGISTERED_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "invalid"


def backend_health(backend: Any, now: float | None = None) -> tuple[str, bool]:
    """(state name, may take new sessions) of a backend, from its optional `health` attribute.

    Read defensively, so metrics work whatever shape health takes: no `health` (or None) is
    "unchecked" and up; with `now`, a `status(now)` and `available(now)` (health.py's
    BackendHealth: up, slow_start, ejected, down) are asked first; otherwise a `state` attribute,
    or the health value itself, may be a string, an enum or a bool, and a bool `up` wins.
    """
    health = getattr(backend, "health", None)
    if health is None:
        return "unchecked", True
    status = getattr(health, "status", None)
    available = getattr(health, "available", None)
    state = status(now) if now is not None and callable(status) else getattr(health, "state", health)
    if isinstance(state, enum.Enum):
        state = state.value if isinstance(state.value, str) else state.name
    if isinstance(state, bool):
        state = "up" if state else "down"
    name = str(state).lower()
    up = available(now) if now is not None and callable(available) else getattr(health, "up", None)
    if not isinstance(up, bool):
        up = name in _UP_STATES
    return name, up


ADMIN_STATES = ("ready", "drain", "maint")  # policy/control.py's, as metric label values


def admin_state(backend: Any) -> str:
    """The operator's state of a backend (ready when it has none)."""
    admin = getattr(backend, "admin", None)
    return str(getattr(admin, "state", "ready"))


class _BackendCollector(Collector):
    """Backend state read at scrape time, so a reload or a health change shows at once."""

    def __init__(self, pools: Callable[[], Mapping[str, Any]], clock: Callable[[], float] | None) -> None:
        self._pools = pools
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "wsproxy_backend_up", "1 if the backend may take new sessions (health), else 0", labels=["pool", "backend"]
        )
        state = GaugeMetricFamily(
            "wsproxy_backend_health_state",
            "1 for the backend's current health state (unchecked when no health check runs)",
            labels=["pool", "backend", "state"],
        )
        weight = GaugeMetricFamily(
            "wsproxy_backend_weight", "The backend's current balancing weight", labels=["pool", "backend"]
        )
        admin = GaugeMetricFamily(
            "wsproxy_backend_admin_state",
            "1 for the operator's state of the backend (ready, drain, maint), 0 for the others",
            labels=["pool", "backend", "state"],
        )
        now = self._clock() if self._clock is not None else None
        for pool_name, pool in self._pools().items():
            for backend in pool.backends:
                name, is_up = backend_health(backend, now)
                up.add_metric([pool_name, backend.name], 1.0 if is_up else 0.0)
                state.add_metric([pool_name, backend.name, name], 1.0)
                weight.add_metric([pool_name, backend.name], float(backend.weight))
                current = admin_state(backend)
                for s in ADMIN_STATES:
                    admin.add_metric([pool_name, backend.name, s], 1.0 if s == current else 0.0)
        return [up, state, weight, admin]


Traffic = tuple[str, str, Any]  # (listener, pool, RelayStats) of one open, counted session
_DIRECTIONS = ("client_to_backend", "backend_to_client")


class _TrafficCollector(Collector):
    """wsproxy_messages_total and wsproxy_bytes_total: ended sessions' totals plus live ones.

    A session leaves `live` in the same step that adds it to the totals (no await between), so a
    scrape never counts it twice or drops it, and the counters never go down.
    """

    def __init__(self, live: Callable[[], Iterable[Traffic]]) -> None:
        self._live = live
        self.ended_messages: dict[tuple[str, str, str], int] = {}
        self.ended_bytes: dict[tuple[str, str, str], int] = {}

    def add_ended(self, listener: str, pool: str, messages: tuple[int, int], octets: tuple[int, int]) -> None:
        for direction, m, b in zip(_DIRECTIONS, messages, octets, strict=True):
            key = (listener, pool, direction)
            self.ended_messages[key] = self.ended_messages.get(key, 0) + m
            self.ended_bytes[key] = self.ended_bytes.get(key, 0) + b

    def collect(self) -> Iterable[Metric]:
        messages, octets = dict(self.ended_messages), dict(self.ended_bytes)
        for listener, pool, stats in self._live():
            live_m = (stats.messages_to_backend, stats.messages_to_client)
            live_b = (stats.client_bytes_in, stats.backend_bytes_in)
            for direction, m, b in zip(_DIRECTIONS, live_m, live_b, strict=True):
                key = (listener, pool, direction)
                messages[key] = messages.get(key, 0) + m
                octets[key] = octets.get(key, 0) + b
        labels = ["listener", "pool", "direction"]
        msg = CounterMetricFamily("wsproxy_messages", "Data messages relayed, open sessions included", labels=labels)
        byt = CounterMetricFamily(
            "wsproxy_bytes",
            "Bytes read from each peer (WebSocket frames on the wire), open sessions included",
            labels=labels,
        )
        for key, value in sorted(messages.items()):
            msg.add_metric(list(key), float(value))
        for key, value in sorted(octets.items()):
            byt.add_metric(list(key), float(value))
        return [msg, byt]


class Metrics:
    """The registry and every metric of one server; methods record one event each."""

    def __init__(
        self,
        *,
        pools: Callable[[], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] | None = None,
        live: Callable[[], Iterable[Traffic]] | None = None,
    ) -> None:
        """`pools` gives the live pools at scrape time; `clock` the time health is judged at;
        `live` the open sessions' traffic (listener, pool, RelayStats)."""
        self.registry = CollectorRegistry()
        # labelled children by (metric, label values): prometheus-client's labels() validates and
        # locks on every call, a few per session; label values come from the config, so bounded
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.sessions_active = Gauge(
            "wsproxy_sessions_active",
            "Sessions in the relay phase (after the 101)",
            ["listener", "pool", "backend"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "wsproxy_sessions_opened",
            "Sessions that reached the relay phase (a 101), by where they went",
            ["listener", "pool", "backend"],
            registry=r,
        )
        self.handshakes = Counter(
            "wsproxy_handshakes",
            "Client handshakes by outcome (upgraded, rejected, backend_response, aborted) and HTTP status",
            ["listener", "outcome", "status"],
            registry=r,
        )
        self.session_duration = Histogram(
            "wsproxy_session_duration_seconds",
            "Time from accepting the connection to the end of an upgraded session",
            ["listener", "pool"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.traffic = _TrafficCollector(live if live is not None else tuple)
        r.register(self.traffic)
        self.close_codes = Counter(
            "wsproxy_close_codes",
            "Close codes by who sent them: client, backend, or proxy (1006: the peer vanished without a close)",
            ["side", "code"],
            registry=r,
        )
        self.first_closer = Counter(
            "wsproxy_sessions_closed",
            "Ended upgraded sessions by who closed first (client, backend, proxy, none)",
            ["first_closer"],
            registry=r,
        )
        self.pings_sent = Counter(
            "wsproxy_pings_sent", "Pings the proxy itself sent on a silent leg", ["leg"], registry=r
        )
        self.pong_rtt = Histogram(
            "wsproxy_pong_rtt_seconds",
            "Round trip of the proxy's own pings, per leg",
            ["leg"],
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self.dead_peers = Counter(
            "wsproxy_dead_peers", "Peers that did not answer the proxy's ping in time", ["leg"], registry=r
        )
        self.retries = Counter(
            "wsproxy_retries",
            "Further backends tried after a failed connect or upstream handshake",
            ["pool"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "wsproxy_upstream_failures",
            "Failed connects or upstream handshakes, by the status the client would get",
            ["pool", "backend", "status"],
            registry=r,
        )
        self.backpressure = Counter(
            "wsproxy_backpressure_events",
            "Buffer-full events toward a peer: send_stalled, buffer_full, slow_consumer_closed",
            ["side", "event"],
            registry=r,
        )
        self.local_exhausted = Counter(
            "wsproxy_local_resource_exhausted",
            "Times the proxy ran out of its OWN resources (descriptors, memory, buffers, source_ports):"
            " sessions refused or shed with 503, never counted against a backend",
            ["resource"],
            registry=r,
        )
        self.relay_failures = Counter(
            "wsproxy_relay_failures",
            "Sessions a bug ended in their relay phase (the traceback is logged once; other sessions go on)",
            registry=r,
        )
        self.reloads = Counter(
            "wsproxy_config_reloads", "Configuration reloads by result (ok, failed)", ["result"], registry=r
        )
        # plain HTTP requests: their own series, never mixed into the WebSocket session figures
        self.http_requests = Counter(
            "wsproxy_http_requests",
            "Plain HTTP requests by method and the status the client got (none: no answer)",
            ["listener", "pool", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "wsproxy_http_request_duration_seconds",
            "Time from a plain HTTP request's head to the end of its response",
            ["listener", "pool"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=r,
        )
        self.http_bytes = Counter(
            "wsproxy_http_body_bytes",
            "Body bytes of plain HTTP requests (client_to_backend) and responses (backend_to_client)",
            ["listener", "pool", "direction"],
            registry=r,
        )
        self.http_connections = Counter(
            "wsproxy_http_backend_connections",
            "Backend connections used for plain HTTP requests: opened anew or reused from the idle pool",
            ["pool", "reused"],
            registry=r,
        )
        self.config_info = Info("wsproxy_config", "The loaded configuration: file and sha256", registry=r)
        self.build_info = Info("wsproxy_build", "The running wsproxy: its version and Python's", registry=r)
        self.handshake_latency = Histogram(
            "wsproxy_handshake_seconds",
            "From accepting the connection to sending the client its 101",
            ["listener"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_latency = Histogram(
            "wsproxy_backend_handshake_seconds",
            "Backend connect plus the upstream Upgrade, for attempts the backend answered",
            ["pool", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.send_stalls = Histogram(
            "wsproxy_send_stall_seconds",
            "How long sends to a peer waited for its TCP window (stalls of the relay phase)",
            ["side"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)  # both series exist from the start, at 0
        if pools is not None:
            r.register(_BackendCollector(pools, clock))

    # --- handshake phase ---------------------------------------------------------------------

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def handshake(self, listener: str, outcome: str, status: int) -> None:
        self._child(self.handshakes, listener, outcome, status_label(status)).inc()

    def retry(self, pool: str) -> None:
        self._child(self.retries, pool).inc()

    def upstream_failure(self, pool: str, backend: str, status: int) -> None:
        self._child(self.upstream_failures, pool, backend, status_label(status)).inc()

    def local_resource_exhausted(self, resource: str) -> None:
        self._child(self.local_exhausted, resource).inc()

    # --- relay phase -------------------------------------------------------------------------

    def session_opened(self, listener: str, pool: str, backend: str) -> tuple[str, str, str]:
        """Count an upgraded session as active; give the labels back to `session_closed`."""
        labels = (listener, pool, backend)
        self._child(self.sessions_active, *labels).inc()
        self._child(self.sessions_opened, *labels).inc()
        return labels

    def session_closed(self, active: tuple[str, str, str] | None, record: SessionRecord) -> None:
        """One upgraded session ended: everything it carried, counted once."""
        if active is not None:
            self._child(self.sessions_active, *active).dec()
        if not record.relayed:
            return
        listener, pool = record.listener, record.pool or "-"
        self._child(self.session_duration, listener, pool).observe(record.duration)
        self.traffic.add_ended(
            listener,
            pool,
            (record.messages_to_backend, record.messages_to_client),
            (record.bytes_from_client, record.bytes_from_backend),
        )
        closes = (
            (Side.CLIENT, record.client_close),
            (Side.BACKEND, record.backend_close),
            ("proxy", record.proxy_close),
        )
        for who, rec in closes:
            if rec is not None:
                self._child(self.close_codes, who, close_code_label(rec.code)).inc()
        self._child(self.first_closer, record.first_closer or "none").inc()

    def upgraded_after(self, listener: str, seconds: float) -> None:
        """A client got its 101 `seconds` after its connection was accepted."""
        self._child(self.handshake_latency, listener).observe(seconds)

    def backend_handshake(self, pool: str, backend: str, seconds: float) -> None:
        self._child(self.backend_latency, pool, backend).observe(seconds)

    def send_stall(self, side: Side, seconds: float) -> None:
        self._child(self.send_stalls, side).observe(seconds)

    # The label is still called "leg" on the heartbeat metrics (a name dashboards know); its
    # values are a Side's, "client" or "backend".
    def ping_sent(self, side: Side) -> None:
        self._child(self.pings_sent, side).inc()

    def rtt(self, side: Side, seconds: float) -> None:
        self._child(self.pong_rtt, side).observe(seconds)

    def dead_peer(self, side: Side) -> None:
        self._child(self.dead_peers, side).inc()

    def backpressure_event(self, side: Side, event: str) -> None:
        self._child(self.backpressure, side, event).inc()

    def relay_failure(self) -> None:
        self.relay_failures.inc()

    # --- plain HTTP requests ---------------------------------------------------------------------

    def http_request(self, record: HttpRecord, method: str) -> None:
        """One plain HTTP request ended (`method`: the bounded label, http_log.method_label)."""
        pool = record.pool or "-"
        self._child(self.http_requests, record.listener, pool, method, status_label(record.status)).inc()
        self._child(self.http_duration, record.listener, pool).observe(record.duration)
        if record.bytes_from_client:
            self._child(self.http_bytes, record.listener, pool, "client_to_backend").inc(record.bytes_from_client)
        if record.bytes_from_backend:
            self._child(self.http_bytes, record.listener, pool, "backend_to_client").inc(record.bytes_from_backend)
        if record.backend is not None and record.status:
            self._child(self.http_connections, pool, "yes" if record.reused else "no").inc()

    # --- configuration -----------------------------------------------------------------------

    def built(self, version: str, python: str) -> None:
        """wsproxy_build_info: which wsproxy (and Python) is running."""
        self.build_info.info({"version": version, "python": python})

    def config_loaded(self, config: Config) -> None:
        """The snapshot now serving: its file and sha256 (wsproxy_config_info)."""
        self.config_info.info({"source": config.source, "sha256": config.digest})

    def reload_ok(self, config: Config) -> None:
        """A reload validated and swapped in `config`."""
        self.reloads.labels("ok").inc()
        self.config_loaded(config)

    def reload_failed(self) -> None:
        """A reload was refused (invalid file): the old snapshot keeps serving."""
        self.reloads.labels("failed").inc()

    # --- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text format of this server's registry."""
        return generate_latest(self.registry)
