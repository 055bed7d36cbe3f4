"""A local shortage is not a backend failure: `wsproxy run` with 128 descriptors, and a burst past it.

The proxy runs as its own process with RLIMIT_NOFILE set to 128 in the child (the test process
keeps its own limit), in front of two healthy echo backends in this process, with passive health
at its defaults (3 failures eject for 30 s). A burst of 300 sessions opened at once and held
needs about 600 descriptors: on main, backend connects failed with EMFILE, both backends were
ejected and a normal client got 503 for 30 s after the burst. Here the proxy sheds what it cannot
carry (503 with Retry-After, or a connection closed at accept), never blames the backends, counts
the shortage in wsproxy_local_resource_exhausted_total, logs it once per burst, and serves a
normal session as soon as the burst has gone. Every wait is bounded.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from wsproto.events import TextMessage

from tests.support import RawClient, free_port, proxy_yaml, start_backend

DESCRIPTOR_LIMIT = 128
BURST = 300
UPGRADE = (
    b"GET /burst HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class LimitedProxy:
    """`python -m wsproxy run` with RLIMIT_NOFILE lowered in the child before exec."""

    def __init__(self, config: Path, limit: int) -> None:
        def lower_limit() -> None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lower_limit,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on \w+://[\d.]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
            if "wsproxy ready" in line:
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> int:
        assert self.ready.wait(15), "".join(self.lines)
        assert self.proc.poll() is None and self.port is not None, "".join(self.lines)
        return self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[list[LimitedProxy]]:
    started: list[LimitedProxy] = []
    yield started
    for p in started:
        p.stop()


async def burst_session(port: int, held: list[trio.SocketStream], answers: list[str]) -> None:
    """Open a session and keep it open (in `held`); what the proxy answered, in a word."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        causes = [exc, exc.__cause__, *getattr(exc.__cause__, "exceptions", ())]
        reset = any(isinstance(c, ConnectionResetError) for c in causes)
        answers.append("reset" if reset else f"connect failed: {causes!r}")  # reset: closed at accept
        return
    held.append(stream)
    try:
        await stream.send_all(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                answers.append("closed")
                return
            head += data
    except trio.BrokenResourceError:
        answers.append("reset")
        return
    status = head[9:12].decode()
    if status == "503":
        assert re.search(rb"(?i)\r\nretry-after: *\d+", head), head
    answers.append(status)


async def admin_get(port: int, path: str) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        got = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                got += data
    return got.decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_descriptor_burst_never_ejects_a_backend_and_a_session_succeeds_right_after(
    backends, limited, tmp_path: Path
) -> None:
    backends.extend([start_backend(), start_backend()])
    admin_port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        proxy_yaml(
            [b.port for b in backends],
            extra=(
                "timeouts: {handshake: 3s, connect: 1s, close: 1s}\n"
                f"admin: {{address: 127.0.0.1:{admin_port}}}\n"
                "heartbeat: {interval: off}\n"
            ),
        )
    )
    proxy = LimitedProxy(config, DESCRIPTOR_LIMIT)
    limited.append(proxy)
    port = proxy.wait_ready()
    assert any("descriptor limit (RLIMIT_NOFILE) 128 carries about" in line for line in proxy.lines), proxy.lines

    held: list[trio.SocketStream] = []
    answers: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(BURST):
                nursery.start_soon(burst_session, port, held, answers)
        during = await admin_get(admin_port, "/metrics")  # while the burst still holds its sessions
        for stream in held:
            await trio.aclose_forcefully(stream)
    upgraded = answers.count("101")
    print(f"burst of {BURST}: " + ", ".join(f"{a}: {answers.count(a)}" for a in sorted(set(answers))))
    assert len(answers) == BURST
    assert 10 <= upgraded < BURST  # some carried, the rest shed: the limit was really hit
    assert set(answers) <= {"101", "503", "reset", "closed"}, set(answers)
    assert metric(during, "wsproxy_local_resource_exhausted_total", resource="descriptors") > 0

    # The backends were never blamed: both up, never ejected, no upstream failure counted.
    status_text = await admin_get(admin_port, "/metrics")
    for b in backends:
        assert metric(status_text, "wsproxy_backend_up", backend=f"127.0.0.1:{b.port}") == 1.0
        assert metric(status_text, "wsproxy_backend_health_state", backend=f"127.0.0.1:{b.port}", state="up") == 1
    assert metric(status_text, "wsproxy_upstream_failures_total") == 0
    log = "".join(proxy.lines)
    assert "ejected" not in log, log[-3000:]
    # logged once per burst, not once per session (the sessions' own lines stay at debug)
    assert len(re.findall(r"the proxy is out of its own descriptors", log)) == 1, log[-3000:]
    assert "503 proxy out of" not in log, log[-3000:]

    # As soon as the burst is gone, a normal session succeeds.
    with trio.fail_after(5):
        while True:
            client = await RawClient.connect(port, "/after")
            if client.accept is not None:
                break
            await trio.aclose_forcefully(client.stream)  # the burst's sockets may still be closing
            await trio.sleep(0.05)
    await client.send(TextMessage(data="after the burst"))
    assert await client.receive_message() == "after the burst"
    await client.close()
    await trio.aclose_forcefully(client.stream)
