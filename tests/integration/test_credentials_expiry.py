"""Sessions bound to their credentials: the auth answer's expiry header closes the session with
1008 "credentials expired" at that time, or, with recheck_before, the auth service is asked
again before it and the session goes on while the answer is still yes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import h11
import trio
from wsproto.events import TextMessage

from tests.support import RawClient, proxy_yaml, start_backend, start_proxy


@dataclass
class ExpiringAuth:
    port: int = 0
    answers: list[tuple[int, str | None]] = field(default_factory=list)  # (status, X-Auth-Expires) in turn
    asked: list[float] = field(default_factory=list)


async def start_expiring_auth(nursery: trio.Nursery, answers: list[tuple[int, str | None]]) -> ExpiringAuth:
    auth = ExpiringAuth(answers=list(answers))

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                break
        auth.asked.append(trio.current_time())
        status, expires = auth.answers.pop(0) if auth.answers else (401, None)
        headers = [(b"Content-Length", b"0")]
        if expires is not None:
            headers.append((b"X-Auth-Expires", expires.encode()))
        await stream.send_all(
            conn.send(h11.Response(status_code=status, headers=headers)) + conn.send(h11.EndOfMessage())
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    auth.port = listeners[0].socket.getsockname()[1]
    return auth


def _listener(port: int, recheck: str = "off") -> str:
    return (
        f"auth: {{url: 'http://127.0.0.1:{port}/check', timeout: 1s, session_expiry_header: X-Auth-Expires, "
        f"recheck_before: {recheck}}}"
    )


async def test_a_session_closes_with_1008_when_its_credentials_expire(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_expiring_auth(nursery, [(200, "1.5"), (200, None)])
    yaml_text = proxy_yaml(
        [backends[0].port], listener_extra=_listener(auth.port), extra="heartbeat: {interval: off}\n"
    )
    proxy = await start_proxy(nursery, yaml_text)
    start = trio.current_time()
    bound = await RawClient.connect(proxy.port(), "/a")
    free = await RawClient.connect(proxy.port(), "/b")  # its answer carried no expiry: not bound
    with trio.fail_after(5):
        close = await bound.wait_close()
    took = trio.current_time() - start
    assert (close.code, close.reason) == (1008, "credentials expired")
    assert 1.2 <= took <= 2.2, took  # at expiry, moved earlier by at most a tenth of it
    await free.send(TextMessage(data="still here"))
    assert await free.receive_message() == "still here"
    await free.close()


async def test_recheck_before_expiry_keeps_the_session_while_the_auth_service_says_yes(nursery, backends) -> None:
    backends.append(start_backend())
    # the handshake's check (2 s), a recheck that passes (another 4 s), a recheck that fails
    auth = await start_expiring_auth(nursery, [(200, "2"), (200, "4"), (401, None)])
    yaml_text = proxy_yaml(
        [backends[0].port], listener_extra=_listener(auth.port, recheck="1s"), extra="heartbeat: {interval: off}\n"
    )
    proxy = await start_proxy(nursery, yaml_text)
    start = trio.current_time()
    client = await RawClient.connect(proxy.port(), "/r")
    assert client.accept is not None
    with trio.fail_after(5):
        while len(auth.asked) < 2:
            await trio.sleep(0.02)
    assert 0.7 <= auth.asked[1] - start <= 1.3  # asked again about recheck_before ahead of expiry
    await trio.sleep(1.2 - (trio.current_time() - auth.asked[1]))  # past the first expiry: still open
    await client.send(TextMessage(data="renewed"))
    assert await client.receive_message() == "renewed"
    with trio.fail_after(5):
        close = await client.wait_close()
    assert (close.code, close.reason) == (1008, "credentials expired")
    assert len(auth.asked) == 3 and 2.4 <= trio.current_time() - auth.asked[1] <= 3.3
    assert not proxy.server.edge.watches or all(s.closing for s in proxy.server.edge.watches)
