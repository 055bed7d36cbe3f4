"""The soak's rig (benchmarks/soak.py): echo backends, the proxy process, idle-cutting relays.

Each echo backend is its own process (`python benchmarks/soak_rig.py --backend --port P --name N`:
websockets' asyncio server, says `backend:NAME` first, then echoes), so that a fault can kill it,
stop it (SIGSTOP) and restart it on its port. The proxy is `python -m wsproxy run`, reloaded with
SIGHUP and confirmed through its admin listener. An `IdleCutRelay` is a middlebox that forwards a
loopback port to another and, while `cutting`, resets every connection through it that has been
idle for IDLE_CUT seconds, as a NAT or cloud load balancer does. Only processes started here are
signalled, by their own handle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
IDLE_CUT = 1.0  # a relay that cuts, cuts connections idle this long


# --------------------------------------------------------------------------------------------
# the echo backend (its own process: `soak.py --backend`)


def backend_main(port: int, name: str, max_seconds: float) -> None:
    """Say `backend:NAME`, then echo every message (websockets' asyncio server); exit on stdin EOF."""
    import asyncio
    import logging

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # faults break connections on purpose

    async def echo(conn: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await conn.send(f"backend:{name}")
            async for message in conn:
                await conn.send(message)

    async def stdin_closed() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(4096):
            pass

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, ping_interval=None, compression=None, max_size=None, backlog=1024):
            print("ready", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stdin_closed(), max_seconds)

    asyncio.run(main())


class BackendProcess:
    """One echo backend on a fixed port; killed, stopped, continued and restarted by handle."""

    def __init__(self, name: str, port: int, max_seconds: float) -> None:
        self.name, self.port, self.max_seconds = name, port, max_seconds
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        for _ in range(50):  # a restart may race the old socket's release: bounded retries
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--backend",
                    "--port",
                    str(self.port),
                    "--name",
                    self.name,
                    "--max-seconds",
                    str(self.max_seconds),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            if line.strip() == "ready":
                self.proc = proc
                return
            proc.wait(timeout=10)
            await trio.sleep(0.1)
        raise SystemExit(f"backend {self.name} did not start on port {self.port}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


# --------------------------------------------------------------------------------------------
# the proxy


class ProxyProcess:
    """`python -m wsproxy run -c FILE`, its log in a file; reloaded with SIGHUP."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            cwd=ROOT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, port: int, timeout: float = 20.0) -> None:
        """Until the listener accepts (the log is at warning level: no "ready" line to wait for)."""
        with trio.fail_after(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit("the proxy exited:\n" + self.text()[-3000:])
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await trio.aclose_forcefully(stream)
                return

    async def reloads(self, admin: int) -> int:
        """wsproxy_config_reloads_total{result="ok"}, from the admin listener's /metrics."""
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", admin)
            async with stream:
                head = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nConnection: close\r\n\r\n"
                await stream.send_all(head.encode())  # the admin listener answers only its own Host
                got = b""
                while data := await stream.receive_some(65536):
                    got += data
        for line in got.decode().splitlines():
            if line.startswith('wsproxy_config_reloads_total{result="ok"}'):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    async def reload(self, admin: int, text: str) -> None:
        """Write the config, SIGHUP, and wait (bounded) until the proxy counts the reload."""
        before = await self.reloads(admin)
        self.config.write_text(text)
        self.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while await self.reloads(admin) <= before:
                await trio.sleep(0.05)

    def sample(self) -> tuple[int, int]:
        """(open descriptors, VmRSS bytes); OSError once it is gone."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return len(os.listdir(f"/proc/{self.proc.pid}/fd")), rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


def proxy_config(port: int, admin: int, backends: list[int], cap: int, relay: str) -> str:
    listed = ", ".join(f"127.0.0.1:{p}" for p in backends)
    return (
        f"listeners: [{{address: 127.0.0.1:{port}, pool: soak, relay: {relay}}}]\n"
        "pools:\n"
        "  soak:\n"
        f"    backends: [{listed}]\n"
        "    retries: 2\n"
        "    health: {check: tcp, interval: 500ms, timeout: 300ms, rise: 2, fall: 2}\n"
        "    passive: {failures: 3, window: 10s, eject_for: 10s}\n"
        "timeouts: {handshake: 3s, connect: 1s, close: 2s}\n"
        "heartbeat: {interval: 5s, timeout: 5s}\n"
        f"limits: {{max_sessions: {cap}, slow_consumer_timeout: 2s}}\n"
        "reload: {drain_window: 2s}\n"
        f"admin: {{address: 127.0.0.1:{admin}}}\n"
        "log: {level: warning}\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# the idle-cutting relay (a NAT or load balancer that drops idle connections)


@dataclass(eq=False)
class _Pair:
    a: trio.SocketStream
    b: trio.SocketStream
    last: float
    cut: bool = False


class IdleCutRelay:
    """Forwards 127.0.0.1:port to a target port; while `cutting`, resets connections idle IDLE_CUT."""

    def __init__(self, name: str, target: int) -> None:
        self.name, self.target = name, target
        self.port = 0
        self.cutting = False
        self.cuts = 0
        self.pairs: set[_Pair] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cutter)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _cutter(self) -> None:
        while True:
            await trio.sleep(0.1)
            if not self.cutting:
                continue
            now = trio.current_time()
            for pair in [p for p in self.pairs if now - p.last >= IDLE_CUT]:
                pair.cut = True
                self.cuts += 1
                for s in (pair.a, pair.b):  # a reset each way, as a middlebox's RST
                    with contextlib.suppress(OSError):
                        s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.socket.close()
                self.pairs.discard(pair)

    async def _handle(self, a: trio.SocketStream) -> None:
        try:
            b = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await trio.aclose_forcefully(a)
            return
        pair = _Pair(a, b, trio.current_time())
        self.pairs.add(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, pair, a, b)
                nursery.start_soon(self._pump, pair, b, a)
        finally:
            self.pairs.discard(pair)
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)

    async def _pump(self, pair: _Pair, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                pair.last = trio.current_time()
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await dst.send_eof()
                    return
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            for s in (src, dst):  # one side broke: the other sees it broken too
                with contextlib.suppress(OSError):
                    s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.socket.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one echo backend of the soak")
    parser.add_argument("--backend", action="store_true", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    backend_main(args.port, args.name, args.max_seconds)
