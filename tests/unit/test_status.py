"""status.py: /status.json from live objects, bounded however many sessions are open."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from wsproxy.config import parse_config
from wsproxy.observe.status import MAX_ERROR_CHARS, RecentErrors, build_status
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol.relay import RelayStats

CONFIG = parse_config(
    "listeners: [{address: 127.0.0.1:8080, pool: p}]\n"
    "pools: {p: {backends: [127.0.0.1:9001, {address: 127.0.0.1:9002, weight: 3}]}}\n",
    source="s.yaml",
)
LISTENER = CONFIG.listeners[0]


@dataclass
class Outcome:
    """The fields of session.Outcome the status page reads."""

    status: int = 0
    pool: str | None = None
    backend: str | None = None
    path: str | None = None
    subprotocol: str | None = None


@dataclass
class FakeRelay:
    stats: RelayStats = field(default_factory=RelayStats)


@dataclass
class FakeSession:
    """The attributes of `Session` the status page reads."""

    started: float
    backend: str = "127.0.0.1:9001"
    sent: int = 0
    handshaking: bool = False
    client_addr: tuple[str, int] = ("127.0.0.1", 5000)
    listener: object = LISTENER
    outcome: Outcome = field(default_factory=Outcome)
    relay: FakeRelay | None = None

    def __post_init__(self) -> None:
        if not self.handshaking:
            self.outcome = Outcome(status=101, pool="p", backend=self.backend, path=f"/s{self.started:g}")
            self.relay = FakeRelay(RelayStats(client_bytes_in=self.sent, backend_bytes_in=1))


def status(sessions: list[FakeSession], **kw: object) -> dict:
    args: dict = dict(
        pools=Snapshot.build(CONFIG).pools,
        sessions=sessions,
        now=1000.0,
        wall_time=1_800_000_000.0,
        draining=False,
        config=CONFIG,
        listeners=[(LISTENER, ("127.0.0.1", 8080))],
        errors=[],
    )
    args.update(kw)
    return build_status(**args)


def test_counts_pools_and_backends() -> None:
    sessions = [FakeSession(started=float(i)) for i in range(3)] + [
        FakeSession(started=5.0, backend="127.0.0.1:9002"),
        FakeSession(started=6.0, handshaking=True),
    ]
    doc = status(sessions)
    assert doc["sessions"] == {"active": 4, "handshaking": 1}
    [pool] = doc["pools"]
    assert pool["name"] == "p" and pool["balance"] == "round_robin" and pool["active_sessions"] == 4
    assert [(b["name"], b["weight"], b["active_sessions"], b["up"]) for b in pool["backends"]] == [
        ("127.0.0.1:9001", 1, 3, True),
        ("127.0.0.1:9002", 3, 1, True),
    ]
    assert doc["config"] == {"source": "s.yaml", "sha256": CONFIG.digest}
    assert doc["listeners"] == [{"address": "127.0.0.1:8080", "bound": "127.0.0.1:8080"}]


def test_top_sessions_are_bounded_and_ordered() -> None:
    sessions = [FakeSession(started=float(i), sent=(i * 37) % 101) for i in range(500)]
    doc = status(sessions, top=20)
    by_age = doc["top_sessions_by_age"]
    by_bytes = doc["top_sessions_by_bytes"]
    assert len(by_age) == 20 and len(by_bytes) == 20
    assert [s["age_s"] for s in by_age] == [1000.0 - i for i in range(20)]  # oldest first
    sizes = [s["bytes_from_client"] for s in by_bytes]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 100
    assert by_bytes[0]["bytes_from_backend"] == 1 and by_bytes[0]["client"] == "127.0.0.1:5000"


def test_ipv6_client_is_bracketed_and_draining_shows() -> None:
    doc = status([FakeSession(started=1.0, client_addr=("::1", 4000))], draining=True)
    assert doc["top_sessions_by_age"][0]["client"] == "[::1]:4000"
    assert doc["draining"] is True


@pytest.mark.expect_errors(r"^wsproxy\.status-test: x+$")
def test_recent_errors_keep_the_last_warnings_newest_first() -> None:
    ring = RecentErrors(size=3)
    logger = logging.getLogger("wsproxy.status-test")
    logger.addHandler(ring)
    try:
        logger.info("not an error")
        for i in range(5):
            logger.warning("problem %d", i)
        logger.error("x" * (MAX_ERROR_CHARS + 100))
    finally:
        logger.removeHandler(ring)
    assert [e["message"] for e in ring.entries][:2] == ["problem 3", "problem 4"]
    assert len(ring.entries) == 3 and len(ring.entries[-1]["message"]) == MAX_ERROR_CHARS
    doc = status([], errors=ring.entries)
    assert doc["recent_errors"][0]["level"] == "error" and doc["recent_errors"][-1]["message"] == "problem 3"
