"""Echo backends for relay_bench.py: picows on uvloop, compiled, so the backend is never the
proxy's bottleneck.

Every data frame is echoed as one frame with the same opcode and FIN bit (so a relay that
fragments a message, like the inspect path, gets its fragments back and the client still sees
one message end per message). Serves `--count` plain listeners and, with `--cert/--key`, as many
TLS listeners, all on 127.0.0.1 ephemeral ports, and prints them as one JSON line:
`{"plain": [ports], "tls": [ports], "pid": N}`. It exits when stdin reaches EOF (its parent
went away) or after `--max-seconds`, so it never outlives the benchmark.

    python benchmarks/echo_server.py --count 2 --cert cert.pem --key key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Echo(WSListener):
    """One connection: echo data frames as they are, answer a close and hang up."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif kind is not WSMsgType.PING and kind is not WSMsgType.PONG:  # picows answers pings itself
            transport.send(kind, frame.get_payload_as_memoryview(), frame.fin, frame.rsv1)


def _listener(_request: WSUpgradeRequest) -> Echo:
    return Echo()


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(count: int, ctx: ssl.SSLContext | None, max_seconds: float) -> None:
    servers = []
    ports: dict[str, list[int]] = {"plain": [], "tls": []}
    for kind, ssl_ctx in (("plain", None), ("tls", ctx)):
        if kind == "tls" and ssl_ctx is None:
            continue
        for _ in range(count):
            server = await ws_create_server(
                _listener,
                "127.0.0.1",
                0,
                ssl=ssl_ctx,
                backlog=4096,
                max_frame_size=1 << 20,
                websocket_handshake_timeout=10,
            )
            servers.append(server)
            ports[kind].append(server.sockets[0].getsockname()[1])
    print(json.dumps({**ports, "pid": os.getpid()}), flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_stdin_closed(), max_seconds)
    for server in servers:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2, help="listeners of each kind")
    p.add_argument("--cert", help="PEM certificate chain for the TLS listeners")
    p.add_argument("--key", help="PEM key for the TLS listeners")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long in any case")
    args = p.parse_args()
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["http/1.1"])
    uvloop.run(serve(args.count, ctx, args.max_seconds))


if __name__ == "__main__":
    main()
