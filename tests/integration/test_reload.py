"""Reload, drain, workers and PROXY protocol: real processes, real signals, real sockets.

What operators feel during a reload is what is asserted: sessions on unchanged backends are not
touched and no connect is refused; sessions on a removed backend get 1012 at a flat rate over the
window (the spread is measured, not just the count); a broken file changes nothing.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio
from wsproto.events import CloseConnection, Request

from tests.integration.test_relay import ProxyProcess
from tests.support import RawClient, free_port, make_tls_files, proxy_yaml, raw_http, start_proxy, status_of
from wsproxy.config import parse_config
from wsproxy.demo import demo_backend
from wsproxy.protocol import proxy_protocol
from wsproxy.runtime.supervisor import reload_from_file

FAST = "timeouts: {handshake: 5s, connect: 2s, close: 2s}\nheartbeat: {interval: off}\n"


async def start_backends(nursery: trio.Nursery, count: int) -> list[int]:
    ports = [free_port() for _ in range(count)]
    for i, port in enumerate(ports):
        await nursery.start(functools.partial(demo_backend, "127.0.0.1", port, f"b{i}"))
    return ports


async def whoami(client: RawClient) -> str:
    from wsproto.events import TextMessage

    await client.send(TextMessage(data="/whoami"))
    answer = await client.receive_message()
    assert isinstance(answer, str)
    return answer


def config_text(port: int, backends: list[int], *, extra: str = "", balance: str = "round_robin") -> str:
    lines = ["listeners:", f"  - address: 127.0.0.1:{port}", "    pool: p", "pools:", "  p:", f"    balance: {balance}"]
    lines += ["    backends:"] + [f"      - 127.0.0.1:{b}" for b in backends]
    return "\n".join(lines) + "\n" + FAST + extra


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


# --------------------------------------------------------------------------------------------
# in-process reloads


async def test_removing_one_of_three_backends_closes_only_its_sessions_with_1012_spread(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 3)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    path.write_text(config_text(port, backends, extra="reload: {drain_window: 2s}\n"))
    proxy = await start_proxy(nursery, path.read_text())
    clients = [await RawClient.connect(port, f"/s{i}") for i in range(30)]
    names = [await whoami(c) for c in clients]
    assert sorted(names.count(n) for n in ("b0", "b1", "b2")) == [10, 10, 10]
    closes: dict[int, tuple[float, CloseConnection]] = {}

    async def watch(i: int, client: RawClient) -> None:
        ev = await client.wait_close()
        closes[i] = (trio.current_time(), ev)

    for i, c in enumerate(clients):
        if names[i] == "b1":
            nursery.start_soon(watch, i, c)
    path.write_text(config_text(port, [backends[0], backends[2]], extra="reload: {drain_window: 2s}\n"))
    t0 = trio.current_time()
    assert await reload_from_file(proxy.server, path)
    await wait_for(lambda: len(closes) == 10, timeout=8)
    assert all(ev.code == 1012 for _, ev in closes.values())
    offsets = sorted(t - t0 for t, _ in closes.values())
    # flat over the window: one close per 0.2 s slot, never a burst
    assert offsets[-1] <= 2.5 and offsets[-1] - offsets[0] >= 1.2, offsets
    for i in range(len(offsets) - 2):
        assert offsets[i + 2] - offsets[i] >= 0.15, offsets
    # the others were not touched and still echo; new sessions avoid the removed backend
    for i, c in enumerate(clients):
        if names[i] != "b1":
            assert await whoami(c) == names[i]
    fresh = [await whoami(await RawClient.connect(port, "/new")) for _ in range(6)]
    assert set(fresh) == {"b0", "b2"}


async def test_listeners_added_and_removed_and_a_kept_one_stays_open(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    keep, gone, added = free_port(), free_port(), free_port()
    two = f"  - address: 127.0.0.1:{gone}\n    pool: p\n"
    path = tmp_path / "wsproxy.yaml"
    text = config_text(keep, backends)
    path.write_text(text.replace("pools:", two + "pools:", 1))
    proxy = await start_proxy(nursery, path.read_text())
    held = await RawClient.connect(gone, "/held")
    assert await whoami(held) == "b0"
    path.write_text(text.replace("pools:", f"  - address: 127.0.0.1:{added}\n    pool: p\npools:", 1))
    assert await reload_from_file(proxy.server, path)
    assert await whoami(await RawClient.connect(added)) == "b0"
    assert await whoami(await RawClient.connect(keep)) == "b0"
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", gone)
    assert await whoami(held) == "b0"  # a session on a closed listener stays: its backend remains
    assert {addr[1] for _, addr in proxy.server.bound} == {keep, added}


@pytest.mark.expect_errors(
    r"reload rejected, keeping the running config: .*pools\.p\.backends\[1\]\.address",
    r"reload rejected, keeping the running config: .*not valid YAML",
)
async def test_a_broken_file_changes_nothing_and_is_logged(nursery, tmp_path, caplog) -> None:
    backends = await start_backends(nursery, 2)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    path.write_text(config_text(port, backends))
    proxy = await start_proxy(nursery, path.read_text())
    before = proxy.server.snapshot
    client = await RawClient.connect(port)
    name = await whoami(client)
    path.write_text(config_text(port, backends).replace("127.0.0.1:" + str(backends[1]), "127.0.0.1:notaport"))
    assert not await reload_from_file(proxy.server, path)
    assert proxy.server.snapshot is before
    assert "pools.p.backends[1].address" in caplog.text and "keeping the running config" in caplog.text
    assert await whoami(client) == name
    path.write_text("listeners: [")
    assert not await reload_from_file(proxy.server, path)
    assert "not valid YAML" in caplog.text
    assert proxy.server.snapshot is before
    assert await whoami(await RawClient.connect(port)) in ("b0", "b1")


@pytest.mark.expect_errors(r"reload rejected, keeping the running config: .*cannot load TLS cert")
async def test_a_valid_file_whose_cert_cannot_load_changes_nothing(nursery, tmp_path, caplog) -> None:
    backends = await start_backends(nursery, 1)
    tls = make_tls_files(tmp_path)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    text = config_text(port, backends).replace(
        "    pool: p\n", f"    pool: p\n    tls: {{cert: {tls.cert}, key: {tls.key}}}\n", 1
    )
    path.write_text(text)
    proxy = await start_proxy(nursery, text)
    before = proxy.server.snapshot
    (tmp_path / "junk.pem").write_text("not a certificate")
    path.write_text(text.replace(str(tls.cert), str(tmp_path / "junk.pem")))
    assert not await reload_from_file(proxy.server, path)
    assert proxy.server.snapshot is before and "cannot load TLS cert" in caplog.text
    client = await RawClient.connect(port, ssl_context=tls.client_context())
    assert await whoami(client) == "b0"


async def test_reload_picks_up_renewed_cert_files(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old, new = make_tls_files(old_dir), make_tls_files(new_dir)
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(old.cert.read_bytes())
    live_key.write_bytes(old.key.read_bytes())
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    tls_line = f"    pool: p\n    tls: {{cert: {live_cert}, key: {live_key}}}\n"
    path.write_text(config_text(port, backends).replace("    pool: p\n", tls_line, 1))
    proxy = await start_proxy(nursery, path.read_text())
    assert await whoami(await RawClient.connect(port, ssl_context=old.client_context())) == "b0"
    live_cert.write_bytes(new.cert.read_bytes())  # a renewal writes new files under the same names
    live_key.write_bytes(new.key.read_bytes())
    assert await reload_from_file(proxy.server, path)
    assert await whoami(await RawClient.connect(port, ssl_context=new.client_context())) == "b0"
    with pytest.raises(trio.BrokenResourceError):
        await RawClient.connect(port, ssl_context=old.client_context())


async def test_backend_counts_carry_over_a_reload(nursery, tmp_path) -> None:
    """least_conn after a reload still sees the sessions opened before it."""
    backends = await start_backends(nursery, 2)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    path.write_text(config_text(port, backends[:1], balance="least_conn"))
    proxy = await start_proxy(nursery, path.read_text())
    held = [await RawClient.connect(port) for _ in range(4)]
    assert [await whoami(c) for c in held] == ["b0"] * 4
    path.write_text(config_text(port, backends, balance="least_conn"))
    assert await reload_from_file(proxy.server, path)
    fresh = [await RawClient.connect(port) for _ in range(4)]
    assert [await whoami(c) for c in fresh] == ["b1"] * 4


async def test_rebalance_moves_sessions_to_an_added_backend_at_the_configured_rate(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    rebalance = "    rebalance: {max_sessions_per_second: 20}\n"
    path.write_text(
        config_text(port, backends[:1], balance="least_conn").replace("    backends:", rebalance + "    backends:")
    )
    proxy = await start_proxy(nursery, path.read_text())
    where: dict[int, str] = {}
    moved_at: list[float] = []

    async def reconnecting_client(i: int) -> None:
        """Like a real app: on 1012 it reconnects, and the balancer places it again."""
        client = await RawClient.connect(port, f"/r{i}")
        where[i] = await whoami(client)
        ev = await client.wait_close()
        assert ev.code == 1012
        moved_at.append(trio.current_time())
        client = await RawClient.connect(port, f"/r{i}")
        where[i] = await whoami(client)
        await trio.sleep_forever()

    async with trio.open_nursery() as clients:
        for i in range(20):
            clients.start_soon(reconnecting_client, i)
        await wait_for(lambda: len(where) == 20)
        assert set(where.values()) == {"b0"}
        path.write_text(
            path.read_text().replace(
                f"      - 127.0.0.1:{backends[0]}\n", "".join(f"      - 127.0.0.1:{b}\n" for b in backends)
            )
        )
        t0 = trio.current_time()
        assert await reload_from_file(proxy.server, path)
        await wait_for(lambda: sorted(where.values()).count("b1") == 10, timeout=10)
        await trio.sleep(0.5)  # nothing more moves once the spread is within weight
        assert len(moved_at) == 10
        assert moved_at[-1] - t0 >= 9 / 20 * 0.8  # at the configured rate, not at once
        clients.cancel_scope.cancel()


async def test_a_session_mid_handshake_that_lands_on_a_removed_backend_is_closed_too(nursery, tmp_path) -> None:
    """It picked from the old snapshot just before the reload and got its 101 just after."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection

    answered = trio.Event()

    async def slow_backend(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, Request):
                    await trio.sleep(0.5)  # the reload happens while we think
                    await stream.send_all(ws.send(AcceptConnection()))
                    answered.set()
                elif isinstance(ev, CloseConnection):
                    await stream.send_all(ws.send(ev.response()))
                    return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    slow = listeners[0].socket.getsockname()[1]
    nursery.start_soon(functools.partial(trio.serve_listeners, slow_backend, listeners))
    other = await start_backends(nursery, 1)
    port = free_port()
    path = tmp_path / "wsproxy.yaml"
    extra = "reload: {drain_window: 100ms}\n"
    path.write_text(config_text(port, [slow], extra=extra).replace("handshake: 5s", "handshake: 1s"))
    proxy = await start_proxy(nursery, path.read_text())
    got: list[RawClient] = []

    async def connect() -> None:
        got.append(await RawClient.connect(port, "/late"))

    nursery.start_soon(connect)
    await wait_for(lambda: len(proxy.server.sessions) == 1)
    await trio.sleep(0.1)
    path.write_text(config_text(port, other, extra=extra).replace("handshake: 5s", "handshake: 1s"))
    assert await reload_from_file(proxy.server, path)
    await answered.wait()
    await wait_for(lambda: len(got) == 1)
    assert got[0].accept is not None
    with trio.fail_after(5):
        ev = await got[0].wait_close()
    assert ev.code == 1012


# --------------------------------------------------------------------------------------------
# real processes and signals


async def test_sighup_under_1000_sessions_closes_none_and_refuses_no_connect(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 3)
    path = tmp_path / "wsproxy.yaml"
    port = free_port()
    path.write_text(config_text(port, backends))
    proc = ProxyProcess(path)
    try:
        await trio.to_thread.run_sync(proc.wait_ready)
        clients: list[RawClient] = []

        async def open_some(n: int) -> None:
            for _ in range(n):
                clients.append(await RawClient.connect(port, "/held"))

        async with trio.open_nursery() as opening:
            for _ in range(20):
                opening.start_soon(open_some, 50)
        assert len(clients) == 1000 and all(c.accept is not None for c in clients)
        refused: list[str] = []
        connected = 0
        stop = trio.Event()

        async def connect_loop() -> None:
            nonlocal connected
            for _ in range(2000):  # bounded: at most 2000 connects while the reload runs
                if stop.is_set():
                    return
                try:
                    c = await RawClient.connect(port, "/during")
                except OSError as exc:
                    refused.append(repr(exc))
                    continue
                if c.accept is None:
                    refused.append(f"rejected {c.reject}")
                else:
                    connected += 1
                await c.stream.aclose()

        async with trio.open_nursery() as during:
            for _ in range(4):
                during.start_soon(connect_loop)
            await trio.sleep(0.2)
            path.write_text(config_text(port, backends).replace("close: 2s", "close: 3s"))
            proc.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: any("reloaded" in ln for ln in proc.lines), timeout=10)
            await trio.sleep(0.3)
            stop.set()
        assert not refused, refused[:5]
        assert connected > 0
        # none of the 1000 was closed: every one still echoes
        for c in clients[::10]:
            assert await whoami(c) in ("b0", "b1", "b2")
        for c in clients:
            with trio.move_on_after(0) as peek:
                ev = await c.next_event()
                raise AssertionError(f"held session got {ev!r}")
            assert peek.cancelled_caught
        assert "0 session(s) on removed backends" in "".join(proc.lines)
        for c in clients:  # gone before the stop, which would otherwise drain them with 1001 until it kills
            await c.stream.aclose()
    finally:
        proc.stop()
    assert proc.proc.returncode == 0  # exited by itself, not killed after the stop's wait


@pytest.mark.expect_errors(r"ERROR wsproxy: reload rejected, keeping the running config: .*pools\.q")
async def test_broken_file_on_sighup_is_logged_and_the_process_keeps_serving(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    path = tmp_path / "wsproxy.yaml"
    port = free_port()
    good = config_text(port, backends)
    path.write_text(good)
    proc = ProxyProcess(path)
    try:
        await trio.to_thread.run_sync(proc.wait_ready)
        client = await RawClient.connect(port)
        path.write_text(good.replace("pools:", "pools:\n  q: 7", 1))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("reload rejected" in ln for ln in proc.lines))
        assert any("pools.q" in ln for ln in proc.lines)
        assert proc.proc.poll() is None
        assert await whoami(client) == "b0"
        other = await RawClient.connect(port)
        assert await whoami(other) == "b0"
        for open_client in (client, other):  # else the stop below waits on their drain (SIGTERM, 1001)
            assert (await open_client.close()).code == 1000
    finally:
        proc.stop()
    assert proc.proc.returncode == 0  # drained and exited in time, not killed


async def test_reload_command_validates_then_signals_the_running_proxy(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    path = tmp_path / "wsproxy.yaml"
    pid_file = tmp_path / "wsproxy.pid"
    port = free_port()
    path.write_text(config_text(port, backends[:1], extra=f"pid_file: {pid_file}\n"))
    proc = ProxyProcess(path)
    try:
        await trio.to_thread.run_sync(proc.wait_ready)
        assert pid_file.read_text().strip() == str(proc.proc.pid)
        cmd = [sys.executable, "-m", "wsproxy", "reload", "-c", str(path)]
        path.write_text("pid_file: [\n")
        bad = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        assert bad.returncode == 2 and b"not valid YAML" in bad.stderr
        path.write_text(config_text(port, backends[1:], extra=f"pid_file: {pid_file}\n"))
        ok = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        assert ok.returncode == 0, ok.stderr
        await wait_for(lambda: any("reloaded" in ln for ln in proc.lines))
        client = await RawClient.connect(port)
        assert await whoami(client) == "b1"
        assert (await client.close()).code == 1000  # else the stop below drains it
    finally:
        proc.stop()
    assert not pid_file.exists()


async def test_sigterm_drains_with_1001_spread_over_the_window(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    path = tmp_path / "wsproxy.yaml"
    port = free_port()
    path.write_text(config_text(port, backends, extra="shutdown: {drain_window: 2s, deadline: 6s}\n"))
    proc = ProxyProcess(path)
    try:
        await trio.to_thread.run_sync(proc.wait_ready)
        clients = [await RawClient.connect(port, f"/d{i}") for i in range(20)]
        closes: list[tuple[float, int | None]] = []

        async def watch(c: RawClient) -> None:
            ev = await c.wait_close()
            closes.append((trio.current_time(), ev.code))

        async with trio.open_nursery() as watching:
            for c in clients:
                watching.start_soon(watch, c)
            await trio.sleep(0.1)
            t0 = trio.current_time()
            proc.proc.send_signal(signal.SIGTERM)
        assert [code for _, code in closes] == [1001] * 20
        offsets = sorted(t - t0 for t, _ in closes)
        assert offsets[-1] - offsets[0] >= 1.2, offsets
        assert offsets[-1] <= 3.0, offsets
        for i in range(len(offsets) - 3):
            assert offsets[i + 3] - offsets[i] >= 0.1, offsets  # slots of 0.1 s: no burst
        code = await trio.to_thread.run_sync(functools.partial(proc.proc.wait, timeout=10))
        assert code == 0
    finally:
        proc.stop()


def free_port_pair(avoid: set[int]) -> int:
    """A port p such that p and p + 1 are both free now (worker i's admin listener is on p + i)."""
    for _ in range(100):
        p = free_port()
        if p in avoid or p + 1 in avoid or p + 1 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports found")


def _children(pid: int) -> set[int]:
    """Live child processes of `pid` (any of its threads may have started them)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


@pytest.mark.expect_errors(r"ERROR wsproxy: worker \d+ \(pid \d+\) died with -9: restarting")
async def test_two_workers_share_one_port_restart_when_killed_and_all_reload(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    path = tmp_path / "wsproxy.yaml"
    port = free_port()
    admin = free_port_pair(avoid={port, *backends})
    extra = f"workers: 2\nshutdown: {{drain_window: 0s, deadline: 3s}}\nadmin: {{address: 127.0.0.1:{admin}}}\n"
    path.write_text(config_text(port, backends[:1], extra=extra))
    proc = ProxyProcess(path)
    try:
        try:
            await wait_for(lambda: len([ln for ln in proc.lines if "wsproxy ready" in ln]) >= 2, timeout=20)
        except trio.TooSlowError:
            raise AssertionError("two workers did not report ready:\n" + "".join(proc.lines)) from None
        workers = _children(proc.proc.pid)
        assert len(workers) == 2, proc.lines
        for _ in range(40):
            c = await RawClient.connect(port)
            assert await whoami(c) == "b0"
            await c.close()
        for admin_port in (admin, admin + 1):  # worker i serves its own metrics on admin + i
            reply = await raw_http(admin_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert status_of(reply) == 200, reply
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: len(_children(proc.proc.pid) - {victim}) == 2, timeout=15)
        await wait_for(lambda: len([ln for ln in proc.lines if "wsproxy ready" in ln]) >= 3, timeout=20)
        assert any(re.search(rf"worker \d \(pid {victim}\) died", ln) for ln in proc.lines)
        for _ in range(10):
            assert await whoami(await RawClient.connect(port)) == "b0"
        # a reload reaches every worker: each logs it, and every new session goes to the new backend
        path.write_text(path.read_text().replace(f"127.0.0.1:{backends[0]}", f"127.0.0.1:{backends[1]}"))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: len([ln for ln in proc.lines if "reloaded" in ln]) == 2, timeout=10)
        for _ in range(20):
            assert await whoami(await RawClient.connect(port)) == "b1"
        proc.proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(functools.partial(proc.proc.wait, timeout=15))
        assert code == 0
        assert not _children(proc.proc.pid)
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------
# PROXY protocol


async def test_proxy_protocol_listener_uses_the_header_address_everywhere(nursery, backends) -> None:
    from tests.support import start_backend

    backend = start_backend()
    backends.append(backend)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra="proxy_protocol: true", extra=FAST))
    for header in (
        proxy_protocol.build("v1", ("198.51.100.7", 40000), ("127.0.0.1", proxy.port())),
        proxy_protocol.build("v2", ("2001:db8::9", 40001), ("::1", proxy.port())),
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
        client = RawClient(stream)
        await stream.send_all(header + client.ws.send(Request(host="example.com", target="/pp")))
        while client.accept is None:
            ev = await client.next_event()
            assert type(ev).__name__ == "AcceptConnection", ev
            client.accept = ev  # type: ignore[assignment]
        await client.close()
    xffs = [r.headers["X-Forwarded-For"] for r in backend.requests]
    assert xffs == ["198.51.100.7", "2001:db8::9"]
    # no header: refused before any HTTP
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some(1024) == b""
    assert len(backend.requests) == 2


async def test_send_proxy_protocol_v2_tells_the_backend_the_client(nursery) -> None:
    seen: list[proxy_protocol.ProxyHeader] = []

    async def pp_backend(stream: trio.SocketStream) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, TextMessage

        data = b""
        while (got := proxy_protocol.parse(data)) is None:
            data += await stream.receive_some(4096)
        seen.append(got)
        ws = WSConnection(ConnectionType.SERVER)
        if got.rest:  # b"" would mean end of stream to wsproto
            ws.receive_data(got.rest)
        while True:
            for ev in ws.events():
                if isinstance(ev, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                elif isinstance(ev, TextMessage):
                    await stream.send_all(ws.send(TextMessage(data=ev.data)))
                elif isinstance(ev, CloseConnection):
                    return
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            ws.receive_data(chunk)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bport = listeners[0].socket.getsockname()[1]
    nursery.start_soon(functools.partial(trio.serve_listeners, pp_backend, listeners))
    proxy = await start_proxy(nursery, proxy_yaml([bport], pool_extra="send_proxy_protocol: v2", extra=FAST))
    client = await RawClient.connect(proxy.port())
    from wsproto.events import TextMessage

    await client.send(TextMessage(data="hello"))
    assert await client.receive_message() == "hello"
    assert len(seen) == 1
    local = client.stream.socket.getsockname()
    assert seen[0].source == (local[0], local[1])
    assert seen[0].dest == ("127.0.0.1", proxy.port())


def test_config_rejects_workers_with_an_ephemeral_port() -> None:
    from wsproxy.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config("workers: 2\n" + proxy_yaml([9001]), source="w.yaml")
    assert "listeners[0].address" in str(err.value) and "fixed port" in str(err.value)
