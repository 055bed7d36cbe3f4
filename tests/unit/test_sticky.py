"""The affinity cookie's pure rules (policy/sticky.py): ids, pinning, candidates, Set-Cookie."""

from __future__ import annotations

import pytest

from wsproxy.config import BackendConfig, PassiveHealth, PoolConfig, Sticky, parse_address
from wsproxy.policy import sticky
from wsproxy.policy.balancing import build_pool
from wsproxy.protocol.handshake import ClientUpgrade

SECRET = b"s" * 32


def _pool(n: int = 3, **kw):  # type: ignore[no-untyped-def]
    backends = tuple(BackendConfig(parse_address(f"10.0.0.{i}:80{i}")) for i in range(1, n + 1))
    return build_pool(PoolConfig(name="p", backends=backends, passive=PassiveHealth(failures=1), **kw))


def _request(cookie: bytes | None) -> ClientUpgrade:
    headers = ((b"Cookie", b"other=1; aff=" + cookie),) if cookie is not None else ()
    return ClientUpgrade(b"/", b"h", b"", (), (), headers, websocket=False)


def test_ids_are_stable_distinct_per_backend_and_reveal_no_address() -> None:
    pool = _pool()
    ids = [sticky.backend_id(SECRET, "p", b) for b in pool.backends]
    assert len(set(ids)) == 3
    assert ids == [sticky.backend_id(SECRET, "p", b) for b in _pool().backends]  # same secret, same ids
    assert all(b"10.0.0" not in i and b"80" not in i and len(i) == 20 for i in ids)
    assert ids != [sticky.backend_id(b"t" * 32, "p", b) for b in pool.backends]  # another secret: other ids
    assert ids != [sticky.backend_id(SECRET, "q", b) for b in pool.backends]  # another pool: other ids


def test_cookie_pins_its_backend_first_then_the_balancer_order_without_it() -> None:
    pool = _pool()
    value = sticky.cookie_value(_request(sticky.backend_id(SECRET, "p", pool.backends[2])), "aff")
    pinned, named = sticky.pinned(SECRET, "p", pool.backends, value, 0.0)
    assert pinned is pool.backends[2] and named
    order = list(sticky.candidates(pinned, pool.candidates(None, 0.0)))
    assert order[0] is pool.backends[2] and sorted(b.name for b in order) == sorted(b.name for b in pool.backends)


def test_cookie_of_an_ejected_backend_or_unknown_value_pins_nothing() -> None:
    pool = _pool()
    target = pool.backends[1]
    target.health.attempt_failed(0.0, "refused")  # failures: 1 -> ejected
    value = sticky.backend_id(SECRET, "p", target)
    assert sticky.pinned(SECRET, "p", pool.backends, value, 1.0) == (None, True)
    assert sticky.pinned(SECRET, "p", pool.backends, b"forged-value-xxxxxxx", 1.0) == (None, False)
    assert sticky.pinned(SECRET, "p", pool.backends, None, 1.0) == (None, False)


@pytest.mark.parametrize("state", ["drain", "maint"])
def test_cookie_of_a_backend_set_to_drain_or_maint_pins_nothing(state: str) -> None:
    """An operator's drain/maint takes the backend out of new sessions, cookie or not: otherwise
    maint's 1012 closes would send every client straight back to it."""
    pool = _pool()
    target = pool.backends[0]
    value = sticky.backend_id(SECRET, "p", target)
    target.admin.set(state, 0.0)
    assert sticky.pinned(SECRET, "p", pool.backends, value, 1.0) == (None, True)
    target.admin.set("ready", 2.0)
    assert sticky.pinned(SECRET, "p", pool.backends, value, 3.0) == (target, True)


def test_set_cookie_attributes() -> None:
    spec = Sticky(cookie="aff", max_age=3600.0, secure="auto", http_only=True, same_site="lax")
    assert sticky.set_cookie(spec, b"ID", client_tls=False) == b"aff=ID; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    assert b"; Secure" in sticky.set_cookie(spec, b"ID", client_tls=True)
    plain = Sticky(cookie="c", max_age=None, secure="true", http_only=False, same_site="none")
    assert sticky.set_cookie(plain, b"ID", client_tls=False) == b"c=ID; Path=/; Secure; SameSite=None"
