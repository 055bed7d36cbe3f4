"""Binary upgrades (`wsproxy upgrade`, SIGUSR2) on real processes under load: a client opening
sessions continuously across the upgrade sees no refused or reset connect; the old process's
sessions end with 1001 spread over shutdown.drain_window; a successor that fails leaves the old
process serving; with workers: N every worker is replaced the same way."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from tests.integration.test_relay import ProxyProcess
from tests.integration.test_reload import _children, config_text, free_port_pair, start_backends, wait_for, whoami
from tests.support import RawClient, free_port, raw_http, status_of

DRAIN = 2.0


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


class Load:
    """Opens sessions one after another (each: connect, upgrade, one echo, close), recording
    every failure; bounded in count."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self.stop = trio.Event()

    async def run(self, limit: int = 20_000) -> None:
        while not self.stop.is_set() and self.done < limit:
            try:
                with trio.fail_after(5):
                    client = await RawClient.connect(self.port, "/load")
                    if client.accept is None:
                        self.failures.append(f"rejected: {client.reject}")
                    else:
                        assert await whoami(client) in ("b0", "b1")
                        await client.close()
            except (OSError, trio.TooSlowError, AssertionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.done += 1


async def _watch_close(client: RawClient, start: float, closes: list[tuple[int | None, float]]) -> None:
    with trio.move_on_after(20):
        close = await client.wait_close()
        closes.append((close.code, trio.current_time() - start))


async def _ready(admin: int, proc: ProxyProcess, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while True:
            with contextlib.suppress(OSError):
                if status_of(await raw_http(admin, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == 200:
                    return
            assert proc.proc.poll() is None, "".join(proc.lines)
            await trio.sleep(0.1)


def _stop(pid: int | None) -> None:
    """The successor is not our child: end it by its pid (from the pid file)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _setup(tmp_path: Path, backends: list[int], extra: str = "") -> tuple[Path, Path, int, int]:
    port, admin = free_port(), free_port()
    pid_file = tmp_path / "wsproxy.pid"
    text = config_text(
        port,
        backends,
        extra=f"admin: {{address: 127.0.0.1:{admin}}}\npid_file: {pid_file}\n"
        f"shutdown: {{drain_window: {DRAIN}s, deadline: 10s}}\n" + extra,
    )
    path = tmp_path / "wsproxy.yaml"
    path.write_text(text)
    return path, pid_file, port, admin


async def test_upgrade_under_load_refuses_no_connect_and_drains_old_sessions_spread(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    path, pid_file, port, admin = _setup(tmp_path, backends)
    proc = ProxyProcess(path)
    successor = None
    old_pid = proc.proc.pid
    try:
        await _ready(admin, proc)
        assert _pid(pid_file) == old_pid
        old_sessions = [await RawClient.connect(port, f"/old/{i}") for i in range(8)]
        assert all(c.accept for c in old_sessions)
        closes: list[tuple[int | None, float]] = []
        load = Load(port)
        async with trio.open_nursery() as inner:
            inner.start_soon(load.run)
            await wait_for(lambda: load.done >= 20, timeout=20)
            before = load.done
            start = trio.current_time()
            for c in old_sessions:
                inner.start_soon(_watch_close, c, start, closes)
            done = await trio.run_process(
                [sys.executable, "-m", "wsproxy", "upgrade", "-c", str(path)], capture_stdout=True, check=False
            )
            assert done.returncode == 0 and b"sent SIGUSR2" in done.stdout
            await wait_for(lambda: _pid(pid_file) not in (None, old_pid), timeout=30)
            successor = _pid(pid_file)
            code = await trio.to_thread.run_sync(functools.partial(proc.proc.wait, timeout=20))
            assert code == 0, "".join(proc.lines)
            after_exit = load.done
            await wait_for(lambda: load.done >= after_exit + 20, timeout=20)  # the successor serves alone
            load.stop.set()
        assert load.failures == [], load.failures[:5]
        assert load.done - before >= 40
        assert successor is not None and _alive(successor)
        assert status_of(await raw_http(admin, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == 200
        assert sorted(code for code, _ in closes) == [1001] * 8  # the old process's sessions: 1001
        times = sorted(t for _, t in closes)
        assert times[-1] - times[0] >= DRAIN / 4, times  # spread over the drain window, not at once
        assert any("upgrade: the successor accepts on every listener" in ln for ln in proc.lines)
    finally:
        if successor is None and _pid(pid_file) not in (None, old_pid):
            successor = _pid(pid_file)  # the test failed before it saw the successor: end it all the same
        _stop(successor)  # first: it inherited the old process's stderr, whose reader waits for its end
        proc.stop()


@pytest.mark.expect_errors(r"upgrade failed: the successor did not take over \(it exited with 2\)")
async def test_a_failing_successor_leaves_the_old_process_serving(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 1)
    path, pid_file, port, admin = _setup(tmp_path, backends)
    proc = ProxyProcess(path)
    try:
        await _ready(admin, proc)
        good = path.read_text()
        path.write_text(good + "no_such_key: 1\n")
        done = await trio.run_process(
            [sys.executable, "-m", "wsproxy", "upgrade", "-c", str(path)], capture_stderr=True, check=False
        )
        assert done.returncode == 2 and b"no_such_key" in done.stderr  # refused before any signal
        os.kill(proc.proc.pid, signal.SIGUSR2)  # the successor itself reads the bad file and exits
        await wait_for(lambda: any("upgrade failed" in ln for ln in proc.lines), timeout=30)
        assert proc.proc.poll() is None and _pid(pid_file) == proc.proc.pid
        client = await RawClient.connect(port, "/still")
        assert client.accept is not None and await whoami(client) == "b0"
        await client.close()
        path.write_text(good)  # a good file: the next upgrade goes through
        os.kill(proc.proc.pid, signal.SIGUSR2)
        await wait_for(lambda: _pid(pid_file) != proc.proc.pid, timeout=30)
        successor = _pid(pid_file)
        try:
            code = await trio.to_thread.run_sync(functools.partial(proc.proc.wait, timeout=20))
            assert code == 0
            client = await RawClient.connect(port, "/new")
            assert await whoami(client) == "b0"
            await client.close()
        finally:
            _stop(successor)
    finally:
        proc.stop()


async def test_workers_are_each_replaced_under_load_without_a_refused_connect(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    port = free_port()
    admin = free_port_pair(avoid={port, *backends})
    text = config_text(
        port, backends, extra=f"workers: 2\nadmin: {{address: 127.0.0.1:{admin}}}\nshutdown: {{drain_window: 1s}}\n"
    )
    path = tmp_path / "wsproxy.yaml"
    path.write_text(text)
    proc = ProxyProcess(path)
    try:
        await wait_for(lambda: len([ln for ln in proc.lines if "wsproxy ready" in ln]) >= 2, timeout=30)
        old_workers = _children(proc.proc.pid)
        assert len(old_workers) == 2
        load = Load(port)
        async with trio.open_nursery() as inner:
            inner.start_soon(load.run)
            await wait_for(lambda: load.done >= 20, timeout=20)
            proc.proc.send_signal(signal.SIGUSR2)
            await wait_for(lambda: len(_children(proc.proc.pid) - old_workers) == 2, timeout=30)
            await wait_for(lambda: not (_children(proc.proc.pid) & old_workers), timeout=30)
            after = load.done
            await wait_for(lambda: load.done >= after + 20, timeout=20)
            load.stop.set()
        assert load.failures == [], load.failures[:5]
        for admin_port in (admin, admin + 1):  # each new worker took its admin listener over too
            assert status_of(await raw_http(admin_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == 200
        assert len(_children(proc.proc.pid)) == 2
        assert not any("died" in ln for ln in proc.lines), proc.lines
    finally:
        proc.stop()
