"""Runs a `Server` under signals, or supervises N worker processes that each run one.

One process: SIGHUP re-reads and validates the config file and applies it (a bad file is logged
with every error and changes nothing); SIGINT/SIGTERM drain and exit; a second one cuts at once.

`workers: N > 1`: the main process runs no listener itself. It starts N copies of
`wsproxy run --worker`, which bind every listener with SO_REUSEPORT so the kernel spreads new
connections over them; it passes SIGHUP/SIGTERM/SIGINT on to every worker, restarts a worker that
dies unexpectedly (with back-off, so a worker that cannot start does not spin), and exits once
every worker has exited after a shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from wsproxy.config import Config, ConfigError, load_config
from wsproxy.runtime import handover
from wsproxy.runtime.server import ReloadError, Server

log = logging.getLogger("wsproxy")

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
HEALTHY_AFTER = 10.0  # a worker that ran this long resets its back-off
SECRET_ENV = "WSPROXY_AFFINITY_SECRET"  # supervisor -> workers: one affinity-cookie key for all


def startup_errors(exc: BaseException) -> list[OSError] | None:
    """The OSErrors (a port in use, an address not available) that stopped a start, however trio
    grouped them; None if anything else is among them (a bug: let it raise)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[OSError] = []
        for inner in exc.exceptions:
            found = startup_errors(inner)
            if found is None:
                return None
            leaves += found
        return leaves
    return [exc] if isinstance(exc, OSError) else None


async def run(
    config: Config,
    config_path: str | Path | None = None,
    worker_index: int = 0,
    *,
    supervised: bool = False,
    inherit: str | None = None,
    argv_tail: list[str] | None = None,
    on_successor: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `config` in this process until SIGINT/SIGTERM; SIGHUP reloads `config_path`; SIGUSR2
    hands the listeners to a successor (handover.py) and drains. With `inherit`, this process is
    such a successor: it takes its listening sockets from the process waiting at that path.
    `supervised`: a worker of a `Supervisor`, which starts the successor itself."""
    path = Path(config_path) if config_path is not None else Path(config.source)
    # The receiver first: a signal sent once the pid file exists waits for the loop below instead
    # of killing a process still taking its sockets over or building its server.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2) as signals:
        inherited = await handover.receive_listeners(inherit) if inherit is not None else None
        server = Server(config, worker_index=worker_index, inherited=inherited, secret=_shared_secret())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            if inherited is not None:
                inherited.close_unused(admin_used=config.admin is not None)
                await inherited.ready()  # the previous process stops accepting now
            log.info("wsproxy ready (config %s, sha256 %s, pid %d)", config.source, config.digest[:12], os.getpid())
            task_status.started(server)
            state = _State()
            successor = (
                None if supervised else [sys.executable, "-m", "wsproxy", "run", "-c", str(path), *(argv_tail or [])]
            )
            async for sig in signals:
                if sig == signal.SIGHUP:
                    if not state.draining:
                        await reload_from_file(server, path)
                    continue
                if sig == signal.SIGUSR2:
                    if not state.draining and not state.upgrading:
                        log.info("received SIGUSR2: upgrading (handing the listeners to a new process)")
                        nursery.start_soon(_upgrade, server, nursery, state, successor, on_successor)
                    continue
                if not state.draining:
                    state.draining = True
                    log.info("received %s: draining", signal.Signals(sig).name)
                    nursery.start_soon(_drain_then_stop, server, nursery)
                    continue
                log.warning("received %s again: stopping now", signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                break


class _State:
    __slots__ = ("draining", "upgrading")

    def __init__(self) -> None:
        self.draining = False
        self.upgrading = False


async def _upgrade(
    server: Server,
    nursery: trio.Nursery,
    state: _State,
    successor: list[str] | None,
    on_successor: Callable[[int], None] | None,
) -> None:
    """Hand the listeners over (handover.py); once the successor accepts, drain and stop."""
    state.upgrading = True
    try:
        listeners, admin = server.listening_fds()
        path = handover.handover_path(os.getpid())
        env = {**os.environ, SECRET_ENV: server.snapshot.secret.hex()}  # its cookies stay valid in the successor
        done = await handover.send_listeners(listeners, admin, path=path, successor=successor, env=env)
    finally:
        state.upgrading = False
    if done is False or state.draining:
        return
    if isinstance(done, trio.Process) and on_successor is not None:
        on_successor(done.pid)
    log.info("upgrade: the successor accepts on every listener; draining this process (pid %d)", os.getpid())
    state.draining = True
    server.stop_admin()
    await _drain_then_stop(server, nursery)


def _shared_secret() -> bytes | None:
    """The affinity cookies' key the supervisor gave its workers (None: this process makes one),
    so a cookie set by one worker is valid in all of them."""
    value = os.environ.get(SECRET_ENV)
    return bytes.fromhex(value) if value else None


async def reload_from_file(server: Server, path: Path) -> bool:
    """Re-read, validate and apply `path`; on any problem log it and keep the running config."""
    log.info("reloading %s", path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for key, msg in exc.problems:
            log.error("reload rejected, keeping the running config: %s: %s: %s", exc.source, key or "<top>", msg)
        _note_reload(server, ok=False)
        return False
    try:
        await server.reload(config)
    except ReloadError as exc:
        log.error("reload rejected, keeping the running config: %s: %s", path, exc)
        _note_reload(server, ok=False)
        return False
    _note_reload(server, ok=True)
    return True


def _note_reload(server: Server, *, ok: bool) -> None:
    metrics = getattr(server, "metrics", None)
    if metrics is None:
        return
    if ok:
        metrics.reload_ok(server.snapshot.config)
    else:
        metrics.reload_failed()


async def _drain_then_stop(server: Server, nursery: trio.Nursery) -> None:
    await server.shutdown()
    nursery.cancel_scope.cancel()


# --- several worker processes --------------------------------------------------------------


class Supervisor:
    """The main process when `workers > 1`: starts, restarts and signals the workers."""

    def __init__(self, count: int, config_path: str | Path, argv_tail: list[str]) -> None:
        self.config_path = config_path
        self.cmd = [sys.executable, "-m", "wsproxy", "run", "-c", str(config_path), *argv_tail]
        self.procs: list[trio.Process | None] = [None] * count
        self.stopping = False
        self.restarts = 0
        self.env = {**os.environ, SECRET_ENV: os.urandom(32).hex()}  # the workers' shared affinity key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)
            with trio.open_signal_receiver(*sigs) as signals:
                async with trio.open_nursery() as nursery:
                    for i in range(len(self.procs)):
                        nursery.start_soon(self._keep_running, i)
                    log.info("wsproxy supervisor ready: %d workers (pid %d)", len(self.procs), os.getpid())
                    task_status.started()
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            self._reload()
                        elif sig == signal.SIGUSR2:
                            if not self.stopping and self._valid():
                                log.info("received SIGUSR2: upgrading %d workers", len(self.procs))
                                for i in range(len(self.procs)):
                                    nursery.start_soon(self._upgrade_worker, i)
                        elif not self.stopping:
                            log.info("received %s: stopping %d workers", signal.Signals(sig).name, len(self.procs))
                            self.stopping = True
                            self._forward(sig)
                            nursery.start_soon(self._exit_when_workers_gone, nursery)
                        else:
                            self._forward(sig)  # a second SIGINT/SIGTERM: the workers stop at once
        finally:
            for proc in self.procs:  # never leave a worker behind, whatever ended the supervisor
                if proc is not None and proc.returncode is None:
                    proc.kill()

    def _valid(self, what: str = "reload") -> bool:
        try:
            load_config(self.config_path)  # a bad file is logged once, here; the workers keep theirs
        except ConfigError as exc:
            for key, msg in exc.problems:
                log.error("%s rejected, keeping the running config: %s: %s: %s", what, exc.source, key or "<top>", msg)
            return False
        return True

    def _reload(self) -> None:
        if not self._valid():
            return
        log.info("reloading %d workers", len(self.procs))
        self._forward(signal.SIGHUP)

    async def _upgrade_worker(self, index: int) -> None:
        """Worker `index` hands its listeners to a new worker started here; until the new one
        accepts, the old one serves, and if the new one fails the old one stays."""
        old = self.procs[index]
        if old is None or old.returncode is not None:
            return
        old.send_signal(signal.SIGUSR2)  # it waits for its successor at handover_path(its pid)
        cmd = [*self.cmd, "--worker", str(index), "--inherit", handover.handover_path(old.pid)]
        new = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        log.info("worker %d: successor started (pid %d) to take over from pid %d", index, new.pid, old.pid)
        self.procs[index] = new
        await new.wait()
        if old.returncode is None and self.procs[index] is new:
            log.error(
                "worker %d: the successor (pid %d) exited with %d; pid %d goes on",
                index,
                new.pid,
                new.returncode,
                old.pid,
            )
            self.procs[index] = old

    def _forward(self, sig: int) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(sig)

    async def _keep_running(self, index: int) -> None:
        backoff = RESTART_BACKOFF_MIN
        while not self.stopping:
            started = trio.current_time()
            # own session: a terminal's Ctrl-C reaches the supervisor only, which passes it on once
            cmd = [*self.cmd, "--worker", str(index)]
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
            self.procs[index] = proc
            if self.stopping:  # the stop signal went out while this one was starting
                proc.send_signal(signal.SIGTERM)
            log.info("worker %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            while (current := self.procs[index]) is not None and current is not proc:  # replaced by an upgrade
                proc = current
                code = await proc.wait()
            if self.stopping:
                log.info("worker %d (pid %d) exited with %d", index, proc.pid, code)
                return
            if trio.current_time() - started >= HEALTHY_AFTER:
                backoff = RESTART_BACKOFF_MIN
            log.error("worker %d (pid %d) died with %d: restarting in %gs", index, proc.pid, code, backoff)
            self.restarts += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _exit_when_workers_gone(self, nursery: trio.Nursery) -> None:
        for proc in self.procs:
            if proc is not None:
                await proc.wait()
        nursery.cancel_scope.cancel()
