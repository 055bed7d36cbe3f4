"""Binary upgrades without refused connections: the running process hands its listening sockets
to its successor over a Unix socket (SCM_RIGHTS), and stops accepting only once the successor
accepts on them.

`wsproxy upgrade -c FILE` (or SIGUSR2, as nginx) makes the running process the *sender*: it
listens on a Unix socket (`handover_path(its pid)`), starts its successor (`wsproxy run
--inherit PATH`, or with `workers: N` the supervisor starts each worker's successor), sends it
every listening socket (the admin listener's too) with `socket.send_fds`, and waits for the
line "ready": the successor is accepting. Only then does the old process stop accepting (its
copies of the descriptors close; the sockets stay open in the successor, so a connect in the
kernel's queue is accepted by one of the two, never refused) and drain its sessions with 1001
over `shutdown.drain_window`. A successor that fails (a bad config, a crash at start, no answer
within UPGRADE_READY_TIMEOUT) is stopped, logged, and the old process goes on serving as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass

import trio

from wsproxy.config import defaults

log = logging.getLogger("wsproxy.upgrade")

MAX_FDS = 1024  # listening sockets one handover may carry
READY = b"ready\n"
MAX_MESSAGE = 1 << 16


def handover_path(pid: int) -> str:
    """Where the process `pid` waits for its successor (a worker's successor finds it by pid)."""
    return os.path.join(tempfile.gettempdir(), f"wsproxy-handover-{pid}.sock")


@dataclass(slots=True)
class Inherited:
    """What a successor received: listening sockets by listener key, and the admin listener's."""

    listeners: dict[str, list[socket.socket]]
    admin: list[socket.socket]
    channel: trio.socket.SocketType  # to say "ready" on

    def take(self, key: str) -> list[socket.socket] | None:
        return self.listeners.pop(key, None)

    def close_unused(self, *, admin_used: bool) -> None:
        """Sockets the successor's config no longer has a listener for (nor an admin listener):
        closed here (the old process closes its copies as it stops), so they stop listening."""
        for socks in [*self.listeners.values(), [] if admin_used else self.admin]:
            for s in socks:
                s.close()
        self.listeners.clear()

    async def ready(self) -> None:
        with contextlib.suppress(OSError):
            await self.channel.send(READY)
        self.channel.close()


def _dup_blocking(sock: trio.socket.SocketType, timeout: float) -> socket.socket:
    """A blocking stdlib copy of a trio socket, for socket.send_fds / recv_fds in a thread."""
    std = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
    std.settimeout(timeout)
    return std


async def send_listeners(
    listeners: dict[str, list[int]],
    admin: list[int],
    *,
    path: str,
    successor: list[str] | None,
    timeout: float = defaults.UPGRADE_READY_TIMEOUT,
    env: dict[str, str] | None = None,
) -> trio.Process | bool:
    """The old process's half. Listen on `path`, start `successor` (a command, or None when
    someone else starts it), send it the descriptors, wait for "ready". Returns the successor
    process (or True when someone else started it) once it accepts; False if it failed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proc: trio.Process | None = None
    ok = False
    try:
        await server.bind(path)
        server.listen(1)
        if successor is not None:
            proc = await trio.lowlevel.open_process(
                [*successor, "--inherit", path], stdin=subprocess.DEVNULL, start_new_session=True, env=env
            )
            log.info("upgrade: started the successor (pid %d); handing over over %s", proc.pid, path)
        with trio.move_on_after(timeout) as waited:
            async with trio.open_nursery() as nursery:
                if proc is not None:
                    nursery.start_soon(_cancel_when_exits, proc, nursery.cancel_scope)
                conn, _ = await server.accept()
                with conn:
                    fds = [fd for socks in listeners.values() for fd in socks] + admin
                    meta = json.dumps(
                        {"listeners": [[key, len(socks)] for key, socks in listeners.items()], "admin": len(admin)}
                    ).encode()
                    std = _dup_blocking(conn, timeout)
                    try:
                        await trio.to_thread.run_sync(socket.send_fds, std, [meta], fds)
                    finally:
                        std.close()
                    answer = await conn.recv(len(READY))
                ok = answer == READY
                nursery.cancel_scope.cancel()
        if not ok:
            why = "no answer in time" if waited.cancelled_caught else "it exited or hung up before accepting"
            if proc is not None and proc.returncode is not None:
                why = f"it exited with {proc.returncode}"
            log.error("upgrade failed: the successor did not take over (%s); this process goes on serving", why)
        return (proc if proc is not None else True) if ok else False
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if not ok and proc is not None and proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proc.wait()


async def _cancel_when_exits(proc: trio.Process, scope: trio.CancelScope) -> None:
    await proc.wait()
    scope.cancel()


async def receive_listeners(path: str, timeout: float = defaults.UPGRADE_READY_TIMEOUT) -> Inherited:
    """The successor's half: connect to `path` (retrying while the old process sets it up) and
    take the descriptors. Raises OSError if there is nothing to take."""
    with trio.fail_after(timeout):
        while True:
            channel = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await channel.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                channel.close()
                await trio.sleep(0.05)
        std = _dup_blocking(channel, timeout)
        try:
            meta, fds, _flags, _addr = await trio.to_thread.run_sync(socket.recv_fds, std, MAX_MESSAGE, MAX_FDS)
        finally:
            std.close()
    doc = json.loads(meta)
    socks = [socket.socket(fileno=fd) for fd in fds]
    inherited = Inherited(listeners={}, admin=[], channel=channel)
    at = 0
    for key, count in doc["listeners"]:
        inherited.listeners[key] = socks[at : at + count]
        at += count
    inherited.admin = socks[at : at + doc["admin"]]
    for s in socks:
        s.setblocking(False)
    log.info("upgrade: took over %d listening socket(s) from the previous process", len(socks))
    return inherited
