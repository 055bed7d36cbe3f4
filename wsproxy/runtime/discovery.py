"""Backends from DNS: one trio task per discovered pool, asking with dnspython's async resolver on
its trio backend, and handing each new membership to the server's one apply path.

A lookup is bounded by `discovery.dns.timeout` (every query of it, SRV targets included); the
next one follows after the answer's TTL, kept between `interval` and `max_interval`
(policy/discovery.next_lookup). A failed or empty answer changes nothing: the pool keeps its
last good members (a log line, and `wsproxy_discovery_lookups_total{result="failed"|"empty"}`),
and the lookup is tried again after `interval`. `sync(config)` starts tasks for new discovery
specs and cancels those of pools that lost theirs, each in its own cancel scope, as the health
monitor does; a SIGHUP that keeps a pool's spec keeps its task.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.config import BackendConfig, Config, DnsDiscovery
from wsproxy.policy.discovery import Record, membership, next_lookup
from wsproxy.runtime.watch_host import WatchHost

if TYPE_CHECKING:  # dns.asyncbackend re-exports it without marking it public; mypy --strict wants its home
    from dns._asyncbackend import Backend as DnsBackend

log = logging.getLogger("wsproxy.discovery")

Apply = Callable[[str, tuple[BackendConfig, ...]], Awaitable[None]]
RESULTS = ("ok", "empty", "failed")


class LookupFailed(Exception):
    """A lookup that gave no usable answer: why, for the log line."""


def _resolver(spec: DnsDiscovery) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not spec.nameservers)
    if spec.nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port) for a in spec.nameservers]
    resolver.timeout = spec.timeout
    resolver.lifetime = spec.timeout
    resolver.cache = None  # the TTL is honoured here (next_lookup), never served stale from a cache
    return resolver


async def lookup(spec: DnsDiscovery) -> tuple[list[Record], float | None]:
    """The records `spec` answers now and the smallest TTL among them; LookupFailed if none."""
    resolver = _resolver(spec)
    backend = dns.asyncbackend.get_backend("trio")
    try:
        with trio.fail_after(spec.timeout):
            answer = await resolver.resolve(spec.name, spec.type, backend=backend, search=False)
            assert answer.rrset is not None  # raise_on_no_answer: an empty answer raised NoAnswer
            ttl: float = answer.rrset.ttl
            if spec.type != "SRV":
                assert spec.port is not None
                return [Record(rd.address, spec.port) for rd in answer.rrset], ttl
            records: list[Record] = []
            for rd in answer.rrset:
                target = rd.target.to_text(omit_final_dot=True)
                addresses, target_ttl = await _addresses(resolver, backend, answer, target)
                ttl = min(ttl, target_ttl)
                records += [Record(a, rd.port, rd.weight, rd.priority) for a in addresses]
            return records, ttl
    except trio.TooSlowError:
        raise LookupFailed(f"no answer within {spec.timeout:g}s") from None
    except dns.resolver.NXDOMAIN:
        raise LookupFailed(f"{spec.name} does not exist (NXDOMAIN)") from None
    except dns.resolver.NoAnswer:
        return [], None
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise LookupFailed(f"cannot reach the nameserver: {exc}") from None


async def _addresses(
    resolver: dns.asyncresolver.Resolver,
    backend: DnsBackend,
    answer: dns.resolver.Answer,
    target: str,
) -> tuple[list[str], float]:
    """An SRV target's addresses: from the answer's additional section when the server sent them,
    else asked (A, then AAAA)."""
    found: list[str] = []
    ttl = float("inf")
    for rrset in answer.response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and rrset.name.to_text(True).lower() == target.lower():
            found += [rd.address for rd in rrset]
            ttl = min(ttl, rrset.ttl)
    if found:
        return found, ttl
    for rdtype in ("A", "AAAA"):
        try:
            got = await resolver.resolve(target, rdtype, backend=backend, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        assert got.rrset is not None
        return [rd.address for rd in got.rrset], float(got.rrset.ttl)
    return [], ttl


@dataclass(eq=False)
class _Watch:
    spec: DnsDiscovery
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Discovery(WatchHost[str, _Watch, Config]):
    """The DNS watches of every pool with `discovery`; owned by the server."""

    def __init__(self, apply: Apply) -> None:
        super().__init__()
        self._apply = apply
        self.lookups: Counter[tuple[str, str]] = Counter()  # (pool, result)
        self.last_ok: dict[str, float] = {}  # pool: trio time of its last usable answer
        self.failing: set[str] = set()  # pools whose last lookup failed (one warning per streak)

    async def first_answers(self, config: Config) -> None:
        """Ask once for every discovered pool before the listeners open (each bounded by its
        timeout), so a proxy starts with backends when DNS answers."""
        async with trio.open_nursery() as nursery:
            for name, pool in config.pools.items():
                if pool.discovery is not None:
                    nursery.start_soon(self._once, name, pool.discovery)

    def _resync(self, config: Config, nursery: trio.Nursery) -> None:
        """Watch exactly the discovered pools of `config` (a changed spec restarts its watch)."""
        wanted = {name: p.discovery for name, p in config.pools.items() if p.discovery is not None}
        for name in [n for n, w in self._watches.items() if wanted.get(n) != w.spec]:
            self._watches.pop(name).scope.cancel()
        for name, spec in wanted.items():
            if name not in self._watches:
                watch = self._watches[name] = _Watch(spec)
                nursery.start_soon(self._watch, name, watch, name=f"discovery {name} {spec.name}")

    async def _watch(self, pool: str, watch: _Watch) -> None:
        with watch.scope:
            spec = watch.spec
            while True:
                ttl = await self._once(pool, spec)
                await trio.sleep(next_lookup(ttl, spec))

    async def _once(self, pool: str, spec: DnsDiscovery) -> float | None:
        """One lookup; its members applied when usable. The TTL to wait (None: after a failure)."""
        try:
            records, ttl = await lookup(spec)
        except LookupFailed as exc:
            self._note(pool, "failed", f"{spec.type} {spec.name}: {exc}; keeping the last good backends")
            return None
        members = membership(records)
        if not members:
            self._note(pool, "empty", f"{spec.type} {spec.name} answered no backend; keeping the last good backends")
            return None
        self.lookups[pool, "ok"] += 1
        self.last_ok[pool] = trio.current_time()
        if pool in self.failing:
            self.failing.discard(pool)
            log.info("pool %s: DNS %s %s answers again (%d backends)", pool, spec.type, spec.name, len(members))
        await self._apply(pool, members)
        return ttl

    def _note(self, pool: str, result: str, message: str) -> None:
        self.lookups[pool, result] += 1
        if pool not in self.failing:
            log.warning("pool %s: DNS %s", pool, message)
            self.failing.add(pool)


class DiscoveryCollector(Collector):
    """Lookups by result and the age of each pool's last good answer, read at scrape time."""

    def __init__(self, discovery: Discovery, pools: Callable[[], Iterable[str]]) -> None:
        self._discovery = discovery
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        d = self._discovery
        lookups = CounterMetricFamily(
            "wsproxy_discovery_lookups", "DNS lookups of discovered pools, by result", labels=["pool", "result"]
        )
        age = GaugeMetricFamily(
            "wsproxy_discovery_answer_age_seconds",
            "Seconds since the pool's last usable DNS answer (-1: none yet)",
            labels=["pool"],
        )
        now = trio.current_time()
        for pool in self._pools():
            for result in RESULTS:
                lookups.add_metric([pool, result], float(d.lookups.get((pool, result), 0)))
            last = d.last_ok.get(pool)
            age.add_metric([pool], -1.0 if last is None else now - last)
        return [lookups, age]
