"""A real Socket.IO deployment behind wsproxy: three npm `socket.io` 4.x backends, each greeting
with its own id, and 100 npm `socket.io-client` 4.x clients with the default transports (HTTP
long-polling first, then the upgrade to WebSocket), balanced round robin.

With `sticky` on, every poll and the upgrade of a client reach the backend that issued its
session id: 100 of 100 connect, upgrade and exchange messages with that backend. With `sticky`
off the same deployment fails the way unsticky proxies are known to fail: "Session ID unknown".
The npm packages live in tests/socketio (package-lock.json; `npm ci` installs them, as .ci/run
does); node is the system's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support import free_port, start_proxy

HERE = Path(__file__).resolve().parent.parent / "socketio"
CONF = Path(__file__).resolve().parents[2] / "conf" / "socketio.yaml"
CLIENTS = 100
PER_CLIENT_MS = 20000  # a client not connected, upgraded and echoed by then has failed
# The control run's clients that the unsticky deployment leaves hanging (polling on a backend
# that never upgrades them) fail only at their timeout: the sticky run's 100 clients all finish
# within a few seconds, so one that has not succeeded after 6 s has failed, and waiting 20 s for
# it proves nothing more.
CONTROL_PER_CLIENT_MS = 6000
NODE = shutil.which("node") or "/usr/bin/node"


@pytest.fixture
def socketio_backends() -> Iterator[list[tuple[subprocess.Popen[str], int]]]:
    """Three Socket.IO backends (node processes this test starts and stops by their handle)."""
    assert (HERE / "node_modules" / "socket.io").is_dir(), "run `npm ci` in tests/socketio (the test command does)"
    started: list[tuple[subprocess.Popen[str], int]] = []
    try:
        for i in range(3):
            port = free_port()
            proc = subprocess.Popen(
                [NODE, str(HERE / "server.js"), str(port), f"backend-{i}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=HERE,
            )
            started.append((proc, port))
        for proc, _ in started:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks until the server listens (or exits)
            assert json.loads(line)["event"] == "listening", line
        yield started
    finally:
        for proc, _ in started:
            proc.kill()
            proc.wait(timeout=10)


def _yaml(ports: list[int], *, sticky: bool) -> str:
    """conf/socketio.yaml (the README's example) on an ephemeral port and these backends; without
    its `sticky` mapping for the control run."""
    text = CONF.read_text().replace("127.0.0.1:8080", "127.0.0.1:0")
    for fixed, port in zip((3001, 3002, 3003), ports, strict=True):
        text = text.replace(f"127.0.0.1:{fixed}", f"127.0.0.1:{port}")
    if not sticky:
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("sticky:"))
        end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("      "))
        text = "\n".join(lines[:start] + lines[end:]) + "\n"
        assert "sticky" not in text
    return text + "log: {level: warning}\n"


async def _run_clients(port: int, *, per_client_ms: int = PER_CLIENT_MS) -> dict:
    with trio.fail_after(90):
        done = await trio.run_process(
            [NODE, str(HERE / "clients.js"), f"http://127.0.0.1:{port}", str(CLIENTS), str(per_client_ms)],
            capture_stdout=True,
            capture_stderr=True,
            cwd=HERE,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _backend_errors(backends: list[tuple[subprocess.Popen[str], int]]) -> list[str]:
    """What the backends reported so far (they are stopped first, so their output ends)."""
    messages = []
    for proc, _ in backends:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        messages += [json.loads(ln)["message"] for ln in out.splitlines() if '"connection_error"' in ln]
    return messages


async def test_socketio_clients_with_sticky_cookies_all_connect_upgrade_and_talk(nursery, socketio_backends) -> None:
    ports = [port for _, port in socketio_backends]
    proxy = await start_proxy(nursery, _yaml(ports, sticky=True))
    result = await _run_clients(proxy.port())
    assert result["ok"] == CLIENTS, result["errors"][:5]
    assert sorted(result["backends"]) == ["backend-0", "backend-1", "backend-2"]  # round robin spread them
    assert _backend_errors(socketio_backends) == []
    text = proxy.server.metrics.exposition().decode()
    assert 'wsproxy_handshakes_total{listener="127.0.0.1:0",outcome="upgraded",status="101"} 100.0' in text


async def test_socketio_without_sticky_cookies_fails_with_session_id_unknown(nursery, socketio_backends) -> None:
    """The control: the same deployment and clients, sticky off."""
    ports = [port for _, port in socketio_backends]
    proxy = await start_proxy(nursery, _yaml(ports, sticky=False))
    result = await _run_clients(proxy.port(), per_client_ms=CONTROL_PER_CLIENT_MS)
    assert result["ok"] < CLIENTS // 2, result
    errors = _backend_errors(socketio_backends)
    assert "Session ID unknown" in errors
    assert any("Session ID unknown" in e for e in result["errors"])  # the clients see it too
