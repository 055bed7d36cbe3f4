"""Session caps, handshake buckets and route rules (wsproxy/admission.py), and full backends being
skipped by the balancer."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import backend_reads
from wsproxy.config import parse_config
from wsproxy.policy.admission import (
    HANDSHAKE_RATE,
    MAX_SESSIONS,
    POOL_MAX_SESSIONS,
    SESSIONS_PER_IP,
    Admission,
    apply_rules,
    retry_after,
    route_rules,
)
from wsproxy.policy.balancing import build_pool
from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.handshake import ClientUpgrade, build_upstream_request, validate_client_request

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def config(extra: str = "", listener: str = "    pool: p\n", pool: str = ""):
    return parse_config(
        "listeners:\n  - address: 127.0.0.1:0\n"
        + listener
        + "pools:\n  p:\n    backends: [127.0.0.1:9001, 127.0.0.1:9002]\n"
        + pool
        + "  q:\n    backends: [127.0.0.1:9003]\n"
        + extra
    )


def upgrade(target: bytes = b"/", host: bytes = b"example.com", extra: list | None = None) -> ClientUpgrade:
    headers = [
        (b"Host", host),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
        *(extra or []),
    ]
    checked = validate_client_request(h11.Request(method=b"GET", target=target, headers=headers))
    assert isinstance(checked, ClientUpgrade)
    return checked


# --- caps -----------------------------------------------------------------------------------


def test_global_cap_answers_503_with_retry_after_and_frees_on_release():
    cfg = config("limits: {max_sessions: 2, retry_after: 3s}\n")
    a = Admission()
    t1, t2 = a.admit(cfg, "1.1.1.1", "p"), a.admit(cfg, "2.2.2.2", "q")
    refused = a.admit(cfg, "3.3.3.3", "p")
    assert refused.status == 503 and (b"Retry-After", b"3") in refused.headers
    assert a.counts[MAX_SESSIONS] == 1
    t1.release()
    t1.release()  # twice changes nothing
    assert a.total == 1
    with a.admit(cfg, "3.3.3.3", "p"):
        assert a.total == 2
    t2.release()
    assert a.total == 0 and a.per_ip == {} and a.per_pool == {}


def test_pool_cap_counts_only_that_pool():
    cfg = config(pool="    max_sessions: 1\n")
    a = Admission()
    a.admit(cfg, "1.1.1.1", "p")
    refused = a.admit(cfg, "1.1.1.1", "p")
    assert refused.status == 503 and "pool p" in refused.reason
    assert a.counts[POOL_MAX_SESSIONS] == 1
    assert not hasattr(a.admit(cfg, "1.1.1.1", "q"), "status")


def test_per_ip_cap_answers_429_and_other_addresses_go_on():
    cfg = config("rate_limits: {max_sessions_per_ip: 2}\n")
    a = Admission()
    a.admit(cfg, "1.1.1.1", "p")
    a.admit(cfg, "1.1.1.1", "q")
    refused = a.admit(cfg, "1.1.1.1", "p")
    assert refused.status == 429 and a.counts[SESSIONS_PER_IP] == 1
    assert not hasattr(a.admit(cfg, "2.2.2.2", "p"), "status")


def test_handshake_rate_per_address():
    cfg = config("rate_limits: {handshakes_per_ip: {rate: 1/s, burst: 2}}\n")
    a = Admission()
    assert a.check_handshake(cfg, "1.1.1.1", 0.0) is None
    assert a.check_handshake(cfg, "1.1.1.1", 0.0) is None
    refused = a.check_handshake(cfg, "1.1.1.1", 0.2)
    assert refused.status == 429 and (b"Retry-After", b"1") in refused.headers
    assert a.check_handshake(cfg, "2.2.2.2", 0.2) is None
    assert a.check_handshake(cfg, "1.1.1.1", 1.0) is None
    assert a.counts[HANDSHAKE_RATE] == 1
    assert a.check_handshake(config(), "1.1.1.1", 1.0) is None  # off: never limited


def test_handshake_table_is_bounded_by_max_tracked_ips():
    cfg = config("rate_limits: {handshakes_per_ip: {rate: 1/m, burst: 1}, max_tracked_ips: 100}\n")
    a = Admission()
    for i in range(5000):
        a.check_handshake(cfg, f"10.0.{i >> 8}.{i & 255}", 0.0)
    assert a.tracked_ips == 100


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.01, b"2"), (1e9, b"1000000000")]
)
def test_retry_after_is_whole_seconds_at_least_one(seconds, header):
    assert retry_after(seconds) == ((b"Retry-After", header),)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["1.1.1.1", "2.2.2.2", "3.3.3.3"]), st.sampled_from(["p", "q"])),
        max_size=60,
    )
)
def test_counts_never_exceed_caps_and_return_to_zero(steps):
    cfg = config("limits: {max_sessions: 5}\nrate_limits: {max_sessions_per_ip: 2}\n", pool="    max_sessions: 3\n")
    a = Admission()
    held = []
    for take, ip, pool in steps:
        if take:
            got = a.admit(cfg, ip, pool)
            if not hasattr(got, "status"):
                held.append(got)
        elif held:
            held.pop(0).release()
        assert a.total <= 5 and a.per_pool.get("p", 0) <= 3 and all(n <= 2 for n in a.per_ip.values())
        assert a.total == len(held) == sum(a.per_ip.values()) == sum(a.per_pool.values())
    for t in held:
        t.release()
    assert (a.total, a.per_ip, a.per_pool) == (0, {}, {})


# --- full backends are skipped ----------------------------------------------------------------


def test_a_full_backend_is_skipped_by_the_balancer():
    cfg = parse_config(
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        "pools:\n  p:\n    balance: least_conn\n    backends:\n"
        "      - {address: 127.0.0.1:9001, max_sessions: 1}\n      - {address: 127.0.0.1:9002, max_sessions: 2}\n"
    )
    pool = build_pool(cfg.pools["p"])
    b1, b2 = pool.backends
    with pool.acquire(b1):
        assert list(pool.candidates()) == [b2]
        with pool.acquire(b2), pool.acquire(b2):
            assert list(pool.candidates()) == []
    assert set(pool.candidates()) == {b1, b2}


# --- route rules ----------------------------------------------------------------------------


ROUTED = """    allowed_origins: [https://app.example.com, "*.example.org"]
    allowed_subprotocols: [chat.v1]
    auth: {url: http://127.0.0.1:9100/check, copy_headers: [X-User-Id]}
    routes:
      - match: {path_prefix: /v2}
        pool: q
        allowed_subprotocols: [chat.v2, chat.v3]
        auth: off
      - pool: p
"""


def test_routes_inherit_the_listeners_rules_unless_they_set_their_own():
    lst = config(listener=ROUTED).listeners[0]
    v2 = route_rules(lst, b"x", "/v2/room")
    assert (v2.pool, v2.allowed_subprotocols, v2.auth) == ("q", ("chat.v2", "chat.v3"), None)
    default = route_rules(lst, b"x", "/other")
    assert default.pool == "p" and default.allowed_subprotocols == ("chat.v1",)
    assert default.auth is not None and default.auth.copy_headers == ("x-user-id",)


def test_no_route_is_none():
    lst = config(listener="    routes: [{pool: p, match: {host: a.example.com}}]\n").listeners[0]
    assert route_rules(lst, b"b.example.com", "/") is None
    assert route_rules(lst, b"A.example.com:80", "/").pool == "p"


@pytest.mark.parametrize(
    ("origin", "status"),
    [(None, None), (b"https://app.example.com", None), (b"https://x.example.org", None), (b"https://evil.com", 403)],
)
def test_origin_rule(origin, status):
    lst = config(listener=ROUTED).listeners[0]
    extra = [(b"Sec-WebSocket-Protocol", b"chat.v2")] + ([(b"Origin", origin)] if origin else [])
    up = upgrade(b"/v2", extra=extra)
    got = apply_rules(lst, route_rules(lst, up.host, up.path), up)
    assert getattr(got, "status", None) == status


def test_disallowed_subprotocols_are_removed_before_the_backend_sees_them():
    lst = config(listener=ROUTED).listeners[0]
    up = upgrade(b"/v2", extra=[(b"Sec-WebSocket-Protocol", b"evil, chat.v3"), (b"Sec-WebSocket-Protocol", b"chat.v2")])
    got = apply_rules(lst, route_rules(lst, up.host, up.path), up)
    assert isinstance(got, ClientUpgrade)
    assert got.subprotocols == ("chat.v3", "chat.v2")
    request = backend_reads(
        build_upstream_request(got, key=KEY, origin=Origin.direct("1.2.3.4"), scheme="http", extension_offer=None)
    )
    assert [v for k, v in request.headers if k == b"sec-websocket-protocol"] == [b"chat.v3, chat.v2"]


@pytest.mark.parametrize("offer", [None, b"evil", b"CHAT.V2"])
def test_nothing_allowed_left_is_400(offer):
    lst = config(listener=ROUTED).listeners[0]
    up = upgrade(b"/v2", extra=[(b"Sec-WebSocket-Protocol", offer)] if offer else [])
    got = apply_rules(lst, route_rules(lst, up.host, up.path), up)
    assert got.status == 400


def test_all_offers_allowed_leaves_the_request_untouched():
    lst = config(listener=ROUTED).listeners[0]
    up = upgrade(b"/v2", extra=[(b"Sec-WebSocket-Protocol", b"chat.v2")])
    assert apply_rules(lst, route_rules(lst, up.host, up.path), up) is up


def test_a_client_cannot_forge_headers_the_auth_service_sets():
    lst = config(listener=ROUTED).listeners[0]
    up = upgrade(b"/", extra=[(b"Sec-WebSocket-Protocol", b"chat.v1"), (b"x-USER-id", b"admin")])
    got = apply_rules(lst, route_rules(lst, up.host, up.path), up)
    assert isinstance(got, ClientUpgrade)
    assert got.header(b"x-user-id") is None
    request = backend_reads(
        build_upstream_request(
            got,
            key=KEY,
            origin=Origin.direct("1.2.3.4"),
            scheme="http",
            extension_offer=None,
            extra_headers=[(b"X-User-Id", b"42")],
        )
    )
    assert [v for k, v in request.headers if k == b"x-user-id"] == [b"42"]
