"""Rebalancing after a reload must not overshoot while the sessions it closed are still closing.

A session told to go away keeps its backend's count until its closing handshake ends (up to
`timeouts.close`); its client has meanwhile reconnected to the new backend. If rebalancing judged
the spread by those stale counts it would keep moving sessions until the new backend held almost
all of them. Here the clients reconnect at once but never answer the proxy's close, so every moved
session stays "closing" for the whole close timeout.
"""

from __future__ import annotations

import trio
from wsproto.events import CloseConnection

from tests.integration.test_reload import config_text, start_backends, wait_for, whoami
from tests.support import RawClient, free_port, start_proxy
from wsproxy.runtime.supervisor import reload_from_file

SESSIONS = 20


async def test_rebalance_counts_closing_sessions_as_moved(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    rebalance = "    rebalance: {max_sessions_per_second: 40}\n"
    text = config_text(port, backends[:1], balance="least_conn").replace("close: 2s", "close: 3s")
    path.write_text(text.replace("    backends:", rebalance + "    backends:"))
    proxy = await start_proxy(nursery, path.read_text())
    where: dict[int, str] = {}
    moved: list[int] = []

    async def slow_closing_client(i: int) -> None:
        client = await RawClient.connect(port, f"/r{i}")
        where[i] = await whoami(client)
        while not isinstance(await client.next_event(), CloseConnection):
            pass  # the 1012: reconnect at once, never answer it
        moved.append(i)
        fresh = await RawClient.connect(port, f"/r{i}")
        where[i] = await whoami(fresh)
        await trio.sleep_forever()

    async with trio.open_nursery() as clients:
        for i in range(SESSIONS):
            clients.start_soon(slow_closing_client, i)
        await wait_for(lambda: len(where) == SESSIONS)
        path.write_text(
            path.read_text().replace(
                f"      - 127.0.0.1:{backends[0]}\n", "".join(f"      - 127.0.0.1:{b}\n" for b in backends)
            )
        )
        assert await reload_from_file(proxy.server, path)
        await wait_for(lambda: len(moved) >= SESSIONS // 2, timeout=5)
        await trio.sleep(1.0)  # 40 more periods: nothing more may move while the moved ones still close
        assert len(moved) == SESSIONS // 2, moved
        assert sorted(where.values()).count("b1") == SESSIONS // 2
        clients.cancel_scope.cancel()
