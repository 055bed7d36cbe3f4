"""The upstream hop's fixed HTTP heads without h11: the request head as bytes, the backend's 101 read directly.

Every session sends the backend one GET with an Upgrade and, nearly always, gets one small `101
Switching Protocols` back. Through h11 both cost a state machine, an event object validated header
by header, and a generic reader (about a tenth of a plain handshake's CPU, docs/performance.md).
Here the request head is formatted as h11 would write it (Host first, names as given), and a
101 is parsed with h11's own grammar (`status-line`, `header-field`, OWS stripped), but only in
its plain shape: HTTP/1.1, CRLF line ends, no folded lines, no Content-Length or
Transfer-Encoding. Anything else (another status, an unusual but legal 101, a malformed head) is
`None`, and the caller hands the bytes to h11, which stays the one parser of every other answer
and the judge of malformed ones. A hypothesis property (tests/unit/test_http_head.py) holds the
two to each other: whatever 101 this accepts, h11 reads with the same status, reason and headers;
whatever head this writes, h11 writes byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# h11's grammar (h11/_abnf.py), compiled once: a header line is a token, a colon, optional
# whitespace, a value of non-blank characters separated by spaces or tabs, optional whitespace.
_FIELD = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_REASON = re.compile(rb"(?:[ \t]|[^\x00\s])*")
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 sees the blank line that ends a head
_STATUS_101 = b"HTTP/1.1 101"
# A 101 with these is legal but not plain (h11 checks their values): left to h11.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Switching:
    """A backend's 101, read without h11: what check_backend_101 needs (names as sent, values
    without surrounding whitespace, as h11 gives them in `raw_items()`)."""

    headers: tuple[tuple[bytes, bytes], ...]
    reason: bytes
    status_code: int = 101
    http_version: bytes = b"1.1"

    def raw_items(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.headers


def head_end(data: bytes | bytearray, start: int = 0) -> int:
    """The length of the response head at the start of `data` (through its blank line), or -1
    while it is incomplete; the same blank line h11 looks for. `start`: where a blank line may
    begin at the earliest (a caller that searched `data` before it grew passes its old length
    less 2, so a head read in small pieces is not searched from the start each time)."""
    found = _HEAD_END.search(data, max(0, start))
    return -1 if found is None else found.end()


def may_be_101(data: bytes | bytearray) -> bool:
    """The bytes read so far can still become a plain 101 (else h11 reads them now, and says at
    once when they are no HTTP answer at all)."""
    return data[: len(_STATUS_101)] == _STATUS_101[: len(data)]


def parse_101(head: bytes | bytearray) -> Switching | None:
    """`head` (up to and including its blank line) as a plain `HTTP/1.1 101`, or None: not one,
    or not plain; h11 reads it then."""
    if not head.startswith(_STATUS_101) or not head.endswith(b"\r\n\r\n"):
        return None
    lines = bytes(head[:-4]).split(b"\r\n")
    rest = lines[0][len(_STATUS_101) :]
    if rest:
        if rest[:1] != b" " or _REASON.fullmatch(rest, 1) is None:
            return None
        rest = rest[1:]
    headers = []
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)  # a folded line, a bare CR or LF, a bad name: no match
        if field is None:
            return None
        name = field.group(1)
        if name.lower() in _FRAMING:
            return None
        headers.append((name, field.group(2)))
    return Switching(tuple(headers), rest)


def encode_request(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head without a body, as h11 writes it. The caller vouches for the
    values (they come from a head h11 parsed, or are the proxy's own)."""
    return _head(b"%s %s HTTP/1.1\r\n" % (method, target), headers)


def encode_response(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 informational response head (a 101), as h11 writes it."""
    return _head(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)


def _head(first: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The first line, then the header lines as h11 orders them (Host first, then the rest in
    order, names as given), then the blank line."""
    host = []
    out = [first]
    for name, value in headers:
        line = b"%s: %s\r\n" % (name, value)
        if name.lower() == b"host":
            host.append(line)
        else:
            out.append(line)
    out[1:1] = host
    out.append(b"\r\n")
    return b"".join(out)
