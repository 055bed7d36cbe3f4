"""Runs a `Server` under signals: SIGINT/SIGTERM drain and exit, a second one cuts at once."""

from __future__ import annotations

import logging
import signal

import trio

from wsproxy.config import Config
from wsproxy.server import Server

log = logging.getLogger("wsproxy")


async def run(config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(server.serve)
            log.info("wsproxy ready (config %s, sha256 %s)", config.source, config.digest[:12])
            task_status.started(server)
            async for sig in signals:
                log.info("received %s: draining", signal.Signals(sig).name)
                nursery.start_soon(_drain_then_stop, server, nursery)
                break
            async for sig in signals:
                log.warning("received %s again: stopping now", signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                break


async def _drain_then_stop(server: Server, nursery: trio.Nursery) -> None:
    await server.shutdown()
    nursery.cancel_scope.cancel()
