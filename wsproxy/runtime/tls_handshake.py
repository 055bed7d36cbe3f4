"""The server side of a client's TLS handshake, run on its own inside the session's deadline.

The shell's TLS stream (streams.FastTLSStream, also after a PROXY header) would run the
handshake lazily on the first read or write. Run lazily, a client that opens TCP
and stays silent is cut when the head's deadline passes, but then the 408 the session answers
waits for a handshake that never comes for another `timeouts.close`, and the log claims a 408
that was never sent. Running the handshake first, under the same deadline as the request head,
makes one deadline (`timeouts.handshake`) cover both, and tells the session whether it can
answer at all.
"""

from __future__ import annotations

from wsproxy.runtime.streams import FastTLSStream, Stream


async def finish(stream: Stream) -> None:
    """Complete the TLS handshake of a client stream (nothing for plain TCP). Raises
    trio.BrokenResourceError when it fails; the caller bounds the wait."""
    if type(stream) is FastTLSStream:  # (exact: isinstance against trio's ABC-based streams costs more)
        await stream.handshake()
