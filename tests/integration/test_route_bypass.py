"""No spelling of a path reaches a route other than the one the backend acts on (issue 17).

A listener with an `auth` route on `match.path_prefix: /admin` and a default route without auth:
every variant of `/admin` a client can spell is either sent through the auth route (401 without
credentials, 101 with them) or refused with 400; none reaches the backend unauthenticated, and
the backend receives the normalised target the route was chosen by.
"""

from __future__ import annotations

import pytest
import trio

from tests.integration.test_edge import auth_listener, start_auth
from tests.support import proxy_yaml, start_backend, start_proxy, status_of

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
FAST = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: off}\n"

AUTHED, REFUSED, DEFAULT = 401, 400, 101  # without credentials: the auth route, a 400, the default route

# (target as sent; "{port}" is the listener's port) -> what a client without credentials gets,
# and the target the backend receives when the client has them
VARIANTS: list[tuple[str, int, str | None]] = [
    ("/admin", AUTHED, "/admin"),
    ("/%61dmin", AUTHED, "/admin"),
    ("/%61%64%6D%69%6E/x", AUTHED, "/admin/x"),
    ("//admin", AUTHED, "/admin"),
    ("///admin//x", AUTHED, "/admin/x"),
    ("/public/../admin", AUTHED, "/admin"),
    ("/public/%2e%2e/admin", AUTHED, "/admin"),
    ("/./admin", AUTHED, "/admin"),
    ("/%2e/admin", AUTHED, "/admin"),
    ("/admin/../admin", AUTHED, "/admin"),
    ("/admin/./", AUTHED, "/admin/"),
    ("/admin?next=/public", AUTHED, "/admin?next=/public"),
    ("http://127.0.0.1:{port}/admin", AUTHED, "/admin"),
    ("HTTP://127.0.0.1:{port}//public/../admin?x=1", AUTHED, "/admin?x=1"),
    ("ws://127.0.0.1:{port}/%61dmin", AUTHED, "/admin"),
    ("http://evil.example/admin", REFUSED, None),
    ("http://127.0.0.1:1/admin", REFUSED, None),
    ("http://user@127.0.0.1:{port}/admin", REFUSED, None),
    ("/admin%2Fx", REFUSED, None),
    ("/admin%2fx", REFUSED, None),
    ("/public%2F..%2Fadmin", REFUSED, None),
    ("/public/..%2Fadmin", REFUSED, None),
    ("/public\\..\\admin", REFUSED, None),
    ("/public%5C..%5Cadmin", REFUSED, None),
    ("/admin%00", REFUSED, None),
    ("/public/%00/../admin", REFUSED, None),
    ("/admin#x", REFUSED, None),
    ("/..", REFUSED, None),
    ("/../admin", REFUSED, None),
    ("/%2e%2e/admin", REFUSED, None),
    ("/adm%zzin", REFUSED, None),
    ("*", REFUSED, None),
    ("admin", REFUSED, None),
    # matching is case-sensitive, as in Envoy and nginx: another path, sent on as is
    ("/ADMIN", DEFAULT, "/ADMIN"),
    ("/public/feed", DEFAULT, "/public/feed"),
    ("/administrator", DEFAULT, "/administrator"),
]


def _request(target: str, port: int, token: str | None) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _status(port: int, request: bytes) -> int:
    """The status line's code; the connection is closed once the head has arrived."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    break
                head += data
    return status_of(head)


async def test_every_spelling_of_an_auth_route_is_authorised_or_refused(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    yaml = proxy_yaml([backends[0].port], extra=FAST).replace(
        "    pool: p\n",
        "    routes:\n"
        f"      - {{pool: p, match: {{path_prefix: /admin}}, {auth_listener(auth.port)}}}\n"
        "      - {pool: p}\n",
    )
    proxy = await start_proxy(nursery, yaml)
    port = proxy.port()
    got = {}
    for raw, _, _ in VARIANTS:
        target = raw.format(port=port)
        got[raw] = await _status(port, _request(target, port, None))
    assert got == {raw: expected for raw, expected, _ in VARIANTS}
    # the backend never saw a request for /admin that the auth service did not allow
    assert [r.path for r in backends[0].requests] == ["/ADMIN", "/public/feed", "/administrator"]
    # with credentials the auth route lets them through, and the backend gets the normalised target
    for raw, expected, normal in VARIANTS:
        if expected == REFUSED:
            continue
        before = len(backends[0].requests)
        assert await _status(port, _request(raw.format(port=port), port, "good")) == 101, raw
        with trio.fail_after(2):
            while len(backends[0].requests) == before:
                await trio.sleep(0.01)
        seen = backends[0].requests[-1]
        assert seen.path == normal, raw
        # X-User-Id is copied from the auth service's answer only on the auth route
        assert (seen.headers.get("X-User-Id") == "42") == (expected == AUTHED), raw
    assert {s["target"] for s in auth.seen} == {"/check?app=chat"}


@pytest.mark.parametrize("target", ["/admin", "/%61dmin", "/x/../admin"])
async def test_auth_service_is_told_the_normalised_target_with_its_query(nursery, backends, target: str) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(auth.port))
    )
    port = proxy.port()
    assert await _status(port, _request(target + "?token=SECRET", port, "good")) == 101
    assert auth.seen[-1]["x-forwarded-uri"] == "/admin?token=SECRET"
