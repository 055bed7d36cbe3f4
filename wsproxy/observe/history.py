"""The status page's memory: the last 15 minutes of a few series, sampled every few seconds.

An operator would rather look at a chart than read a table: open sessions, new sessions per
second, messages per second each way and closes by code class, for the whole proxy, per pool
and per backend. `History` keeps one sample every `interval` seconds for `span` seconds in a
ring (a fixed number of samples), each sample a small dict of counters and gauges read from the
server's metrics registry (`sample_from_metrics`, pure over the collected families). Rates are
derived by the page from consecutive samples. The number of series is bounded (`max_series`
pools + backends; the rest are left out of the charts, never out of the metrics).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from wsproxy.config import defaults

# close code classes charted (wsproxy_close_codes_total summed over the sides that sent them)
CLOSE_CLASSES = ("normal", "going_away", "restart", "abnormal", "error", "policy", "app", "other")


def close_class(code: str) -> str:
    """The chart's class of a close code label ("1005" for a close without a code)."""
    try:
        n = int(code)
    except ValueError:
        return "other"
    if n in (1000, 1005):
        return "normal"
    if n == 1001:
        return "going_away"
    if n == 1012:
        return "restart"
    if n == 1006:
        return "abnormal"
    if n == 1011:
        return "error"
    if n in (1008, 1009):
        return "policy"
    if 3000 <= n <= 4999:
        return "app"
    return "other"


def sample_from_metrics(families: Iterable[Any], max_series: int) -> dict[str, Any]:
    """One sample from the collected metric families (prometheus_client Metric objects):
    gauges as they are, counters as totals since start."""
    total: dict[str, float] = {"open": 0.0, "new": 0.0, "to_backend": 0.0, "to_client": 0.0}
    pools: dict[str, dict[str, float]] = {}
    backends: dict[str, dict[str, float]] = {}
    closes = dict.fromkeys(CLOSE_CLASSES, 0.0)

    def series(table: dict[str, dict[str, float]], name: str) -> dict[str, float] | None:
        row = table.get(name)
        if row is None:
            if len(pools) + len(backends) >= max_series:
                return None
            row = table[name] = {"open": 0.0, "new": 0.0}
        return row

    for family in families:
        for s in family.samples:
            labels = s.labels
            if s.name == "wsproxy_sessions_active":
                key = "open"
            elif s.name == "wsproxy_sessions_opened_total":
                key = "new"
            elif s.name == "wsproxy_messages_total":
                key = (
                    labels.get("direction", "")
                    .replace("client_to_backend", "to_backend")
                    .replace("backend_to_client", "to_client")
                )
                if key in total:
                    total[key] += s.value
                continue
            elif s.name == "wsproxy_close_codes_total":
                closes[close_class(labels.get("code", ""))] += s.value
                continue
            else:
                continue
            total[key] += s.value
            pool, backend = labels.get("pool", "-"), labels.get("backend", "-")
            for table, name in ((pools, pool), (backends, f"{pool}/{backend}")):
                row = series(table, name)
                if row is not None:
                    row[key] += s.value
    return {"total": total, "pools": pools, "backends": backends, "closes": closes}


class History:
    """A ring of samples: at most span / interval of them, the oldest dropped first."""

    __slots__ = ("_samples", "interval", "span")

    def __init__(self, interval: float = defaults.HISTORY_INTERVAL, span: float = defaults.HISTORY_SPAN) -> None:
        if interval <= 0 or span < interval:
            raise ValueError("interval must be positive and at most span")
        self.interval = interval
        self.span = span
        self._samples: deque[tuple[float, dict[str, Any]]] = deque(maxlen=math.ceil(span / interval) + 1)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, now: float, sample: dict[str, Any]) -> None:
        self._samples.append((now, sample))

    def document(self, now: float) -> dict[str, Any]:
        """For /status.json: each sample's age in seconds (negative: before `now`) and data."""
        return {
            "interval_s": self.interval,
            "span_s": self.span,
            "samples": [{"t": round(when - now, 3), **data} for when, data in self._samples],
        }
