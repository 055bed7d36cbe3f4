"""Runtime control, the pure parts: admin states on backends (and across a reload), selectors,
request bodies, rebalance quotas, the storm shield's budgets and the reconnect table."""

from __future__ import annotations

import pytest

from wsproxy.config import AdmissionConfig, ConfigError, RateLimit, parse_config
from wsproxy.policy.control import (
    DRAIN,
    MAINT,
    READY,
    BackendStateRequest,
    CloseRequest,
    ControlError,
    RebalanceRequest,
    Selector,
    rebalance_quota,
)
from wsproxy.policy.reconnects import ReconnectTable
from wsproxy.policy.snapshot import Snapshot
from wsproxy.policy.storm import GLOBAL, StormShield, spread_retry_after

BASE = "listeners: [{address: 127.0.0.1:0, pool: p}]\npools: {p: {backends: [127.0.0.1:9001, 127.0.0.1:9002]}}\n"


def test_a_drained_backend_gets_no_new_sessions_and_ready_returns_it() -> None:
    pool = Snapshot.build(parse_config(BASE)).pools["p"]
    b1, b2 = pool.backends
    b1.admin.set(DRAIN, now=1.0)
    assert all(c is b2 for _ in range(5) for c in pool.candidates(None, 2.0))
    b1.admin.set(MAINT, now=2.0)
    assert [c.name for c in pool.candidates(None, 3.0)] == [b2.name]
    b1.admin.set(READY, now=3.0)
    assert {c.name for c in pool.candidates(None, 4.0)} == {b1.name, b2.name}


def test_admin_state_and_runtime_weight_survive_a_reload_while_the_backend_stays() -> None:
    first = Snapshot.build(parse_config(BASE))
    pool = first.pools["p"]
    b1 = pool.backends[0]
    b1.admin.set(DRAIN, now=1.0)
    pool.set_weight(b1, 7)
    again = Snapshot.build(parse_config(BASE + "# changed\n"), previous=first).pools["p"]
    assert again.backends[0].admin.state == DRAIN and again.backends[0].weight == 7
    text = BASE.replace("127.0.0.1:9001, ", "")  # b1 leaves the file: its state goes with it
    readded = Snapshot.build(parse_config(BASE), previous=Snapshot.build(parse_config(text), previous=first))
    assert readded.pools["p"].backends[0].admin.state == READY


def test_ready_restarts_the_slow_start_ramp() -> None:
    text = BASE.replace("9002]}", "9002], health: {slow_start: 10s}}")
    pool = Snapshot.build(parse_config(text)).pools["p"]
    b1 = pool.backends[0]
    assert b1.health.weight_factor(100.0) == 1.0
    b1.health.restart_ramp(100.0)
    assert b1.health.weight_factor(105.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        ({"pool": "p"}, True),
        ({"pool": "q"}, False),
        ({"backend": "127.0.0.1:9001"}, True),
        ({"backend": "127.0.0.1:9002"}, False),
        ({"client": "10.0.0.7"}, True),
        ({"client": "10.0.0.7:5555"}, True),
        ({"client": "10.0.0.8"}, False),
        ({"route": "/chat"}, True),
        ({"route": "/feed"}, False),
        ({"older_than": "30s"}, True),
        ({"older_than": "2m"}, False),
        ({"pool": "p", "route": "/feed"}, False),
    ],
)
def test_a_selector_matches_when_every_given_field_does(selector: dict, expected: bool) -> None:
    s = Selector.parse(selector)
    row = {"pool": "p", "backend": "127.0.0.1:9001", "client": "10.0.0.7:5555", "path": "/chat/room1", "age": 60.0}
    assert s.matches(**row) is expected


def test_a_selector_matches_ipv6_clients_by_address() -> None:
    assert Selector.parse({"client": "::1"}).matches(pool="p", backend="b", client="[::1]:80", path="/", age=0)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"pool": "p", "backend": "b"}, "state: missing"),
        ({"pool": "p", "backend": "b", "state": "off"}, "expected one of ready, drain, maint"),
        ({"pool": "p", "backend": "b", "state": "ready", "weight": 0}, "weight"),
        ({"pool": "p", "backend": "b", "state": "ready", "colour": 1}, "unknown field(s): colour"),
        ({"pool": "p", "backend": "b", "state": "maint", "spread": "2h"}, "spread: at most 3600s"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_backend_state_requests_say_what_is_wrong(body: object, words: str) -> None:
    with pytest.raises(ControlError, match=words.replace("(", r"\(").replace(")", r"\)")):
        BackendStateRequest.parse(body)


def test_close_requests_take_codes_a_close_frame_may_carry() -> None:
    req = CloseRequest.parse({"selector": {"backend": "b"}, "code": 1012, "spread": "60s"})
    assert (req.code, req.spread, req.selector.backend) == (1012, 60.0, "b")
    for code in (999, 1005, 1006, 1015, 2000, 5000, True, "1000"):
        with pytest.raises(ControlError, match="code"):
            CloseRequest.parse({"code": code})
    with pytest.raises(ControlError, match="reason"):
        CloseRequest.parse({"reason": "x" * 124})


def test_rebalance_requests_need_a_share() -> None:
    assert RebalanceRequest.parse({"pool": "p", "percent": 25, "over": "10s"}).over == 10.0
    for bad in (0, 101, -5, "10"):
        with pytest.raises(ControlError, match="percent"):
            RebalanceRequest.parse({"pool": "p", "percent": bad})


def test_rebalance_takes_from_the_most_loaded_backends_first() -> None:
    assert rebalance_quota([(90, 1), (10, 1), (0, 1)], 30) == [30, 0, 0]
    assert rebalance_quota([(50, 1), (50, 1)], 10) == [5, 5]
    assert rebalance_quota([(40, 2), (30, 1)], 20) == [3, 11]  # 30/1 is the heavier per weight, to 20/1 first
    assert rebalance_quota([(10, 1), (20, 1)], 50, only=0) == [5, 0]
    assert rebalance_quota([(1, 1)], 1) == [1]  # any share of a non-empty backend moves one
    assert rebalance_quota([(0, 1), (0, 1)], 100) == [0, 0]


def test_the_storm_shield_admits_its_budget_per_second_and_refuses_the_rest() -> None:
    shield = StormShield()
    shield.configure(AdmissionConfig(upgrades=RateLimit(rate=100, burst=100)), now=0.0)
    per_second = []
    for second in range(5):
        # 2000 attempts within each second
        accepted = sum(shield.admit("p", second + i / 2000, 0.5) is None for i in range(2000))
        per_second.append(accepted)
    assert per_second[0] == pytest.approx(200, abs=1)  # the burst, plus a second's refill
    assert all(abs(n - 100) <= 1 for n in per_second[1:])
    assert shield.refused[GLOBAL] == 10_000 - sum(per_second)


def test_a_pool_budget_refuses_only_that_pool_and_gives_the_global_token_back() -> None:
    shield = StormShield()
    cfg = AdmissionConfig(upgrades=RateLimit(rate=1, burst=10), per_pool={"hot": RateLimit(rate=1, burst=2)})
    shield.configure(cfg, now=0.0)
    assert [shield.admit("hot", 0.0, 0.0) is None for _ in range(4)] == [True, True, False, False]
    assert shield.refused == {"hot": 2}
    assert sum(shield.admit("cold", 0.0, 0.0) is None for _ in range(20)) == 8  # 10 - the two hot ones


def test_retry_after_is_spread_over_the_whole_window() -> None:
    values = [spread_retry_after(10.0, i / 1000) for i in range(1000)]
    assert min(values) == 1 and max(values) == 10
    assert all(90 <= values.count(v) <= 110 for v in range(1, 11))
    assert spread_retry_after(10.0, 0.9999999) == 10


def test_refusals_are_reported_at_most_once_per_second() -> None:
    shield = StormShield()
    shield.configure(AdmissionConfig(upgrades=RateLimit(rate=1, burst=1)), now=0.0)
    reports = []
    for i in range(3000):
        now = i / 1000
        shield.admit("p", now, 0.1)
        report = shield.log_due(now)
        if report is not None:
            reports.append(report)
    assert len(reports) == 2  # the first refusal opens the first one-second interval
    assert all(r.seconds == pytest.approx(1.0, abs=0.002) for r in reports)
    assert [r.admitted for r in reports] == [2, 1]  # the first also counts what passed before a refusal
    assert sum(r.refused[GLOBAL] for r in reports) <= shield.refused[GLOBAL]


def test_a_reload_with_the_same_budget_keeps_the_bucket() -> None:
    shield = StormShield()
    cfg = AdmissionConfig(upgrades=RateLimit(rate=1, burst=1))
    shield.configure(cfg, now=0.0)
    assert shield.admit("p", 0.0, 0.0) is None
    shield.configure(AdmissionConfig(upgrades=RateLimit(rate=1, burst=1)), now=0.0)
    assert shield.admit("p", 0.0, 0.0) is not None


def test_reconnects_are_new_sessions_within_the_window_of_a_close() -> None:
    table = ReconnectTable(window=60.0, max_clients=2)
    assert not table.opened("a", "p", "b1", 0.0)
    table.closed("a", 10.0)
    assert table.opened("a", "p", "b1", 30.0)
    table.closed("a", 40.0)
    assert not table.opened("a", "p", "b1", 101.0)  # 61 s later: a new visit, not a reconnect
    for key in ("x", "y", "z"):  # the table keeps two closes: the oldest is forgotten
        table.closed(key, 200.0)
    assert len(table) == 2
    assert not table.opened("x", "p", "b1", 201.0)
    assert table.opened("z", "p", "b2", 201.0)
    assert table.counts == {("p", "b1"): 1, ("p", "b2"): 1}


def test_control_config_keys() -> None:
    text = (
        BASE.replace(
            "pool: p}",
            "pool: p, auth: {url: http://127.0.0.1:1/ok, session_expiry_header: X-Auth-Expires, recheck_before: 30s}}",
        )
        + "admin: {address: 127.0.0.1:0, token_file: tok}\n"
        + "admission: {upgrades: {rate: 500/s, burst: 1000}, per_pool: {p: {rate: 50}}, retry_after_spread: 20s}\n"
        + "observability: {reconnect_window: 2m, reconnect_clients: 5000}\n"
    )
    from pathlib import Path

    c = parse_config(text, base_dir=Path("/etc/wsproxy"))
    assert c.admin is not None and c.admin.token_file == Path("/etc/wsproxy/tok") and c.admin.writable
    assert c.admission.upgrades == RateLimit(500, 1000) and c.admission.per_pool == {"p": RateLimit(50, 50)}
    assert c.admission.retry_after_spread == 20.0
    assert (c.observability.reconnect_window, c.observability.reconnect_clients) == (120.0, 5000)
    auth = c.listeners[0].auth
    assert auth is not None and (auth.session_expiry_header, auth.recheck_before) == ("x-auth-expires", 30.0)
    plain = parse_config(BASE)
    assert plain.admission.upgrades is None and plain.admission.retry_after_spread == 10.0
    assert plain.observability.reconnect_window == 60.0


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("admin: {address: 127.0.0.1:0, token_file: a, token_env: B}", "admin.token_env"),
        ("admin: {address: 127.0.0.1:0, token_env: 1BAD}", "admin.token_env"),
        ("admission: {per_pool: {nope: {rate: 1}}}", "admission.per_pool.nope"),
        ("admission: {upgrades: {rate: fast}}", "admission.upgrades.rate"),
        ("admission: {retry_after_spread: 200ms}", "admission.retry_after_spread"),
        ("admission: {storm: 1}", "admission.storm"),
        ("observability: {reconnect_window: soon}", "observability.reconnect_window"),
        ("observability: {reconnect_clients: 0}", "observability.reconnect_clients"),
    ],
)
def test_bad_control_keys_name_their_path(extra: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra + "\n")
    assert path in [p for p, _ in info.value.problems]


def test_recheck_before_needs_an_expiry_header() -> None:
    text = BASE.replace("pool: p}", "pool: p, auth: {url: http://127.0.0.1:1/ok, recheck_before: 30s}}")
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.auth\.recheck_before"):
        parse_config(text)


def test_expiry_headers_name_a_time_three_ways() -> None:
    from wsproxy.policy.credentials import parse_expiry

    assert parse_expiry(b"30", 1_700_000_000.0) == 1_700_000_030.0  # seconds from now
    assert parse_expiry(b"1700000100", 1_700_000_000.0) == 1_700_000_100.0  # a Unix time
    assert parse_expiry(b"Tue, 14 Nov 2023 22:15:00 GMT", 0.0) == 1_700_000_100.0  # an HTTP date
    for bad in (b"", b"soon", b"-5", b"nan", b"1e300"):
        assert parse_expiry(bad, 0.0) is None


def test_expiry_steps_are_spread_earlier_never_later() -> None:
    from wsproxy.policy.credentials import EXPIRE, RECHECK, next_step

    assert next_step(100.0, None, 0.0) == next_step(100.0, None, 0.0)
    assert next_step(100.0, None, 0.0).delay == 100.0 and next_step(100.0, None, 0.0).what == EXPIRE
    assert next_step(100.0, None, 0.999).delay == pytest.approx(95.005)  # at most AUTH_EXPIRY_SPREAD earlier
    assert next_step(2.0, None, 1.0).delay == pytest.approx(1.8)  # short ones: at most a tenth earlier
    step = next_step(100.0, 30.0, 0.5)
    assert step.what == RECHECK and step.delay == pytest.approx(67.5)
    assert next_step(20.0, 30.0, 0.5).what == EXPIRE  # too late to recheck: close at expiry
    assert next_step(-5.0, None, 0.5).delay == 0.0
