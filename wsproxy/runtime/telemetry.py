"""The shell's part of the metrics: what can only be read from live objects or the process.

The Prometheus metrics themselves are defined in observe/metrics.py; this module registers
what needs the running server: the process collector (`process_*`: CPU, memory, descriptors,
start time, read from /proc at scrape time), `wsproxy_build_info`, and the backlog gauge (bytes
waiting in the proxy per direction, summed over the open sessions at scrape time, labelled by
pool and backend, so bounded by the config).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy import __version__

if TYPE_CHECKING:
    from wsproxy.runtime.server import Server


class BacklogCollector(Collector):
    """wsproxy_backlog_bytes{pool, backend, direction}, read at scrape time."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "wsproxy_backlog_bytes",
            "Bytes read from one peer and waiting in the proxy for the other (its TCP window is full)",
            labels=["pool", "backend", "direction"],
        )
        sums: dict[tuple[str, str, str], int] = {}
        for name, pool in self._server.snapshot.pools.items():
            for b in pool.backends:
                for direction in ("to_client", "to_backend"):
                    sums[(name, b.name, direction)] = 0
        for s in list(self._server.sessions):
            if s.backend is None:
                continue
            to_client, to_backend = s.backlog()
            for direction, n in (("to_client", to_client), ("to_backend", to_backend)):
                key = (s.outcome.pool or "-", s.outcome.backend or "-", direction)
                if key in sums:  # a backend removed by a reload: its sessions are closing
                    sums[key] += n
        for key, n in sorted(sums.items()):
            family.add_metric(list(key), float(n))
        return [family]


def install(server: Server) -> None:
    """Register the shell's collectors on `server`'s own registry."""
    registry = server.metrics.registry
    ProcessCollector(registry=registry)
    registry.register(BacklogCollector(server))
    server.metrics.built(__version__, platform.python_version())
