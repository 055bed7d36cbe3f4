"""Edge protection in a session's path: the waiting half of admission and of rate limiting.

The decisions are pure (admission.py, ratelimit.py, origin.py); this module runs them where a
session needs them and does the waiting they imply: the auth subrequest before a backend is
contacted, and the session's message/byte budget (`flow_limiter`; the relay driver stops
reading a client over it, so TCP pushes back on the client). `Edge` is the state a server shares
with all its sessions; `EdgeCollector` shows its counters as Prometheus metrics. In a fleet
(`shared_state`), the handshake rate and the session caps are asked of the fleet first
(runtime/shared_state.py), and this process's own counts decide whenever the fleet cannot answer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.config import Config, ListenerConfig, defaults
from wsproxy.observe.metrics import Metrics
from wsproxy.policy import admission as adm
from wsproxy.policy import fleet, health, routing
from wsproxy.policy.admission import Admission, Ticket, apply_rules, retry_after, route_rules
from wsproxy.policy.balancing import Pool
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.policy.reconnects import ReconnectTable
from wsproxy.policy.storm import StormShield
from wsproxy.protocol.handshake import ClientUpgrade, Rejection
from wsproxy.runtime.auth import AuthService
from wsproxy.runtime.capacity import Capacity, shortage_rejection
from wsproxy.runtime.credentials import Credentials, CredentialWatch
from wsproxy.runtime.shared_state import SharedStateClient
from wsproxy.runtime.timers import Timers
from wsproxy.runtime.upstream import LocalResourceError

if TYPE_CHECKING:
    from wsproxy.runtime.session import Session

log = logging.getLogger("wsproxy.edge")

LIMIT_NAMES = (
    adm.HANDSHAKE_RATE,
    adm.SESSIONS_PER_IP,
    adm.MAX_SESSIONS,
    adm.POOL_MAX_SESSIONS,
    adm.BACKENDS_FULL,
    adm.ORIGIN,
    adm.SUBPROTOCOL,
    adm.AUTH_DENIED,
    adm.AUTH_ERROR,
    adm.RATE_THROTTLED,
    adm.RATE_CLOSED,
)


class Edge:
    """What a server's sessions share for edge protection: counts, buckets, auth caches, and the
    proxy's own descriptors (`capacity`: None in a bare Edge, as tests build one)."""

    __slots__ = (
        "admission",
        "auth",
        "capacity",
        "fleet",
        "keys",
        "reconnects",
        "storm",
        "tasks",
        "timers",
        "watches",
    )

    def __init__(self, capacity: Capacity | None = None) -> None:
        self.admission = Admission()
        self.auth = AuthService()
        self.capacity = capacity
        self.storm = StormShield()  # the budget of new upgrades (admission.upgrades / per_pool)
        self.reconnects = ReconnectTable(defaults.RECONNECT_WINDOW, defaults.RECONNECT_CLIENTS)
        self.keys: dict[Session, str] = {}  # open upgraded sessions' client keys: bounded by the registry
        self.watches: dict[Session, CredentialWatch] = {}  # sessions bound to credentials that expire
        self.timers = Timers()  # the server's (set by the server): expiry timers
        self.tasks: trio.Nursery | None = None  # the server's nursery (set while serving): auth rechecks
        self.fleet: SharedStateClient | None = None  # with shared_state: the fleet's counts and limits


def local_shortage(edge: Edge, exc: LocalResourceError) -> Rejection:
    """A connect failed for want of the proxy's own resources: count and log it (once per burst),
    and answer 503 with Retry-After. The backend's health is not touched."""
    if edge.capacity is not None:
        return edge.capacity.shortage(exc.resource, exc.reason)
    return shortage_rejection(exc.resource, exc.reason)


@dataclass(slots=True)
class Admitted:
    """A request that may go to a backend: as the backend should see it, and its place in the counts."""

    upgrade: ClientUpgrade
    pool: str
    ticket: Ticket
    upstream_headers: tuple[tuple[bytes, bytes], ...] = ()
    credentials: Credentials | None = None  # the auth answer carried an expiry


def unavailable(pool: Pool, now: float) -> Rejection:
    """No backend to try (all down or ejected): 503 at once, saying when to come back."""
    after = health.retry_after((b.health for b in pool.backends), now)
    return Rejection(
        503,
        f"no backend available in pool {pool.name} (all down or ejected)",
        headers=((b"Retry-After", str(after).encode()),),
    )


def pool_full(pool: Pool) -> bool:
    """Every backend of the pool is at its max_sessions."""
    return bool(pool.backends) and all(b.full for b in pool.backends)


async def admit(
    edge: Edge,
    *,
    config: Config,
    pools: dict[str, Pool],
    listener: ListenerConfig,
    upgrade: ClientUpgrade,
    client_ip: str,
) -> Admitted | Rejection:
    """Route rules, caps and auth, cheapest first; a Rejection says what the client gets."""
    if edge.capacity is not None and (shed := edge.capacity.shed()) is not None:
        return shed  # the proxy's descriptors are within their reserve: refuse before using more
    counts = edge.admission.counts
    rules = route_rules(listener, upgrade.host, upgrade.path)
    if rules is None:
        return Rejection(404, f"no route for host {upgrade.host.decode('latin-1')} path {upgrade.path}")
    checked = apply_rules(listener, rules, upgrade)
    if isinstance(checked, Rejection):
        counts[adm.ORIGIN if checked.status == 403 else adm.SUBPROTOCOL] += 1
        return checked
    shielded = storm_check(edge, config, rules.pool) if upgrade.websocket else None  # a budget of new upgrades
    if shielded is not None:
        return shielded
    pool = pools.get(rules.pool)
    if pool is not None and pool_full(pool):
        counts[adm.BACKENDS_FULL] += 1
        why = f"every backend of pool {rules.pool} is at its max_sessions"
        return Rejection(503, why, retry_after(config.limits.retry_after), public=why)
    ticket = edge.admission.admit(config, client_ip, rules.pool)
    if isinstance(ticket, Rejection):
        return ticket
    if edge.fleet is not None:
        try:
            over = await _fleet_caps(edge, edge.fleet, config, client_ip, rules.pool)
        except BaseException:
            ticket.release()
            raise
        if over is not None:
            ticket.release()
            return over
    if rules.auth is None:
        return Admitted(checked, rules.pool, ticket)
    try:
        answer = await edge.auth.check(
            rules.auth,
            checked,
            client_ip=client_ip,
            scheme="https" if listener.tls else "http",
            max_header_bytes=config.limits.max_header_bytes,
        )
    except BaseException:
        ticket.release()
        raise
    refused = answer.rejection()
    if refused is not None:
        ticket.release()
        counts[adm.AUTH_DENIED if refused.status in (401, 403) else adm.AUTH_ERROR] += 1
        return refused
    creds = None
    if answer.expires_at is not None:
        scheme = "https" if listener.tls else "http"
        creds = Credentials(rules.auth, checked, client_ip, scheme, answer.expires_at)
    return Admitted(checked, rules.pool, ticket, answer.copy, creds)


def storm_check(edge: Edge, config: Config, pool: str) -> Rejection | None:
    """The storm shield: over the upgrade budget, 503 with a Retry-After spread at random over
    admission.retry_after_spread; refusals are logged in one line per second, not one per request."""
    if config.admission.upgrades is None and not config.admission.per_pool:
        return None
    now = trio.current_time()
    edge.storm.configure(config.admission, now)
    after = edge.storm.admit(pool, now, random.random())
    if after is None:
        return None
    report = edge.storm.log_due(now)
    if report is not None:
        log.warning(
            "storm shield: in the last %.2fs admitted %d upgrade(s), refused %d (%s); told to retry within %gs",
            report.seconds,
            report.admitted,
            sum(report.refused.values()),
            ", ".join(f"{'all pools' if k == '*' else 'pool ' + k}: {n}" for k, n in sorted(report.refused.items())),
            config.admission.retry_after_spread,
        )
    why = f"over the upgrade budget (pool {pool}): retry in {after}s"  # the proxy's own limit: fit to show
    return Rejection(503, why, ((b"Retry-After", str(after).encode()),), public=why, quiet=True)


def reconnect_key(session: Session, upgrade: ClientUpgrade) -> str:
    """Who a client is across its sessions: the sticky cookie when its pool hashes on one, else
    its address."""
    pool = session.snapshot.pools.get(session.outcome.pool or "")
    hk = pool.config.hash_key if pool is not None else None
    if hk is not None and hk.kind == "cookie":
        value = routing.extract_hash_key(hk, upgrade, session.client_addr[0])
        if value is not None:
            return "cookie:" + value[:256].decode("latin-1")
    return session.client_addr[0]


def upgraded(
    edge: Edge, session: Session, upgrade: ClientUpgrade, metrics: Metrics, credentials: Credentials | None = None
) -> None:
    """A client got its 101: the handshake's latency, whether it is a reconnect, and (when its
    auth answer carried an expiry) the timer that rechecks or closes it."""
    if credentials is not None:
        watch = edge.watches[session] = CredentialWatch(edge, session, credentials)
        watch.arm()
    now = trio.current_time()
    metrics.upgraded_after(str(session.listener.address), now - session.started)
    obs = session.snapshot.config.observability
    table = edge.reconnects
    if (table.window, table.max_clients) != (obs.reconnect_window, obs.reconnect_clients):
        table.resize(obs.reconnect_window, obs.reconnect_clients)
    key = reconnect_key(session, upgrade)
    edge.keys[session] = key
    table.opened(key, session.outcome.pool or "-", session.outcome.backend or "-", now)


def ended(edge: Edge, session: Session) -> None:
    """A session left the registry: remember when its client was last here."""
    watch = edge.watches.pop(session, None)
    if watch is not None:
        watch.cancel()
    key = edge.keys.pop(session, None)
    if key is not None:
        edge.reconnects.closed(key, trio.current_time())


async def check_handshake(edge: Edge, config: Config, ip: str, now: float) -> Rejection | None:
    """A request arrived from `ip` at `now`: within the handshake rate (the fleet's when it answers,
    else this process's own bucket), or 429."""
    spec = config.rate_limits.handshakes_per_ip
    if spec is not None and edge.fleet is not None:
        wait = await edge.fleet.handshake_wait(ip, spec.rate, spec.burst)
        if wait is not None:
            if wait <= 0:
                return None
            edge.admission.counts[adm.HANDSHAKE_RATE] += 1
            return Rejection(
                429,
                f"handshake rate from {ip} over {spec.rate:g}/s (burst {spec.burst:g}) across the fleet",
                headers=retry_after(wait),
            )
    return edge.admission.check_handshake(config, ip, now)


async def _fleet_caps(edge: Edge, state: SharedStateClient, config: Config, ip: str, pool: str) -> Rejection | None:
    """The session caps, held for the fleet: this session (already counted here) against the
    fleet's totals. None: within them, no cap set, or the fleet cannot say (the local caps held)."""
    pool_cap = config.pools[pool].max_sessions if pool in config.pools else None
    caps = {
        fleet.TOTAL: config.limits.max_sessions,
        fleet.pool_field(pool): pool_cap,
        fleet.ip_field(ip): config.rate_limits.max_sessions_per_ip,
    }
    if all(cap is None for cap in caps.values()):
        return None
    field = await state.admit(ip, pool, caps)
    if field is None:
        return None
    later = retry_after(config.limits.retry_after)
    counts = edge.admission.counts
    if field == fleet.TOTAL:
        counts[adm.MAX_SESSIONS] += 1
        return Rejection(503, f"the fleet is at limits.max_sessions ({config.limits.max_sessions})", later)
    if field == fleet.pool_field(pool):
        counts[adm.POOL_MAX_SESSIONS] += 1
        return Rejection(503, f"pool {pool} is at its max_sessions ({pool_cap}) across the fleet", later)
    counts[adm.SESSIONS_PER_IP] += 1
    cap = config.rate_limits.max_sessions_per_ip
    return Rejection(429, f"{ip} already has {cap} sessions across the fleet (max_sessions_per_ip)", later)


def flow_limiter(config: Config, now: float) -> FlowLimiter | None:
    """The client-to-backend budget of a new session, or None when no session rate is set."""
    rl = config.rate_limits
    if rl.messages is None and rl.bytes is None:
        return None
    return FlowLimiter(
        now=now,
        messages=(rl.messages.rate, rl.messages.burst) if rl.messages else None,
        nbytes=(rl.bytes.rate, rl.bytes.burst) if rl.bytes else None,
        close_after=rl.close_after,
    )


class EdgeCollector(Collector):
    """Edge counters read at scrape time from the live `Edge`."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge

    def collect(self) -> Iterable[Metric]:
        a = self._edge.admission
        refused = CounterMetricFamily(
            "wsproxy_edge_limited",
            "Handshakes refused and sessions throttled or closed, by the limit that acted",
            labels=["limit"],
        )
        for name in LIMIT_NAMES:
            refused.add_metric([name], float(a.counts.get(name, 0)))
        auth = CounterMetricFamily(
            "wsproxy_auth_checks", "Auth checks by result (allowed, denied, error, cached)", labels=["result"]
        )
        for name in ("allowed", "denied", "error", "cached"):
            auth.add_metric([name], float(self._edge.auth.counts.get(name, 0)))
        admitted = GaugeMetricFamily(
            "wsproxy_edge_sessions_admitted", "Sessions counted against max_sessions (handshake or relay phase)"
        )
        admitted.add_metric([], float(a.total))
        tracked = GaugeMetricFamily(
            "wsproxy_edge_tracked_ips", "Client addresses with a handshake rate bucket (bounded by max_tracked_ips)"
        )
        tracked.add_metric([], float(a.tracked_ips))
        storm = CounterMetricFamily(
            "wsproxy_storm_refused",
            "Upgrades refused by the storm shield's budget, by pool (* : the global budget)",
            labels=["pool"],
        )
        for name, n in sorted(self._edge.storm.refused.items()):
            storm.add_metric([name], float(n))
        passed = CounterMetricFamily(
            "wsproxy_storm_admitted", "Upgrades that passed the storm shield's budgets, by pool", labels=["pool"]
        )
        for name, n in sorted(self._edge.storm.admitted.items()):
            passed.add_metric([name], float(n))
        reconnects = CounterMetricFamily(
            "wsproxy_reconnects",
            "New sessions from a client (address, or sticky cookie) whose session closed within "
            "observability.reconnect_window",
            labels=["pool", "backend"],
        )
        for (pool, backend), n in sorted(self._edge.reconnects.counts.items()):
            reconnects.add_metric([pool, backend], float(n))
        return [refused, auth, admitted, tracked, storm, passed, reconnects]
