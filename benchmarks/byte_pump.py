"""The yardstick: a minimal trio TCP byte pump, what a trio relay costs when it does nothing per byte.

It parses nothing (the client's Upgrade and the backend's 101 pass as bytes like everything
else), so it is the ceiling for a relay built on trio's stream methods: `receive_some` and
`send_all` on `trio.SocketStream`, and `trio.SSLStream` for TLS. Per session the handler task
pumps client to backend itself and one more task pumps back (two tasks, the fewest a nursery
per session allows). Backends are taken round robin.

Listens on 127.0.0.1 ephemeral ports, prints `{"plain": port, "tls": port, "pid": N}` and
exits when stdin reaches EOF (its parent went away) or after `--max-seconds`.

    python benchmarks/byte_pump.py --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import ssl
from collections.abc import Iterator
from functools import partial

import trio

RECEIVE_BYTES = 65536


async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    """Copy until EOF or a broken peer."""
    try:
        while data := await source.receive_some(RECEIVE_BYTES):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def session(client: trio.abc.Stream, backends: Iterator[tuple[str, int]]) -> None:
    host, port = next(backends)
    try:
        backend = await trio.open_tcp_stream(host, port)
    except OSError:
        await trio.aclose_forcefully(client)
        return
    async with client, backend, trio.open_nursery() as nursery:

        async def back() -> None:
            await pump(backend, client)
            nursery.cancel_scope.cancel()  # either direction ending ends the session

        nursery.start_soon(back)
        await pump(client, backend)
        nursery.cancel_scope.cancel()


async def _stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(4096):
        pass


async def serve(backends: list[tuple[str, int]], ctx: ssl.SSLContext | None, max_seconds: float) -> None:
    ring = itertools.cycle(backends)
    handler = partial(session, backends=ring)

    async def tls_handler(stream: trio.SocketStream) -> None:
        assert ctx is not None
        await handler(trio.SSLStream(stream, ctx, server_side=True, https_compatible=True))

    async with trio.open_nursery() as nursery:
        plain = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1", backlog=4096))
        ports = {"plain": plain[0].socket.getsockname()[1], "tls": None, "pid": os.getpid()}
        if ctx is not None:
            tls = await nursery.start(partial(trio.serve_tcp, tls_handler, 0, host="127.0.0.1", backlog=4096))
            ports["tls"] = tls[0].socket.getsockname()[1]
        print(json.dumps(ports), flush=True)
        with trio.move_on_after(max_seconds):
            await _stdin_closed()
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", required=True, help="host:port; repeat for round robin")
    p.add_argument("--cert", help="PEM certificate chain: also serve TLS (trio.SSLStream)")
    p.add_argument("--key", help="PEM key for --cert")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args()
    backends = [(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in args.backend]
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["http/1.1"])
    trio.run(serve, backends, ctx, args.max_seconds)


if __name__ == "__main__":
    main()
