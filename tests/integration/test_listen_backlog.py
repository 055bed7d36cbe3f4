"""The listener's accept queue (`listeners[].backlog`): what listen(2) was given, read back from the
kernel with `ss`, at start, after a reload (in place, the port never closed) and for the default.

A reconnect storm arrives faster than any accept loop: with the queue at 1024 the fifth thousand of
clients lost their SYNs and retried after 1, 3, 7 and 15 s (benchmarks/relay_bench.py's storm cell).
"""

from __future__ import annotations

import socket
import subprocess

import trio

from tests.integration.test_reload import config_text, start_backends, whoami
from tests.support import RawClient, free_port, start_proxy
from wsproxy.config import Address, defaults
from wsproxy.runtime.listen import open_sockets
from wsproxy.runtime.streams import NOTSENT_LOWAT
from wsproxy.runtime.supervisor import reload_from_file


def queue_size(port: int) -> int:
    """The accept queue of the socket listening on 127.0.0.1:port (ss's Send-Q for a LISTEN row)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out
    return int(rows[0][2])


def somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


async def test_the_default_queue_holds_a_storm_not_a_thousand(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    port = free_port()
    await start_proxy(nursery, config_text(port, backends))
    assert defaults.LISTEN_BACKLOG == 4096
    assert queue_size(port) == min(defaults.LISTEN_BACKLOG, somaxconn())


async def test_a_configured_queue_is_applied_and_a_reload_resizes_it_in_place(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    text = config_text(port, backends)
    path.write_text(text.replace("    pool: p\n", "    pool: p\n    backlog: 7\n", 1))
    proxy = await start_proxy(nursery, path.read_text())
    assert queue_size(port) == 7
    held = await RawClient.connect(port, "/held")
    path.write_text(text.replace("    pool: p\n", "    pool: p\n    backlog: 9\n", 1))
    assert await reload_from_file(proxy.server, path)
    assert queue_size(port) == 9
    assert await whoami(held) == "b0"  # the same listening socket: sessions and the port untouched
    with trio.fail_after(5):
        assert await whoami(await RawClient.connect(port)) == "b0"


async def test_a_listening_socket_is_tuned_before_it_queues_a_connection() -> None:
    """Linux copies a listening socket's options into a connection when its TCP handshake completes,
    not at accept(): a socket tuned only by the accept loop would hand the connections queued
    before it (a storm at start-up) no TCP_NODELAY and no unsent-bytes watermark."""
    (listening,) = await open_sockets(Address("127.0.0.1", 0), label="t", reuse_port=False, backlog=8)
    try:
        early = socket.create_connection(listening.getsockname()[:2])  # queued, not accepted yet
        accepted, _ = listening.accept()
        for sock in (listening, accepted):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
        accepted.close()
        early.close()
    finally:
        listening.close()
