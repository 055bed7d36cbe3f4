"""The proxy's own resources (policy/capacity.py) and the once-per-burst log (observe/burst_log.py)."""

from __future__ import annotations

import errno

import pytest

from wsproxy.config import defaults, parse_config
from wsproxy.observe.burst_log import BurstLog
from wsproxy.policy import capacity


@pytest.mark.parametrize(
    ("err", "resource"),
    [
        (errno.EMFILE, "descriptors"),
        (errno.ENFILE, "descriptors"),
        (errno.ENOMEM, "memory"),
        (errno.ENOBUFS, "buffers"),
        (errno.EADDRNOTAVAIL, "source_ports"),
    ],
)
def test_the_proxys_own_shortages_are_named(err: int, resource: str) -> None:
    assert capacity.local_resource(err) == resource


@pytest.mark.parametrize("err", [errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ECONNRESET, None])
def test_backend_failures_are_not_local_shortages(err: int | None) -> None:
    assert capacity.local_resource(err) is None


def config(extra: str = "", pool: str = "") -> object:
    text = (
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        "pools:\n  p:\n    backends: [127.0.0.1:9001, 127.0.0.1:9002]\n" + pool + extra
    )
    return parse_config(text, source="t.yaml")


def test_descriptors_needed_are_two_per_capped_session_plus_checks_admin_and_a_reserve() -> None:
    base = capacity.descriptors_needed(config("limits: {max_sessions: 1000, splice_min_bytes: off}\n"))
    assert base is not None and 2000 < base < 2300
    with_checks = capacity.descriptors_needed(
        config(
            "limits: {max_sessions: 1000, splice_min_bytes: off}\nadmin: {address: 127.0.0.1:0}\n",
            "    health: {interval: 1s}\n",
        )
    )
    assert with_checks is not None and with_checks >= base + 2 + 32


def test_splicing_counts_the_pipes_it_may_hold() -> None:
    copying = capacity.descriptors_needed(config("limits: {max_sessions: 1000, splice_min_bytes: off}\n"))
    splicing = capacity.descriptors_needed(config("limits: {max_sessions: 1000, splice_min_bytes: 128KiB}\n"))
    assert copying is not None and splicing is not None
    assert splicing - copying >= 2 * (defaults.SPLICE_MAX_PIPES + defaults.SPLICE_IDLE_PIPES)


def test_without_any_cap_nothing_can_be_sized() -> None:
    assert capacity.descriptors_needed(config()) is None


def test_pool_caps_bound_the_sessions_when_every_pool_has_one() -> None:
    assert capacity.session_cap(config(pool="    max_sessions: 50\n")) == 50
    assert capacity.session_cap(config("limits: {max_sessions: 20}\n", "    max_sessions: 50\n")) == 20


def test_the_reserve_is_a_bounded_share_of_the_limit() -> None:
    assert capacity.reserve_for(128) == 16
    assert capacity.reserve_for(4096) == 204
    assert capacity.reserve_for(1_000_000) == 512


def test_new_sessions_are_refused_only_within_the_reserve() -> None:
    assert not capacity.within_reserve(open_descriptors=100, limit=128)  # 102 <= 112
    assert not capacity.within_reserve(open_descriptors=110, limit=128)
    assert capacity.within_reserve(open_descriptors=111, limit=128)
    assert capacity.sessions_allowed(128) == 40


def test_a_burst_is_logged_once_and_the_next_burst_reports_the_last_ones_size() -> None:
    burst = BurstLog(quiet=10.0)
    assert burst.note(0.0) == 0
    assert [burst.note(t) for t in (0.1, 0.2, 5.0, 14.9)] == [None, None, None, None]  # each within 10 s
    assert burst.note(30.0) == 4  # quiet for 15 s: a new burst; the last one had 4 more
    assert burst.note(31.0) is None
    assert burst.note(41.5) == 1
