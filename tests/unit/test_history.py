"""The status page's history: a bounded ring of samples taken from the metrics registry."""

from __future__ import annotations

import pytest

from wsproxy.observe.history import History, close_class, sample_from_metrics
from wsproxy.observe.metrics import Metrics
from wsproxy.observe.session_log import SessionRecord
from wsproxy.protocol.relay import CloseRecord


def test_the_ring_keeps_fifteen_minutes_of_samples() -> None:
    h = History(interval=5.0, span=900.0)
    for i in range(1000):
        h.add(i * 5.0, {"total": {"open": i}})
    doc = h.document(now=5000.0)
    assert len(h) == 181 and doc["samples"][-1]["t"] == -5.0 and doc["samples"][0]["t"] == -905.0
    with pytest.raises(ValueError):
        History(interval=0)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("1000", "normal"),
        ("1005", "normal"),
        ("1001", "going_away"),
        ("1012", "restart"),
        ("1006", "abnormal"),
        ("1011", "error"),
        ("1008", "policy"),
        ("4001", "app"),
        ("1002", "other"),
        ("x", "other"),
    ],
)
def test_close_codes_fall_in_classes(code: str, cls: str) -> None:
    assert close_class(code) == cls


def test_a_sample_sums_sessions_messages_and_closes_per_pool_and_backend() -> None:
    m = Metrics()
    m.session_opened("l", "p", "b1")
    m.session_opened("l", "p", "b2")
    ended = m.session_opened("l", "q", "b3")
    record = SessionRecord(
        client="c",
        listener="l",
        pool="q",
        backend="b3",
        path="/",
        subprotocol=None,
        status=101,
        duration=1.0,
        attempts=1,
        error="",
    )
    record.relayed = True
    record.messages_to_backend, record.messages_to_client = 4, 6
    record.client_close = CloseRecord(1000, "")
    record.backend_close = CloseRecord(1012, "")
    m.session_closed(ended, record)
    s = sample_from_metrics(m.registry.collect(), max_series=64)
    assert s["total"] == {"open": 2.0, "new": 3.0, "to_backend": 4.0, "to_client": 6.0}
    assert s["pools"]["p"] == {"open": 2.0, "new": 2.0} and s["pools"]["q"] == {"open": 0.0, "new": 1.0}
    assert s["backends"]["p/b1"] == {"open": 1.0, "new": 1.0}
    assert (s["closes"]["normal"], s["closes"]["restart"]) == (1.0, 1.0)
    bounded = sample_from_metrics(m.registry.collect(), max_series=2)
    assert len(bounded["pools"]) + len(bounded["backends"]) == 2
    assert bounded["total"]["new"] == 3.0  # totals never lose what the charts leave out
