"""Per-hop permessage-deflate (RFC 7692) for the inspect relay: zlib with wsproto's parameters.

The inspect relay re-frames every message, so each hop (client-proxy, proxy-backend) compresses
on its own terms: wsproto negotiates each hop's extension during the handshakes and its
`PerMessageDeflate` carries the parameters (window bits, context takeover, per direction); zlib
does the work here. Inflating is where a peer can hurt the proxy: deflate expands up to ~1000x,
so a 64 KiB read could become 64 MiB in memory (a compression bomb). `HopDeflate.inflate`
therefore takes compressed input a slice (`DEFLATE_SLICE`) at a time and stops once its output
would pass the room the caller has; what it did not take waits, and the caller feeds it again
once the other peer's queue has drained. Pure: no I/O, no clock.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from wsproto.extensions import Extension, PerMessageDeflate

from wsproxy.protocol.frames import INVALID_DATA, ProtocolError

DEFLATE_SLICE = 1024  # compressed bytes inflated at once: at most ~1 MiB out
_SYNC_TAIL = b"\x00\x00\xff\xff"  # the end of a compressed message, stripped on the wire


def negotiated_deflate(extensions: Sequence[Extension] | None) -> PerMessageDeflate | None:
    """The hop's permessage-deflate, if wsproto enabled it; any other extension is refused."""
    deflate = None
    for ext in extensions or ():
        if not ext.enabled():
            continue
        if not isinstance(ext, PerMessageDeflate) or deflate is not None:
            raise TypeError(f"unsupported extension {ext!r}")
        deflate = ext
    return deflate


class HopDeflate:
    """permessage-deflate on one hop: inflates what its peer sends, deflates what goes to it.

    `client`: the peer is the client (the proxy is its server), so its messages use the client's
    window and context-takeover parameters; a backend's use the server's.
    """

    __slots__ = ("_in_bits", "_in_reset", "_out_bits", "_out_reset", "_zin", "_zout")

    def __init__(self, negotiated: PerMessageDeflate, *, client: bool) -> None:
        client_params = (negotiated.client_max_window_bits, negotiated.client_no_context_takeover)
        server_params = (negotiated.server_max_window_bits, negotiated.server_no_context_takeover)
        (self._in_bits, self._in_reset), (self._out_bits, self._out_reset) = (
            (client_params, server_params) if client else (server_params, client_params)
        )
        self._zin: zlib._Decompress | None = None
        self._zout: zlib._Compress | None = None

    def inflate(self, data: bytes, *, room: int, ends_message: bool) -> tuple[bytes, int]:
        """Inflate compressed payload `data` while the output stays under `room` bytes.

        Returns (plain, used): `data[:used]` was inflated, the rest must be fed again later.
        When all of `data` was used and `ends_message`, the message is finished too (and the
        inflater reset without context takeover). Bad compressed data raises ProtocolError 1007.
        """
        z = self._zin
        if z is None:
            z = self._zin = zlib.decompressobj(-self._in_bits)
        k = len(data)
        parts: list[bytes] = []
        out = used = 0
        try:
            while used < k and out < room:
                got = z.decompress(data[used : used + DEFLATE_SLICE] if k > DEFLATE_SLICE else data)
                used += DEFLATE_SLICE
                if got:
                    parts.append(got)
                    out += len(got)
            if used > k:
                used = k
            if ends_message and used == k:
                parts.append(z.decompress(_SYNC_TAIL) + z.flush())
                if self._in_reset:
                    self._zin = None
        except zlib.error:
            raise ProtocolError(INVALID_DATA, "error in extension") from None
        return (parts[0] if len(parts) == 1 else b"".join(parts)), used

    def deflate(self, plain: bytes, *, ends_message: bool) -> bytes:
        """Compress the next piece of a message going to this hop's peer."""
        z = self._zout
        if z is None:
            z = self._zout = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self._out_bits)
        data = z.compress(plain)
        if ends_message:
            data = (data + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
            if self._out_reset:
                self._zout = None
        return data

    def stop_inflating(self) -> None:
        """Nothing more will be read from the peer: free the inflater's window."""
        self._zin = None
