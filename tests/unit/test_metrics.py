"""metrics.py: labels, the defensive reading of backend health, and what each record call counts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wsproxy.config import PassiveHealth, parse_config
from wsproxy.observe.metrics import (
    BUFFER_FULL,
    REJECTED,
    UPGRADED,
    Metrics,
    backend_health,
    close_code_label,
    status_label,
)
from wsproxy.observe.session_log import SessionRecord
from wsproxy.policy.health import BackendHealth
from wsproxy.protocol.relay import CloseRecord

CONFIG = parse_config("listeners: [{address: 127.0.0.1:0, pool: p}]\npools: {p: {backends: [127.0.0.1:9001]}}\n")


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def record(**changes: object) -> SessionRecord:
    base: dict = dict(
        client="127.0.0.1:5000",
        listener="127.0.0.1:8080",
        pool="p",
        backend="127.0.0.1:9001",
        path="/",
        subprotocol=None,
        status=101,
        duration=2.5,
        attempts=1,
        relayed=True,
        messages_to_backend=3,
        messages_to_client=4,
        bytes_from_client=30,
        bytes_from_backend=40,
        client_close=CloseRecord(1000, ""),
        backend_close=CloseRecord(None, ""),
        first_closer="client",
    )
    base.update(changes)
    return SessionRecord(**base)


def test_labels_for_no_status_and_no_close_code() -> None:
    assert status_label(0) == "none" and status_label(502) == "502"
    assert close_code_label(None) == "1005" and close_code_label(1011) == "1011"


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (1000, "1000"),
        (1006, "1006"),
        (1015, "1015"),
        (1004, "invalid"),
        (1016, "invalid"),
        (2999, "invalid"),
        (3000, "3xxx"),
        (3999, "3xxx"),
        (4000, "4xxx"),
        (4999, "4xxx"),
        (5000, "invalid"),
        (0, "invalid"),
        (65535, "invalid"),
    ],
)
def test_close_code_labels_are_registered_codes_or_a_class(code: int, label: str) -> None:
    assert close_code_label(code) == label


def test_fifty_application_close_codes_add_no_series_after_the_first_of_each_class() -> None:
    m = Metrics()

    def series() -> int:
        return sum(len(f.samples) for f in m.registry.collect() if f.name == "wsproxy_close_codes")

    m.session_closed(None, record(client_close=CloseRecord(3000, ""), backend_close=CloseRecord(4000, "")))
    before = series()
    for i in range(25):
        m.session_closed(None, record(client_close=CloseRecord(3001 + i, ""), backend_close=CloseRecord(4001 + i, "")))
    assert series() == before
    assert value(m, "wsproxy_close_codes_total", side="client", code="3xxx") == 26
    assert value(m, "wsproxy_close_codes_total", side="backend", code="4xxx") == 26


# --- backend health, however health.py shapes it ----------------------------------------------


class State(enum.Enum):
    UP = "up"
    DOWN = "down"


class Numbered(enum.Enum):
    RISING = 1


@dataclass
class FakeBackend:
    name: str = "127.0.0.1:9001"
    weight: int = 1
    health: object = None


@dataclass
class HealthObject:
    state: object
    up: object = None


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (None, ("unchecked", True)),
        ("down", ("down", False)),
        ("UP", ("up", True)),
        (True, ("up", True)),
        (False, ("down", False)),
        (State.DOWN, ("down", False)),
        (Numbered.RISING, ("rising", False)),
        (HealthObject(State.UP), ("up", True)),
        (HealthObject("ejected"), ("ejected", False)),
        (HealthObject("slow_start"), ("slow_start", True)),
        (HealthObject("rising", up=True), ("rising", True)),  # its own `up` wins over the name
    ],
)
def test_backend_health_reads_any_shape_defensively(health: object, expected: tuple[str, bool]) -> None:
    assert backend_health(FakeBackend(health=health)) == expected


def test_backend_health_asks_health_py_at_the_scrape_time() -> None:
    h = BackendHealth(passive=PassiveHealth(failures=1, window=10.0, eject_for=30.0))
    b = FakeBackend(health=h)
    assert backend_health(b, 0.0) == ("up", True)
    h.attempt_failed(100.0, "connection refused")  # one failure ejects it for 30 s
    assert backend_health(b, 101.0) == ("ejected", False)
    assert backend_health(b, 131.0) == ("up", True)
    for t in (200.0, 201.0, 202.0):  # three failed active checks: down
        h.check_failed(t, "refused")
    assert backend_health(b, 203.0) == ("down", False)


def test_backend_without_a_health_attribute_is_unchecked_and_up() -> None:
    class Bare:
        pass

    assert backend_health(Bare()) == ("unchecked", True)


@dataclass
class FakePool:
    backends: list = field(default_factory=list)


def test_backend_state_is_read_at_scrape_time() -> None:
    b = FakeBackend(weight=3)
    pools = {"p": FakePool([b])}
    m = Metrics(pools=lambda: pools)
    assert value(m, "wsproxy_backend_up", pool="p", backend=b.name) == 1
    assert value(m, "wsproxy_backend_health_state", pool="p", backend=b.name, state="unchecked") == 1
    assert value(m, "wsproxy_backend_weight", pool="p", backend=b.name) == 3
    b.health, b.weight = HealthObject("down"), 2  # a change shows at the next scrape
    assert value(m, "wsproxy_backend_up", pool="p", backend=b.name) == 0
    assert value(m, "wsproxy_backend_health_state", pool="p", backend=b.name, state="down") == 1
    assert value(m, "wsproxy_backend_health_state", pool="p", backend=b.name, state="unchecked") is None
    assert value(m, "wsproxy_backend_weight", pool="p", backend=b.name) == 2


# --- recording ------------------------------------------------------------------------------


def test_each_server_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.handshake("l", UPGRADED, 101)
    assert value(a, "wsproxy_handshakes_total", listener="l", outcome="upgraded", status="101") == 1
    assert value(b, "wsproxy_handshakes_total", listener="l", outcome="upgraded", status="101") is None


def test_session_closed_counts_what_the_session_carried_once() -> None:
    m = Metrics()
    active = m.session_opened("127.0.0.1:8080", "p", "127.0.0.1:9001")
    assert value(m, "wsproxy_sessions_active", listener="127.0.0.1:8080", pool="p", backend="127.0.0.1:9001") == 1
    m.session_closed(active, record())
    labels = {"listener": "127.0.0.1:8080", "pool": "p"}
    assert value(m, "wsproxy_sessions_active", backend="127.0.0.1:9001", **labels) == 0
    assert value(m, "wsproxy_messages_total", direction="client_to_backend", **labels) == 3
    assert value(m, "wsproxy_messages_total", direction="backend_to_client", **labels) == 4
    assert value(m, "wsproxy_bytes_total", direction="client_to_backend", **labels) == 30
    assert value(m, "wsproxy_bytes_total", direction="backend_to_client", **labels) == 40
    assert value(m, "wsproxy_session_duration_seconds_count", **labels) == 1
    assert value(m, "wsproxy_session_duration_seconds_sum", **labels) == 2.5
    assert value(m, "wsproxy_session_duration_seconds_bucket", le="5.0", **labels) == 1
    assert value(m, "wsproxy_session_duration_seconds_bucket", le="1.0", **labels) == 0
    assert value(m, "wsproxy_close_codes_total", side="client", code="1000") == 1
    assert value(m, "wsproxy_close_codes_total", side="backend", code="1005") == 1
    assert value(m, "wsproxy_sessions_closed_total", first_closer="client") == 1


def test_a_session_that_never_relayed_counts_no_traffic() -> None:
    m = Metrics()
    m.session_closed(None, record(status=502, relayed=False, messages_to_backend=0))
    assert value(m, "wsproxy_session_duration_seconds_count", listener="127.0.0.1:8080", pool="p") is None
    assert value(m, "wsproxy_sessions_closed_total", first_closer="client") is None


def test_event_counters() -> None:
    m = Metrics()
    m.handshake("l", REJECTED, 400)
    m.handshake("l", "aborted", 0)
    m.retry("p")
    m.upstream_failure("p", "b", 504)
    m.ping_sent("client")
    m.rtt("backend", 0.003)
    m.dead_peer("client")
    m.backpressure_event("client", BUFFER_FULL)
    assert value(m, "wsproxy_handshakes_total", listener="l", outcome="rejected", status="400") == 1
    assert value(m, "wsproxy_handshakes_total", listener="l", outcome="aborted", status="none") == 1
    assert value(m, "wsproxy_retries_total", pool="p") == 1
    assert value(m, "wsproxy_upstream_failures_total", pool="p", backend="b", status="504") == 1
    assert value(m, "wsproxy_pings_sent_total", leg="client") == 1
    assert value(m, "wsproxy_pong_rtt_seconds_bucket", leg="backend", le="0.005") == 1
    assert value(m, "wsproxy_pong_rtt_seconds_bucket", leg="backend", le="0.0025") == 0
    assert value(m, "wsproxy_dead_peers_total", leg="client") == 1
    assert value(m, "wsproxy_backpressure_events_total", side="client", event="buffer_full") == 1


def test_reloads_and_the_loaded_config_hash() -> None:
    m = Metrics()
    assert value(m, "wsproxy_config_reloads_total", result="ok") == 0  # both results exist from the start
    assert value(m, "wsproxy_config_reloads_total", result="failed") == 0
    m.config_loaded(CONFIG)
    assert value(m, "wsproxy_config_info", source="<config>", sha256=CONFIG.digest) == 1
    m.reload_failed()
    newer = parse_config(
        "listeners: [{address: 127.0.0.1:0, pool: p}]\npools: {p: {backends: [127.0.0.1:9002]}}\n", source="new.yaml"
    )
    m.reload_ok(newer)
    assert value(m, "wsproxy_config_reloads_total", result="ok") == 1
    assert value(m, "wsproxy_config_reloads_total", result="failed") == 1
    assert value(m, "wsproxy_config_info", source="new.yaml", sha256=newer.digest) == 1
    assert value(m, "wsproxy_config_info", source="<config>", sha256=CONFIG.digest) is None  # one hash at a time


def test_exposition_follows_prometheus_naming() -> None:
    m = Metrics(pools=lambda: {"p": FakePool([FakeBackend()])})
    m.config_loaded(CONFIG)
    m.session_closed(m.session_opened("l", "p", "b"), record())
    m.ping_sent("client")
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert all(name.startswith("wsproxy_") for name in families)
    for name, family in families.items():
        if family.type == "counter":
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples), name
    assert families["wsproxy_sessions_active"].type == "gauge"
    assert families["wsproxy_session_duration_seconds"].type == "histogram"
    assert families["wsproxy_pong_rtt_seconds"].type == "histogram"
    assert families["wsproxy_bytes"].type == "counter"
    assert {s.name for s in families["wsproxy_bytes"].samples} >= {"wsproxy_bytes_total"}


def test_traffic_counts_open_sessions_live_and_never_goes_down_when_they_end() -> None:
    from wsproxy.protocol.relay import RelayStats

    stats = RelayStats(client_bytes_in=100, backend_bytes_in=40, messages_to_backend=3, messages_to_client=2)
    live: list[tuple[str, str, RelayStats]] = [("l", "p", stats)]
    m = Metrics(live=lambda: list(live))
    up = {"listener": "l", "pool": "p", "direction": "client_to_backend"}
    assert m.registry.get_sample_value("wsproxy_messages_total", up) == 3
    assert m.registry.get_sample_value("wsproxy_bytes_total", up) == 100
    stats.messages_to_backend += 1  # traffic flows: the next scrape sees it
    assert m.registry.get_sample_value("wsproxy_messages_total", up) == 4
    # the session ends: it leaves `live` as its totals are added, in one step
    m.traffic.add_ended("l", "p", (4, 2), (100, 40))
    live.clear()
    assert m.registry.get_sample_value("wsproxy_messages_total", up) == 4
    down = {"listener": "l", "pool": "p", "direction": "backend_to_client"}
    assert m.registry.get_sample_value("wsproxy_bytes_total", down) == 40
